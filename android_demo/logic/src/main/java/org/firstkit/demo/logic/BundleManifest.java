package org.firstkit.demo.logic;

import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import org.json.JSONArray;
import org.json.JSONObject;

/**
 * The manifest.json of a firstkit bundle (docs/bundle_format.md), checked exactly like the Python runtime
 * ({@code firstkit.runtime.bundle.validate_manifest}) before anything is loaded.
 */
public final class BundleManifest {
  public static final String FORMAT = "firstkit-bundle";
  public static final long FORMAT_VERSION = 1;
  public static final String MANIFEST = "manifest.json";
  static final List<String> REQUIRED_KEYS = Arrays.asList("format", "format_version", "model", "routing",
      "max_seq_len", "quantization", "backends", "mask_semantics", "versions", "files");
  static final List<String> REQUIRED_MODEL_KEYS = Arrays.asList("id", "sha256", "architecture", "num_layers",
      "hidden_size", "vocab_size", "eos_ids");
  static final Set<String> BACKENDS = new HashSet<>(Arrays.asList("executorch", "onnx"));

  /** One file the manifest lists. */
  public static final class FileEntry {
    public final String path;
    public final String sha256;
    public final long size;

    FileEntry(String path, String sha256, long size) {
      this.path = path;
      this.sha256 = sha256;
      this.size = size;
    }
  }

  /** The parsed manifest (org.json, part of Android). */
  public final JSONObject raw;
  public final String modelId;
  public final String architecture;
  public final int numLayers;
  public final long maxSeqLen;
  public final List<Long> eosIds;
  public final List<Integer> protectedLayers;
  public final String policy;
  /** model.vocab_size (0 when it is not an integer: then prompt ids are not range-checked here). */
  public final long vocabSize;
  /** How prompts become ids: the manifest's {@code chat_template} (rendered at export), or plain text without one. */
  public final PromptFormat promptFormat;
  /** The ExecuTorch program file (backends.executorch.file), or null for an ONNX-only bundle. */
  public final String pteFile;
  public final List<FileEntry> files;

  /** Reads the fields of a manifest {@link #validate} accepted. */
  private BundleManifest(JSONObject raw, String where) throws BundleException {
    this.raw = raw;
    JSONObject model = (JSONObject) get(raw, "model");
    this.modelId = String.valueOf(get(model, "id"));
    this.architecture = String.valueOf(get(model, "architecture"));
    this.numLayers = (int) ((Number) get(model, "num_layers")).longValue();
    this.maxSeqLen = ((Number) get(raw, "max_seq_len")).longValue();
    Object vs = get(model, "vocab_size");
    this.vocabSize = JsonText.isInt(vs) && ((Number) vs).longValue() > 0 ? ((Number) vs).longValue() : 0;
    this.promptFormat = PromptFormat.fromChatTemplate(get(raw, "chat_template"), vocabSize);
    List<Long> eos = new ArrayList<>();
    Object e = get(model, "eos_ids");
    if (e instanceof JSONArray) {
      JSONArray a = (JSONArray) e;
      for (int k = 0; k < a.length(); k++) {
        Object x = JsonText.at(a, k);
        if (!JsonText.isInt(x)) throw new BundleException(where + ": model.eos_ids must be integers");
        eos.add(((Number) x).longValue());
      }
    } else if (JsonText.isInt(e)) {
      eos.add(((Number) e).longValue());
    } else {
      throw new BundleException(where + ": model.eos_ids must be a list of integers");
    }
    this.eosIds = Collections.unmodifiableList(eos);
    JSONObject routing = (JSONObject) get(raw, "routing");
    this.policy = String.valueOf(get(routing, "policy"));
    List<Integer> prot = new ArrayList<>();
    JSONArray pl = (JSONArray) get(routing, "protected_layers");
    for (int k = 0; k < pl.length(); k++) prot.add((int) ((Number) JsonText.at(pl, k)).longValue());
    this.protectedLayers = Collections.unmodifiableList(prot);
    Object et = get((JSONObject) get(raw, "backends"), "executorch");
    this.pteFile = et == null ? null : (String) get((JSONObject) et, "file");
    List<FileEntry> fl = new ArrayList<>();
    JSONObject fs = (JSONObject) get(raw, "files");
    for (String rel : JsonText.keys(fs)) {
      JSONObject ent = (JSONObject) get(fs, rel);
      fl.add(new FileEntry(rel, (String) get(ent, "sha256"), ((Number) get(ent, "size")).longValue()));
    }
    this.files = Collections.unmodifiableList(fl);
  }

