// The firstkit demo app: Kotlin UI, ExecuTorch Android runtime, JNI bridge (src/main/cpp) over the shared C++
// runner core in ../../device_bench/runner/core, built with CMake through the NDK.
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val executorchVersion = providers.gradleProperty("firstkit.executorchVersion").getOrElse("1.5.1")
val executorchMode = providers.gradleProperty("firstkit.executorchMode").getOrElse("aar")
val executorchRoot = providers.gradleProperty("firstkit.executorchRoot").getOrElse("")

/** Headers of the same ExecuTorch release: the gradle property, else the pip wheel's include dir. */
fun executorchInclude(): String {
    val configured = providers.gradleProperty("firstkit.executorchInclude").getOrElse("")
    if (configured.isNotBlank()) return configured
    return try {
        val p = ProcessBuilder("python3", "-c",
            "import executorch,os;print(os.path.join(list(executorch.__path__)[0],'include'))")
            .redirectErrorStream(true).start()
        val out = p.inputStream.bufferedReader().readText().trim()
        if (p.waitFor() == 0) out else ""
    } catch (e: Exception) {
        ""
    }
}

// The AAR itself, to take its libexecutorch.so for the native link (the app also depends on it normally).
val executorchAar: Configuration by configurations.creating { isTransitive = false }
val aarJniDir = layout.buildDirectory.dir("executorch-aar-jni")

val extractExecutorchJni by tasks.registering(Copy::class) {
    description = "Unpacks jni/<abi>/libexecutorch.so from the executorch-android AAR for the CMake link."
    from({ executorchAar.map { zipTree(it) } }) {
        include("jni/**")
        eachFile { path = path.removePrefix("jni/") }
        includeEmptyDirs = false
    }
    into(aarJniDir)
}

android {
    namespace = "org.firstkit.demo"
    compileSdk = 35
    ndkVersion = "27.2.12479018"

    defaultConfig {
        applicationId = "org.firstkit.demo"
        minSdk = 28
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk {
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
        externalNativeBuild {
            cmake {
                arguments += listOf(
                    "-DANDROID_STL=c++_shared",
                    "-DFIRSTKIT_EXECUTORCH=$executorchMode",
                    "-DEXECUTORCH_AAR_JNI_DIR=${aarJniDir.get().asFile.absolutePath}",
                    "-DEXECUTORCH_INCLUDE_DIR=${executorchInclude()}",
                    "-DEXECUTORCH_ROOT=$executorchRoot",
                )
                cppFlags += listOf("-O2", "-fexceptions", "-frtti")
            }
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            proguardFiles(getDefaultProguardFile("proguard-android-optimize.txt"), "proguard-rules.pro")
            // Local testing builds: sign release with the debug key so `installRelease` works without a keystore.
            signingConfig = signingConfigs.getByName("debug")
        }
    }

    externalNativeBuild {
        cmake {
            path = file("src/main/cpp/CMakeLists.txt")
            version = "3.31.6"
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    packaging {
        // libexecutorch.so comes from the AAR; keep one copy per ABI.
        jniLibs.pickFirsts += listOf("**/libexecutorch.so", "**/libc++_shared.so")
    }
}

dependencies {
    implementation(project(":logic"))
    implementation("org.pytorch:executorch-android:$executorchVersion")
    executorchAar("org.pytorch:executorch-android:$executorchVersion@aar")
}

// CMake needs the unpacked .so before it configures.
tasks.configureEach {
    if (name.startsWith("configureCMake") || name.startsWith("buildCMake")) dependsOn(extractExecutorchJni)
}
