package org.firstkit.demo.logic;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Locale;
import java.util.Map;

/**
 * One generation in the "Run result JSON" of docs/CONTRACTS.md (device_bench/schemas/run_result.schema.json),
 * as the native core writes it. {@link #parse} checks every key and type so that a malformed line never reaches
 * first-bench.
 */
public final class RunResult {
  /** The keys every run result has, in the contract's order. */
  public static final List<String> KEYS = Collections.unmodifiableList(Arrays.asList("text", "tokens",
      "prompt_tokens", "mask", "skip_ratio", "prefill_ms", "decode_ms_per_token", "decode_ms", "tokens_per_s",
      "peak_rss_mb", "threads", "backend", "runner", "bundle_sha256"));

  public final String json;
  public final String text;
  public final long[] tokens;
  public final long promptTokens;
  public final String mask;
  public final double skipRatio;
  public final double prefillMs;
  public final double decodeMsPerToken;
  public final double[] decodeMs;
  public final double tokensPerS;
  public final double peakRssMb;
  public final long threads;
  public final String backend;
  public final String runner;
  public final String bundleSha256;

  private RunResult(String json, Map<String, Object> m) {
    this.json = json;
    this.text = (String) m.get("text");
    List<?> t = (List<?>) m.get("tokens");
    this.tokens = new long[t.size()];
    for (int i = 0; i < tokens.length; i++) tokens[i] = ((Number) t.get(i)).longValue();
    this.promptTokens = ((Number) m.get("prompt_tokens")).longValue();
    this.mask = (String) m.get("mask");
    this.skipRatio = ((Number) m.get("skip_ratio")).doubleValue();
    this.prefillMs = ((Number) m.get("prefill_ms")).doubleValue();
    this.decodeMsPerToken = ((Number) m.get("decode_ms_per_token")).doubleValue();
    List<?> d = (List<?>) m.get("decode_ms");
    this.decodeMs = new double[d.size()];
    for (int i = 0; i < decodeMs.length; i++) decodeMs[i] = ((Number) d.get(i)).doubleValue();
    this.tokensPerS = ((Number) m.get("tokens_per_s")).doubleValue();
    this.peakRssMb = ((Number) m.get("peak_rss_mb")).doubleValue();
    this.threads = ((Number) m.get("threads")).longValue();
    this.backend = (String) m.get("backend");
    this.runner = (String) m.get("runner");
    this.bundleSha256 = (String) m.get("bundle_sha256");
  }

  /** Parses and validates one run-result object; throws {@link IllegalArgumentException} naming the problem. */
  public static RunResult parse(String json) {
    Map<String, Object> m = Json.parseObject(json);
    validate(m);
    return new RunResult(json, m);
  }

  /** Contract check of a parsed run result (keys, types, ranges, internal consistency). */
  public static void validate(Map<String, Object> m) {
    List<String> missing = new ArrayList<>();
    for (String k : KEYS) if (!m.containsKey(k)) missing.add(k);
    if (!missing.isEmpty()) throw new IllegalArgumentException("run result lacks keys " + String.join(", ", missing));
    for (String k : new String[] {"text", "mask", "backend", "runner", "bundle_sha256"}) {
      if (!(m.get(k) instanceof String)) throw new IllegalArgumentException("run result: " + k + " must be a string");
    }
    for (String k : new String[] {"prompt_tokens", "threads"}) {
      if (!Json.isInt(m.get(k)) || ((Number) m.get(k)).longValue() < 0) {
        throw new IllegalArgumentException("run result: " + k + " must be a non-negative integer");
      }
    }
    for (String k : new String[] {"skip_ratio", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_rss_mb"}) {
      Object v = m.get(k);
      if (!(v instanceof Number) || ((Number) v).doubleValue() < 0) {
        throw new IllegalArgumentException("run result: " + k + " must be a non-negative number");
      }
    }
    Object toks = m.get("tokens");
    if (!(toks instanceof List)) throw new IllegalArgumentException("run result: tokens must be a list");
    for (Object x : (List<?>) toks) {
      if (!Json.isInt(x)) throw new IllegalArgumentException("run result: tokens must be integers");
    }
    Object dms = m.get("decode_ms");
    if (!(dms instanceof List)) throw new IllegalArgumentException("run result: decode_ms must be a list");
    for (Object x : (List<?>) dms) {
      if (!(x instanceof Number)) throw new IllegalArgumentException("run result: decode_ms must be numbers");
    }
    String mask = (String) m.get("mask");
    if (mask.isEmpty() || !mask.matches("[01]+")) {
      throw new IllegalArgumentException("run result: mask must be a non-empty 0/1 string");
    }
    double ratio = ((Number) m.get("skip_ratio")).doubleValue();
    if (Math.abs(ratio - MaskFormat.skipRatio(mask)) > 1e-9) {
      throw new IllegalArgumentException("run result: skip_ratio " + ratio + " does not match mask " + mask);
    }
    String backend = (String) m.get("backend");
    if (!backend.equals("executorch") && !backend.equals("onnx")) {
      throw new IllegalArgumentException("run result: backend must be executorch or onnx");
    }
    String runner = (String) m.get("runner");
    if (!runner.equals("python") && !runner.equals("native") && !runner.equals("android")) {
      throw new IllegalArgumentException("run result: runner must be python, native or android");
    }
    if (!((String) m.get("bundle_sha256")).matches("[0-9a-f]{64}")) {
      throw new IllegalArgumentException("run result: bundle_sha256 must be 64 lowercase hex digits");
    }
  }

  /** One status line for the UI: prefill time, decode speed, skipped layers. */
  public String statsLine() {
    return String.format(Locale.US, "prefill %.1f ms \u00b7 decode %.1f tok/s (%.2f ms/token, %d tokens) \u00b7 "
        + "skipped %d/%d layers \u00b7 peak RSS %.0f MB", prefillMs, tokensPerS, decodeMsPerToken, decodeMs.length,
        MaskFormat.skippedLayers(mask).size(), mask.length(), peakRssMb);
  }
}
