// first_jni.cpp -- JNI bridge from org.firstkit.demo.logic.NativeRunner to the shared firstkit runner core
// (device_bench/runner/core/first_runner.h). The app runs exactly the core the Linux runner runs: prefill
// with the routers, the mask frozen for the whole decode, and only the running layer_i methods per token.
//
// No C++ exception crosses into Java: every RunnerError becomes a java.lang.RuntimeException (bad arguments an
// IllegalArgumentException) carrying the core's one-line message. Strings cross as UTF-16 (NewString), so any
// UTF-8 the detokenizer produces (4-byte sequences, a character cut between two tokens) is safe.
#include <jni.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#ifdef __ANDROID__
#include <android/log.h>
#define FIRST_LOG(...) __android_log_print(ANDROID_LOG_INFO, "firstkit", __VA_ARGS__)
#else
#define FIRST_LOG(...) ((void)0)
#endif

#include <nlohmann/json.hpp>

#include "first_runner.h"

namespace {

constexpr const char* kRuntimeException = "java/lang/RuntimeException";
constexpr const char* kIllegalArgument = "java/lang/IllegalArgumentException";
constexpr const char* kIllegalState = "java/lang/IllegalStateException";

void throw_java(JNIEnv* env, const char* cls, const std::string& msg) {
  if (env->ExceptionCheck()) return;  // keep the first (e.g. from a listener)
  jclass c = env->FindClass(cls);
  if (c != nullptr) env->ThrowNew(c, msg.c_str());
}

// UTF-8 (possibly invalid or cut in the middle of a character) -> Java string; bad bytes become U+FFFD.
jstring utf8_to_jstring(JNIEnv* env, const std::string& s) {
  std::u16string out;
  out.reserve(s.size());
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    uint32_t cp = 0xFFFD;
    size_t len = 1;
    if (c < 0x80) {
      cp = c;
    } else if ((c >> 5) == 0x6 || (c >> 4) == 0xE || (c >> 3) == 0x1E) {
      len = (c >> 5) == 0x6 ? 2 : ((c >> 4) == 0xE ? 3 : 4);
      uint32_t v = (len == 2) ? (c & 0x1Fu) : (len == 3 ? (c & 0x0Fu) : (c & 0x07u));
      bool ok = i + len <= n;
      for (size_t k = 1; ok && k < len; ++k) {
        unsigned char cc = static_cast<unsigned char>(s[i + k]);
        if ((cc >> 6) != 0x2) ok = false;
        else v = (v << 6) | (cc & 0x3Fu);
      }
      const uint32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
      if (ok && v >= min_for_len[len] && v <= 0x10FFFF && !(v >= 0xD800 && v <= 0xDFFF)) {
        cp = v;
      } else {
        len = 1;
        cp = 0xFFFD;
      }
    }
    if (cp >= 0x10000) {
      cp -= 0x10000;
      out.push_back(static_cast<char16_t>(0xD800 + (cp >> 10)));
      out.push_back(static_cast<char16_t>(0xDC00 + (cp & 0x3FF)));
    } else {
      out.push_back(static_cast<char16_t>(cp));
    }
    i += len;
  }
  return env->NewString(reinterpret_cast<const jchar*>(out.data()), static_cast<jsize>(out.size()));
}

std::string jstring_to_utf8(JNIEnv* env, jstring s) {
  if (s == nullptr) return std::string();
  // GetStringUTFChars gives modified UTF-8, which equals UTF-8 for the paths and mask specs passed here
  // (no NUL, no supplementary characters are expected; they would only fail to match a file).
  const char* c = env->GetStringUTFChars(s, nullptr);
  if (c == nullptr) return std::string();
  std::string out(c);
  env->ReleaseStringUTFChars(s, c);
  return out;
}

std::vector<int64_t> long_array(JNIEnv* env, jlongArray a) {
  std::vector<int64_t> v;
  if (a == nullptr) return v;
  jsize n = env->GetArrayLength(a);
  v.resize(static_cast<size_t>(n));
  if (n > 0) env->GetLongArrayRegion(a, 0, n, reinterpret_cast<jlong*>(v.data()));
  return v;
}

jlongArray to_long_array(JNIEnv* env, const std::vector<int64_t>& v) {
  jlongArray a = env->NewLongArray(static_cast<jsize>(v.size()));
  if (a != nullptr && !v.empty())
    env->SetLongArrayRegion(a, 0, static_cast<jsize>(v.size()), reinterpret_cast<const jlong*>(v.data()));
  return a;
}

firstkit::Runner* runner_of(JNIEnv* env, jlong handle) {
  if (handle == 0) {
    throw_java(env, kIllegalState, "runner is closed");
    return nullptr;
  }
  return reinterpret_cast<firstkit::Runner*>(handle);
}

std::string info_json(const firstkit::BundleInfo& info) {
  nlohmann::ordered_json o = info.to_json();
  o["api_version"] = firstkit::kRunnerApiVersion;
  return o.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

}  // namespace

