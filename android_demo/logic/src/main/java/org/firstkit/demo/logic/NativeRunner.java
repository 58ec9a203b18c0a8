package org.firstkit.demo.logic;

/**
 * Java face of the shared C++ runner core (device_bench/runner/core) through the JNI bridge
 * {@code libfirstkit_jni.so} (android_demo/app/src/main/cpp/first_jni.cpp). The phone therefore runs exactly the
 * prefill / frozen-mask / per-layer-decode logic of the Linux runner. Not thread-safe: one call at a time.
 */
public final class NativeRunner implements AutoCloseable {
  /** Receives every generated token; return false to stop early. {@code text} is the decoded text so far. */
  public interface TokenListener {
    boolean onToken(long token, int index, String text);
  }

  private long handle;
  /** The bundle facts as JSON (bundle_sha256, num_layers, max_seq_len, vocab_size, bos_id, eos_ids, ...). */
  public final String infoJson;

  private NativeRunner(long handle) {
    this.handle = handle;
    this.infoJson = nativeInfo(handle);
  }

  /**
   * Loads a bundle (the core reads manifest.json and model.pte and checks the listed files).
   *
   * @param threads ExecuTorch thread-pool size, 0 = library default
   * @throws RuntimeException with the core's one-line message when the bundle cannot be loaded
   */
  public static NativeRunner load(String bundleDir, int threads, boolean verifyFiles) {
    return new NativeRunner(nativeLoad(bundleDir, threads, verifyFiles, true));
  }

  /**
   * Greedy generation; returns the run-result JSON of docs/CONTRACTS.md (runner "android").
   *
   * @param maskOverride null = routers decide; else one entry per layer (-1 router, 0 skip, 1 run)
   * @param listener may be null (benchmarks: nothing is decoded between tokens)
   */
  public String generate(long[] prompt, int maxNewTokens, long[] maskOverride, boolean stopAtEos,
      TokenListener listener) {
    check();
    return nativeGenerate(handle, prompt, maxNewTokens, maskOverride, stopAtEos, listener);
  }

  /** Token ids to text with the bundle's tokenizer ("" when the bundle has none). */
  public String decode(long[] tokens) {
    check();
    return nativeDecode(handle, tokens);
  }

  private void check() {
    if (handle == 0) throw new IllegalStateException("runner is closed");
  }

  @Override
  public void close() {
    if (handle != 0) {
      nativeClose(handle);
      handle = 0;
    }
  }

  /** The core's mask parser ({@code firstkit::parse_mask_spec}); null for "auto". */
  public static native long[] parseMaskSpec(String spec, long numLayers);

  /** {@code firstkit::kRunnerApiVersion} of the compiled core. */
  public static native int apiVersion();

  private static native long nativeLoad(String bundleDir, int threads, boolean verifyFiles, boolean weightCache);

  private static native String nativeInfo(long handle);

  private static native String nativeGenerate(long handle, long[] prompt, int maxNewTokens, long[] maskOverride,
      boolean stopAtEos, TokenListener listener);

  private static native String nativeDecode(long handle, long[] tokens);

  private static native void nativeClose(long handle);
}
