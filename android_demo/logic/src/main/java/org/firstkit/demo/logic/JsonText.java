package org.firstkit.demo.logic;

import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;
import org.json.JSONStringer;
import org.json.JSONTokener;

/**
 * The logic module's glue to {@code org.json} (part of Android; on a desktop JVM the same API comes from Debian's
 * libandroid-json-java, {@code /usr/share/java/com.android.json.jar}). org.json does all parsing and writing;
 * this only makes a whole document one value with a one-line error, and gives the few value tests the contract
 * checks need (JSON null and a missing key both read as Java null, integers are Integer or Long).
 */
final class JsonText {
  private static final Pattern POSITION = Pattern.compile("( at character \\d+) of .*", Pattern.DOTALL);

  private JsonText() {}

  /**
   * Parses a complete JSON document (trailing non-whitespace is refused). On bad input throws
   * {@link IllegalArgumentException} "WHAT: invalid JSON (org.json's reason)", one line; {@code what} names the
   * document (a file, "run result", ...). Objects are {@link JSONObject}, arrays {@link JSONArray}, JSON null
   * {@link JSONObject#NULL}.
   */
  static Object parse(String text, String what) {
    if (text == null) throw new IllegalArgumentException(what + ": invalid JSON (no text)");
    JSONTokener t = new JSONTokener(text);
    Object v;
    try {
      v = t.nextValue();
    } catch (JSONException e) {
      throw new IllegalArgumentException(what + ": invalid JSON (" + reason(e) + ")");
    } catch (StackOverflowError e) {
      throw new IllegalArgumentException(what + ": invalid JSON (nested too deeply)");
    }
    while (t.more()) {
      char c = t.next();
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
        throw new IllegalArgumentException(what + ": invalid JSON (trailing characters after the value)");
      }
    }
    return v;
  }

  /** Parses a document that must be an object. */
  static JSONObject parseObject(String text, String what) {
    Object v = parse(text, what);
    if (!(v instanceof JSONObject)) throw new IllegalArgumentException(what + ": not a JSON object");
    return (JSONObject) v;
  }

  /** Parses a document that must be an array. */
  static JSONArray parseArray(String text, String what) {
    Object v = parse(text, what);
    if (!(v instanceof JSONArray)) throw new IllegalArgumentException(what + ": not a JSON array");
    return (JSONArray) v;
  }

  /** org.json's message without the document it appends (Android: "... at character N of TEXT"), one line. */
  static String reason(Exception e) {
    String m = e.getMessage() == null ? e.toString() : e.getMessage();
    Matcher pos = POSITION.matcher(m);
    if (pos.find()) m = m.substring(0, pos.start()) + pos.group(1);
    m = m.replaceAll("\\s+", " ").trim();
    return m.length() > 200 ? m.substring(0, 200) + "..." : m;
  }

  /** Member {@code key}, or null when it is absent or JSON null. */
  static Object get(JSONObject o, String key) {
    return o.isNull(key) ? null : o.opt(key);
  }

  /** Element {@code i}, or null when it is JSON null. */
  static Object at(JSONArray a, int i) {
    return a.isNull(i) ? null : a.opt(i);
  }

  /** The object's keys in document order (Android's JSONObject keeps it; its {@code keySet()} is hidden API). */
  static List<String> keys(JSONObject o) {
    List<String> out = new ArrayList<>();
    for (Iterator<?> it = o.keys(); it.hasNext(); ) out.add((String) it.next());  // raw Iterator in older Androids
    return out;
  }

  /** True when {@code v} is an integral JSON number (org.json gives Integer or Long; never a boolean). */
  static boolean isInt(Object v) {
    return v instanceof Integer || v instanceof Long;
  }

  /** A JSON array of the ids. */
  static JSONArray array(long[] values) {
    JSONArray a = new JSONArray();
    for (long x : values) a.put(x);
    return a;
  }

  /**
   * One object, keys in the given order (alternating key, value; a null value is written as null). Values are
   * strings, numbers, booleans, {@link JSONArray}s or {@link JSONObject}s.
   */
  static String object(Object... keysAndValues) {
    try {
      JSONStringer s = new JSONStringer().object();
      for (int k = 0; k < keysAndValues.length; k += 2) {
        Object v = keysAndValues[k + 1];
        s.key((String) keysAndValues[k]).value(v == null ? JSONObject.NULL : v);
      }
      return s.endObject().toString();
    } catch (JSONException e) {
      throw new IllegalArgumentException("cannot write JSON (" + reason(e) + ")");
    }
  }
}
