package org.firstkit.demo.logic;

import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.json.JSONArray;
import org.json.JSONObject;

/**
 * Text to token ids with a Hugging Face {@code tokenizer.json} (byte-level BPE: GPT-2, SmolLM2, Qwen style).
 *
 * <p>The native runner core only decodes (ids to text), so the app encodes prompts here. Supported pieces:
 * model {@code BPE}; pre-tokenizers {@code ByteLevel} (with or without its GPT-2 regex), {@code Split}
 * (regex, isolated), {@code Digits} and {@code Sequence} of these; no normalizer or {@code NFC};
 * {@code TemplateProcessing} post-processor; added tokens are matched first. Anything else is refused with a
 * clear message rather than encoded differently from the Python tokenizer.
 */
public final class BpeTokenizer {
  static final String GPT2_PATTERN =
      "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

  private final Map<String, Integer> vocab = new HashMap<>();
  private final Map<String, Integer> mergeRank = new HashMap<>();
  private final Map<String, Integer> added = new LinkedHashMap<>();
  private final Pattern addedPattern;
  private final List<Object[]> preSteps = new ArrayList<>(); // {"split", Pattern} | {"digits", Boolean}
  private boolean byteLevel;
  private boolean addPrefixSpace;
  private final boolean nfc;
  /** TemplateProcessing "single": null = the text's ids, else a special token name (null list: no template). */
  private final List<String> templateSingle;
  private final Map<String, long[]> templateSpecials = new HashMap<>();
  private final Integer unkId;
  private final Map<String, long[]> cache = new HashMap<>();
  private static final String[] BYTE_TO_UNICODE = byteToUnicode();

  /**
   * Loads {@code tokenizer.json}. Throws {@link IllegalArgumentException} (one line, "tokenizer: ...") for invalid
   * JSON, a malformed file and unsupported tokenizers.
   */
  public BpeTokenizer(String tokenizerJson) {
    JSONObject t = JsonText.parseObject(tokenizerJson, "tokenizer: tokenizer.json");
    JSONObject model = obj(t, "model");
    if (model == null || !"BPE".equals(JsonText.get(model, "type"))) {
      throw new IllegalArgumentException("tokenizer: only BPE models are supported, got "
          + (model == null ? "none" : JsonText.get(model, "type")));
    }
    if (Boolean.TRUE.equals(JsonText.get(model, "byte_fallback"))) {
      throw new IllegalArgumentException("tokenizer: byte-fallback (SentencePiece-style) BPE is not supported");
    }
    JSONObject v = required(obj(model, "vocab"), "model.vocab");
    for (String token : JsonText.keys(v)) vocab.put(token, (int) integer(JsonText.get(v, token), "model.vocab"));
    JSONArray merges = required(arr(model, "merges"), "model.merges");
    for (int r = 0; r < merges.length(); r++) {
      Object m = JsonText.at(merges, r);
      String key;
      if (m instanceof String) {
        key = (String) m;
      } else if (m instanceof JSONArray && ((JSONArray) m).length() == 2) {
        key = string(JsonText.at((JSONArray) m, 0), "model.merges") + " "
            + string(JsonText.at((JSONArray) m, 1), "model.merges");
      } else {
        throw new IllegalArgumentException("tokenizer: model.merges must hold strings or pairs of strings");
      }
      mergeRank.putIfAbsent(key, r);
    }
    Object unk = JsonText.get(model, "unk_token");
    unkId = unk instanceof String ? vocab.get(unk) : null;

    JSONArray addedTokens = arr(t, "added_tokens");
    if (addedTokens != null) {
      List<String> contents = new ArrayList<>();
      for (int k = 0; k < addedTokens.length(); k++) {
        JSONObject a = object(JsonText.at(addedTokens, k), "added_tokens");
        String c = string(JsonText.get(a, "content"), "added_tokens content");
        added.put(c, (int) integer(JsonText.get(a, "id"), "added_tokens id"));
        contents.add(c);
      }
      contents.sort((a, b) -> b.length() - a.length());
      StringBuilder alt = new StringBuilder();
      for (String c : contents) alt.append(alt.length() > 0 ? "|" : "").append(Pattern.quote(c));
      addedPattern = contents.isEmpty() ? null : Pattern.compile(alt.toString());
    } else {
      addedPattern = null;
    }

    JSONObject norm = obj(t, "normalizer");
    if (norm == null) {
      nfc = false;
    } else if ("NFC".equals(JsonText.get(norm, "type"))) {
      nfc = true;
    } else {
      throw new IllegalArgumentException("tokenizer: normalizer " + JsonText.get(norm, "type")
          + " is not supported");
    }
    JSONObject pre = obj(t, "pre_tokenizer");
    if (pre == null) throw new IllegalArgumentException("tokenizer: a pre_tokenizer is required");
    addPre(pre);
    if (!byteLevel) throw new IllegalArgumentException("tokenizer: only byte-level BPE is supported");

    JSONObject post = obj(t, "post_processor");
    List<String> single = null;
    if (post != null) {
      String type = String.valueOf(JsonText.get(post, "type"));
      if (type.equals("TemplateProcessing")) {
        single = new ArrayList<>();
        JSONArray pieces = required(arr(post, "single"), "post_processor.single");
        for (int k = 0; k < pieces.length(); k++) {
          JSONObject piece = object(JsonText.at(pieces, k), "post_processor.single");
          if (piece.has("Sequence")) {
            single.add(null);
          } else if (piece.has("SpecialToken")) {
            JSONObject sp = object(JsonText.get(piece, "SpecialToken"), "post_processor.single SpecialToken");
            single.add(String.valueOf(JsonText.get(sp, "id")));
          }
        }
        JSONObject specials = obj(post, "special_tokens");
        if (specials != null) {
          for (String name : JsonText.keys(specials)) {
            JSONObject sp = object(JsonText.get(specials, name), "post_processor.special_tokens");
            JSONArray ids = required(arr(sp, "ids"), "post_processor.special_tokens ids");
            long[] a = new long[ids.length()];
            for (int k = 0; k < a.length; k++) a[k] = integer(JsonText.at(ids, k), "post_processor.special_tokens ids");
            templateSpecials.put(name, a);
          }
        }
      } else if (!type.equals("ByteLevel")) {
        throw new IllegalArgumentException("tokenizer: post_processor " + type + " is not supported");
      }
    }
    templateSingle = single;
  }

