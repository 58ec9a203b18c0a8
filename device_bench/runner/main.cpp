// main.cpp -- first_runner: command-line front end of the firstkit runner core.
//
//   first_runner --bundle DIR --prompt-ids 1,2,3 [--max-new-tokens 32] [--threads N]
//                [--mask auto|all|BITS] [--warmup N] [--runs N] [--ignore-eos] [--no-verify]
//                [--out results.jsonl] [--etdump trace.etdp] [--info]
//
// Prints one run-result JSON object per measured run on stdout (one line each) and, with --out,
// appends the same lines to a file (flushed and fsynced after every run, so finished runs survive
// a crash). Exit status: 0 ok, 1 runtime error, 2 usage error; errors are one line on stderr.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/first_runner.h"

namespace {

constexpr const char* kUsage =
    "usage: first_runner --bundle DIR (--prompt-ids IDS | --prompt-ids-file FILE) [options]\n"
    "  --bundle DIR            firstkit bundle (manifest.json + model.pte)\n"
    "  --prompt-ids IDS        prompt token ids, comma separated (BOS included if wanted)\n"
    "  --prompt-ids-file FILE  prompt token ids from a file (a JSON array, or comma/space separated)\n"
    "  --max-new-tokens N      tokens to generate (default 32)\n"
    "  --threads N             ExecuTorch thread-pool size (default: library default)\n"
    "  --mask SPEC             auto (routers decide) | all | BITS, one 0/1 per layer (default auto)\n"
    "  --warmup N              unmeasured runs before the measured ones (default 0)\n"
    "  --runs N                measured runs (default 1)\n"
    "  --ignore-eos            do not stop at an EOS token (fixed-length benchmark runs)\n"
    "  --no-verify             skip sha256 checks of bundle files\n"
    "  --no-weight-cache       disable the XNNPACK weight cache\n"
    "  --out FILE              append every measured run as one JSON line to FILE (fsynced)\n"
    "  --etdump FILE           record an ExecuTorch ETDump of all runs into FILE\n"
    "  --info                  print bundle facts as JSON and exit\n"
    "  --version               print the runner API version\n";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "first_runner: error: %s\n", msg.c_str());
  std::exit(2);
}

long parse_int(const std::string& flag, const std::string& v, long lo) {
  char* end = nullptr;
  long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || !end || *end || x < lo) usage_error(flag + " needs an integer >= " + std::to_string(lo) + ", got '" + v + "'");
  return x;
}

// Token ids from --prompt-ids or --prompt-ids-file: a JSON array of non-negative integers ("[1, 2, 3]"), or ids
// separated by commas and/or whitespace ("1,2,3").
std::vector<int64_t> parse_ids(const std::string& text, const std::string& origin) {
  std::vector<int64_t> ids;
  const size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && text[first] == '[') {
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      std::string what = e.what();  // without the "[json.exception.parse_error.101] " prefix
      if (size_t close = what.find("] "); what[0] == '[' && close != std::string::npos) what.erase(0, close + 2);
      usage_error(origin + ": invalid JSON (" + firstkit::RunnerError(what).what() + ")");  // one line
    }
    for (const nlohmann::json& v : doc) {  // an array (it starts with '[')
      if (!v.is_number_unsigned() || v.get<uint64_t>() > uint64_t(INT64_MAX))
        usage_error("bad token id " + v.dump(-1, ' ', true, nlohmann::json::error_handler_t::replace) + " in " +
                    origin + " (ids are non-negative integers)");
      ids.push_back(int64_t(v.get<uint64_t>()));
    }
  } else {
    std::string cur;
    auto flush = [&]() {
      if (cur.empty()) return;
      char* end = nullptr;
      errno = 0;
      long long x = std::strtoll(cur.c_str(), &end, 10);
      if (!end || *end || x < 0 || errno == ERANGE)
        usage_error(std::string("bad token id '") + firstkit::RunnerError(cur).what() + "' in " + origin);
      ids.push_back(x);
      cur.clear();
    };
    for (char c : text) {
      if (c == ',' || c == ' ' || c == '\n' || c == '\t' || c == '\r') flush();
      else cur += c;
    }
    flush();
  }
  if (ids.empty()) usage_error("no token ids in " + origin);
  return ids;
}

