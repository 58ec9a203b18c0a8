package org.firstkit.demo

import java.io.File
import org.firstkit.demo.logic.BpeTokenizer
import org.firstkit.demo.logic.BundleManifest
import org.firstkit.demo.logic.MaskFormat
import org.firstkit.demo.logic.NativeRunner
import org.firstkit.demo.logic.RunResult

/**
 * A loaded bundle: its checked manifest, the native runner (shared C++ core through JNI) and the prompt encoder.
 * Not thread-safe: the activity calls it from one background executor.
 */
class FirstSession private constructor(
    val dir: File,
    val manifest: BundleManifest,
    private val runner: NativeRunner,
    private val tokenizer: BpeTokenizer?
) : AutoCloseable {

    companion object {
        init {
            // libexecutorch.so (from the executorch-android AAR) first: libfirstkit_jni.so links against it.
            System.loadLibrary("executorch")
            System.loadLibrary("firstkit_jni")
        }

        /** Forces the native libraries to load (the companion's initializer runs once). */
        fun ensureLoaded() = Unit

        /** Checks the manifest (schema, sizes, sha256) then loads model.pte; throws with a one-line message. */
        fun open(dir: File, threads: Int = 0): FirstSession {
            val manifest = BundleManifest.read(dir, true)
            if (!manifest.hasExecutorch()) {
                throw IllegalArgumentException("$dir: this bundle has no ExecuTorch program (ONNX-only)")
            }
            val tokDir = File(dir, "tokenizer")
            val tokenizer = if (File(tokDir, "tokenizer.json").isFile) BpeTokenizer.fromDirectory(tokDir) else null
            // Hashes were just checked in Java: the core re-checks sizes only.
            val runner = NativeRunner.load(dir.absolutePath, threads, false)
            return FirstSession(dir, manifest, runner, tokenizer)
        }
    }

    val numLayers: Int get() = manifest.numLayers

    /**
     * Prompt text to token ids like first-run: a user turn of the chat template the export rendered into the
     * manifest (chat_template), or the plain text when the bundle has none.
     */
    fun encode(prompt: String): LongArray {
        val tok = tokenizer ?: throw IllegalStateException("bundle has no tokenizer/tokenizer.json")
        return manifest.promptFormat.encode(tok, prompt)
    }

    /**
     * Greedy generation. [routed] = false forces every layer to run (the A/B baseline); [onText] receives the
     * decoded text after each token and returns false to stop.
     */
    fun generate(prompt: LongArray, maxNewTokens: Int, routed: Boolean, onText: (String) -> Boolean): RunResult {
        val override = if (routed) null else MaskFormat.parseSpec("all", numLayers, manifest.protectedLayers)
        val json = runner.generate(prompt, maxNewTokens, override, true) { _, _, text -> onText(text) }
        return RunResult.parse(json)
    }

    override fun close() = runner.close()
}
