package org.firstkit.demo.logic;

import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * How a user prompt becomes model input, matching {@code FirstModel.encode_chat}: the tokenizer's chat template
 * with one user turn and the generation prompt, or the raw text with the tokenizer's special tokens when the
 * bundle has no chat template. Jinja is not run on the phone: the two template families firstkit's default models
 * use are recognised (ChatML, with its default system turn, and Gemma turns); other templates are refused.
 */
public final class PromptFormat {
  /** Which format. */
  public enum Kind { RAW, CHATML, GEMMA }

  public final Kind kind;
  /** ChatML system turn the template inserts when the conversation has none (null: none). */
  public final String defaultSystem;

  public PromptFormat(Kind kind, String defaultSystem) {
    this.kind = kind;
    this.defaultSystem = defaultSystem;
  }

  /** Recognises a chat template text (null or empty: raw). */
  public static PromptFormat fromTemplate(String template) {
    if (template == null || template.trim().isEmpty()) return new PromptFormat(Kind.RAW, null);
    if (template.contains("<|im_start|>")) {
      Matcher m = Pattern.compile("<\\|im_start\\|>system\\n(.*?)<\\|im_end\\|>", Pattern.DOTALL).matcher(template);
      return new PromptFormat(Kind.CHATML, m.find() ? m.group(1) : null);
    }
    if (template.contains("<start_of_turn>")) return new PromptFormat(Kind.GEMMA, null);
    throw new IllegalArgumentException("unsupported chat template (only ChatML and Gemma turns are recognised)");
  }

  /** Reads the template from {@code chat_template.jinja} or {@code tokenizer_config.json} in a tokenizer dir. */
  public static PromptFormat fromTokenizerDir(File dir) throws IOException {
    File jinja = new File(dir, "chat_template.jinja");
    if (jinja.isFile()) return fromTemplate(read(jinja));
    File cfg = new File(dir, "tokenizer_config.json");
    if (cfg.isFile()) {
      Object t = JsonText.get(JsonText.parseObject(read(cfg), cfg.getPath()), "chat_template");
      if (t instanceof String) return fromTemplate((String) t);
    }
    return new PromptFormat(Kind.RAW, null);
  }

  private static String read(File f) throws IOException {
    return new String(Files.readAllBytes(f.toPath()), StandardCharsets.UTF_8);
  }

  /** The templated text of a single user turn plus the generation prompt (raw: the prompt itself). */
  public String render(String prompt, String bosToken) {
    switch (kind) {
      case CHATML: {
        StringBuilder b = new StringBuilder();
        if (defaultSystem != null) b.append("<|im_start|>system\n").append(defaultSystem).append("<|im_end|>\n");
        return b.append("<|im_start|>user\n").append(prompt).append("<|im_end|>\n<|im_start|>assistant\n")
            .toString();
      }
      case GEMMA:
        return (bosToken == null ? "" : bosToken) + "<start_of_turn>user\n" + prompt
            + "<end_of_turn>\n<start_of_turn>model\n";
      default:
        return prompt;
    }
  }

  /** Prompt token ids: templated text without extra specials, or raw text with the tokenizer's specials. */
  public long[] encode(BpeTokenizer tok, String prompt) {
    if (prompt == null || prompt.isEmpty()) throw new IllegalArgumentException("empty prompt");
    if (kind == Kind.RAW) return tok.encode(prompt, true);
    return tok.encode(render(prompt, kind == Kind.GEMMA ? "<bos>" : null), false);
  }
}
