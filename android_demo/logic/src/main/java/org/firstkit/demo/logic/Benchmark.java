package org.firstkit.demo.logic;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.Map;

/**
 * The headless benchmark, shared by the app's BenchmarkActivity and the host {@link LogicTool}: load the bundle,
 * check its manifest, run warm-up and measured generations through the native core, and write every measured run
 * as one validated run-result JSON line to {@code out} (appended, flushed and synced per run, so finished runs
 * survive a crash), then {@code out + ".done"} with the status ({@link BenchmarkRequest#status}).
 */
public final class Benchmark {
  /** Receives each result line (the app also logs it to logcat). */
  public interface Sink {
    void accept(String line);
  }

  /** Loads the native libraries (on the phone: libexecutorch.so, then libfirstkit_jni.so). */
  public interface NativeLoader {
    void load();
  }

  private Benchmark() {}

  /**
   * Everything BenchmarkActivity does with its intent, minus the Android calls, so the same entry point runs on a
   * desktop JVM ({@code LogicTool activity}, and first-bench's tests drive it through a stand-in {@code am}):
   * resolve a relative {@code bundle} under {@code bundlesDir} and a relative {@code out} under {@code filesDir},
   * parse the extras, load the native libraries, run. A bad request or a library that does not load still leaves
   * {@code out + ".done"} with {@code ok: false} and the one-line message when {@code out} is known, so first-bench
   * never waits for its timeout on a mistake.
   *
   * @return the status JSON that was written (or would have been, when {@code out} is missing)
   */
  public static String runIntent(Map<String, String> extras, String bundlesDir, String filesDir, NativeLoader natives,
      Sink sink) {
    Map<String, String> resolved = BenchmarkRequest.resolvePaths(extras, bundlesDir, filesDir);
    BenchmarkRequest req;
    try {
      req = BenchmarkRequest.fromExtras(resolved);
      natives.load();
      run(req, sink);
      return LogicTool.readText(new File(req.out + ".done"));
    } catch (RuntimeException | LinkageError | IOException e) {
      String msg = e.getMessage() == null ? e.toString() : e.getMessage();
      String status = BenchmarkRequest.status(false, 0, msg);
      String out = resolved.get("out");
      if (out != null && !out.isEmpty()) {
        try {
          LogicTool.writeAtomically(new File(out + ".done"), status);
        } catch (IOException ignored) {
          // nowhere to report: the caller logs the status
        }
      }
      return status;
    }
  }

  /** Runs the request; returns true on success. Never throws for a bad bundle or request: the status says why. */
  public static boolean run(BenchmarkRequest req, Sink sink) throws IOException {
    File out = new File(req.out);
    File done = new File(req.out + ".done");
    if (done.exists() && !done.delete()) throw new IOException("cannot remove old " + done);
    int written = 0;
    try {
      BundleManifest manifest = BundleManifest.read(new File(req.bundle), req.verify);
      if (!manifest.hasExecutorch()) throw new BundleException(req.bundle + ": bundle has no ExecuTorch program");
      long[] prompt = req.promptIds;
      if (prompt == null) {  // a user turn of the manifest's chat_template, or plain text without one
        File tokDir = new File(req.bundle, "tokenizer");
        if (!new File(tokDir, "tokenizer.json").isFile()) {
          throw new BundleException(req.bundle + ": bundle has no tokenizer; pass prompt_ids");
        }
        BpeTokenizer tok = BpeTokenizer.fromDirectory(tokDir);
        prompt = manifest.promptFormat.encode(tok, req.prompt);
      }
      long[] override = MaskFormat.parseSpec(req.mask, manifest.numLayers, manifest.protectedLayers);
      // sha256 of every file was just checked above (when req.verify): the core re-checks sizes only.
      try (NativeRunner runner = NativeRunner.load(req.bundle, req.threads, false)) {
        for (int w = 0; w < req.warmup; w++) runner.generate(prompt, req.maxNewTokens, override, !req.ignoreEos, null);
        for (int r = 0; r < req.runs; r++) {
          String line = runner.generate(prompt, req.maxNewTokens, override, !req.ignoreEos, null);
          RunResult.parse(line);  // never hand first-bench a malformed line
          append(out, line);
          sink.accept(line);
          written++;
        }
      }
      LogicTool.writeAtomically(done, BenchmarkRequest.status(true, written, null));
      return true;
    } catch (BundleException | RuntimeException | IOException e) {
      String msg = e.getMessage() == null ? e.toString() : e.getMessage();
      LogicTool.writeAtomically(done, BenchmarkRequest.status(false, written, msg));
      return false;
    }
  }

  private static void append(File f, String line) throws IOException {
    try (FileOutputStream o = new FileOutputStream(f, true)) {
      o.write((line + "\n").getBytes(StandardCharsets.UTF_8));
      o.flush();
      o.getFD().sync();
    }
  }
}
