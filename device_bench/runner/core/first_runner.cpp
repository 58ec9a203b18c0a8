// first_runner.cpp -- the FiRST runner core: bundle loading, prefill, frozen mask, per-layer decode.
#include "first_runner.h"

#include <limits.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <executorch/devtools/etdump/etdump_flatcc.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/backend/backend_options_map.h>
#include <executorch/runtime/backend/options.h>

#include <nlohmann/json.hpp>

#include "tokenizer.h"

// The wheel ships libexecutorch_threadpool.so but not its header; these two declarations match
// the exported symbols (executorch/extension/threadpool/threadpool.h in the ExecuTorch sources).
namespace executorch {
namespace extension {
namespace threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace threadpool
}  // namespace extension
}  // namespace executorch

namespace firstkit {

namespace {

// Length of the valid UTF-8 sequence at s[i] (1..4), 0 when the bytes there are not one.
size_t utf8_len(const std::string& s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return 0;
  return n;
}

// One line of UTF-8 of at most ~kMax bytes: control characters, invalid bytes and 4-byte sequences become \n, \t,
// \xNN (so it is also valid "modified UTF-8", what JNI's ThrowNew takes in the Android bridge).
std::string one_line(const std::string& s) {
  constexpr size_t kMax = 500;
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (out.size() >= kMax) {
      out += "...";
      break;
    }
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t n = utf8_len(s, i);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (n == 0 || n == 4 || c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    } else {
      out.append(s, i, n);
      i += n - 1;
    }
  }
  return out;
}

}  // namespace

RunnerError::RunnerError(const std::string& what) : std::runtime_error(one_line(what)) {}

namespace et = ::executorch;
using et::aten::ScalarType;
using et::extension::Module;
using et::runtime::EValue;

namespace {

// The memory-planned buffers of every method, shared the way Module(share_memory_arenas=true) shares them
// (buffer k of every method starts at the same address; the KV cache is one of them), but mapped lazily:
// Module's own arenas are zero-filled vectors, so the prefill's arena, planned for a max_seq_len prompt
// (hundreds of MB), would be resident from load on. Anonymous mmap pages become resident only when a
// method writes them, so memory follows the prompt and the filled cache rows actually used.
class LazySharedArenas {
 public:
  void reserve(size_t index, size_t bytes) {
    if (sizes_.size() <= index) sizes_.resize(index + 1, 0);
    sizes_[index] = std::max(sizes_[index], bytes);
  }
  void map() {
    for (size_t n : sizes_) {
      void* p = n ? ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) : nullptr;
      if (p == MAP_FAILED) throw RunnerError("cannot map " + std::to_string(n) + " bytes of planned memory");
      bases_.push_back(static_cast<uint8_t*>(p));
    }
  }
  // A HierarchicalAllocator over the shared arenas for a method whose buffer k needs sizes[k] bytes.
  et::runtime::HierarchicalAllocator* allocator_for(const std::vector<size_t>& sizes) {
    auto spans = std::make_unique<std::vector<et::runtime::Span<uint8_t>>>();
    for (size_t k = 0; k < sizes.size(); ++k) spans->emplace_back(bases_.at(k), sizes[k]);
    allocators_.push_back(std::make_unique<et::runtime::HierarchicalAllocator>(
        et::runtime::Span<et::runtime::Span<uint8_t>>(spans->data(), spans->size())));
    spans_.push_back(std::move(spans));
    return allocators_.back().get();
  }
  ~LazySharedArenas() {
    for (size_t k = 0; k < bases_.size(); ++k)
      if (bases_[k]) ::munmap(bases_[k], sizes_[k]);
  }

 private:
  std::vector<size_t> sizes_;
  std::vector<uint8_t*> bases_;
  std::vector<std::unique_ptr<std::vector<et::runtime::Span<uint8_t>>>> spans_;
  std::vector<std::unique_ptr<et::runtime::HierarchicalAllocator>> allocators_;
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RunnerError("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool file_exists(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return static_cast<bool>(f);
}

int64_t file_size(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return -1;
  return static_cast<int64_t>(f.tellg());
}

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) == nullptr) return std::string();
  return std::string(buf);
}

