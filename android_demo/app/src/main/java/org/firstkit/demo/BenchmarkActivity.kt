package org.firstkit.demo

import android.app.Activity
import android.os.Bundle
import android.util.Log
import java.io.File
import org.firstkit.demo.logic.Benchmark
import org.firstkit.demo.logic.BenchmarkRequest

/**
 * Headless benchmark entry point for first-bench:
 *
 *     adb shell am start -W -n org.firstkit.demo/.BenchmarkActivity \
 *         -e bundle smollm2 -e prompt_ids 1,2,3 -e max_new_tokens 64 -e runs 5 -e out bench.jsonl
 *
 * Relative `bundle` names resolve under the app's bundles directory, relative `out` paths under its external
 * files directory (/sdcard/Android/data/org.firstkit.demo/files/). Every measured run is appended to `out` as one
 * run-result JSON line (runner "android") and logged as `FIRSTKIT_RESULT <json>`; `out.done` then holds
 * {"ok": true|false, "runs": N, "error": ...}. Poll for `out.done`, then pull `out`.
 */
class BenchmarkActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val extras = mutableMapOf<String, String>()
        intent.extras?.let { b -> for (k in b.keySet()) b.get(k)?.let { extras[k] = it.toString() } }
        val files = getExternalFilesDir(null) ?: filesDir
        val resolved = BenchmarkRequest.resolvePaths(extras, BundleStore.root(this).path, files.path)
        Thread {
            try {
                val req = BenchmarkRequest.fromExtras(resolved)
                FirstSession.ensureLoaded()
                val ok = Benchmark.run(req) { line -> Log.i(TAG, "FIRSTKIT_RESULT $line") }
                Log.i(TAG, "FIRSTKIT_DONE " + File(req.out + ".done").readText())
                if (!ok) Log.e(TAG, "benchmark failed, see ${req.out}.done")
            } catch (e: Throwable) {
                // A bad request: still leave a status file where first-bench looks, when `out` is known.
                Log.e(TAG, "FIRSTKIT_ERROR ${e.message}")
                resolved["out"]?.let { File("$it.done").writeText(BenchmarkRequest.status(false, 0, e.message)) }
            } finally {
                runOnUiThread { finish() }
            }
        }.start()
    }

    companion object {
        private const val TAG = "firstkit"
    }
}