  private static Object get(JSONObject o, String key) {
    return JsonText.get(o, key);
  }

  /** Parses and validates manifest text; {@code where} names the file in error messages. */
  public static BundleManifest parse(String text, String where) throws BundleException {
    Object v;
    try {
      v = JsonText.parse(text, where);
    } catch (IllegalArgumentException ex) {
      throw new BundleException(ex.getMessage());
    }
    return fromJson(v, where);
  }

  /** Validates an already parsed manifest (any JSON value: a non-object is refused like the Python runtime does). */
  public static BundleManifest fromJson(Object v, String where) throws BundleException {
    if (!(v instanceof JSONObject)) throw new BundleException(where + ": manifest must be a JSON object");
    JSONObject m = (JSONObject) v;
    validate(m, where);
    return new BundleManifest(m, where);
  }

  /** Reads {@code dir/manifest.json}, validates it and, with {@code checkHashes}, every listed file. */
  public static BundleManifest read(File dir, boolean checkHashes) throws BundleException {
    if (!dir.isDirectory()) throw new BundleException(dir + ": not a bundle directory");
    File mf = new File(dir, MANIFEST);
    if (!mf.isFile()) throw new BundleException(dir + ": no " + MANIFEST + " (not a firstkit bundle)");
    String text;
    try {
      text = new String(Files.readAllBytes(mf.toPath()), StandardCharsets.UTF_8);
    } catch (IOException ex) {
      throw new BundleException(mf + ": cannot read (" + ex.getMessage() + ")");
    }
    BundleManifest bm = parse(text, mf.getPath());
    bm.checkFiles(dir, checkHashes);
    return bm;
  }

  /** Checks that every listed file exists with its size and, with {@code hashes}, its sha256. */
  public void checkFiles(File dir, boolean hashes) throws BundleException {
    for (FileEntry f : files) {
      File p = new File(dir, f.path);
      if (!p.isFile()) throw new BundleException(dir + ": file " + f.path + " listed in the manifest is missing");
      long size = p.length();
      if (size != f.size) {
        throw new BundleException(dir + ": " + f.path + " has " + size + " bytes, manifest says " + f.size
            + " (truncated?)");
      }
      if (hashes && !sha256(p).equals(f.sha256)) {
        throw new BundleException(dir + ": sha256 of " + f.path
            + " does not match the manifest (corrupt or modified)");
      }
    }
  }

