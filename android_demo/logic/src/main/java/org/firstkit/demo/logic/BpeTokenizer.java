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
  private final List<Object> templateSingle;
  private final Map<String, long[]> templateSpecials = new HashMap<>();
  private final Integer unkId;
  private final Map<String, long[]> cache = new HashMap<>();
  private static final String[] BYTE_TO_UNICODE = byteToUnicode();

  /** Loads {@code tokenizer.json}. Throws {@link IllegalArgumentException} for unsupported tokenizers. */
  @SuppressWarnings("unchecked")
  public BpeTokenizer(String tokenizerJson) {
    Map<String, Object> t = Json.parseObject(tokenizerJson);
    Map<String, Object> model = Json.obj(t, "model");
    if (model == null || !"BPE".equals(model.get("type"))) {
      throw new IllegalArgumentException("tokenizer: only BPE models are supported, got "
          + (model == null ? "none" : model.get("type")));
    }
    if (Boolean.TRUE.equals(model.get("byte_fallback"))) {
      throw new IllegalArgumentException("tokenizer: byte-fallback (SentencePiece-style) BPE is not supported");
    }
    for (Map.Entry<String, Object> e : Json.obj(model, "vocab").entrySet()) {
      vocab.put(e.getKey(), (int) ((Number) e.getValue()).longValue());
    }
    List<Object> merges = Json.arr(model, "merges");
    for (int r = 0; r < merges.size(); r++) {
      Object m = merges.get(r);
      String key;
      if (m instanceof String) key = (String) m;
      else key = ((List<Object>) m).get(0) + " " + ((List<Object>) m).get(1);
      mergeRank.putIfAbsent(key, r);
    }
    Object unk = model.get("unk_token");
    unkId = unk instanceof String ? vocab.get(unk) : null;

    List<Object> addedTokens = Json.arr(t, "added_tokens");
    if (addedTokens != null) {
      List<String> contents = new ArrayList<>();
      for (Object o : addedTokens) {
        Map<String, Object> a = (Map<String, Object>) o;
        String c = (String) a.get("content");
        added.put(c, (int) ((Number) a.get("id")).longValue());
        contents.add(c);
      }
      contents.sort((a, b) -> b.length() - a.length());
      StringBuilder alt = new StringBuilder();
      for (String c : contents) alt.append(alt.length() > 0 ? "|" : "").append(Pattern.quote(c));
      addedPattern = contents.isEmpty() ? null : Pattern.compile(alt.toString());
    } else {
      addedPattern = null;
    }

    Map<String, Object> norm = Json.obj(t, "normalizer");
    if (norm == null) {
      nfc = false;
    } else if ("NFC".equals(norm.get("type"))) {
      nfc = true;
    } else {
      throw new IllegalArgumentException("tokenizer: normalizer " + norm.get("type") + " is not supported");
    }
    Map<String, Object> pre = Json.obj(t, "pre_tokenizer");
    if (pre == null) throw new IllegalArgumentException("tokenizer: a pre_tokenizer is required");
    addPre(pre);
    if (!byteLevel) throw new IllegalArgumentException("tokenizer: only byte-level BPE is supported");

    Map<String, Object> post = Json.obj(t, "post_processor");
    List<Object> single = null;
    if (post != null) {
      String type = String.valueOf(post.get("type"));
      if (type.equals("TemplateProcessing")) {
        single = Json.arr(post, "single");
        Map<String, Object> specials = Json.obj(post, "special_tokens");
        if (specials != null) {
          for (Map.Entry<String, Object> e : specials.entrySet()) {
            List<Object> ids = Json.arr((Map<String, Object>) e.getValue(), "ids");
            long[] a = new long[ids.size()];
            for (int k = 0; k < a.length; k++) a[k] = ((Number) ids.get(k)).longValue();
            templateSpecials.put(e.getKey(), a);
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

  @SuppressWarnings("unchecked")
  private void addPre(Map<String, Object> p) {
    String type = String.valueOf(p.get("type"));
    switch (type) {
      case "Sequence":
        for (Object o : Json.arr(p, "pretokenizers")) addPre((Map<String, Object>) o);
        break;
      case "ByteLevel":
        byteLevel = true;
        addPrefixSpace = Boolean.TRUE.equals(p.get("add_prefix_space"));
        if (!Boolean.FALSE.equals(p.get("use_regex"))) {
          preSteps.add(new Object[] {"split", Pattern.compile(GPT2_PATTERN, Pattern.UNICODE_CHARACTER_CLASS)});
        }
        break;
      case "Split": {
        Map<String, Object> pat = Json.obj(p, "pattern");
        String behavior = String.valueOf(p.get("behavior"));
        if (pat == null || !pat.containsKey("Regex") || !behavior.equals("Isolated")
            || Boolean.TRUE.equals(p.get("invert"))) {
          throw new IllegalArgumentException("tokenizer: only isolated regex Split pre-tokenizers are supported");
        }
        preSteps.add(new Object[] {"split", Pattern.compile((String) pat.get("Regex"),
            Pattern.UNICODE_CHARACTER_CLASS)});
        break;
      }
      case "Digits":
        preSteps.add(new Object[] {"digits", Boolean.TRUE.equals(p.get("individual_digits"))});
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
    for (Object o : templateSingle) {
      @SuppressWarnings("unchecked")
      Map<String, Object> piece = (Map<String, Object>) o;
      if (piece.containsKey("Sequence")) {
        for (long x : body) out.add(x);
      } else if (piece.containsKey("SpecialToken")) {
        @SuppressWarnings("unchecked")
        String id = String.valueOf(((Map<String, Object>) piece.get("SpecialToken")).get("id"));
        long[] sp = templateSpecials.get(id);
        if (sp == null) throw new IllegalArgumentException("tokenizer: unknown special token " + id);
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
