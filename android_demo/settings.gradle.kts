// firstkit Android demo: the app (Kotlin UI + JNI bridge over device_bench/runner/core) and its plain-Java logic.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "firstkit-android-demo"
include(":app", ":logic")
