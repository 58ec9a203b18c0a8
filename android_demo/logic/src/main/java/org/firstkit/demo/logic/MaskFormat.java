package org.firstkit.demo.logic;

import java.util.ArrayList;
import java.util.List;

/**
 * Layer masks as text (docs/CONTRACTS.md): one '0'/'1' per decoder layer, layer 0 first, 1 = the layer runs.
 * The same rules as the native core's {@code parse_mask_spec} and the Python
 * {@code firstkit.mask_spec.parse_mask_spec}; the app uses them for the benchmark's {@code mask}, the A/B toggle and
 * display.
 */
public final class MaskFormat {
  private MaskFormat() {}

  /**
   * Override vector for a mask spec: "auto" (or empty) gives null (routers decide), "all" gives all ones,
   * a bits string of length {@code numLayers} gives those bits, which must keep every protected layer running
   * ({@code protectedLayers}: the manifest's routing.protected_layers; negative indices count from the end, like
   * Python's). Throws {@link IllegalArgumentException} otherwise ("mask skips protected layer i" for a protected
   * layer the bits skip, the first in {@code protectedLayers} order, as the core says it).
   */
  public static long[] parseSpec(String spec, int numLayers, List<Integer> protectedLayers) {
    if (spec == null || spec.isEmpty() || spec.equals("auto")) return null;
    long[] out = new long[numLayers];
    if (spec.equals("all")) {
      java.util.Arrays.fill(out, 1);
      return out;
    }
    if (spec.length() != numLayers) {
      throw new IllegalArgumentException("mask '" + spec + "' has " + spec.length() + " bits, model has "
          + numLayers + " layers");
    }
    for (int i = 0; i < numLayers; i++) {
      char c = spec.charAt(i);
      if (c != '0' && c != '1') throw new IllegalArgumentException(notASpec(spec));
      out[i] = c == '1' ? 1 : 0;
    }
    for (int p : protectedLayers) {
      int i = Math.floorMod(p, numLayers);
      if (out[i] == 0) throw new IllegalArgumentException("mask skips protected layer " + i);
    }
    return out;
  }

  /**
   * Checks what a user typed before the model is known (the benchmark's {@code mask} extra): "auto", "all" or a
   * non-empty string of 0/1; {@link #parseSpec} checks the length and the protected layers once the bundle
   * is known.
   */
  public static void checkSpec(String spec) {
    if (spec == null || !(spec.equals("auto") || spec.equals("all") || isBits(spec))) {
      throw new IllegalArgumentException(notASpec(spec));
    }
  }

  private static String notASpec(String spec) {
    return "mask must be auto, all or a string of 0/1, got '" + spec + "'";
  }

  /** True for a non-empty string of '0'/'1' (a mask as text). */
  public static boolean isBits(String bits) {
    if (bits == null || bits.isEmpty()) return false;
    for (int i = 0; i < bits.length(); i++) {
      if (bits.charAt(i) != '0' && bits.charAt(i) != '1') return false;
    }
    return true;
  }

  /** Checks a mask bits string as it comes back from a run. */
  public static void checkBits(String bits, int numLayers) {
    if (bits == null || bits.length() != numLayers) {
      throw new IllegalArgumentException("mask has " + (bits == null ? 0 : bits.length()) + " bits, model has "
          + numLayers + " layers");
    }
    if (!isBits(bits)) throw new IllegalArgumentException("mask is not 0/1 text");
  }

  /** Indices of skipped layers (the '0' bits). */
  public static List<Integer> skippedLayers(String bits) {
    List<Integer> out = new ArrayList<>();
    for (int i = 0; i < bits.length(); i++) if (bits.charAt(i) == '0') out.add(i);
    return out;
  }

  /** Skipped layers / all layers (0 for an empty mask). */
  public static double skipRatio(String bits) {
    return bits.isEmpty() ? 0.0 : (double) skippedLayers(bits).size() / bits.length();
  }

  /** Compact ranges of layer indices, e.g. [3,4,5,9] gives "3-5, 9"; empty gives "none". */
  public static String ranges(List<Integer> layers) {
    if (layers.isEmpty()) return "none";
    StringBuilder b = new StringBuilder();
    int start = layers.get(0);
    int prev = start;
    for (int k = 1; k <= layers.size(); k++) {
      int cur = k < layers.size() ? layers.get(k) : Integer.MIN_VALUE;
      if (cur != prev + 1) {
        if (b.length() > 0) b.append(", ");
        b.append(start == prev ? String.valueOf(start) : start + "-" + prev);
        start = cur;
      }
      prev = cur;
    }
    return b.toString();
  }

  /**
   * One line for the skipped-layers view: a cell per layer ("█" runs, "·" skipped) in groups of ten,
   * then the count, e.g. "██·█ — skipped 1/4 (layer 2)".
   */
  public static String describe(String bits) {
    StringBuilder cells = new StringBuilder();
    for (int i = 0; i < bits.length(); i++) {
      if (i > 0 && i % 10 == 0) cells.append(' ');
      cells.append(bits.charAt(i) == '1' ? '\u2588' : '\u00b7');
    }
    List<Integer> skipped = skippedLayers(bits);
    String which = skipped.isEmpty() ? "no layer" : (skipped.size() == 1 ? "layer " : "layers ") + ranges(skipped);
    return cells + " \u2014 skipped " + skipped.size() + "/" + bits.length() + " (" + which + ")";
  }
}
