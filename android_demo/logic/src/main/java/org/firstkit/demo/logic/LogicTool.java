package org.firstkit.demo.logic;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.json.JSONArray;
import org.json.JSONObject;

/**
 * Host command line over the app's plain-Java logic, so it can be run and tested off the phone:
 *
 * <pre>
 *   manifest BUNDLE_DIR [--no-hashes]      validate a bundle like the app; prints a JSON summary
 *   encode BUNDLE_DIR TEXT [--raw]          prompt ids as the app computes them: TEXT as a user turn of the
 *                                           manifest's chat_template (plain text when it has none, or --raw)
 *   encode-json TOKENIZER_DIR FILE [TEMPLATE]  the encoder alone, for a JSON array of texts; prints an array of id
 *                                           arrays: plain text, or with TEMPLATE (a file holding a chat_template
 *                                           value as a manifest has it) each text as a user turn of it
 *   check-manifests FILE                    JSON array of manifest objects; prints null or the error of each
 *   mask SPEC NUM_LAYERS [PROTECTED]        override vector for a mask spec (Java rules); PROTECTED: comma
 *                                           separated protected layers (routing.protected_layers)
 *   native-mask SPEC NUM_LAYERS             the same through the JNI bridge (the core's rules, no protected layers)
 *   decode BUNDLE_DIR IDS                   token ids to text with the core's detokenizer (through JNI)
 *   stream BUNDLE_DIR IDS N [MASK]          generate with a token listener: one JSON line per token, then the result
 *   describe BITS                           the skipped-layers line the app shows
 *   result FILE                             validate run-result JSON lines
 *   bench KEY=VALUE ...                     run the headless benchmark logic (BenchmarkActivity's extras)
 *   activity FILES_DIR BUNDLES_DIR KEY=VALUE...  what BenchmarkActivity does with its intent (relative bundle and
 *                                           out resolved like on the phone; status file even for bad extras)
 * </pre>
 *
 * Exit status 0 on success, 1 on a failure (one line on stderr), 2 on a usage error.
 */
public final class LogicTool {
  private LogicTool() {}

  public static void main(String[] args) {
    try {
      System.exit(run(args));
    } catch (IllegalArgumentException | BundleException e) {
      System.err.println("error: " + e.getMessage());
      System.exit(1);
    } catch (Exception e) {
      System.err.println("error: " + e);
      System.exit(1);
    }
  }

