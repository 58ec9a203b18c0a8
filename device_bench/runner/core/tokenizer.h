// tokenizer.h -- decode-only reader of a Hugging Face tokenizer.json (ids -> text), plain C++17.
// Supports byte-level BPE (GPT-2 / SmolLM2 style, "ByteLevel" decoder) and SentencePiece-style
// vocabularies ("\u2581" word marker, "<0xNN>" byte fallback: Llama / Gemma style).
// Encoding text to ids is not implemented here: callers pass token ids (first-bench tokenizes on the host).
#pragma once

#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

namespace firstkit {

class Detokenizer {
 public:
  /// Load tokenizer.json. Throws RunnerError on a missing or malformed file.
  explicit Detokenizer(const std::string& tokenizer_json_path);
  /// Decode ids to UTF-8 text, skipping special tokens (like HF decode(skip_special_tokens=True)).
  std::string decode(const std::vector<int64_t>& ids) const;
  size_t vocab_size() const { return pieces_.size(); }

 private:
  std::vector<std::string> pieces_;       // id -> token string as stored in tokenizer.json
  std::unordered_set<int64_t> special_;   // ids of special added tokens
  bool byte_level_ = false;
  bool strip_leading_space_ = false;
};

}  // namespace firstkit
