// Plain Java (no Android classes; JSON through org.json, which Android has built in): compiled and tested on any
// JVM, used by the app as a project dependency.
plugins {
    `java-library`
}

java {
    sourceCompatibility = JavaVersion.VERSION_11
    targetCompatibility = JavaVersion.VERSION_11
}

// org.json (JSONObject, JSONArray, JSONTokener) is part of the Android platform, so the app gets it from Android
// itself and must not package a copy: compileOnly, not implementation. On the JVM the module compiles and tests
// against Android's own org.json extracted from the SDK (the same API and behavior as on the phone: checked
// JSONException, objects keep their key order); tests/test_android_demo.py uses Debian's libandroid-json-java
// (/usr/share/java/com.android.json.jar), the same code. Not org.json:json from json.org: it orders keys
// differently and is not what runs on the phone.
val androidJson = "com.vaadin.external.google:android-json:0.0.20131108.vaadin1"

dependencies {
    compileOnly(androidJson)
    testImplementation(androidJson)
}