// The resolved path of a file the manifest lists: it must stay inside the bundle (no symlink out of it) and
// be a regular file (docs/bundle_format.md; firstkit.runtime.bundle.bundle_file applies the same rule).
std::string checked_bundle_file(const std::string& bundle_real, const std::string& bundle_dir,
                                const std::string& name) {
  const std::string real = real_path(join(bundle_dir, name));
  if (real.empty()) throw RunnerError("bundle file missing: " + name);
  if (real.compare(0, bundle_real.size() + 1, bundle_real + "/") != 0)
    throw RunnerError("bundle file " + name + " resolves outside the bundle (" + real + "); refusing to read it");
  struct stat st;
  if (::stat(real.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    throw RunnerError("bundle file " + name + " is not a regular file");
  return real;
}

std::string err_text(et::runtime::Error e) {
  return "ExecuTorch error " + std::to_string(static_cast<int>(e));
}

using nlohmann::json;

// A string as a JSON literal (quotes, escapes): how messages quote names and values taken from a manifest.
std::string json_text(const json& v) {
  return v.dump(-1, ' ', false, json::error_handler_t::replace);
}

// The message of a nlohmann exception without its "[json.exception.parse_error.101] " prefix.
std::string json_error_text(const json::exception& e) {
  std::string s = e.what();
  if (!s.empty() && s[0] == '[') {
    const size_t close = s.find("] ");
    if (close != std::string::npos) s.erase(0, close + 2);
  }
  return s;
}

// A strict JSON integer (4, not 4.0, not true) that fits int64_t.
bool strict_int(const json& v, int64_t& out) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(INT64_MAX)) return false;
    out = static_cast<int64_t>(u);
    return true;
  }
  if (v.is_number_integer()) {
    out = v.get<int64_t>();
    return true;
  }
  return false;
}

// manifest.schema.json $defs.relpath: a relative POSIX path inside the bundle (not empty, no leading '/',
// no backslash, no NUL, no '..' component).
bool is_relpath(const std::string& rel) {
  if (rel.empty() || rel[0] == '/' || rel.find('\\') != std::string::npos || rel.find('\0') != std::string::npos)
    return false;
  size_t start = 0;
  while (true) {
    const size_t end = rel.find('/', start);
    if (rel.compare(start, end == std::string::npos ? std::string::npos : end - start, "..") == 0) return false;
    if (end == std::string::npos) return true;
    start = end + 1;
  }
}

