// tokenizer.cpp -- see tokenizer.h.
#include "tokenizer.h"

#include <fstream>
#include <sstream>
#include <unordered_map>

#include "first_runner.h"
#include "json.h"

namespace firstkit {
namespace {

// GPT-2 bytes_to_unicode, inverted: unicode code point -> byte.
std::unordered_map<uint32_t, uint8_t> byte_decoder() {
  std::unordered_map<uint32_t, uint8_t> m;
  std::vector<int> bs;
  for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
  std::vector<int> cs = bs;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    bool found = false;
    for (int x : bs) found |= (x == b);
    if (!found) {
      bs.push_back(b);
      cs.push_back(256 + n++);
    }
  }
  for (size_t i = 0; i < bs.size(); ++i) m[uint32_t(cs[i])] = uint8_t(bs[i]);
  return m;
}

// Next UTF-8 code point of s from position i (advances i).
uint32_t next_cp(const std::string& s, size_t& i) {
  unsigned char c = s[i];
  uint32_t cp;
  int extra;
  if (c < 0x80) { cp = c; extra = 0; }
  else if ((c >> 5) == 0x6) { cp = c & 0x1F; extra = 1; }
  else if ((c >> 4) == 0xE) { cp = c & 0x0F; extra = 2; }
  else { cp = c & 0x07; extra = 3; }
  ++i;
  for (int k = 0; k < extra && i < s.size(); ++k, ++i) cp = (cp << 6) | (static_cast<unsigned char>(s[i]) & 0x3F);
  return cp;
}

bool mentions(const json::Value* v, const std::string& type) {
  if (!v) return false;
  if (v->is_object()) {
    const json::Value* t = v->get("type");
    if (t && t->is_string() && t->str == type) return true;
    for (const auto& kv : v->obj)
      if (mentions(&kv.second, type)) return true;
  } else if (v->is_array()) {
    for (const auto& x : v->arr)
      if (mentions(&x, type)) return true;
  }
  return false;
}

}  // namespace

Detokenizer::Detokenizer(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RunnerError("cannot read tokenizer " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  json::Value doc;
  try {
    doc = json::parse(ss.str());
  } catch (const std::exception& e) {
    throw RunnerError("malformed tokenizer " + path + ": " + e.what());
  }
  const json::Value* vocab = doc.path({"model", "vocab"});
  if (!vocab) throw RunnerError("tokenizer " + path + " has no model.vocab");
  auto put = [this](int64_t id, const std::string& tok) {
    if (id < 0) return;
    if (size_t(id) >= pieces_.size()) pieces_.resize(size_t(id) + 1);
    pieces_[size_t(id)] = tok;
  };
  if (vocab->is_object()) {
    for (const auto& kv : vocab->obj)
      if (kv.second.is_number()) put(kv.second.integer, kv.first);
  } else if (vocab->is_array()) {  // Unigram: [[piece, score], ...]
    for (size_t i = 0; i < vocab->arr.size(); ++i)
      if (vocab->arr[i].is_array() && !vocab->arr[i].arr.empty()) put(int64_t(i), vocab->arr[i].arr[0].str);
  }
  if (const json::Value* added = doc.get("added_tokens"); added && added->is_array()) {
    for (const auto& t : added->arr) {
      const json::Value* id = t.get("id");
      const json::Value* content = t.get("content");
      if (!id || !content) continue;
      put(id->integer, content->str);
      const json::Value* sp = t.get("special");
      if (sp && sp->is_bool() && sp->b) special_.insert(id->integer);
    }
  }
  const json::Value* decoder = doc.get("decoder");
  byte_level_ = mentions(decoder, "ByteLevel") || mentions(doc.get("pre_tokenizer"), "ByteLevel");
  strip_leading_space_ = mentions(decoder, "Strip");
}

std::string Detokenizer::decode(const std::vector<int64_t>& ids) const {
  static const std::unordered_map<uint32_t, uint8_t> bytes = byte_decoder();
  std::string out;
  for (int64_t id : ids) {
    if (id < 0 || size_t(id) >= pieces_.size() || special_.count(id)) continue;
    const std::string& p = pieces_[size_t(id)];
    if (byte_level_) {
      for (size_t i = 0; i < p.size();) {
        uint32_t cp = next_cp(p, i);
        auto it = bytes.find(cp);
        if (it != bytes.end()) out += static_cast<char>(it->second);
      }
    } else if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>') {
      out += static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16));
    } else {
      for (size_t i = 0; i < p.size();) {
        if (p.compare(i, 3, "\xE2\x96\x81") == 0) {  // U+2581 word marker
          out += ' ';
          i += 3;
        } else {
          out += p[i++];
        }
      }
    }
  }
  if (!byte_level_ && strip_leading_space_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

}  // namespace firstkit
