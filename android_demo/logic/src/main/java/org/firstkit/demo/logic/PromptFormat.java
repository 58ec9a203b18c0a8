package org.firstkit.demo.logic;

import org.json.JSONObject;

/**
 * How a user prompt becomes model input, exactly as the Python runtime's {@code BundleRunner.encode} (first-run):
 * {@code first-export} renders the model's chat template around one user turn into the manifest
 * ({@code chat_template}: {@code prefix}, {@code suffix}, the generation prompt included), and the prompt ids are
 * those of {@code prefix + message + suffix} tokenized without added special tokens. A bundle whose manifest has
 * no chat template ({@code chat_template} null or absent) encodes the message as plain text, with the tokenizer's
 * special tokens. No template is evaluated or recognised here (docs/bundle_format.md).
 */
public final class PromptFormat {
  /** Plain text: no chat template (also {@code first-run --raw}). */
  public static final PromptFormat PLAIN = new PromptFormat(null, null, 0);

  /** Text before the message (null: plain text). */
  public final String prefix;
  /** Text after the message, the generation prompt included (null: plain text). */
  public final String suffix;
  /** The model's vocabulary size (model.vocab_size): every prompt id must be below it; 0 = not checked. */
  public final long vocabSize;

  private PromptFormat(String prefix, String suffix, long vocabSize) {
    this.prefix = prefix;
    this.suffix = suffix;
    this.vocabSize = vocabSize;
  }

  /**
   * The format of a {@code chat_template} value as {@link BundleManifest#checkChatTemplate} accepted it: null (JSON
   * null or absent) is plain text, else an object with string {@code prefix} and {@code suffix}.
   */
  static PromptFormat fromChatTemplate(Object chatTemplate, long vocabSize) {
    if (chatTemplate == null || chatTemplate == JSONObject.NULL) return new PromptFormat(null, null, vocabSize);
    JSONObject t = (JSONObject) chatTemplate;
    return new PromptFormat((String) JsonText.get(t, "prefix"), (String) JsonText.get(t, "suffix"), vocabSize);
  }

  /** True when prompts are sent as a user turn of a chat template. */
  public boolean isChat() {
    return prefix != null;
  }

  /** The text that is tokenized for a message: {@code prefix + message + suffix}, or the message itself. */
  public String text(String message) {
    return isChat() ? prefix + message + suffix : message;
  }

  /** One phrase for the UI: how prompts are sent to this bundle. */
  public String describe() {
    return isChat() ? "prompts sent as a user turn of the chat template" : "no chat template: prompts are plain text";
  }

  /**
   * Prompt token ids: the chat text without added special tokens, or the plain message with the tokenizer's
   * special tokens. Throws {@link IllegalArgumentException} (one line) for an empty prompt, text that is not valid
   * UTF-8 (a lone surrogate) and ids outside the model's vocabulary (a tokenizer that does not belong to it).
   */
  public long[] encode(BpeTokenizer tok, String message) {
    if (message == null || message.isEmpty()) throw new IllegalArgumentException("empty prompt");
    checkText(message, "prompt");
    long[] ids = tokenize(tok, message);
    if (vocabSize > 0) {
      for (long id : ids) {
        if (id < 0 || id >= vocabSize) {
          throw new IllegalArgumentException("the bundle's tokenizer produced token id " + id + ", outside the "
              + "model's vocabulary (" + vocabSize + "); tokenizer/ does not belong to this model");
        }
      }
    }
    return ids;
  }

  /** The ids alone (no checks): the chat text without added special tokens, or the text with them. */
  long[] tokenize(BpeTokenizer tok, String message) {
    return isChat() ? tok.encode(text(message), false) : tok.encode(message, true);
  }

  /** Refuses text that cannot be encoded as UTF-8 (a lone surrogate), like the Python runtime's check_text. */
  static void checkText(String text, String what) {
    int cpIndex = 0;
    for (int k = 0; k < text.length(); cpIndex++) {
      int cp = text.codePointAt(k);
      if (cp >= 0xD800 && cp <= 0xDFFF) {
        throw new IllegalArgumentException(what + " is not valid UTF-8 text (" + String.format("U+%04X", cp)
            + " at character " + cpIndex + "); pass UTF-8 text");
      }
      k += Character.charCount(cp);
    }
  }
}
