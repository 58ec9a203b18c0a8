package org.firstkit.demo.logic;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * The headless benchmark's parameters, parsed from the string extras of
 * {@code am start -n org.firstkit.demo/.BenchmarkActivity --es KEY VALUE ...}. The keys mirror the native
 * runner's flags so first-bench can drive either with the same arguments:
 *
 * <pre>
 *   bundle          bundle directory on the device (required)
 *   prompt_ids      comma-separated prompt token ids (or:)
 *   prompt          prompt text, encoded on the device with the bundle's tokenizer as a user turn of the
 *                   manifest's chat_template (plain text when the bundle has none), like first-run
 *   max_new_tokens  default 32
 *   threads         ExecuTorch thread-pool size, 0 = library default
 *   mask            auto | all | 0/1 bits (default auto)
 *   warmup, runs    unmeasured / measured runs (default 0 / 1)
 *   ignore_eos      true: fixed-length runs
 *   verify          false: skip sha256 checks of bundle files
 *   out             result file (JSON lines, one per measured run); a status file out + ".done" follows
 * </pre>
 */
public final class BenchmarkRequest {
  static final Set<String> KEYS = new HashSet<>(Arrays.asList("bundle", "prompt_ids", "prompt", "max_new_tokens",
      "threads", "mask", "warmup", "runs", "ignore_eos", "verify", "out"));

  public final String bundle;
  public final long[] promptIds;
  public final String prompt;
  public final int maxNewTokens;
  public final int threads;
  public final String mask;
  public final int warmup;
  public final int runs;
  public final boolean ignoreEos;
  public final boolean verify;
  public final String out;

  private BenchmarkRequest(Map<String, String> e) {
    for (String k : e.keySet()) {
      if (!KEYS.contains(k)) throw new IllegalArgumentException("unknown benchmark extra '" + k + "'");
    }
    bundle = required(e, "bundle");
    out = required(e, "out");
    String ids = e.get("prompt_ids");
    String text = e.get("prompt");
    if ((ids == null) == (text == null)) {
      throw new IllegalArgumentException("give exactly one of the extras prompt_ids and prompt");
    }
    promptIds = ids == null ? null : parseIds(ids);
    prompt = text;
    maxNewTokens = intExtra(e, "max_new_tokens", 32, 1);
    threads = intExtra(e, "threads", 0, 0);
    warmup = intExtra(e, "warmup", 0, 0);
    runs = intExtra(e, "runs", 1, 1);
    mask = e.getOrDefault("mask", "auto");
    MaskFormat.checkSpec(mask);  // length and protected layers: MaskFormat.parseSpec once the bundle is read
    ignoreEos = boolExtra(e, "ignore_eos", false);
    verify = boolExtra(e, "verify", true);
  }

  /** Parses extras; throws {@link IllegalArgumentException} with a one-line message on bad input. */
  public static BenchmarkRequest fromExtras(Map<String, String> extras) {
    return new BenchmarkRequest(extras);
  }

  private static String required(Map<String, String> e, String k) {
    String v = e.get(k);
    if (v == null || v.isEmpty()) throw new IllegalArgumentException("missing extra '" + k + "'");
    return v;
  }

  private static int intExtra(Map<String, String> e, String k, int dflt, int min) {
    String v = e.get(k);
    if (v == null) return dflt;
    try {
      int x = Integer.parseInt(v.trim());
      if (x < min) throw new NumberFormatException();
      return x;
    } catch (NumberFormatException ex) {
      throw new IllegalArgumentException(k + " needs an integer >= " + min + ", got '" + v + "'");
    }
  }

  private static boolean boolExtra(Map<String, String> e, String k, boolean dflt) {
    String v = e.get(k);
    if (v == null) return dflt;
    switch (v.trim().toLowerCase()) {
      case "1": case "true": case "yes": return true;
      case "0": case "false": case "no": return false;
      default: throw new IllegalArgumentException(k + " must be true or false, got '" + v + "'");
    }
  }

  /** Comma/space separated non-negative token ids (a JSON array is accepted too). */
  public static long[] parseIds(String text) {
    List<Long> ids = new ArrayList<>();
    for (String p : text.replace('[', ' ').replace(']', ' ').split("[,\\s]+")) {
      if (p.isEmpty()) continue;
      try {
        long x = Long.parseLong(p);
        if (x < 0) throw new NumberFormatException();
        ids.add(x);
      } catch (NumberFormatException ex) {
        throw new IllegalArgumentException("bad token id '" + p + "' in prompt_ids");
      }
    }
    if (ids.isEmpty()) throw new IllegalArgumentException("no token ids in prompt_ids");
    long[] a = new long[ids.size()];
    for (int k = 0; k < a.length; k++) a[k] = ids.get(k);
    return a;
  }

  /**
   * Resolves relative {@code bundle} and {@code out} extras on the device: a bundle name is looked up under
   * {@code bundlesDir} (the app's external files/bundles, where {@code adb push} puts bundles), a relative out path
   * under {@code filesDir} (readable with {@code adb pull /sdcard/Android/data/org.firstkit.demo/files/...}).
   */
  public static Map<String, String> resolvePaths(Map<String, String> extras, String bundlesDir, String filesDir) {
    Map<String, String> m = new java.util.LinkedHashMap<>(extras);
    String b = m.get("bundle");
    if (b != null && !b.isEmpty() && !b.startsWith("/")) m.put("bundle", new java.io.File(bundlesDir, b).getPath());
    String o = m.get("out");
    if (o != null && !o.isEmpty() && !o.startsWith("/")) m.put("out", new java.io.File(filesDir, o).getPath());
    return m;
  }

  /** The status object written to {@code out + ".done"} when the benchmark ends. */
  public static String status(boolean ok, int runsWritten, String error) {
    return JsonText.object("ok", ok, "runs", runsWritten, "error", error);
  }
}
