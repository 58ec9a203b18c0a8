// tokenizer.cpp -- see tokenizer.h.
#include "tokenizer.h"

#include <fstream>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "first_runner.h"

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

using nlohmann::json;

// Whether v, or anything inside it, is an object with "type": type (a decoder/pre-tokenizer of that kind,
// possibly inside a Sequence). Nesting deeper than any real tokenizer.json is not followed.
bool mentions(const json& v, const std::string& type, int depth = 0) {
  if (depth > 32) return false;
  if (v.is_object()) {
    if (auto t = v.find("type"); t != v.end() && t->is_string() && t->get_ref<const std::string&>() == type)
      return true;
    for (const json& x : v)
      if (mentions(x, type, depth + 1)) return true;
  } else if (v.is_array()) {
    for (const json& x : v)
      if (mentions(x, type, depth + 1)) return true;
  }
  return false;
}

// A non-negative integer id (JSON integer), or -1.
int64_t id_of(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>() <= uint64_t(INT64_MAX) ? int64_t(v.get<uint64_t>()) : -1;
  if (v.is_number_integer()) return v.get<int64_t>();
  return -1;
}

}  // namespace

Detokenizer::Detokenizer(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RunnerError("cannot read tokenizer " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    const json doc = json::parse(ss.str());
    if (!doc.is_object()) throw RunnerError("malformed tokenizer " + path + ": not a JSON object");
    const auto model = doc.find("model");
    const json* vocab = nullptr;
    if (model != doc.end() && model->is_object())
      if (auto v = model->find("vocab"); v != model->end()) vocab = &*v;
    if (!vocab) throw RunnerError("tokenizer " + path + " has no model.vocab");
    auto put = [this, &path](int64_t id, const std::string& tok) {
      if (id < 0) return;
      if (id >= (int64_t(1) << 24))  // vocabularies have at most a few 100k entries
        throw RunnerError("malformed tokenizer " + path + ": token id " + std::to_string(id) + " is out of range");
      if (size_t(id) >= pieces_.size()) pieces_.resize(size_t(id) + 1);
      pieces_[size_t(id)] = tok;
    };
    if (vocab->is_object()) {  // BPE / WordPiece: {piece: id}
      for (const auto& kv : vocab->items()) put(id_of(kv.value()), kv.key());
    } else if (vocab->is_array()) {  // Unigram: [[piece, score], ...]
      for (size_t i = 0; i < vocab->size(); ++i) {
        const json& e = (*vocab)[i];
        if (e.is_array() && !e.empty() && e[0].is_string()) put(int64_t(i), e[0].get<std::string>());
      }
    }
    if (auto added = doc.find("added_tokens"); added != doc.end() && added->is_array()) {
      for (const json& t : *added) {
        if (!t.is_object()) continue;
        auto id = t.find("id"), content = t.find("content"), sp = t.find("special");
        if (id == t.end() || content == t.end() || !content->is_string() || id_of(*id) < 0) continue;
        put(id_of(*id), content->get<std::string>());
        if (sp != t.end() && sp->is_boolean() && sp->get<bool>()) special_.insert(id_of(*id));
      }
    }
    const json none;
    auto member = [&doc, &none](const char* k) -> const json& {
      auto it = doc.find(k);
      return it == doc.end() ? none : *it;
    };
    byte_level_ = mentions(member("decoder"), "ByteLevel") || mentions(member("pre_tokenizer"), "ByteLevel");
    strip_leading_space_ = mentions(member("decoder"), "Strip");
  } catch (const json::exception& e) {
    std::string what = e.what();  // without the "[json.exception.parse_error.101] " prefix
    if (size_t close = what.find("] "); !what.empty() && what[0] == '[' && close != std::string::npos)
      what.erase(0, close + 2);
    throw RunnerError("malformed tokenizer " + path + ": " + what);
  }
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