  static int run(String[] a) throws Exception {
    if (a.length == 0) return usage();
    switch (a[0]) {
      case "manifest": {
        if (a.length < 2) return usage();
        boolean hashes = !Arrays.asList(a).contains("--no-hashes");
        BundleManifest m = BundleManifest.read(new File(a[1]), hashes);
        System.out.println(JsonText.object("ok", true, "model_id", m.modelId, "num_layers", m.numLayers,
            "max_seq_len", m.maxSeqLen, "pte", m.pteFile, "summary", m.summary()));
        return 0;
      }
      case "encode": {
        if (a.length < 3) return usage();
        File dir = new File(a[1]);
        BundleManifest m = BundleManifest.read(dir, true);
        PromptFormat fmt = Arrays.asList(a).contains("--raw") ? PromptFormat.PLAIN : m.promptFormat;
        System.out.println(JsonText.array(fmt.encode(BpeTokenizer.fromDirectory(new File(dir, "tokenizer")), a[2])));
        return 0;
      }
      case "encode-json": {
        if (a.length < 3 || a.length > 4) return usage();
        BpeTokenizer tok = BpeTokenizer.fromDirectory(new File(a[1]));
        PromptFormat fmt = PromptFormat.PLAIN;
        if (a.length == 4) {
          Object template = JsonText.parse(readText(new File(a[3])), a[3]);
          BundleManifest.checkChatTemplate(template, a[3]);
          fmt = PromptFormat.fromChatTemplate(template, 0);
        }
        JSONArray texts = JsonText.parseArray(readText(new File(a[2])), a[2]);
        JSONArray out = new JSONArray();
        for (int k = 0; k < texts.length(); k++) {
          Object t = JsonText.at(texts, k);
          if (!(t instanceof String)) throw new IllegalArgumentException(a[2] + ": texts must be strings");
          out.put(JsonText.array(fmt.tokenize(tok, (String) t)));
        }
        System.out.println(out);
        return 0;
      }
      case "check-manifests": {
        if (a.length < 2) return usage();
        JSONArray manifests = JsonText.parseArray(readText(new File(a[1])), a[1]);
        JSONArray out = new JSONArray();
        for (int k = 0; k < manifests.length(); k++) {
          try {
            BundleManifest.fromJson(JsonText.at(manifests, k), "manifest.json");
            out.put(JSONObject.NULL);
          } catch (BundleException e) {
            out.put(e.getMessage());
          }
        }
        System.out.println(out);
        return 0;
      }
      case "mask":
      case "native-mask": {
        if (a.length < 3) return usage();
        int n = Integer.parseInt(a[2]);
        long[] v;
        if (a[0].equals("mask")) {
          List<Integer> prot = new ArrayList<>();
          for (String p : (a.length > 3 ? a[3] : "").split(",")) {
            if (!p.trim().isEmpty()) prot.add(Integer.parseInt(p.trim()));
          }
          v = MaskFormat.parseSpec(a[1], n, prot);
        } else {
          System.loadLibrary("firstkit_jni");
          v = NativeRunner.parseMaskSpec(a[1], n);
        }
        System.out.println(v == null ? "null" : JsonText.array(v).toString());
        return 0;
      }
      case "decode":
      case "stream": {
        if (a.length < 3 || (a[0].equals("stream") && a.length < 4)) return usage();
        System.loadLibrary("firstkit_jni");
        long[] ids = BenchmarkRequest.parseIds(a[2]);
        try (NativeRunner r = NativeRunner.load(a[1], 1, true)) {
          if (a[0].equals("decode")) {
            System.out.println(JSONObject.quote(r.decode(ids)));
            return 0;
          }
          BundleManifest m = a.length > 4 ? BundleManifest.read(new File(a[1]), false) : null;
          long[] override = m != null ? MaskFormat.parseSpec(a[4], m.numLayers, m.protectedLayers) : null;
          String result = r.generate(ids, Integer.parseInt(a[3]), override, false, (tok, i, text) -> {
            System.out.println(JsonText.object("token", tok, "index", i, "text", text));
            return true;
          });
          RunResult.parse(result);
          System.out.println(result);
        }
        return 0;
      }
      case "describe":
        if (a.length < 2) return usage();
        System.out.println(MaskFormat.describe(a[1]));
        return 0;
      case "result": {
        if (a.length < 2) return usage();
        int n = 0;
        for (String line : Files.readAllLines(new File(a[1]).toPath(), StandardCharsets.UTF_8)) {
          if (line.trim().isEmpty()) continue;
          RunResult r = RunResult.parse(line);
          System.out.println(r.statsLine());
          n++;
        }
        if (n == 0) throw new IllegalArgumentException("no run results in " + a[1]);
        return 0;
      }
      case "bench": {
        Map<String, String> extras = new LinkedHashMap<>();
        for (int k = 1; k < a.length; k++) {
          int eq = a[k].indexOf('=');
          if (eq <= 0) return usage();
          extras.put(a[k].substring(0, eq), a[k].substring(eq + 1));
        }
        BenchmarkRequest req = BenchmarkRequest.fromExtras(extras);
        System.loadLibrary("firstkit_jni");
        return Benchmark.run(req, line -> { }) ? 0 : 1;
      }
      case "activity": {
        // BenchmarkActivity's entry point: FILES_DIR plays getExternalFilesDir(null), BUNDLES_DIR the bundle store
        if (a.length < 3) return usage();
        Map<String, String> extras = new LinkedHashMap<>();
        for (int k = 3; k < a.length; k++) {
          int eq = a[k].indexOf('=');
          if (eq <= 0) return usage();
          extras.put(a[k].substring(0, eq), a[k].substring(eq + 1));
        }
        String status = Benchmark.runIntent(extras, a[2], a[1], () -> System.loadLibrary("firstkit_jni"),
            line -> System.out.println("FIRSTKIT_RESULT " + line));
        System.out.println("FIRSTKIT_DONE " + status);
        return Boolean.TRUE.equals(JsonText.get(JsonText.parseObject(status, "status"), "ok")) ? 0 : 1;
      }
      default:
        return usage();
    }
  }

  private static int usage() {
    System.err.println("usage: LogicTool manifest DIR [--no-hashes] | encode DIR TEXT [--raw] | "
        + "encode-json TOKDIR FILE [TEMPLATE] | check-manifests FILE | mask SPEC N [PROTECTED] | decode DIR IDS | "
        + "stream DIR IDS N [MASK] | "
        + "native-mask SPEC N | describe BITS | result FILE | bench KEY=VALUE... | "
        + "activity FILES_DIR BUNDLES_DIR KEY=VALUE...");
    return 2;
  }

  /** Writes text to a file atomically (temp file in the same directory, then rename). */
  static void writeAtomically(File f, String text) throws IOException {
    File tmp = new File(f.getPath() + ".tmp");
    try (OutputStream o = new FileOutputStream(tmp)) {
      o.write(text.getBytes(StandardCharsets.UTF_8));
      o.flush();
    }
    if (!tmp.renameTo(f)) {
      Files.move(tmp.toPath(), f.toPath(), java.nio.file.StandardCopyOption.REPLACE_EXISTING);
    }
  }

  static String readText(File f) throws IOException {
    return new String(Files.readAllBytes(f.toPath()), StandardCharsets.UTF_8);
  }
}