  /** Schema check with the same rules and messages as the Python runtime; throws naming the first problem. */
  public static void validate(JSONObject m, String where) throws BundleException {
    List<String> missing = new ArrayList<>();
    for (String k : REQUIRED_KEYS) if (!m.has(k)) missing.add(k);
    if (!missing.isEmpty()) throw new BundleException(where + ": missing keys " + String.join(", ", missing));
    if (!FORMAT.equals(get(m, "format"))) {
      throw new BundleException(where + ": format is " + pyRepr(get(m, "format")) + ", expected '" + FORMAT + "'");
    }
    Object fv = get(m, "format_version");
    if (!(JsonText.isInt(fv) && ((Number) fv).longValue() == FORMAT_VERSION)) {
      throw new BundleException(where + ": format_version " + fv + " is not supported (this firstkit reads version "
          + FORMAT_VERSION + ")");
    }
    Object modelObj = get(m, "model");
    if (!(modelObj instanceof JSONObject) || !hasAll((JSONObject) modelObj, REQUIRED_MODEL_KEYS)) {
      throw new BundleException(where + ": model must have keys " + String.join(", ", REQUIRED_MODEL_KEYS));
    }
    JSONObject model = (JSONObject) modelObj;
    Object nObj = get(model, "num_layers");
    if (!JsonText.isInt(nObj) || ((Number) nObj).longValue() < 1) {
      throw new BundleException(where + ": model.num_layers must be a positive integer");
    }
    long n = ((Number) nObj).longValue();
    Object msl = get(m, "max_seq_len");
    if (!JsonText.isInt(msl) || ((Number) msl).longValue() < 1) {
      throw new BundleException(where + ": max_seq_len must be a positive integer");
    }
    Object routingObj = get(m, "routing");
    if (!(routingObj instanceof JSONObject) || !((JSONObject) routingObj).has("policy")
        || !((JSONObject) routingObj).has("protected_layers")) {
      throw new BundleException(where + ": routing must have policy and protected_layers");
    }
    Object prot = get((JSONObject) routingObj, "protected_layers");
    if (!(prot instanceof JSONArray)) throw new BundleException(where + ": routing.protected_layers must be a list");
    JSONArray protList = (JSONArray) prot;
    for (int k = 0; k < protList.length(); k++) {
      Object x = JsonText.at(protList, k);
      if (!JsonText.isInt(x) || ((Number) x).longValue() < 0 || ((Number) x).longValue() >= n) {
        throw new BundleException(where + ": routing.protected_layers out of range for " + n + " layers");
      }
    }
    Object backendsObj = get(m, "backends");
    if (!(backendsObj instanceof JSONObject) || ((JSONObject) backendsObj).length() == 0
        || !BACKENDS.containsAll(JsonText.keys((JSONObject) backendsObj))) {
      throw new BundleException(where + ": backends must be a non-empty object with keys from ('executorch', 'onnx')");
    }
    Object filesObj = get(m, "files");
    if (!(filesObj instanceof JSONObject)) throw new BundleException(where + ": files must be an object");
    JSONObject files = (JSONObject) filesObj;
    for (String rel : JsonText.keys(files)) {
      Object ent = get(files, rel);
      if (!(ent instanceof JSONObject) || !(get((JSONObject) ent, "sha256") instanceof String)
          || !((JSONObject) ent).has("size")) {
        throw new BundleException(where + ": files[" + pyRepr(rel) + "] needs sha256 and size");
      }
      if (!JsonText.isInt(get((JSONObject) ent, "size"))) {
        throw new BundleException(where + ": files[" + pyRepr(rel) + "] size must be an integer");
      }
      if (rel.startsWith("/") || Arrays.asList(rel.split("/")).contains("..")) {
        throw new BundleException(where + ": files[" + pyRepr(rel) + "] escapes the bundle");
      }
    }
    JSONObject backends = (JSONObject) backendsObj;
    Object et = get(backends, "executorch");
    if (et != null) {
      if (!(et instanceof JSONObject)) throw new BundleException(where + ": backends.executorch must be an object");
      if (!isListed(files, get((JSONObject) et, "file"))) {
        throw new BundleException(where + ": backends.executorch.file is not listed under files");
      }
      Set<String> expected = new HashSet<>(Arrays.asList("embed", "route", "head"));
      for (long i = 0; i < n; i++) {
        expected.add("prefill_" + i);
        expected.add("layer_" + i);
      }
      Object methods = get((JSONObject) et, "methods");
      Set<String> have = new HashSet<>();
      if (methods instanceof JSONObject) {
        have.addAll(JsonText.keys((JSONObject) methods));
      } else if (methods instanceof JSONArray) {
        JSONArray ml = (JSONArray) methods;
        for (int k = 0; k < ml.length(); k++) have.add(String.valueOf(JsonText.at(ml, k)));
      }
      if (!have.equals(expected)) {
        throw new BundleException(where + ": backends.executorch.methods must be embed, route, prefill_0..prefill_"
            + (n - 1) + ", layer_0..layer_" + (n - 1) + ", head (a bundle from an older firstkit: export it again)");
      }
    }
    Object ox = get(backends, "onnx");
    if (ox != null) {
      for (String key : new String[] {"prefill", "decode"}) {
        Object sub = ox instanceof JSONObject ? get((JSONObject) ox, key) : null;
        Object file = sub instanceof JSONObject ? get((JSONObject) sub, "file") : null;
        if (!isListed(files, file)) {
          throw new BundleException(where + ": backends." + "onnx." + key + ".file is not listed under files");
        }
      }
    }
    // the Python runtime checks types with the JSON schema after the rules above: chat_template is its concern
    String problem = chatTemplateProblem(get(m, "chat_template"));
    if (problem != null) throw new BundleException(where + ": " + problem);
  }

