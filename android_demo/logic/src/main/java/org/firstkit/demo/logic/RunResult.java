package org.firstkit.demo.logic;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Locale;
import org.json.JSONArray;
import org.json.JSONObject;

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

  private RunResult(String json, JSONObject m) {
    this.json = json;
    this.text = (String) get(m, "text");
    JSONArray t = (JSONArray) get(m, "tokens");
    this.tokens = new long[t.length()];
    for (int i = 0; i < tokens.length; i++) tokens[i] = ((Number) JsonText.at(t, i)).longValue();
    this.promptTokens = number(m, "prompt_tokens").longValue();
    this.mask = (String) get(m, "mask");
    this.skipRatio = number(m, "skip_ratio").doubleValue();
    this.prefillMs = number(m, "prefill_ms").doubleValue();
    this.decodeMsPerToken = number(m, "decode_ms_per_token").doubleValue();
    JSONArray d = (JSONArray) get(m, "decode_ms");
    this.decodeMs = new double[d.length()];
    for (int i = 0; i < decodeMs.length; i++) decodeMs[i] = ((Number) JsonText.at(d, i)).doubleValue();
    this.tokensPerS = number(m, "tokens_per_s").doubleValue();
    this.peakRssMb = number(m, "peak_rss_mb").doubleValue();
    this.threads = number(m, "threads").longValue();
    this.backend = (String) get(m, "backend");
    this.runner = (String) get(m, "runner");
    this.bundleSha256 = (String) get(m, "bundle_sha256");
  }

  private static Object get(JSONObject m, String key) {
    return JsonText.get(m, key);
  }

  private static Number number(JSONObject m, String key) {
    return (Number) get(m, key);
  }

  /** Parses and validates one run-result object; throws {@link IllegalArgumentException} naming the problem. */
  public static RunResult parse(String json) {
    JSONObject m = JsonText.parseObject(json, "run result");
    validate(m);
    return new RunResult(json, m);
  }

  /** Contract check of a parsed run result (keys, types, ranges, internal consistency). */
  public static void validate(JSONObject m) {
    List<String> missing = new ArrayList<>();
    for (String k : KEYS) if (!m.has(k)) missing.add(k);
    if (!missing.isEmpty()) throw new IllegalArgumentException("run result lacks keys " + String.join(", ", missing));
    for (String k : new String[] {"text", "mask", "backend", "runner", "bundle_sha256"}) {
      if (!(get(m, k) instanceof String)) throw new IllegalArgumentException("run result: " + k + " must be a string");
    }
    for (String k : new String[] {"prompt_tokens", "threads"}) {
      if (!JsonText.isInt(get(m, k)) || number(m, k).longValue() < 0) {
        throw new IllegalArgumentException("run result: " + k + " must be a non-negative integer");
      }
    }
    for (String k : new String[] {"skip_ratio", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_rss_mb"}) {
      Object v = get(m, k);
      if (!(v instanceof Number) || ((Number) v).doubleValue() < 0) {
        throw new IllegalArgumentException("run result: " + k + " must be a non-negative number");
      }
    }
    Object toks = get(m, "tokens");
    if (!(toks instanceof JSONArray)) throw new IllegalArgumentException("run result: tokens must be a list");
    for (int i = 0; i < ((JSONArray) toks).length(); i++) {
      if (!JsonText.isInt(JsonText.at((JSONArray) toks, i))) {
        throw new IllegalArgumentException("run result: tokens must be integers");
      }
    }
    Object dms = get(m, "decode_ms");
    if (!(dms instanceof JSONArray)) throw new IllegalArgumentException("run result: decode_ms must be a list");
    for (int i = 0; i < ((JSONArray) dms).length(); i++) {
      if (!(JsonText.at((JSONArray) dms, i) instanceof Number)) {
        throw new IllegalArgumentException("run result: decode_ms must be numbers");
      }
    }
    String mask = (String) get(m, "mask");
    if (!MaskFormat.isBits(mask)) {
      throw new IllegalArgumentException("run result: mask must be a non-empty 0/1 string");
    }
    double ratio = number(m, "skip_ratio").doubleValue();
    if (Math.abs(ratio - MaskFormat.skipRatio(mask)) > 1e-9) {
      throw new IllegalArgumentException("run result: skip_ratio " + ratio + " does not match mask " + mask);
    }
    String backend = (String) get(m, "backend");
    if (!backend.equals("executorch") && !backend.equals("onnx")) {
      throw new IllegalArgumentException("run result: backend must be executorch or onnx");
    }
    String runner = (String) get(m, "runner");
    if (!runner.equals("python") && !runner.equals("native") && !runner.equals("android")) {
      throw new IllegalArgumentException("run result: runner must be python, native or android");
    }
    if (!((String) get(m, "bundle_sha256")).matches("[0-9a-f]{64}")) {
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
