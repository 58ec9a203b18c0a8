// first_runner.cpp -- the FiRST runner core: bundle loading, prefill, frozen mask, per-layer decode.
#include "first_runner.h"

#include <limits.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <executorch/devtools/etdump/etdump_flatcc.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/backend/backend_options_map.h>
#include <executorch/runtime/backend/options.h>

#include "json.h"
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

int64_t integer_of(const json::Value* v, int64_t dflt) {
  return (v && v->is_number()) ? (v->is_integer ? v->integer : static_cast<int64_t>(v->num)) : dflt;
}

// One file entry a manifest asks us to check.
struct FileCheck {
  std::string name;
  std::string sha256;  // empty: not listed
  int64_t size = -1;   // -1: not listed
};

// Reads the "files" listing in any of the shapes {name: sha}, {name: {sha256, size}},
// [{path|name|file, sha256, size|bytes}].
std::vector<FileCheck> listed_files(const json::Value& manifest) {
  std::vector<FileCheck> out;
  const json::Value* files = manifest.get("files");
  if (!files) return out;
  auto entry = [](const std::string& name, const json::Value& v) {
    FileCheck c;
    c.name = name;
    if (v.is_string()) {
      c.sha256 = v.str;
    } else if (v.is_object()) {
      if (const json::Value* s = v.get("sha256"); s && s->is_string()) c.sha256 = s->str;
      c.size = integer_of(v.get("size"), integer_of(v.get("bytes"), -1));
    }
    return c;
  };
  if (files->is_object()) {
    for (const auto& kv : files->obj) out.push_back(entry(kv.first, kv.second));
  } else if (files->is_array()) {
    for (const auto& v : files->arr) {
      const json::Value* n = v.get("path");
      if (!n) n = v.get("name");
      if (!n) n = v.get("file");
      if (n && n->is_string()) out.push_back(entry(n->str, v));
    }
  }
  return out;
}