  /**
   * Checks a {@code chat_template} value (JSON null / absent, or an object with string {@code prefix} and
   * {@code suffix}, device_bench/schemas/manifest.schema.json); {@code where} names its document in the message.
   */
  public static void checkChatTemplate(Object value, String where) throws BundleException {
    String problem = chatTemplateProblem(value);
    if (problem != null) throw new BundleException(where + ": " + problem);
  }

  /**
   * The schema's complaint about a {@code chat_template} value, worded as the Python runtime reports it
   * ({@code schema_error}: jsonschema's {@code best_match} over the {@code oneOf [null, object]}, cut to one line of
   * 240 characters), or null when the value is valid. best_match descends into the branch errors only when one is
   * strictly the most relevant: the deepest first (a non-string {@code prefix} before {@code suffix}), then one that
   * matches the instance's type (a missing key of an object); ties keep the {@code oneOf} message.
   */
  static String chatTemplateProblem(Object v) {
    if (v == null || v == JSONObject.NULL) return null;
    String msg;
    if (!(v instanceof JSONObject)) {
      msg = "chat_template: " + pyRepr(v) + " is not valid under any of the given schemas";
    } else {
      JSONObject t = (JSONObject) v;
      List<String> missing = new ArrayList<>();
      msg = null;
      for (String key : new String[] {"prefix", "suffix"}) {
        if (!t.has(key)) {
          missing.add(key);
        } else if (msg == null && !(t.opt(key) instanceof String)) {
          msg = "chat_template." + key + ": " + pyRepr(t.opt(key)) + " is not of type 'string'";
        }
      }
      if (msg == null && missing.size() == 1) {
        msg = "chat_template: " + pyRepr(missing.get(0)) + " is a required property";
      }
      if (msg == null && missing.size() == 2) {
        msg = "chat_template: " + pyRepr(v) + " is not valid under any of the given schemas";
      }
      if (msg == null) return null;
    }
    int limit = 240;  // Python's one_line(problem, 240), in code points
    if (msg.codePointCount(0, msg.length()) > limit) {
      msg = msg.substring(0, msg.offsetByCodePoints(0, limit - 3)) + "...";
    }
    return msg;
  }

  private static boolean hasAll(JSONObject o, List<String> keys) {
    for (String k : keys) if (!o.has(k)) return false;
    return true;
  }

  /** A file reference (a string, as Python's {@code file in files} needs) that the manifest lists. */
  private static boolean isListed(JSONObject files, Object file) {
    return file instanceof String && files.has((String) file);
  }

  /** True when the app can run this bundle: it has an ExecuTorch program. */
  public boolean hasExecutorch() {
    return pteFile != null;
  }

  /** A short human summary for the UI. */
  public String summary() {
    Object q = get(raw, "quantization");
    Object scheme = q instanceof JSONObject ? get((JSONObject) q, "scheme") : null;
    String quant = String.valueOf(scheme != null ? scheme : q);
    return modelId + " (" + architecture + ", " + numLayers + " layers, max " + maxSeqLen + " tokens, " + quant
        + ", policy " + policy + ", protected " + protectedLayers + "; " + promptFormat.describe() + ")";
  }

  /**
   * Python's {@code repr} of a JSON value (str, int, float, bool, None, list, dict), for messages identical to the
   * Python runtime's.
   */
  static String pyRepr(Object o) {
    StringBuilder b = new StringBuilder();
    appendRepr(b, o);
    return b.toString();
  }

