// first_runner.h -- the reusable core of the firstkit native runner (plain C++17).
//
// Shared by the Linux CLI (device_bench/runner/main.cpp) and the Android app (through JNI).
// The core knows nothing about processes, argv, stdout or files other than the bundle it reads
// (and an optional ETDump path it writes): every error is reported as a firstkit::RunnerError.
//
// A bundle is the directory written by `first-export` (docs/CONTRACTS.md, docs/bundle_format.md):
// manifest.json + model.pte with the methods
//   embed(tokens int64[1,T]) -> hidden float32[1,T,H]                          (T = 1 in decode)
//   route(hidden float32[1,T,H], layer int64[1], mask_override int64[L]) -> run int64[1]
//   prefill_{i}(hidden float32[1,T,H]) -> hidden float32[1,T,H]   (writes layer i's cache rows 0..T-1)
//   layer_{i}(hidden float32[1,1,H], input_pos int64[1], kv_positions int64[pos+1]) -> hidden float32[1,1,H]
//     (kv_positions = 0..pos; the layer reads only those filled cache rows)
//   head(hidden float32[1,1,H]) -> logits float32[1,V]
//   get_max_seq_len, get_n_layers, get_vocab_size, get_bos_id, get_eos_ids (constant methods)
// Prefill calls route before each layer and prefill_{i} only for the layers that run; decode calls
// embed, the running layer_{i}, head. All methods share the KV-cache buffers and the planned arenas.
//
// Typical use:
//   firstkit::RunnerOptions opt; opt.bundle_dir = "/data/local/tmp/bundle"; opt.threads = 4;
//   auto runner = firstkit::Runner::load(opt);            // throws RunnerError
//   firstkit::GenerateOptions g; g.max_new_tokens = 64;   // g.mask_override = {} -> routers decide
//   firstkit::RunResult r = runner->generate(prompt_ids, g, [](int64_t tok, size_t i) { return true; });
//   std::string json = r.to_json();                       // the "Run result JSON" of docs/CONTRACTS.md
#pragma once

#include <nlohmann/json.hpp>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace firstkit {

/// Version of this API (bumped only on incompatible changes).
constexpr int kRunnerApiVersion = 1;

/// Any failure of the core: bad bundle, manifest mismatch, method failure, bad argument.
/// what() is always one line of UTF-8, at most ~500 bytes (control characters, invalid bytes and 4-byte sequences
/// escaped as \n, \xNN: also valid JNI "modified UTF-8"): a message may quote untrusted input (a file name from a
/// manifest, a JSON parser's context).
class RunnerError : public std::runtime_error {
 public:
  explicit RunnerError(const std::string& what);
};

/// How a bundle is opened.
struct RunnerOptions {
  std::string bundle_dir;             ///< directory holding manifest.json and model.pte
  int threads = 0;                    ///< CPU threads for the ExecuTorch thread pool; 0 = leave default
  bool verify_files = true;           ///< check sizes / sha256 of the files the manifest lists
  bool xnnpack_weight_cache = true;   ///< XNNPACK weight cache (weights packed once, shared by methods)
  std::string etdump_path;            ///< non-empty: record an ETDump and write it here after generate()
  std::string runner_name = "native"; ///< value of the "runner" key in results ("native" | "android")
};

/// What one generate() call does.
struct GenerateOptions {
  int max_new_tokens = 32;            ///< number of tokens to generate (prefill's token included)
  /// Per-layer override, one entry per layer: -1 = router decides, 0 = skip, 1 = run.
  /// Empty = the routers decide every layer ("auto").
  std::vector<int64_t> mask_override;
  bool stop_at_eos = true;            ///< stop when an EOS id (get_eos_ids) is produced
};

/// Facts about the loaded bundle.
struct BundleInfo {
  std::string bundle_dir;
  std::string manifest_sha256;        ///< sha256 of manifest.json (the bundle's identity)
  int64_t num_layers = 0;
  int64_t max_seq_len = 0;
  int64_t vocab_size = 0;
  int64_t bos_id = -1;
  std::vector<int64_t> eos_ids;
  bool has_tokenizer = false;         ///< tokenizer/tokenizer.json found: token ids can be decoded to text

  /// The bundle facts as JSON (first_runner --info, the JNI info call): bundle_sha256, num_layers, max_seq_len,
  /// vocab_size, bos_id, eos_ids, has_tokenizer, in this order; callers append their own keys.
  nlohmann::ordered_json to_json() const;
};

/// One generation, the "Run result JSON" of docs/CONTRACTS.md.
struct RunResult {
  std::string text;                   ///< decoded generated text ("" when the bundle has no tokenizer)
  std::vector<int64_t> tokens;        ///< generated token ids (the prompt excluded)
  int64_t prompt_tokens = 0;
  std::string mask;                   ///< "0"/"1" per layer, layer 0 first, 1 = the layer runs
  double skip_ratio = 0.0;            ///< skipped layers / L
  double prefill_ms = 0.0;            ///< prefill wall time (the first generated token comes from it)
  std::vector<double> decode_ms;      ///< wall time of every decode step (embed + running layers + head)
  double decode_ms_per_token = 0.0;   ///< mean of decode_ms (0 when no decode step ran)
  double tokens_per_s = 0.0;          ///< decode throughput: decode_ms.size() / sum(decode_ms) * 1000
  double peak_rss_mb = 0.0;           ///< peak resident set size of the process (0 where unknown)
  int threads = 0;
  std::string backend = "executorch";
  std::string runner = "native";
  std::string bundle_sha256;
  /// Serialize with the keys of docs/CONTRACTS.md (one JSON object, no trailing newline).
  std::string to_json() const;
};

/// Called after every generated token with (token id, index in the generated sequence).
/// Return false to stop generation early.
using TokenCallback = std::function<bool(int64_t token, size_t index)>;

/// A loaded bundle. Not thread-safe: one generate() at a time.
class Runner {
 public:
  /// Open a bundle: read and check manifest.json, load model.pte and its methods. Throws RunnerError.
  static std::unique_ptr<Runner> load(const RunnerOptions& options);
  virtual ~Runner() = default;

  virtual const BundleInfo& info() const = 0;

  /// Prefill `prompt` (token ids, BOS included if the caller wants one), take the frozen mask,
  /// then decode calling only the running layer_i methods. Throws RunnerError.
  virtual RunResult generate(const std::vector<int64_t>& prompt, const GenerateOptions& options,
                             const TokenCallback& on_token = nullptr) = 0;

  /// Decode token ids to text with the bundle's tokenizer ("" when none).
  virtual std::string decode(const std::vector<int64_t>& tokens) const = 0;

  /// Write the ETDump recorded so far to options.etdump_path (no-op when profiling is off).
  virtual void flush_etdump() = 0;
};

/// Parse a mask string for GenerateOptions::mask_override: "auto" -> {}, "all" -> all ones,
/// a string of '0'/'1' of length num_layers -> those values. Throws RunnerError otherwise.
std::vector<int64_t> parse_mask_spec(const std::string& spec, int64_t num_layers);

/// sha256 of a file as lowercase hex. Throws RunnerError when it cannot be read.
std::string sha256_file(const std::string& path);

/// Peak resident set size of this process in MB (0 where unknown).
double peak_rss_mb();

}  // namespace firstkit
