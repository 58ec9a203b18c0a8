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
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

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

  public final Map<String, Object> raw;
  public final String modelId;
  public final String architecture;
  public final int numLayers;
  public final long maxSeqLen;
  public final List<Long> eosIds;
  public final List<Integer> protectedLayers;
  public final String policy;
  /** The ExecuTorch program file (backends.executorch.file), or null for an ONNX-only bundle. */
  public final String pteFile;
  public final List<FileEntry> files;

  private BundleManifest(Map<String, Object> raw, String where) throws BundleException {
    this.raw = raw;
    Map<String, Object> model = castObj(raw.get("model"));
    this.modelId = String.valueOf(model.get("id"));
    this.architecture = String.valueOf(model.get("architecture"));
    this.numLayers = (int) ((Number) model.get("num_layers")).longValue();
    this.maxSeqLen = ((Number) raw.get("max_seq_len")).longValue();
    List<Long> eos = new ArrayList<>();
    Object e = model.get("eos_ids");
    if (e instanceof List) {
      for (Object x : (List<?>) e) {
        if (!Json.isInt(x)) throw new BundleException(where + ": model.eos_ids must be integers");
        eos.add(((Number) x).longValue());
      }
    } else if (Json.isInt(e)) {
      eos.add(((Number) e).longValue());
    } else {
      throw new BundleException(where + ": model.eos_ids must be a list of integers");
    }
    this.eosIds = Collections.unmodifiableList(eos);
    Map<String, Object> routing = castObj(raw.get("routing"));
    this.policy = String.valueOf(routing.get("policy"));
    List<Integer> prot = new ArrayList<>();
    for (Object x : (List<?>) routing.get("protected_layers")) prot.add((int) ((Number) x).longValue());
    this.protectedLayers = Collections.unmodifiableList(prot);
    Map<String, Object> et = castObj(castObj(raw.get("backends")).get("executorch"));
    this.pteFile = et == null ? null : (String) et.get("file");
    List<FileEntry> fl = new ArrayList<>();
    for (Map.Entry<String, Object> f : castObj(raw.get("files")).entrySet()) {
      Map<String, Object> ent = castObj(f.getValue());
      fl.add(new FileEntry(f.getKey(), (String) ent.get("sha256"), ((Number) ent.get("size")).longValue()));
    }
    this.files = Collections.unmodifiableList(fl);
  }

  @SuppressWarnings("unchecked")
  private static Map<String, Object> castObj(Object o) {
    return (Map<String, Object>) o;
  }

  /** Parses and validates manifest text; {@code where} names the file in error messages. */
  public static BundleManifest parse(String text, String where) throws BundleException {
    Map<String, Object> m;
    try {
      Object v = Json.parse(text);
      if (!(v instanceof Map)) throw new BundleException(where + ": manifest must be a JSON object");
      m = castObj(v);
    } catch (IllegalArgumentException ex) {
      throw new BundleException(where + ": invalid JSON (" + ex.getMessage() + ")");
    }
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
  public static void validate(Map<String, Object> m, String where) throws BundleException {
    List<String> missing = new ArrayList<>();
    for (String k : REQUIRED_KEYS) if (!m.containsKey(k)) missing.add(k);
    if (!missing.isEmpty()) throw new BundleException(where + ": missing keys " + String.join(", ", missing));
    if (!FORMAT.equals(m.get("format"))) {
      throw new BundleException(where + ": format is " + pyRepr(m.get("format")) + ", expected '" + FORMAT + "'");
    }
    Object fv = m.get("format_version");
    if (!(Json.isInt(fv) && ((Number) fv).longValue() == FORMAT_VERSION)) {
      throw new BundleException(where + ": format_version " + fv + " is not supported (this firstkit reads version "
          + FORMAT_VERSION + ")");
    }
    Object modelObj = m.get("model");
    if (!(modelObj instanceof Map) || !castObj(modelObj).keySet().containsAll(REQUIRED_MODEL_KEYS)) {
      throw new BundleException(where + ": model must have keys " + String.join(", ", REQUIRED_MODEL_KEYS));
    }
    Map<String, Object> model = castObj(modelObj);
    Object nObj = model.get("num_layers");
    if (!Json.isInt(nObj) || ((Number) nObj).longValue() < 1) {
      throw new BundleException(where + ": model.num_layers must be a positive integer");
    }
    long n = ((Number) nObj).longValue();
    Object msl = m.get("max_seq_len");
    if (!Json.isInt(msl) || ((Number) msl).longValue() < 1) {
      throw new BundleException(where + ": max_seq_len must be a positive integer");
    }
    Object routingObj = m.get("routing");
    if (!(routingObj instanceof Map) || !castObj(routingObj).containsKey("policy")
        || !castObj(routingObj).containsKey("protected_layers")) {
      throw new BundleException(where + ": routing must have policy and protected_layers");
    }
    Object prot = castObj(routingObj).get("protected_layers");
    if (!(prot instanceof List)) throw new BundleException(where + ": routing.protected_layers must be a list");
    for (Object x : (List<?>) prot) {
      if (!Json.isInt(x) || ((Number) x).longValue() < 0 || ((Number) x).longValue() >= n) {
        throw new BundleException(where + ": routing.protected_layers out of range for " + n + " layers");
      }
    }
    Object backendsObj = m.get("backends");
    if (!(backendsObj instanceof Map) || castObj(backendsObj).isEmpty()
        || !BACKENDS.containsAll(castObj(backendsObj).keySet())) {
      throw new BundleException(where + ": backends must be a non-empty object with keys from ('executorch', 'onnx')");
    }
    Object filesObj = m.get("files");
    if (!(filesObj instanceof Map)) throw new BundleException(where + ": files must be an object");
    Map<String, Object> files = castObj(filesObj);
    for (Map.Entry<String, Object> f : files.entrySet()) {
      String rel = f.getKey();
      Object ent = f.getValue();
      if (!(ent instanceof Map) || !(castObj(ent).get("sha256") instanceof String)
          || !castObj(ent).containsKey("size")) {
        throw new BundleException(where + ": files[" + pyRepr(rel) + "] needs sha256 and size");
      }
      if (!Json.isInt(castObj(ent).get("size"))) {
        throw new BundleException(where + ": files[" + pyRepr(rel) + "] size must be an integer");
      }
      if (rel.startsWith("/") || Arrays.asList(rel.split("/")).contains("..")) {
        throw new BundleException(where + ": files[" + pyRepr(rel) + "] escapes the bundle");
      }
    }
    Map<String, Object> backends = castObj(backendsObj);
    Object et = backends.get("executorch");
    if (et != null) {
      if (!(et instanceof Map)) throw new BundleException(where + ": backends.executorch must be an object");
      if (!files.containsKey(String.valueOf(castObj(et).get("file")))) {
        throw new BundleException(where + ": backends.executorch.file is not listed under files");
      }
      Set<String> expected = new HashSet<>(Arrays.asList("embed", "route", "head"));
      for (long i = 0; i < n; i++) {
        expected.add("prefill_" + i);
        expected.add("layer_" + i);
      }
      Object methods = castObj(et).get("methods");
      Set<String> have = new HashSet<>();
      if (methods instanceof Map) have.addAll(castObj(methods).keySet());
      else if (methods instanceof List) for (Object x : (List<?>) methods) have.add(String.valueOf(x));
      if (!have.equals(expected)) {
        throw new BundleException(where + ": backends.executorch.methods must be embed, route, prefill_0..prefill_"
            + (n - 1) + ", layer_0..layer_" + (n - 1) + ", head (a bundle from an older firstkit: export it again)");
      }
    }
    Object ox = backends.get("onnx");
    if (ox != null) {
      for (String key : new String[] {"prefill", "decode"}) {
        Object sub = ox instanceof Map ? castObj(ox).get(key) : null;
        Object file = sub instanceof Map ? castObj(sub).get("file") : null;
        if (file == null || !files.containsKey(String.valueOf(file))) {
          throw new BundleException(where + ": backends.onnx." + key + ".file is not listed under files");
        }
      }
    }
  }

  /** True when the app can run this bundle: it has an ExecuTorch program. */
  public boolean hasExecutorch() {
    return pteFile != null;
  }

  /** A short human summary for the UI. */
  public String summary() {
    Map<String, Object> q = raw.get("quantization") instanceof Map ? castObj(raw.get("quantization")) : null;
    String quant = q != null && q.get("scheme") != null ? String.valueOf(q.get("scheme"))
        : String.valueOf(raw.get("quantization"));
    return modelId + " (" + architecture + ", " + numLayers + " layers, max " + maxSeqLen + " tokens, " + quant
        + ", policy " + policy + ", protected " + protectedLayers + ")";
  }

  /** Python-style repr of a string (for messages identical to the Python runtime's). */
  static String pyRepr(Object o) {
    if (o instanceof String) return "'" + ((String) o).replace("\\", "\\\\").replace("'", "\\'") + "'";
    if (o == null) return "None";
    return String.valueOf(o);
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

  /** Ordered copy of the raw manifest (for display). */
  public Map<String, Object> rawCopy() {
    return new LinkedHashMap<>(raw);
  }
}
