// Plain Java (no Android classes): compiled and tested on any JVM, used by the app as a project dependency.
plugins {
    `java-library`
}

java {
    sourceCompatibility = JavaVersion.VERSION_11
    targetCompatibility = JavaVersion.VERSION_11
}