  /** Loads {@code dir/tokenizer.json}. */
  public static BpeTokenizer fromDirectory(File dir) throws IOException {
    File f = new File(dir, "tokenizer.json");
    return new BpeTokenizer(new String(Files.readAllBytes(f.toPath()), StandardCharsets.UTF_8));
  }

  // Typed access to tokenizer.json: a wrong type is a one-line "tokenizer: ..." error, never a ClassCastException.

  private static JSONObject object(Object v, String what) {
    if (!(v instanceof JSONObject)) throw new IllegalArgumentException("tokenizer: " + what + " must be an object");
    return (JSONObject) v;
  }

  /** Member {@code key} as an object, or null when absent or null. */
  private static JSONObject obj(JSONObject o, String key) {
    Object v = JsonText.get(o, key);
    return v == null ? null : object(v, key);
  }

  /** Member {@code key} as an array, or null when absent or null. */
  private static JSONArray arr(JSONObject o, String key) {
    Object v = JsonText.get(o, key);
    if (v == null) return null;
    if (!(v instanceof JSONArray)) throw new IllegalArgumentException("tokenizer: " + key + " must be an array");
    return (JSONArray) v;
  }

  private static <T> T required(T v, String what) {
    if (v == null) throw new IllegalArgumentException("tokenizer: " + what + " is missing");
    return v;
  }

  private static long integer(Object v, String what) {
    if (!JsonText.isInt(v)) throw new IllegalArgumentException("tokenizer: " + what + " must hold integers");
    return ((Number) v).longValue();
  }

  private static String string(Object v, String what) {
    if (!(v instanceof String)) throw new IllegalArgumentException("tokenizer: " + what + " must hold strings");
    return (String) v;
  }

  private void addPre(JSONObject p) {
    String type = String.valueOf(JsonText.get(p, "type"));
    switch (type) {
      case "Sequence": {
        JSONArray steps = required(arr(p, "pretokenizers"), "pre_tokenizer pretokenizers");
        for (int k = 0; k < steps.length(); k++) addPre(object(JsonText.at(steps, k), "pretokenizers"));
        break;
      }
      case "ByteLevel":
        byteLevel = true;
        addPrefixSpace = Boolean.TRUE.equals(JsonText.get(p, "add_prefix_space"));
        if (!Boolean.FALSE.equals(JsonText.get(p, "use_regex"))) {
          preSteps.add(new Object[] {"split", Pattern.compile(GPT2_PATTERN, Pattern.UNICODE_CHARACTER_CLASS)});
        }
        break;
      case "Split": {
        JSONObject pat = obj(p, "pattern");
        String behavior = String.valueOf(JsonText.get(p, "behavior"));
        if (pat == null || !(JsonText.get(pat, "Regex") instanceof String) || !behavior.equals("Isolated")
            || Boolean.TRUE.equals(JsonText.get(p, "invert"))) {
          throw new IllegalArgumentException("tokenizer: only isolated regex Split pre-tokenizers are supported");
        }
        preSteps.add(new Object[] {"split", Pattern.compile((String) JsonText.get(pat, "Regex"),
            Pattern.UNICODE_CHARACTER_CLASS)});
        break;
      }
      case "Digits":
        preSteps.add(new Object[] {"digits", Boolean.TRUE.equals(JsonText.get(p, "individual_digits"))});
        break;
      default:
        throw new IllegalArgumentException("tokenizer: pre_tokenizer " + type + " is not supported");
    }
  }

  /** Vocabulary id of a token string (including added tokens), or -1. */
  public int tokenId(String token) {
    Integer a = added.get(token);
    if (a != null) return a;
    Integer v = vocab.get(token);
    return v == null ? -1 : v;
  }

