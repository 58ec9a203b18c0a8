package org.firstkit.demo

import android.app.Activity
import android.os.Bundle
import android.util.Log
import org.firstkit.demo.logic.Benchmark

/**
 * Headless benchmark entry point for first-bench (`first-bench BUNDLE --device SERIAL --app`):
 *
 *     adb shell am start -S -W -n org.firstkit.demo/.BenchmarkActivity \
 *         -e bundle smollm2 -e prompt_ids 1,2,3 -e max_new_tokens 64 -e runs 5 -e out bench.jsonl
 *
 * A thin shell around [Benchmark.runIntent] (plain Java, run and tested on a desktop JVM as well): relative
 * `bundle` names resolve under the app's bundles directory, relative `out` paths under its external files
 * directory (/sdcard/Android/data/org.firstkit.demo/files/). Every measured run is appended to `out` as one
 * run-result JSON line (runner "android") and logged as `FIRSTKIT_RESULT <json>`; `out.done` then holds
 * {"ok": true|false, "runs": N, "error": ...}, also for bad extras. Poll for `out.done`, then pull `out`.
 */
class BenchmarkActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val extras = mutableMapOf<String, String>()
        intent.extras?.let { b -> for (k in b.keySet()) b.get(k)?.let { extras[k] = it.toString() } }
        val files = getExternalFilesDir(null) ?: filesDir
        val bundles = BundleStore.root(this).path
        Thread {
            try {
                val status = Benchmark.runIntent(extras, bundles, files.path, { FirstSession.ensureLoaded() }) { line ->
                    Log.i(TAG, "FIRSTKIT_RESULT $line")
                }
                Log.i(TAG, "FIRSTKIT_DONE $status")
            } finally {
                runOnUiThread { finish() }
            }
        }.start()
    }

    companion object {
        private const val TAG = "firstkit"
    }
}