extern "C" {

JNIEXPORT jint JNICALL Java_org_firstkit_demo_logic_NativeRunner_apiVersion(JNIEnv*, jclass) {
  return firstkit::kRunnerApiVersion;
}

JNIEXPORT jlongArray JNICALL Java_org_firstkit_demo_logic_NativeRunner_parseMaskSpec(JNIEnv* env, jclass,
                                                                                      jstring spec, jlong layers) {
  try {
    std::vector<int64_t> v = firstkit::parse_mask_spec(jstring_to_utf8(env, spec), layers);
    if (v.empty()) return nullptr;  // "auto": the routers decide
    return to_long_array(env, v);
  } catch (const std::exception& e) {
    throw_java(env, kIllegalArgument, e.what());
    return nullptr;
  }
}

JNIEXPORT jlong JNICALL Java_org_firstkit_demo_logic_NativeRunner_nativeLoad(JNIEnv* env, jclass, jstring dir,
                                                                             jint threads, jboolean verify,
                                                                             jboolean weight_cache) {
  try {
    firstkit::RunnerOptions opt;
    opt.bundle_dir = jstring_to_utf8(env, dir);
    opt.threads = threads;
    opt.verify_files = verify == JNI_TRUE;
    opt.xnnpack_weight_cache = weight_cache == JNI_TRUE;
    opt.runner_name = "android";
    std::unique_ptr<firstkit::Runner> r = firstkit::Runner::load(opt);
    FIRST_LOG("loaded %s: %lld layers", opt.bundle_dir.c_str(), (long long)r->info().num_layers);
    return reinterpret_cast<jlong>(r.release());
  } catch (const std::exception& e) {
    throw_java(env, kRuntimeException, e.what());
    return 0;
  }
}

JNIEXPORT jstring JNICALL Java_org_firstkit_demo_logic_NativeRunner_nativeInfo(JNIEnv* env, jclass, jlong handle) {
  firstkit::Runner* r = runner_of(env, handle);
  if (r == nullptr) return nullptr;
  return utf8_to_jstring(env, info_json(r->info()));
}

JNIEXPORT jstring JNICALL Java_org_firstkit_demo_logic_NativeRunner_nativeGenerate(
    JNIEnv* env, jclass, jlong handle, jlongArray prompt, jint max_new_tokens, jlongArray mask_override,
    jboolean stop_at_eos, jobject listener) {
  firstkit::Runner* r = runner_of(env, handle);
  if (r == nullptr) return nullptr;
  if (prompt == nullptr) {
    throw_java(env, kIllegalArgument, "prompt is null");
    return nullptr;
  }
  jmethodID on_token = nullptr;
  if (listener != nullptr) {
    jclass lc = env->GetObjectClass(listener);
    on_token = env->GetMethodID(lc, "onToken", "(JILjava/lang/String;)Z");
    if (on_token == nullptr) return nullptr;  // NoSuchMethodError pending
  }
  try {
    firstkit::GenerateOptions g;
    g.max_new_tokens = max_new_tokens;
    g.mask_override = long_array(env, mask_override);
    g.stop_at_eos = stop_at_eos == JNI_TRUE;
    std::vector<int64_t> ids = long_array(env, prompt);
    std::vector<int64_t> so_far;
    firstkit::TokenCallback cb = nullptr;
    if (listener != nullptr) {
      cb = [&](int64_t tok, size_t index) -> bool {
        so_far.push_back(tok);
        jstring text = utf8_to_jstring(env, r->decode(so_far));
        if (text == nullptr) return false;
        jboolean go = env->CallBooleanMethod(listener, on_token, static_cast<jlong>(tok), static_cast<jint>(index),
                                             text);
        env->DeleteLocalRef(text);
        if (env->ExceptionCheck()) return false;  // rethrown in Java when generate returns
        return go == JNI_TRUE;
      };
    }
    firstkit::RunResult res = r->generate(ids, g, cb);
    if (env->ExceptionCheck()) return nullptr;
    return utf8_to_jstring(env, res.to_json());
  } catch (const std::exception& e) {
    throw_java(env, kRuntimeException, e.what());
    return nullptr;
  }
}

JNIEXPORT jstring JNICALL Java_org_firstkit_demo_logic_NativeRunner_nativeDecode(JNIEnv* env, jclass, jlong handle,
                                                                                jlongArray tokens) {
  firstkit::Runner* r = runner_of(env, handle);
  if (r == nullptr) return nullptr;
  try {
    return utf8_to_jstring(env, r->decode(long_array(env, tokens)));
  } catch (const std::exception& e) {
    throw_java(env, kRuntimeException, e.what());
    return nullptr;
  }
}

JNIEXPORT void JNICALL Java_org_firstkit_demo_logic_NativeRunner_nativeClose(JNIEnv*, jclass, jlong handle) {
  delete reinterpret_cast<firstkit::Runner*>(handle);
}

}  // extern "C"
