package org.firstkit.demo

import android.app.Activity
import android.content.Intent
import android.os.Bundle
import android.os.Handler
import android.os.Looper
import android.widget.Button
import android.widget.EditText
import android.widget.Switch
import android.widget.TextView
import java.io.File
import java.util.Locale
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicBoolean
import org.firstkit.demo.logic.MaskFormat
import org.firstkit.demo.logic.RunResult

/**
 * The interactive demo: load a bundle (pushed with adb or picked), check its manifest, type a prompt, watch the
 * output stream, see which layers the prompt skipped, prefill ms and decode tok/s, and compare routed against
 * all layers with the A/B switch.
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()
    private val main = Handler(Looper.getMainLooper())
    private val stop = AtomicBoolean(false)
    private var session: FirstSession? = null
    private var running = false
    private var lastRouted: RunResult? = null
    private var lastAll: RunResult? = null

    private lateinit var bundlePath: EditText
    private lateinit var manifestStatus: TextView
    private lateinit var prompt: EditText
    private lateinit var routed: Switch
    private lateinit var maxTokens: EditText
    private lateinit var generate: Button
    private lateinit var output: TextView
    private lateinit var skipped: TextView
    private lateinit var stats: TextView
    private lateinit var ab: TextView

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        bundlePath = findViewById(R.id.bundle_path)
        manifestStatus = findViewById(R.id.manifest_status)
        prompt = findViewById(R.id.prompt)
        routed = findViewById(R.id.routed_switch)
        maxTokens = findViewById(R.id.max_tokens)
        generate = findViewById(R.id.generate_button)
        output = findViewById(R.id.output)
        skipped = findViewById(R.id.skipped_view)
        stats = findViewById(R.id.stats_view)
        ab = findViewById(R.id.ab_view)

        BundleStore.list(this).firstOrNull()?.let { bundlePath.setText(it.name) }
        findViewById<Button>(R.id.load_button).setOnClickListener { load(BundleStore.resolve(this, bundlePath.text.toString().trim())) }
        findViewById<Button>(R.id.pick_button).setOnClickListener {
            startActivityForResult(Intent(Intent.ACTION_OPEN_DOCUMENT_TREE), REQUEST_TREE)
        }
        routed.setOnCheckedChangeListener { _, on -> routed.setText(if (on) R.string.routed else R.string.all_layers) }
        generate.setOnClickListener { if (running) stop.set(true) else runGeneration() }
    }

    override fun onActivityResult(requestCode: Int, resultCode: Int, data: Intent?) {
        super.onActivityResult(requestCode, resultCode, data)
        val tree = data?.data
        if (requestCode != REQUEST_TREE || resultCode != RESULT_OK || tree == null) return
        manifestStatus.setText(R.string.copying)
        worker.execute {
            try {
                val dir = BundleStore.importTree(this, tree)
                main.post {
                    bundlePath.setText(dir.name)
                    load(dir)
                }
            } catch (e: Throwable) {  // also UnsatisfiedLinkError: the message goes to the status line
                main.post { showError(e) }
            }
        }
    }

    private fun load(dir: File) {
        manifestStatus.text = getString(R.string.loading, dir.path)
        generate.isEnabled = false
        worker.execute {
            try {
                session?.close()
                session = null
                val s = FirstSession.open(dir)
                session = s
                lastRouted = null
                lastAll = null
                main.post {
                    manifestStatus.setTextColor(getColor(R.color.ok))
                    manifestStatus.text = "manifest OK: ${s.manifest.summary()}"
                    generate.isEnabled = true
                    ab.text = ""
                }
            } catch (e: Throwable) {  // also UnsatisfiedLinkError: the message goes to the status line
                main.post { showError(e) }
            }
        }
    }

    private fun runGeneration() {
        val s = session ?: return
        val text = prompt.text.toString()
        val maxNew = maxTokens.text.toString().toIntOrNull()?.coerceIn(1, 4096) ?: 64
        val isRouted = routed.isChecked
        running = true
        stop.set(false)
        generate.setText(R.string.stop)
        output.setText(R.string.generating)
        worker.execute {
            try {
                val ids = s.encode(text)
                val result = s.generate(ids, maxNew, isRouted) { partial ->
                    main.post { output.text = partial }
                    !stop.get()
                }
                if (isRouted) lastRouted = result else lastAll = result
                main.post { showResult(result) }
            } catch (e: Throwable) {  // also UnsatisfiedLinkError: the message goes to the status line
                main.post { showError(e) }
            } finally {
                main.post {
                    running = false
                    generate.setText(R.string.generate)
                }
            }
        }
    }

    private fun showResult(r: RunResult) {
        output.text = r.text
        skipped.text = MaskFormat.describe(r.mask)
        stats.text = r.statsLine()
        ab.text = abLine()
    }

    private fun abLine(): String {
        val a = lastRouted
        val b = lastAll
        fun line(name: String, r: RunResult?) = if (r == null) "$name: (not run yet)" else
            String.format(Locale.US, "%s: prefill %.1f ms, decode %.1f tok/s, skipped %d/%d", name, r.prefillMs,
                r.tokensPerS, MaskFormat.skippedLayers(r.mask).size, r.mask.length)
        val lines = mutableListOf(line("routed", a), line("all layers", b))
        if (a != null && b != null && b.tokensPerS > 0 && a.prefillMs > 0) {
            lines += String.format(Locale.US, "decode speed-up %.2fx, prefill %.2fx", a.tokensPerS / b.tokensPerS,
                b.prefillMs / a.prefillMs)
        }
        return lines.joinToString("\n")
    }

    private fun showError(e: Throwable) {
        manifestStatus.setTextColor(getColor(R.color.error))
        manifestStatus.text = e.message ?: e.toString()
        generate.isEnabled = session != null
    }

    override fun onDestroy() {
        stop.set(true)
        worker.execute { session?.close() }
        worker.shutdown()
        super.onDestroy()
    }

    companion object {
        private const val REQUEST_TREE = 1
    }
}