bool is_sha256_hex(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

// One file the manifest lists ("files": relative path -> {"sha256": hex, "size": bytes}).
struct ListedFile {
  std::string name;
  std::string sha256;
  int64_t size = 0;
};

// What the runner takes from manifest.json.
struct ManifestFacts {
  int64_t num_layers = 0;                 // model.num_layers
  std::vector<int64_t> protected_layers;  // routing.protected_layers
  std::string program;                    // backends.executorch.file
  std::vector<ListedFile> files;          // files, sorted by name
};

constexpr const char* kRequiredKeys[] = {"format", "format_version", "model", "routing", "max_seq_len",
                                         "quantization", "backends", "mask_semantics", "versions", "files"};
constexpr const char* kRequiredModelKeys[] = {"id", "sha256", "architecture", "num_layers", "hidden_size",
                                              "vocab_size", "eos_ids"};

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// Reads manifest.json with the rules of docs/bundle_format.md (the consistency rules of
// firstkit.runtime.bundle.validate_manifest; for the values this runner uses, their manifest.schema.json types).
// Any problem is a RunnerError "<path>: <what>".
ManifestFacts read_manifest(const std::string& path) {
  auto fail = [&path](const std::string& what) -> void { throw RunnerError(path + ": " + what); };
  json m;
  try {
    m = json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail("invalid JSON (" + json_error_text(e) + ")");
  }
  ManifestFacts f;
  try {
    if (!m.is_object()) fail("manifest must be a JSON object");
    std::vector<std::string> missing;
    for (const char* k : kRequiredKeys)
      if (!m.contains(k)) missing.push_back(k);
    if (!missing.empty()) fail("missing keys " + joined(missing));

    if (m.at("format") != "firstkit-bundle")
      fail("format is " + json_text(m.at("format")) + ", expected \"firstkit-bundle\"");
    int64_t version = 0;
    if (!strict_int(m.at("format_version"), version) || version != 1)
      fail("unsupported bundle format_version " + json_text(m.at("format_version")) + " (this runner reads version 1)");

    const json& model = m.at("model");
    if (!model.is_object()) fail("model must be an object");
    missing.clear();
    for (const char* k : kRequiredModelKeys)
      if (!model.contains(k)) missing.push_back(k);
    if (!missing.empty())
      fail("model must have keys " +
           joined(std::vector<std::string>(std::begin(kRequiredModelKeys), std::end(kRequiredModelKeys))));
    if (!strict_int(model.at("num_layers"), f.num_layers) || f.num_layers < 1)
      fail("model.num_layers must be a positive integer, got " + json_text(model.at("num_layers")));
    const int64_t n = f.num_layers;
    int64_t max_seq_len = 0;
    if (!strict_int(m.at("max_seq_len"), max_seq_len) || max_seq_len < 1)
      fail("max_seq_len must be a positive integer, got " + json_text(m.at("max_seq_len")));
    for (const char* k : {"quantization", "mask_semantics", "versions"})
      if (!m.at(k).is_object()) fail(std::string(k) + " must be an object");

    const json& routing = m.at("routing");
    if (!routing.is_object() || !routing.contains("policy") || !routing.contains("protected_layers"))
      fail("routing must have policy and protected_layers");
    if (routing.at("policy") != "routers" && routing.at("policy") != "none")
      fail("routing.policy must be \"routers\" or \"none\", got " + json_text(routing.at("policy")));
    const json& prot = routing.at("protected_layers");
    if (!prot.is_array()) fail("routing.protected_layers must be a list of layer indices");
    for (const json& x : prot) {
      int64_t i = -1;
      if (!strict_int(x, i) || i < 0 || i >= n)
        fail("routing.protected_layers: " + json_text(x) + " is not a layer index in 0.." + std::to_string(n - 1));
      f.protected_layers.push_back(i);
    }

    const json& files = m.at("files");
    if (!files.is_object()) fail("files must be an object");
    for (const auto& item : files.items()) {
      const std::string& rel = item.key();
      const json& entry = item.value();
      if (!is_relpath(rel)) fail("files[" + json_text(json(rel)) + "] escapes the bundle");
      ListedFile lf;
      lf.name = rel;
      if (!entry.is_object() || !entry.contains("sha256") || !entry.contains("size") ||
          !entry.at("sha256").is_string() || !strict_int(entry.at("size"), lf.size))
        fail("files[" + json_text(json(rel)) + "] needs sha256 and size");
      lf.sha256 = entry.at("sha256").get<std::string>();
      if (!is_sha256_hex(lf.sha256)) fail("files[" + json_text(json(rel)) + "].sha256 is not 64 lowercase hex digits");
      if (lf.size < 0) fail("files[" + json_text(json(rel)) + "].size is negative");
      f.files.push_back(std::move(lf));
    }
    auto listed = [&files](const json& name) { return name.is_string() && files.contains(name.get<std::string>()); };

    const json& backends = m.at("backends");
    if (!backends.is_object() || backends.empty())
      fail("backends must be a non-empty object with keys from executorch, onnx");
    for (const auto& b : backends.items())
      if (b.key() != "executorch" && b.key() != "onnx") fail("backends must be a non-empty object with keys from executorch, onnx");
    if (backends.contains("onnx")) {
      const json& ox = backends.at("onnx");
      for (const char* k : {"prefill", "decode"})
        if (!ox.is_object() || !ox.contains(k) || !ox.at(k).is_object() || !ox.at(k).contains("file") ||
            !listed(ox.at(k).at("file")))
          fail(std::string("backends.onnx.") + k + ".file is not listed under files");
    }
    if (!backends.contains("executorch"))
      fail("bundle has no ExecuTorch program (backends.executorch missing; ONNX-only bundle?)");
    const json& et = backends.at("executorch");
    if (!et.is_object() || !et.contains("file") || !et.at("file").is_string())
      fail("backends.executorch.file must be the program's path in the bundle");
    if (!listed(et.at("file"))) fail("backends.executorch.file is not listed under files");
    f.program = et.at("file").get<std::string>();
    std::set<std::string> want = {"embed", "route", "head"}, have;
    for (int64_t i = 0; i < n; ++i) want.insert({"prefill_" + std::to_string(i), "layer_" + std::to_string(i)});
    if (et.contains("methods") && et.at("methods").is_object())
      for (const auto& x : et.at("methods").items()) have.insert(x.key());
    if (have != want)
      fail("backends.executorch.methods must be embed, route, prefill_0..prefill_" + std::to_string(n - 1) +
           ", layer_0..layer_" + std::to_string(n - 1) + ", head (a bundle from an older firstkit: export it again)");
  } catch (const json::exception& e) {  // a value of a type the rules above do not expect
    fail("malformed manifest (" + json_error_text(e) + ")");
  }
  return f;
}

class RunnerImpl final : public Runner {
 public:
  explicit RunnerImpl(const RunnerOptions& opt) : opt_(opt) {
    info_.bundle_dir = opt.bundle_dir;
    const std::string manifest_path = join(opt.bundle_dir, "manifest.json");
    if (!file_exists(manifest_path)) throw RunnerError("not a bundle: " + manifest_path + " is missing");
    const ManifestFacts manifest = read_manifest(manifest_path);
    info_.manifest_sha256 = sha256_file(manifest_path);
    protected_ = manifest.protected_layers;
    manifest_layers_ = manifest.num_layers;

    // Only the files the manifest lists are read, each resolved inside the bundle (no symbolic link out of it),
    // a regular file, with the listed size and sha256 (docs/bundle_format.md). This runner reads the program
    // (backends.executorch.file) and tokenizer/tokenizer.json when listed; the ONNX files may be absent (first-bench
    // pushes only the manifest, the program and the tokenizer files). With --no-verify (files already verified on
    // the device) only the program's size is checked.
    const std::string& pte = manifest.program;
    const std::string tok_name = "tokenizer/tokenizer.json";
    const std::string bundle_real = real_path(opt.bundle_dir);
    if (bundle_real.empty()) throw RunnerError("cannot resolve the bundle folder " + opt.bundle_dir);
    std::string pte_path, tok_path;
    for (const ListedFile& c : manifest.files) {
      const bool is_program = c.name == pte;
      if (!file_exists(join(opt.bundle_dir, c.name))) {
        if (is_program)
          throw RunnerError("bundle has no ExecuTorch program: " + join(opt.bundle_dir, pte) + " is missing");
        if (c.name.rfind("onnx/", 0) == 0) continue;  // ONNX files are optional for this runner
      }
      const std::string real = checked_bundle_file(bundle_real, opt.bundle_dir, c.name);
      if (is_program) pte_path = real;
      else if (c.name == tok_name) tok_path = real;
      if (!is_program && !opt.verify_files) continue;
      const int64_t size = file_size(real);
      if (size != c.size)
        throw RunnerError("bundle file " + c.name + " has " + std::to_string(size) + " bytes, manifest says " +
                          std::to_string(c.size));
      if (opt.verify_files && c.name.rfind("onnx/", 0) != 0) {
        const std::string got = sha256_file(real);
        if (got != c.sha256) throw RunnerError("sha256 mismatch for " + c.name + ": " + got + " != " + c.sha256);
      }
    }
    const bool tok_listed = !tok_path.empty();

    if (opt.threads > 0) {
      auto* pool = et::extension::threadpool::get_threadpool();
      if (pool) pool->_unsafe_reset_threadpool(static_cast<uint32_t>(opt.threads));
    }
    if (auto* pool = et::extension::threadpool::get_threadpool()) threads_ = int(pool->get_thread_count());

    std::unique_ptr<et::runtime::EventTracer> tracer;
    if (!opt.etdump_path.empty()) {
      auto gen = std::make_unique<et::etdump::ETDumpGen>();
      etdump_ = gen.get();
      tracer = std::move(gen);
    }
    // Arenas are shared by LazySharedArenas (every executable method is loaded on them below); Module's own
    // shared arenas would be zero-filled, hence resident, at the first execute of a metadata method.
    module_ = std::make_unique<Module>(pte_path, Module::LoadMode::Mmap, std::move(tracer), nullptr, nullptr,
                                       /*share_memory_arenas=*/false);
    et::runtime::BackendOptions<4> xnn;
    xnn.set_option("weight_cache_enabled", opt.xnnpack_weight_cache);
    et::runtime::LoadBackendOptionsMap backend_options;
    backend_options.set_options("XnnpackBackend", xnn.view());
    // InternalConsistency: the flatbuffer verifier checks every offset before anything reads it, so a
    // malformed program (even one whose sha256 matches its manifest) is an error, not a crash.
    if (auto e = module_->load(backend_options, et::runtime::Program::Verification::InternalConsistency);
        e != et::runtime::Error::Ok)
      throw RunnerError("cannot load " + pte_path + ": " + err_text(e) +
                        " (the program is malformed or not an ExecuTorch .pte)");

    auto names = module_->method_names();
    if (!names.ok()) throw RunnerError("cannot list methods of " + pte_path);
    const auto& have = names.get();
    for (const char* m : {"embed", "route", "head", "get_n_layers", "get_max_seq_len"})
      if (!have.count(m)) throw RunnerError(std::string("program lacks method '") + m + "' (not a firstkit bundle?)");
    if (!have.count("get_prefill_chunk"))
      throw RunnerError("program lacks method 'get_prefill_chunk' (a bundle from an older firstkit? export it again)");
    info_.num_layers = const_int("get_n_layers");
    info_.max_seq_len = const_int("get_max_seq_len");
    prefill_chunk_ = const_int("get_prefill_chunk");
    positions_.resize(size_t(std::max<int64_t>(info_.max_seq_len, 0)));
    for (size_t i = 0; i < positions_.size(); ++i) positions_[i] = int64_t(i);
    if (prefill_chunk_ < 1) throw RunnerError("bad prefill chunk in program");
    info_.vocab_size = have.count("get_vocab_size") ? const_int("get_vocab_size") : -1;
    info_.bos_id = have.count("get_bos_id") ? const_int("get_bos_id") : -1;
    if (have.count("get_eos_ids")) {
      auto r = module_->execute("get_eos_ids");
      if (!r.ok()) throw RunnerError("get_eos_ids failed: " + err_text(r.error()));
      for (const EValue& v : r.get())
        if (v.isInt() && v.toInt() >= 0) info_.eos_ids.push_back(v.toInt());
    }
    if (info_.num_layers <= 0) throw RunnerError("bad layer count in program");
    for (int64_t i = 0; i < info_.num_layers; ++i)
      for (const char* kind : {"prefill_", "layer_"})
        if (!have.count(kind + std::to_string(i)))
          throw RunnerError(std::string("program lacks method '") + kind + std::to_string(i) +
                            "' (a bundle from an older firstkit? export it again)");

    // Manifest vs program: model.num_layers is the program's layer count.
    if (manifest_layers_ != info_.num_layers)
      throw RunnerError("manifest says " + std::to_string(manifest_layers_) + " layers (model.num_layers), program has " +
                        std::to_string(info_.num_layers));

    // Load every method now so that no load time lands inside a timed region, on lazily mapped shared arenas.
    std::unordered_map<std::string, std::vector<size_t>> planned;
    for (const std::string& m : have) {
      auto meta = module_->method_meta(m);
      if (!meta.ok()) throw RunnerError("cannot read method '" + m + "': " + err_text(meta.error()));
      std::vector<size_t>& sizes = planned[m];
      for (size_t k = 0; k < meta->num_memory_planned_buffers(); ++k) {
        auto n = meta->memory_planned_buffer_size(k);
        if (!n.ok() || *n < 0) throw RunnerError("bad planned buffer size in method '" + m + "'");
        sizes.push_back(size_t(*n));
        arenas_.reserve(k, size_t(*n));
      }
    }
    arenas_.map();
    for (const std::string& m : have) {
      auto* alloc = planned[m].empty() ? nullptr : arenas_.allocator_for(planned[m]);
      if (auto e = module_->load_method(m, alloc); e != et::runtime::Error::Ok)
        throw RunnerError("cannot load method '" + m + "': " + err_text(e));
    }

    if (tok_listed) {  // only a listed (and checked) tokenizer.json is read
      detok_ = std::make_unique<Detokenizer>(tok_path);
      info_.has_tokenizer = true;
    }
  }

  const BundleInfo& info() const override { return info_; }

  std::string decode(const std::vector<int64_t>& tokens) const override {
    return detok_ ? detok_->decode(tokens) : std::string();
  }

  void flush_etdump() override {
    if (!etdump_) return;
    et::etdump::ETDumpResult r = etdump_->get_etdump_data();
    if (r.buf == nullptr || r.size == 0) return;
    const std::string tmp = opt_.etdump_path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) {
      std::free(r.buf);
      throw RunnerError("cannot write ETDump " + tmp);
    }
    size_t n = std::fwrite(r.buf, 1, r.size, f);
    std::free(r.buf);
    if (std::fclose(f) != 0 || n != r.size) throw RunnerError("short write of ETDump " + tmp);
    if (std::rename(tmp.c_str(), opt_.etdump_path.c_str()) != 0)
      throw RunnerError("cannot rename ETDump to " + opt_.etdump_path);
  }

  RunResult generate(const std::vector<int64_t>& prompt, const GenerateOptions& g,
                     const TokenCallback& on_token) override {
    using clock = std::chrono::steady_clock;
    const int64_t L = info_.num_layers;
    if (prompt.empty()) throw RunnerError("empty prompt");
    if (g.max_new_tokens < 1) throw RunnerError("max_new_tokens must be >= 1");
    const int64_t T = static_cast<int64_t>(prompt.size());
    if (!g.mask_override.empty() && static_cast<int64_t>(g.mask_override.size()) != L)
      throw RunnerError("mask override has " + std::to_string(g.mask_override.size()) + " entries, model has " +
                        std::to_string(L) + " layers");
    for (int64_t i : protected_)  // checked against the layer count when the manifest was read
      if (!g.mask_override.empty() && i < L && g.mask_override[size_t(i)] == 0)
        throw RunnerError("mask skips protected layer " + std::to_string(i));
    if (T + g.max_new_tokens - 1 > info_.max_seq_len)
      throw RunnerError("prompt (" + std::to_string(T) + " tokens) + max_new_tokens (" +
                        std::to_string(g.max_new_tokens) + ") exceeds max_seq_len " +
                        std::to_string(info_.max_seq_len) + " + 1");
    if (info_.vocab_size > 0)
      for (int64_t t : prompt)
        if (t < 0 || t >= info_.vocab_size)
          throw RunnerError("token id " + std::to_string(t) + " outside the vocabulary (size " +
                            std::to_string(info_.vocab_size) + ")");

    RunResult res;
    res.prompt_tokens = T;
    res.threads = threads_;
    res.runner = opt_.runner_name;
    res.bundle_sha256 = info_.manifest_sha256;

    std::vector<int64_t> tokens_buf(prompt);
    std::vector<int64_t> override_buf(g.mask_override.empty() ? std::vector<int64_t>(size_t(L), -1) : g.mask_override);
    auto tok_t = et::extension::from_blob(tokens_buf.data(), {1, static_cast<int>(T)}, ScalarType::Long);
    auto ov_t = et::extension::from_blob(override_buf.data(), {static_cast<int>(L)}, ScalarType::Long);

    auto t0 = clock::now();
    // Prefill, layer by layer: `route` applies the routing rule (inside the program) to the prompt's hidden
    // state entering layer i; `prefill_i` runs only if it says so, over the prompt in chunks of at most
    // prefill_chunk_ tokens: chunk [a, b) writes that layer's cache rows a..b-1 and attends rows 0..b-1.
    // A skipped layer costs nothing here, and the decode below never calls it either.
    std::vector<float> prompt_h;
    auto er0 = exec("embed", {EValue(*tok_t)});
    if (!er0.ok()) throw RunnerError("embed failed: " + err_text(er0.error()));
    copy_float(er0.get().at(0).toTensor(), prompt_h);  // outputs may alias shared arenas: copy now
    const int64_t H = int64_t(prompt_h.size()) / T;
    auto prompt_t = et::extension::from_blob(prompt_h.data(), {1, static_cast<int>(T), static_cast<int>(H)},
                                             ScalarType::Float);
    int64_t layer_in = 0;
    auto layer_t = et::extension::from_blob(&layer_in, {1}, ScalarType::Long);
    std::vector<int64_t> running;
    res.mask.reserve(size_t(L));
    for (int64_t i = 0; i < L; ++i) {
      layer_in = i;
      auto rr = exec("route", {EValue(*prompt_t), EValue(*layer_t), EValue(*ov_t)});
      if (!rr.ok()) throw RunnerError("route failed: " + err_text(rr.error()));
      if (rr.get().empty() || !rr.get()[0].isTensor() || rr.get()[0].toTensor().numel() != 1)
        throw RunnerError("route returned unexpected outputs");
      const bool run = read_int(rr.get()[0].toTensor(), 0) != 0;
      res.mask += run ? '1' : '0';
      if (!run) continue;
      running.push_back(i);
      const std::string name = "prefill_" + std::to_string(i);
      for (int64_t a = 0; a < T; a += prefill_chunk_) {
        const int64_t n = std::min(prefill_chunk_, T - a);
        auto chunk_t = et::extension::from_blob(prompt_h.data() + a * H, {1, static_cast<int>(n), static_cast<int>(H)},
                                                ScalarType::Float);
        auto pos_t = et::extension::from_blob(&positions_[size_t(a)], {static_cast<int>(n)}, ScalarType::Long);
        auto kv_t = et::extension::from_blob(positions_.data(), {static_cast<int>(a + n)}, ScalarType::Long);
        auto pr = exec(name, {EValue(*chunk_t), EValue(*pos_t), EValue(*kv_t)});
        if (!pr.ok()) throw RunnerError(name + " failed: " + err_text(pr.error()));
        const auto& out = pr.get().at(0).toTensor();
        if (out.scalar_type() != ScalarType::Float || out.numel() != n * H)
          throw RunnerError(name + " returned an unexpected hidden state");
        // this chunk's rows only: the later chunks' inputs are still the layer's input
        std::copy(out.const_data_ptr<float>(), out.const_data_ptr<float>() + n * H, prompt_h.begin() + a * H);
      }
    }
    std::vector<float> last(prompt_h.end() - H, prompt_h.end());  // the last prompt position's hidden state
    auto last_t = et::extension::from_blob(last.data(), {1, 1, static_cast<int>(H)}, ScalarType::Float);
    auto hr0 = exec("head", {EValue(*last_t)});
    if (!hr0.ok()) throw RunnerError("head failed: " + err_text(hr0.error()));
    int64_t next = argmax(hr0.get().at(0).toTensor());
    res.prefill_ms = ms_since(t0);
    res.skip_ratio = double(L - int64_t(running.size())) / double(L);

    std::vector<std::string> layer_names;
    for (int64_t i : running) layer_names.push_back("layer_" + std::to_string(i));
    std::unordered_set<int64_t> eos(info_.eos_ids.begin(), info_.eos_ids.end());

    res.tokens.push_back(next);
    bool go = on_token ? on_token(next, 0) : true;
    int64_t pos = T;
    std::vector<float> hidden;
    int64_t token_in = 0;
    auto token_t = et::extension::from_blob(&token_in, {1, 1}, ScalarType::Long);
    // layer_i(hidden, input_pos, kv_positions): kv_positions = 0..pos, a prefix of positions_ whose length
    // is the number of filled cache rows (the layer reads only those); input_pos = its last element
    et::extension::TensorPtr hidden_t;

    while (go && static_cast<int>(res.tokens.size()) < g.max_new_tokens && !(g.stop_at_eos && eos.count(next))) {
      auto s0 = clock::now();
      token_in = next;
      auto pos_t = et::extension::from_blob(&positions_[size_t(pos)], {1}, ScalarType::Long);
      auto kv_t = et::extension::from_blob(positions_.data(), {static_cast<int>(pos + 1)}, ScalarType::Long);
      auto er = exec("embed", {EValue(*token_t)});
      if (!er.ok()) throw RunnerError("embed failed: " + err_text(er.error()));
      copy_float(er.get().at(0).toTensor(), hidden);  // outputs may alias shared arenas: copy now
      if (!hidden_t)
        hidden_t = et::extension::from_blob(hidden.data(), {1, 1, static_cast<int>(hidden.size())}, ScalarType::Float);
      for (const std::string& name : layer_names) {
        auto lr = exec(name, {EValue(*hidden_t), EValue(*pos_t), EValue(*kv_t)});
        if (!lr.ok()) throw RunnerError(name + " failed: " + err_text(lr.error()));
        copy_float(lr.get().at(0).toTensor(), hidden);
      }
      auto hr = exec("head", {EValue(*hidden_t)});
      if (!hr.ok()) throw RunnerError("head failed: " + err_text(hr.error()));
      next = argmax(hr.get().at(0).toTensor());
      res.decode_ms.push_back(ms_since(s0));
      res.tokens.push_back(next);
      ++pos;
      if (on_token) go = on_token(next, res.tokens.size() - 1);
    }
    double total = 0.0;
    for (double d : res.decode_ms) total += d;
    if (!res.decode_ms.empty()) {
      res.decode_ms_per_token = total / double(res.decode_ms.size());
      res.tokens_per_s = total > 0 ? 1000.0 * double(res.decode_ms.size()) / total : 0.0;
    }
    res.text = decode(res.tokens);
    res.peak_rss_mb = peak_rss_mb();
    return res;
  }

 private:
  // Executes a method; with profiling on, wraps it in an ETDump event named "method:<name>" so the
  // Inspector summary can attribute time per method (embed, route, prefill_i, layer_i, head).
  et::runtime::Result<std::vector<EValue>> exec(const std::string& name, const std::vector<EValue>& inputs) {
    if (!etdump_) return module_->execute(name, inputs);
    auto it = event_names_.find(name);
    if (it == event_names_.end()) it = event_names_.emplace(name, "method:" + name).first;
    auto entry = etdump_->start_profiling(it->second.c_str());
    auto r = module_->execute(name, inputs);
    etdump_->end_profiling(entry);
    return r;
  }

  int64_t const_int(const char* name) {
    auto r = module_->execute(name);
    if (!r.ok() || r.get().empty() || !r.get()[0].isInt())
      throw RunnerError(std::string("constant method ") + name + " failed");
    return r.get()[0].toInt();
  }
  static double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  static int64_t read_int(const et::aten::Tensor& t, int64_t i) {
    switch (t.scalar_type()) {
      case ScalarType::Long: return t.const_data_ptr<int64_t>()[i];
      case ScalarType::Int: return t.const_data_ptr<int32_t>()[i];
      case ScalarType::Bool: return t.const_data_ptr<bool>()[i] ? 1 : 0;
      default: throw RunnerError("prefill mask has an unsupported dtype");
    }
  }
  static int64_t argmax(const et::aten::Tensor& t) {
    if (t.scalar_type() != ScalarType::Float) throw RunnerError("logits are not float32");
    const float* p = t.const_data_ptr<float>();
    const int64_t n = t.size(t.dim() - 1);
    const float* row = p + (t.numel() - n);  // last position
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (row[i] > row[best]) best = i;
    return best;
  }
  static void copy_float(const et::aten::Tensor& t, std::vector<float>& out) {
    if (t.scalar_type() != ScalarType::Float) throw RunnerError("hidden state is not float32");
    if (!out.empty() && out.size() != size_t(t.numel())) throw RunnerError("hidden state changed size");
    out.assign(t.const_data_ptr<float>(), t.const_data_ptr<float>() + t.numel());
  }

  RunnerOptions opt_;
  BundleInfo info_;
  LazySharedArenas arenas_;  // declared before module_: outlives the methods that use it
  std::unique_ptr<Module> module_;
  et::etdump::ETDumpGen* etdump_ = nullptr;  // owned by module_
  std::unique_ptr<Detokenizer> detok_;
  std::unordered_map<std::string, std::string> event_names_;  // stable storage for ETDump event names
  std::vector<int64_t> protected_;  // routing.protected_layers from the manifest
  int64_t manifest_layers_ = 0;     // model.num_layers from the manifest
  int threads_ = 0;
  int64_t prefill_chunk_ = 0;     // get_prefill_chunk: most prompt tokens per prefill_i call
  std::vector<int64_t> positions_;  // 0..max_seq_len-1: position inputs are views of it
};

}  // namespace