  /**
   * Encodes text like Hugging Face {@code tokenizer(text, add_special_tokens=...)}: added tokens are split out
   * first, the rest is pre-tokenized, mapped to byte-level symbols and merged by BPE rank.
   */
  public long[] encode(String text, boolean addSpecialTokens) {
    List<Long> ids = new ArrayList<>();
    int last = 0;
    if (addedPattern != null) {
      Matcher m = addedPattern.matcher(text);
      while (m.find()) {
        encodeSegment(text.substring(last, m.start()), ids);
        ids.add((long) added.get(m.group()));
        last = m.end();
      }
    }
    encodeSegment(text.substring(last), ids);
    long[] body = new long[ids.size()];
    for (int k = 0; k < body.length; k++) body[k] = ids.get(k);
    if (!addSpecialTokens || templateSingle == null) return body;
    List<Long> out = new ArrayList<>();
    for (String special : templateSingle) {
      if (special == null) {  // the "Sequence" piece: the text's own ids
        for (long x : body) out.add(x);
      } else {
        long[] sp = templateSpecials.get(special);
        if (sp == null) throw new IllegalArgumentException("tokenizer: unknown special token " + special);
        for (long x : sp) out.add(x);
      }
    }
    long[] r = new long[out.size()];
    for (int k = 0; k < r.length; k++) r[k] = out.get(k);
    return r;
  }

  private void encodeSegment(String s, List<Long> ids) {
    if (s.isEmpty()) return;
    if (nfc) s = java.text.Normalizer.normalize(s, java.text.Normalizer.Form.NFC);
    if (addPrefixSpace && !s.startsWith(" ")) s = " " + s;
    List<String> pieces = Collections.singletonList(s);
    for (Object[] step : preSteps) {
      List<String> next = new ArrayList<>();
      for (String p : pieces) {
        if (step[0].equals("split")) split((Pattern) step[1], p, next);
        else digits(p, (Boolean) step[1], next);
      }
      pieces = next;
    }
    for (String p : pieces) {
      for (long id : bpe(toByteLevel(p))) ids.add(id);
    }
  }

  private static void split(Pattern pat, String s, List<String> out) {
    Matcher m = pat.matcher(s);
    int last = 0;
    while (m.find()) {
      if (m.start() == m.end()) continue;
      if (m.start() > last) out.add(s.substring(last, m.start()));
      out.add(m.group());
      last = m.end();
    }
    if (last < s.length()) out.add(s.substring(last));
  }

  private static void digits(String s, boolean individual, List<String> out) {
    StringBuilder cur = new StringBuilder();
    boolean curDigit = false;
    for (int k = 0; k < s.length(); ) {
      int cp = s.codePointAt(k);
      boolean d = Character.isDigit(cp);
      if (cur.length() > 0 && (d != curDigit || (d && individual))) {
        out.add(cur.toString());
        cur.setLength(0);
      }
      cur.appendCodePoint(cp);
      curDigit = d;
      k += Character.charCount(cp);
    }
    if (cur.length() > 0) out.add(cur.toString());
  }

  private static String toByteLevel(String s) {
    StringBuilder b = new StringBuilder();
    for (byte x : s.getBytes(StandardCharsets.UTF_8)) b.append(BYTE_TO_UNICODE[x & 0xff]);
    return b.toString();
  }

  private long[] bpe(String word) {
    long[] hit = cache.get(word);
    if (hit != null) return hit;
    List<String> sym = new ArrayList<>();
    for (int k = 0; k < word.length(); ) {
      int cp = word.codePointAt(k);
      sym.add(new String(Character.toChars(cp)));
      k += Character.charCount(cp);
    }
    while (sym.size() > 1) {
      int best = -1;
      int bestRank = Integer.MAX_VALUE;
      for (int k = 0; k + 1 < sym.size(); k++) {
        Integer r = mergeRank.get(sym.get(k) + " " + sym.get(k + 1));
        if (r != null && r < bestRank) {
          bestRank = r;
          best = k;
        }
      }
      if (best < 0) break;
      String a = sym.get(best);
      String b = sym.get(best + 1);
      List<String> merged = new ArrayList<>();
      for (int k = 0; k < sym.size(); ) {
        if (k + 1 < sym.size() && sym.get(k).equals(a) && sym.get(k + 1).equals(b)) {
          merged.add(a + b);
          k += 2;
        } else {
          merged.add(sym.get(k));
          k++;
        }
      }
      sym = merged;
    }
    long[] out = new long[sym.size()];
    for (int k = 0; k < out.length; k++) {
      Integer id = vocab.get(sym.get(k));
      if (id == null) {
        if (unkId == null) throw new IllegalArgumentException("tokenizer: no id for symbol '" + sym.get(k) + "'");
        id = unkId;
      }
      out[k] = id;
    }
    if (cache.size() < 50000) cache.put(word, out);
    return out;
  }

  /** GPT-2's reversible byte to printable-unicode table. */
  private static String[] byteToUnicode() {
    String[] t = new String[256];
    int n = 0;
    for (int b = 0; b < 256; b++) {
      boolean printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? String.valueOf((char) b) : String.valueOf((char) (256 + n++));
    }
    return t;
  }
}