class RunnerImpl final : public Runner {
 public:
  explicit RunnerImpl(const RunnerOptions& opt) : opt_(opt) {
    info_.bundle_dir = opt.bundle_dir;
    const std::string manifest_path = join(opt.bundle_dir, "manifest.json");
    if (!file_exists(manifest_path)) throw RunnerError("not a bundle: " + manifest_path + " is missing");
    json::Value manifest;
    try {
      manifest = json::parse(read_file(manifest_path));
    } catch (const RunnerError&) {
      throw;
    } catch (const std::exception& e) {
      throw RunnerError("malformed manifest " + manifest_path + ": " + e.what());
    }
    if (!manifest.is_object()) throw RunnerError("malformed manifest " + manifest_path + ": not an object");
    info_.manifest_sha256 = sha256_file(manifest_path);

    // docs/bundle_format.md: format "firstkit-bundle", format_version 1 (checked where present).
    if (const json::Value* f = manifest.get("format"); f && (!f->is_string() || f->str != "firstkit-bundle"))
      throw RunnerError("manifest format is not \"firstkit-bundle\"");
    if (const json::Value* v = manifest.get("format_version"); v && integer_of(v, -1) != 1)
      throw RunnerError("unsupported bundle format_version " + std::to_string(integer_of(v, -1)) +
                        " (this runner reads version 1)");
    if (const json::Value* b = manifest.get("backends"); b && b->is_object() && !b->get("executorch"))
      throw RunnerError("bundle has no ExecuTorch program (backends.executorch missing; ONNX-only bundle?)");
    if (const json::Value* pl = manifest.path({"routing", "protected_layers"}); pl && pl->is_array())
      for (const auto& x : pl->arr)
        if (x.is_number()) protected_.push_back(integer_of(&x, -1));

    // Which program file: backends.executorch.file (bundle_format.md), a few older spellings, model.pte.
    std::string pte = "model.pte";
    for (auto keys : {std::initializer_list<const char*>{"backends", "executorch", "file"},
                      std::initializer_list<const char*>{"executorch", "file"},
                      std::initializer_list<const char*>{"executorch", "pte"},
                      std::initializer_list<const char*>{"executorch", "path"},
                      std::initializer_list<const char*>{"pte"}}) {
      const json::Value* v = manifest.path(keys);
      if (v && v->is_string()) {
        pte = v->str;
        break;
      }
    }
    if (pte.find("..") != std::string::npos || (!pte.empty() && pte[0] == '/'))
      throw RunnerError("manifest names a program outside the bundle: " + pte);
    std::string pte_path = join(opt.bundle_dir, pte);
    if (!file_exists(pte_path)) throw RunnerError("bundle has no ExecuTorch program: " + pte_path + " is missing");
    const std::string bundle_real = real_path(opt.bundle_dir);
    if (bundle_real.empty()) throw RunnerError("cannot resolve the bundle folder " + opt.bundle_dir);
    const std::vector<FileCheck> listed = listed_files(manifest);
    const std::string tok_name = "tokenizer/tokenizer.json";
    bool pte_listed = false, tok_listed = false;
    std::string tok_path;

    for (const FileCheck& c : listed) {
      if (c.name.find("..") != std::string::npos || (!c.name.empty() && c.name[0] == '/'))
        throw RunnerError("manifest lists a file outside the bundle: " + c.name);
      const std::string p = join(opt.bundle_dir, c.name);
      if (c.name != pte && !file_exists(p)) {
        if (c.name.rfind("onnx", 0) == 0) continue;  // ONNX files are optional for this runner
        throw RunnerError("bundle file missing: " + c.name);
      }
      if (c.name == pte || c.name == tok_name) {  // the files this runner reads: resolved inside the bundle
        const std::string real = checked_bundle_file(bundle_real, opt.bundle_dir, c.name);
        if (c.name == pte) pte_listed = true, pte_path = real;
        else tok_listed = true, tok_path = real;
      }
      if (c.name != pte && !opt.verify_files) continue;
      if (c.size >= 0 && file_size(p) != c.size)
        throw RunnerError("bundle file " + c.name + " has " + std::to_string(file_size(p)) +
                          " bytes, manifest says " + std::to_string(c.size));
      if (opt.verify_files && !c.sha256.empty() && (c.name == pte || c.name.rfind("onnx", 0) != 0)) {
        std::string got = sha256_file(p);
        if (got != c.sha256) throw RunnerError("sha256 mismatch for " + c.name + ": " + got + " != " + c.sha256);
      }
    }

    // A bundle with a file listing (every first-export bundle) is read through it: an unlisted program or
    // tokenizer is never read.
    if (!listed.empty() && !pte_listed) throw RunnerError("the manifest does not list the program " + pte);
    if (listed.empty()) {
      pte_path = checked_bundle_file(bundle_real, opt.bundle_dir, pte);
      if (file_exists(join(opt.bundle_dir, tok_name))) {
        tok_path = checked_bundle_file(bundle_real, opt.bundle_dir, tok_name);
        tok_listed = true;
      }
    }

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

    // Manifest vs program: the layer count must agree where the manifest states it.
    for (auto keys : {std::initializer_list<const char*>{"num_layers"}, std::initializer_list<const char*>{"n_layers"},
                      std::initializer_list<const char*>{"model", "num_layers"},
                      std::initializer_list<const char*>{"model", "n_layers"}}) {
      const json::Value* v = manifest.path(keys);
      if (v && v->is_number() && integer_of(v, -1) != info_.num_layers)
        throw RunnerError("manifest says " + std::to_string(integer_of(v, -1)) + " layers, program has " +
                          std::to_string(info_.num_layers));
    }

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
    for (int64_t p : protected_) {
      int64_t i = p < 0 ? p + L : p;
      if (!g.mask_override.empty() && i >= 0 && i < L && g.mask_override[size_t(i)] == 0)
        throw RunnerError("mask skips protected layer " + std::to_string(i));
    }
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
  std::unordered_map<std::string, std::string> event_names_;
  std::vector<int64_t> protected_;  // routing.protected_layers from the manifest  // stable storage for ETDump event names
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

std::string RunResult::to_json() const {
  std::string o = "{";
  auto key = [&o](const char* k) {
    if (o.size() > 1) o += ",";
    o += json::quote(k) + ":";
  };
  key("text"); o += json::quote(text);
  key("tokens"); o += "[";
  for (size_t i = 0; i < tokens.size(); ++i) o += (i ? "," : "") + std::to_string(tokens[i]);
  o += "]";
  key("prompt_tokens"); o += std::to_string(prompt_tokens);
  key("mask"); o += json::quote(mask);
  key("skip_ratio"); o += json::number(skip_ratio);
  key("prefill_ms"); o += json::number(prefill_ms);
  key("decode_ms_per_token"); o += json::number(decode_ms_per_token);
  key("decode_ms"); o += "[";
  for (size_t i = 0; i < decode_ms.size(); ++i) o += (i ? "," : "") + json::number(decode_ms[i]);
  o += "]";
  key("tokens_per_s"); o += json::number(tokens_per_s);
  key("peak_rss_mb"); o += json::number(peak_rss_mb);
  key("threads"); o += std::to_string(threads);
  key("backend"); o += json::quote(backend);
  key("runner"); o += json::quote(runner);
  key("bundle_sha256"); o += json::quote(bundle_sha256);
  return o + "}";
}

}  // namespace firstkit