  private static void appendRepr(StringBuilder b, Object o) {
    if (o == null || o == JSONObject.NULL) {
      b.append("None");
    } else if (o instanceof String) {
      appendStrRepr(b, (String) o);
    } else if (o instanceof Boolean) {
      b.append((Boolean) o ? "True" : "False");
    } else if (o instanceof Double || o instanceof Float) {
      b.append(floatRepr(((Number) o).doubleValue()));
    } else if (o instanceof JSONArray) {
      JSONArray a = (JSONArray) o;
      b.append('[');
      for (int k = 0; k < a.length(); k++) {
        if (k > 0) b.append(", ");
        appendRepr(b, a.opt(k));
      }
      b.append(']');
    } else if (o instanceof JSONObject) {
      JSONObject m = (JSONObject) o;
      b.append('{');
      boolean first = true;
      for (String k : JsonText.keys(m)) {
        if (!first) b.append(", ");
        first = false;
        appendStrRepr(b, k);
        b.append(": ");
        appendRepr(b, m.opt(k));
      }
      b.append('}');
    } else {
      b.append(o);  // integers
    }
  }

  /** Python's str repr: single quotes unless the text has ' and no ", escapes for the non-printable characters. */
  private static void appendStrRepr(StringBuilder b, String s) {
    char quote = s.indexOf('\'') >= 0 && s.indexOf('"') < 0 ? '"' : '\'';
    b.append(quote);
    for (int k = 0; k < s.length(); ) {
      int c = s.codePointAt(k);
      k += Character.charCount(c);
      if (c == quote || c == '\\') {
        b.append('\\').appendCodePoint(c);
      } else if (c == '\t') {
        b.append("\\t");
      } else if (c == '\n') {
        b.append("\\n");
      } else if (c == '\r') {
        b.append("\\r");
      } else if (c < ' ' || c == 0x7f) {
        b.append(String.format("\\x%02x", c));
      } else if (c < 0x7f || isPrintable(c)) {
        b.appendCodePoint(c);
      } else if (c <= 0xff) {
        b.append(String.format("\\x%02x", c));
      } else if (c <= 0xffff) {
        b.append(String.format("\\u%04x", c));
      } else {
        b.append(String.format("\\U%08x", c));
      }
    }
    b.append(quote);
  }

  /** Python's str.isprintable for one character: not a control, format, surrogate, private, unassigned or separator. */
  private static boolean isPrintable(int c) {
    switch (Character.getType(c)) {
      case Character.CONTROL: case Character.FORMAT: case Character.SURROGATE: case Character.PRIVATE_USE:
      case Character.UNASSIGNED: case Character.LINE_SEPARATOR: case Character.PARAGRAPH_SEPARATOR:
      case Character.SPACE_SEPARATOR:
        return c == ' ';
      default:
        return true;
    }
  }

  /** Python's float repr: shortest digits, positional for exponents -4..15, else d.ddde+XX. */
  static String floatRepr(double d) {
    if (Double.isNaN(d)) return "nan";
    if (Double.isInfinite(d)) return d > 0 ? "inf" : "-inf";
    if (d == 0) return (1 / d < 0) ? "-0.0" : "0.0";
    java.math.BigDecimal v = new java.math.BigDecimal(Double.toString(d)).stripTrailingZeros();
    int exp = v.precision() - v.scale() - 1;  // decimal exponent of the first digit
    if (exp < -4 || exp >= 16) {
      String digits = v.unscaledValue().abs().toString();
      StringBuilder b = new StringBuilder(d < 0 ? "-" : "").append(digits.charAt(0));
      if (digits.length() > 1) b.append('.').append(digits, 1, digits.length());
      return b.append(exp < 0 ? "e-" : "e+").append(String.format("%02d", Math.abs(exp))).toString();
    }
    String plain = v.toPlainString();
    return plain.contains(".") ? plain : plain + ".0";
  }

  /** Lowercase hex sha256 of a file. */
  public static String sha256(File f) throws BundleException {
    try (InputStream in = new FileInputStream(f)) {
      MessageDigest md = MessageDigest.getInstance("SHA-256");
      byte[] buf = new byte[1 << 16];
      int r;
      while ((r = in.read(buf)) > 0) md.update(buf, 0, r);
      StringBuilder b = new StringBuilder();
      for (byte x : md.digest()) b.append(String.format("%02x", x & 0xff));
      return b.toString();
    } catch (IOException ex) {
      throw new BundleException(f + ": cannot read (" + ex.getMessage() + ")");
    } catch (NoSuchAlgorithmException ex) {
      throw new IllegalStateException(ex);
    }
  }
}