void append_line(const std::string& path, const std::string& line) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0) throw firstkit::RunnerError("cannot open " + path + ": " + std::strerror(errno));
  std::string data = line + "\n";
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      throw firstkit::RunnerError("cannot write " + path + ": " + std::strerror(e));
    }
    p += n;
    left -= size_t(n);
  }
  if (::fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    throw firstkit::RunnerError("cannot sync " + path + ": " + std::strerror(e));
  }
  ::close(fd);
}

}  // namespace

int main(int argc, char** argv) {
  firstkit::RunnerOptions opt;
  firstkit::GenerateOptions gen;
  std::string ids_text, ids_origin, mask_spec = "auto", out_path;
  long warmup = 0, runs = 1;
  bool info_only = false;

  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--version") {
      std::printf("first_runner api %d\n", firstkit::kRunnerApiVersion);
      return 0;
    } else if (a == "--bundle") {
      opt.bundle_dir = value();
    } else if (a == "--prompt-ids") {
      ids_text = value();
      ids_origin = "--prompt-ids";
    } else if (a == "--prompt-ids-file") {
      std::string p = value();
      std::ifstream f(p);
      if (!f) usage_error("cannot read " + p);
      std::stringstream ss;
      ss << f.rdbuf();
      ids_text = ss.str();
      ids_origin = p;
    } else if (a == "--max-new-tokens") {
      gen.max_new_tokens = int(parse_int(a, value(), 1));
    } else if (a == "--threads") {
      opt.threads = int(parse_int(a, value(), 0));
    } else if (a == "--mask") {
      mask_spec = value();
    } else if (a == "--warmup") {
      warmup = parse_int(a, value(), 0);
    } else if (a == "--runs") {
      runs = parse_int(a, value(), 1);
    } else if (a == "--ignore-eos") {
      gen.stop_at_eos = false;
    } else if (a == "--no-verify") {
      opt.verify_files = false;
    } else if (a == "--no-weight-cache") {
      opt.xnnpack_weight_cache = false;
    } else if (a == "--out") {
      out_path = value();
    } else if (a == "--etdump") {
      opt.etdump_path = value();
    } else if (a == "--info") {
      info_only = true;
    } else {
      usage_error("unknown option '" + a + "' (see --help)");
    }
  }
  if (opt.bundle_dir.empty()) usage_error("--bundle is required (see --help)");
  if (!info_only && ids_text.empty()) usage_error("--prompt-ids or --prompt-ids-file is required");

  try {
    auto runner = firstkit::Runner::load(opt);
    const firstkit::BundleInfo& info = runner->info();
    if (info_only) {
      nlohmann::ordered_json o = info.to_json();
      o["peak_rss_mb"] = firstkit::peak_rss_mb();
      std::printf("%s\n", o.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace).c_str());
      return 0;
    }
    gen.mask_override = firstkit::parse_mask_spec(mask_spec, info.num_layers);
    std::vector<int64_t> prompt = parse_ids(ids_text, ids_origin);
    for (long w = 0; w < warmup; ++w) runner->generate(prompt, gen);
    for (long r = 0; r < runs; ++r) {
      firstkit::RunResult res = runner->generate(prompt, gen);
      std::string line = res.to_json();
      if (!out_path.empty()) append_line(out_path, line);
      std::printf("%s\n", line.c_str());
      std::fflush(stdout);
    }
    runner->flush_etdump();
  } catch (const firstkit::RunnerError& e) {
    std::fprintf(stderr, "first_runner: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "first_runner: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