std::unique_ptr<Runner> Runner::load(const RunnerOptions& options) {
  if (options.bundle_dir.empty()) throw RunnerError("no bundle directory given");
  return std::make_unique<RunnerImpl>(options);
}

std::vector<int64_t> parse_mask_spec(const std::string& spec, int64_t num_layers) {
  if (spec.empty() || spec == "auto") return {};
  if (spec == "all") return std::vector<int64_t>(size_t(num_layers), 1);
  if (static_cast<int64_t>(spec.size()) != num_layers)
    throw RunnerError("mask '" + spec + "' has " + std::to_string(spec.size()) + " bits, model has " +
                      std::to_string(num_layers) + " layers");
  std::vector<int64_t> out;
  for (char c : spec) {
    if (c != '0' && c != '1') throw RunnerError("mask must be auto, all or a string of 0/1, got '" + spec + "'");
    out.push_back(c == '1' ? 1 : 0);
  }
  return out;
}

double peak_rss_mb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;
  }
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) == 0) return double(ru.ru_maxrss) / 1024.0;
  return 0.0;
}

nlohmann::ordered_json BundleInfo::to_json() const {
  nlohmann::ordered_json o;
  o["bundle_sha256"] = manifest_sha256;
  o["num_layers"] = num_layers;
  o["max_seq_len"] = max_seq_len;
  o["vocab_size"] = vocab_size;
  o["bos_id"] = bos_id;
  o["eos_ids"] = eos_ids;
  o["has_tokenizer"] = has_tokenizer;
  return o;
}

std::string RunResult::to_json() const {
  // Key order and types as docs/CONTRACTS.md ("Run result JSON") and device_bench/schemas/run_result.schema.json;
  // every number finite (a JSON number, never null). Text cut inside a UTF-8 character (a token boundary) gets
  // U+FFFD for the broken bytes.
  auto finite = [](double v) { return std::isfinite(v) ? v : 0.0; };
  std::vector<double> steps;
  steps.reserve(decode_ms.size());
  for (double d : decode_ms) steps.push_back(finite(d));
  nlohmann::ordered_json o;
  o["text"] = text;
  o["tokens"] = tokens;
  o["prompt_tokens"] = prompt_tokens;
  o["mask"] = mask;
  o["skip_ratio"] = finite(skip_ratio);
  o["prefill_ms"] = finite(prefill_ms);
  o["decode_ms_per_token"] = finite(decode_ms_per_token);
  o["decode_ms"] = steps;
  o["tokens_per_s"] = finite(tokens_per_s);
  o["peak_rss_mb"] = finite(peak_rss_mb);
  o["threads"] = threads;
  o["backend"] = backend;
  o["runner"] = runner;
  o["bundle_sha256"] = bundle_sha256;
  return o.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

}  // namespace firstkit
