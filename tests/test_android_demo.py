"""android_demo: what can be checked without an Android SDK/NDK.

- AndroidManifest.xml and resources are well-formed and compile with Debian's ``aapt`` against the platform
  framework resources; every ``R.*`` the Kotlin code uses exists.
- The JNI bridge (app/src/main/cpp) is compiled for Linux against the SAME shared runner core
  (device_bench/runner/core), a real ``jni.h`` (OpenJDK) and the executorch wheel, then loaded from the app's
  plain-Java logic module (android_demo/logic, compiled with javac) to run a bundle written by the real
  ``first-export``: tokens, text and mask equal the Python runtime (first-run), results validate against
  device_bench/schemas/run_result.schema.json.
- The plain-Java logic agrees with the Python side: manifest validation (firstkit.runtime.bundle, including the
  manifest's ``chat_template``), prompt encoding (first-run's ``BundleRunner.encode`` with and without a chat template
  in the manifest; Hugging Face tokenizers + ``apply_chat_template``), mask specs (the core's parse_mask_spec, and
  Python's ``firstkit.mask_spec.parse_mask_spec`` for protected layers).

System packages: openjdk-17-jdk-headless (javac, jni.h), libandroid-json-java (org.json, which Android has built in
and the logic module parses JSON with), aapt and android-framework-res (resources).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_bench_support import bundle_copy, tiny_bundle  # one shared tiny bundle and its copies
from test_export_support import TINY_CHAT_TEMPLATE
from test_export_support import tiny_bundle as export_bundle

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "android_demo"
APP = DEMO / "app" / "src" / "main"
LOGIC = DEMO / "logic" / "src" / "main" / "java"
CORE = REPO / "device_bench" / "runner" / "core"
FRAMEWORK_RES = Path("/usr/share/android-framework-res/framework-res.apk")
ORG_JSON = Path("/usr/share/java/com.android.json.jar")  # Android's org.json for the JVM (libandroid-json-java)
ANDROID_NS = "{http://schemas.android.com/apk/res/android}"
PROMPT = "Hello, w"
#: prompts for the encoder comparisons (a chat prompt must still fit the tiny bundles' 24 tokens with the template)
PROMPTS = [PROMPT, "Hi", "ünï ✓", "😀!", "a\nb\t", "<|u|>x"]
_ROOT = Path(tempfile.mkdtemp(prefix="firstkit-android-tests-"))


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} missing: install the Debian package {package} (tests/install_system_deps.sh)")
    return path


def _java_home() -> Path:
    javac = Path(os.path.realpath(_need("javac", "openjdk-17-jdk-headless")))
    home = Path(os.environ.get("JAVA_HOME") or javac.parents[1])
    if not (home / "include" / "jni.h").is_file():
        pytest.fail(f"jni.h not found under {home}/include: install openjdk-17-jdk-headless or set JAVA_HOME")
    return home


def org_json() -> Path:
    """Android's org.json as a jar (on the phone it is part of Android; the logic module compiles against it)."""
    if not ORG_JSON.is_file():
        pytest.fail(f"{ORG_JSON} missing: install the Debian package libandroid-json-java (org.json, as built into "
                    "Android; tests/install_system_deps.sh)")
    return ORG_JSON


@functools.cache
def java_classes() -> Path:
    """The logic module compiled with javac (Java 11 language level, as the Gradle module declares)."""
    _need("javac", "openjdk-17-jdk-headless")
    out = _ROOT / "classes"
    sources = sorted(str(p) for p in LOGIC.rglob("*.java"))
    res = subprocess.run(["javac", "--release", "11", "-Xlint:all", "-Werror", "-cp", str(org_json()), "-d", str(out),
                          *sources], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out


def java_classpath() -> str:
    """Classpath that runs the logic module: its classes and org.json."""
    return os.pathsep.join([str(java_classes()), str(org_json())])


@functools.cache
def jni_library() -> Path:
    """libfirstkit_jni.so built for Linux by the app's own CMakeLists.txt (package mode, executorch wheel)."""
    import executorch

    _need("cmake", "pip install cmake")
    _need("ninja", "pip install ninja")
    env = dict(os.environ, JAVA_HOME=str(_java_home()))
    build = _ROOT / "jni-build"
    et_root = list(executorch.__path__)[0]
    cfg = subprocess.run(["cmake", "-S", str(APP / "cpp"), "-B", str(build), "-G", "Ninja",
                          f"-DEXECUTORCH_ROOT={et_root}", "-DCMAKE_BUILD_TYPE=Release"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    res = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lib = build / "libfirstkit_jni.so"
    assert lib.is_file()
    return lib


def logic_tool(*args, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run org.firstkit.demo.logic.LogicTool (with the JNI library on java.library.path when built)."""
    cmd = ["java", "-cp", java_classpath()]
    if args[0] in ("bench", "native-mask", "decode", "stream"):
        cmd.append(f"-Djava.library.path={jni_library().parent}")
    res = subprocess.run([*cmd, "org.firstkit.demo.logic.LogicTool", *map(str, args)], capture_output=True,
                         text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def chat_bundle() -> Path:
    """The tiny gemma3_text bundle from the real first-export: its tokenizer has a chat template, so its manifest has
    ``chat_template`` (the llama one, ``tiny_bundle()``, has none: its prompts are plain text)."""
    bundle, _ = export_bundle("gemma3_text")
    return bundle


# ---------------------------------------------------------------------------------------------------------------
# Manifest and resources
# ---------------------------------------------------------------------------------------------------------------

def _xml_files() -> list[Path]:
    return [APP / "AndroidManifest.xml", *sorted((APP / "res").rglob("*.xml"))]


def test_xml_well_formed_and_manifest_declares_both_entry_points():
    for f in _xml_files():
        ET.parse(f)  # raises on malformed XML
    root = ET.parse(APP / "AndroidManifest.xml").getroot()
    acts = {a.get(f"{ANDROID_NS}name"): a for a in root.iter("activity")}
    assert set(acts) == {".MainActivity", ".BenchmarkActivity"}
    launcher = acts[".MainActivity"]
    assert launcher.get(f"{ANDROID_NS}exported") == "true"
    actions = [e.get(f"{ANDROID_NS}name") for e in launcher.iter("action")]
    assert actions == ["android.intent.action.MAIN"]
    # first-bench starts the benchmark from adb: it must be exported
    assert acts[".BenchmarkActivity"].get(f"{ANDROID_NS}exported") == "true"
    # every Kotlin class the manifest names exists
    for name in acts:
        assert (APP / "java" / "org" / "firstkit" / "demo" / f"{name[1:]}.kt").is_file()


def _resource_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {"id": set(), "string": set(), "color": set(), "layout": set(), "drawable": set(),
                                  "style": set()}
    for f in (APP / "res").rglob("*.xml"):
        kind = f.parent.name.split("-")[0]
        if kind in ("layout", "drawable"):
            names[kind].add(f.stem)
        for el in ET.parse(f).getroot().iter():
            rid = el.get(f"{ANDROID_NS}id")
            if rid and rid.startswith("@+id/"):
                names["id"].add(rid[5:])
            if kind == "values" and el.tag in ("string", "color", "style"):
                names[el.tag].add(el.get("name").replace(".", "_"))
    return names


def test_every_resource_the_kotlin_code_uses_exists():
    names = _resource_names()
    used = set()
    for kt in (APP / "java").rglob("*.kt"):
        used |= set(re.findall(r"\bR\.(id|string|color|layout|drawable|style)\.(\w+)", kt.read_text()))
    assert ("layout", "activity_main") in used and ("id", "generate_button") in used
    missing = sorted(f"R.{k}.{n}" for k, n in used if n not in names[k])
    assert not missing, f"resources used in Kotlin but not defined: {missing}"


def test_resources_compile_with_aapt(tmp_path):
    """aapt packages the manifest and resources against the platform framework (what AGP's aapt2 checks)."""
    aapt = _need("aapt", "aapt")
    if not FRAMEWORK_RES.is_file():
        pytest.fail(f"{FRAMEWORK_RES} missing: install the Debian package android-framework-res")
    # AGP injects the package from `namespace` (app/build.gradle.kts) when it merges the manifest.
    gradle = (DEMO / "app" / "build.gradle.kts").read_text()
    namespace = re.search(r'namespace = "([\w.]+)"', gradle).group(1)
    text = (APP / "AndroidManifest.xml").read_text()
    assert "package=" not in text  # the namespace is the single source of truth
    manifest = tmp_path / "AndroidManifest.xml"
    manifest.write_text(text.replace("<manifest ", f'<manifest package="{namespace}" ', 1))
    min_sdk = re.search(r"minSdk = (\d+)", gradle).group(1)
    apk, gen = tmp_path / "res.apk", tmp_path / "gen"
    gen.mkdir()
    res = subprocess.run([aapt, "package", "-f", "-M", str(manifest), "-S", str(APP / "res"), "-I",
                          str(FRAMEWORK_RES), "-F", str(apk), "-J", str(gen), "--min-sdk-version", min_sdk],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    badging = subprocess.run([aapt, "dump", "badging", str(apk)], capture_output=True, text=True, timeout=60).stdout
    assert f"package: name='{namespace}'" in badging
    assert f"launchable-activity: name='{namespace}.MainActivity'" in badging
    assert "application-label:'firstkit demo'" in badging
    # the R class aapt generated has every id the Kotlin code uses
    r_java = next(gen.rglob("R.java")).read_text()
    for kt in (APP / "java").rglob("*.kt"):
        for rid in re.findall(r"\bR\.id\.(\w+)", kt.read_text()):
            assert re.search(rf"\bint {rid}\s*=", r_java), rid


def test_gradle_project_is_conventional():
    settings = (DEMO / "settings.gradle.kts").read_text()
    assert 'include(":app", ":logic")' in settings
    app = (DEMO / "app" / "build.gradle.kts").read_text()
    assert 'implementation("org.pytorch:executorch-android:$executorchVersion")' in app
    assert 'path = file("src/main/cpp/CMakeLists.txt")' in app
    assert 'implementation(project(":logic"))' in app
    # the logic module parses JSON with org.json: Android has it built in, so it is compileOnly (never packaged)
    logic = (DEMO / "logic" / "build.gradle.kts").read_text()
    assert re.search(r'compileOnly\((androidJson|"com\.vaadin\.external\.google:android-json:[^"]+")\)', logic)
    assert "implementation(" not in logic.replace("testImplementation(", "")
    assert not (LOGIC / "org" / "firstkit" / "demo" / "logic" / "Json.java").exists()  # no hand-written parser
    # the ExecuTorch Android runtime must be the release the exporter used (.pte + headers compatibility)
    props = (DEMO / "gradle.properties").read_text()
    from importlib.metadata import version

    import executorch  # noqa: F401

    assert f"firstkit.executorchVersion={version('executorch')}" in props
    cmake = (APP / "cpp" / "CMakeLists.txt").read_text()
    for src in ("first_runner.cpp", "sha256.cpp", "tokenizer.cpp"):
        assert f"${{FIRSTKIT_CORE_DIR}}/{src}" in cmake and (CORE / src).is_file()
    assert sorted(p.name for p in CORE.glob("*.cpp")) == ["first_runner.cpp", "sha256.cpp", "tokenizer.cpp"], \
        "core gained a source: add it"
    # JSON is nlohmann/json (header-only), found the way the runner's CMake finds it; no hand-written parser
    assert "include(${FIRSTKIT_CORE_DIR}/nlohmann_json.cmake)" in cmake and "firstkit::nlohmann_json" in cmake
    assert not (CORE / "json.h").exists() and not (CORE / "json.cpp").exists()


# ---------------------------------------------------------------------------------------------------------------
# JNI bridge on Linux, against the same core
# ---------------------------------------------------------------------------------------------------------------

def test_bridge_compiles_warning_free_against_real_jni_h():
    """The bridge needs only jni.h and the core's header; NDK clang builds with warnings on, so keep it clean."""
    home = _java_home()
    cxx = _need("g++", "g++")
    res = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Wpedantic", "-Werror",
                          f"-I{home / 'include'}", f"-I{home / 'include' / 'linux'}", f"-I{CORE}",
                          str(APP / "cpp" / "first_jni.cpp")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_jni_symbols_match_the_java_natives():
    lib = jni_library()
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    java = (LOGIC / "org" / "firstkit" / "demo" / "logic" / "NativeRunner.java").read_text()
    natives = re.findall(r"native \S+ (\w+)\(", java)
    assert len(natives) == 7
    for m in natives:
        assert f"Java_org_firstkit_demo_logic_NativeRunner_{m}" in syms, m
    # the core is compiled into the bridge (not stubbed)
    assert "_ZN8firstkit6Runner4load" in syms


@pytest.mark.parametrize("spec,n", [("auto", 4), ("all", 3), ("0110", 4), ("", 2), ("01x0", 4), ("011", 4),
                                    ("ALL", 2), ("1", 1)])
def test_java_mask_rules_equal_the_core(spec, n):
    java = logic_tool("mask", spec, n, check=False)
    core = logic_tool("native-mask", spec, n, check=False)
    assert java.returncode == core.returncode
    assert java.stdout == core.stdout
    if java.returncode:
        assert java.stderr.strip().splitlines()[-1] == core.stderr.strip().splitlines()[-1]
        assert "mask" in java.stderr


@pytest.mark.parametrize("spec,n,protected", [("0110", 4, [0, 3]), ("1111", 4, [0, 3]), ("1110", 4, [0, 3]),
                                              ("0111", 4, [3, 0]), ("1101", 4, [-1, 2]), ("10", 2, [0]),
                                              ("01", 2, [0]), ("all", 3, [0, 1, 2]), ("auto", 3, [0]),
                                              ("110", 3, []), ("1x1", 3, [0]), ("11", 3, [0])])
def test_java_mask_protected_layers_equal_python(spec, n, protected):
    """MaskFormat.parseSpec refuses a mask that skips a protected layer, as firstkit.mask_spec.parse_mask_spec and
    the core do ("mask skips protected layer i": the first skipped one, in the manifest's order)."""
    from firstkit.mask_spec import parse_mask_spec

    java = logic_tool("mask", spec, n, ",".join(map(str, protected)), check=False)
    try:
        want, why = parse_mask_spec(spec, n, protected), None
    except ValueError as e:
        want, why = None, str(e)
    if why is None:
        assert java.returncode == 0, java.stderr
        got = json.loads(java.stdout)
        assert (got or [-1] * n) == want
    else:
        assert java.returncode == 1, java.stdout
        msg = java.stderr.strip().splitlines()[-1].removeprefix("error: ")
        m = re.match(r"mask skips protected layer (\d+) \(protected: ", why)
        assert (msg == f"mask skips protected layer {m.group(1)}") if m else ("protected" not in msg), (msg, why)


@pytest.mark.parametrize("chat,mask", [(False, "auto"), (False, "all"), (False, "1001"), (True, "auto"),
                                       (True, "10")])
def test_headless_benchmark_equals_python_runtime(chat, mask, tmp_path):
    """BenchmarkActivity's logic on the JVM: manifest check, on-device prompt encoding, JNI core, JSON lines; a
    text prompt gives first-run's prompt, tokens, text and mask, plain text (llama bundle) and as a user turn of the
    manifest's chat_template (gemma3_text bundle)."""
    import jsonschema

    from firstkit.runtime import load_bundle

    bundle = chat_bundle() if chat else tiny_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (manifest["chat_template"] is not None) == chat
    n_new = 6 if chat else 10  # the chat prompt is 19 tokens: 19 + 6 - 1 fills max_seq_len 24
    out = tmp_path / "bench.jsonl"
    res = logic_tool("bench", f"bundle={bundle}", f"prompt={PROMPT}", f"max_new_tokens={n_new}", "runs=2",
                     "warmup=1", f"mask={mask}", "ignore_eos=true", f"out={out}", "threads=1")
    status = json.loads(Path(f"{out}.done").read_text())
    assert status == {"ok": True, "runs": 2, "error": None}, res.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    schema = json.loads((REPO / "device_bench" / "schemas" / "run_result.schema.json").read_text())
    from firstkit.runtime.bundle import manifest_sha256

    # first-run: the same text through BundleRunner.encode (the manifest's chat_template, or plain text)
    runner = load_bundle(bundle, threads=1)
    prompt_ids = runner.encode(PROMPT)
    ref = runner.generate(PROMPT, max_new_tokens=n_new, mask=mask, stop_at_eos=False)
    assert len(prompt_ids) == len(PROMPT.encode()) + (11 if chat else 0)  # byte tokens, template around the turn
    assert json.loads(logic_tool("encode", bundle, PROMPT).stdout) == prompt_ids
    n_layers = manifest["model"]["num_layers"]
    for line in lines:
        r = json.loads(line)
        jsonschema.validate(r, schema)
        assert r["runner"] == "android" and r["backend"] == "executorch" and r["threads"] == 1
        assert r["bundle_sha256"] == manifest_sha256(bundle)
        assert r["prompt_tokens"] == ref["prompt_tokens"] == len(prompt_ids)
        assert r["tokens"] == ref["tokens"] and r["mask"] == ref["mask"] and r["text"] == ref["text"]
        assert len(r["tokens"]) == n_new and len(r["decode_ms"]) == n_new - 1
        if mask != "auto":
            assert r["mask"] == ("1" * n_layers if mask == "all" else mask)
    # the Java result validator accepts what the core wrote
    assert len(logic_tool("result", out).stdout.splitlines()) == 2


def test_streamed_text_and_utf8_through_jni():
    """The listener sees every token with the text so far; UTF-8 from the core crosses JNI intact."""
    from transformers import AutoTokenizer

    bundle = tiny_bundle()
    hf = AutoTokenizer.from_pretrained(bundle / "tokenizer")
    # byte-level ids: 2-byte, 4-byte (a surrogate pair in Java), and a cut character (U+FFFD, like HF)
    for ids in ([72, 195, 169], [240, 159, 152, 128, 33], [104, 195], [195, 40]):
        text = json.loads(logic_tool("decode", bundle, ",".join(map(str, ids))).stdout)
        assert text == hf.decode(ids), ids
    lines = logic_tool("stream", bundle, "72,101,108,108,111", 6, "all").stdout.splitlines()
    events, result = [json.loads(x) for x in lines[:-1]], json.loads(lines[-1])
    assert [e["index"] for e in events] == list(range(6)) and [e["token"] for e in events] == result["tokens"]
    for k, e in enumerate(events):
        assert e["text"] == hf.decode(result["tokens"][: k + 1])
    assert events[-1]["text"] == result["text"] and result["mask"] == "1111"


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_encoding_on_device_equals_first_run(chat):
    """The app's prompt ids (LogicTool encode: the manifest's chat_template + BpeTokenizer) are first-run's
    (BundleRunner.encode), with a chat template in the manifest and without one, and with --raw."""
    from firstkit.runtime import load_bundle

    bundle = chat_bundle() if chat else tiny_bundle()
    template = json.loads((bundle / "manifest.json").read_text())["chat_template"]
    if chat:  # the export rendered the tokenizer's template around one user turn
        assert template == {"prefix": "<|u|>", "suffix": "\n<|a|>"} and TINY_CHAT_TEMPLATE["gemma3_text"]
    else:
        assert template is None and TINY_CHAT_TEMPLATE["llama"] is None
    runner = load_bundle(bundle, threads=1)
    for p in PROMPTS:
        ids = json.loads(logic_tool("encode", bundle, p).stdout)
        assert ids == runner.encode(p), p
        assert ids == list((template["prefix"] + p + template["suffix"] if chat else p).encode())  # byte tokens
        assert json.loads(logic_tool("encode", bundle, p, "--raw").stdout) == runner.encode(p, chat=False), p
    _one_line_error(logic_tool("encode", bundle, "", check=False), "empty prompt")


def test_benchmark_errors_are_reported_not_crashed(tmp_path):
    bundle = bundle_copy("damaged")
    out = tmp_path / "b.jsonl"
    # a truncated program: the manifest check names the file, nothing is written to out
    pte = bundle / "model.pte"
    pte.write_bytes(pte.read_bytes()[:-10])
    res = logic_tool("bench", f"bundle={bundle}", "prompt_ids=1,2,3", f"out={out}", check=False)
    assert res.returncode == 1
    status = json.loads(Path(f"{out}.done").read_text())
    assert status["ok"] is False and status["runs"] == 0 and "model.pte" in status["error"]
    assert "truncated" in status["error"] and not out.exists()
    # a wrong mask length comes back from the core's rules as one line
    res = logic_tool("bench", f"bundle={tiny_bundle()}", "prompt_ids=1,2,3", "mask=10", f"out={out}", check=False)
    status = json.loads(Path(f"{out}.done").read_text())
    assert res.returncode == 1 and status["ok"] is False and "2 bits, model has 4 layers" in status["error"]
    # a mask that skips a protected layer (routing.protected_layers = [0, 3]) is refused by MaskFormat.parseSpec,
    # in the core's words, before the core is loaded
    for bits, layer in [("0111", 0), ("1110", 3), ("0110", 0)]:
        logic_tool("bench", f"bundle={tiny_bundle()}", "prompt_ids=1,2,3", f"mask={bits}", f"out={out}", check=False)
        status = json.loads(Path(f"{out}.done").read_text())
        assert status["ok"] is False and status["error"] == f"mask skips protected layer {layer}", status
    # a prompt longer than the bundle's max_seq_len: the core refuses it
    long_ids = ",".join(["5"] * 30)
    logic_tool("bench", f"bundle={tiny_bundle()}", f"prompt_ids={long_ids}", f"out={out}", check=False)
    status = json.loads(Path(f"{out}.done").read_text())
    assert status["ok"] is False and "max_seq_len" in status["error"]
    # bad extras are usage errors before anything runs
    for extras, msg in [(["prompt_ids=1"], "missing extra 'bundle'"),
                        ([f"bundle={bundle}", "prompt_ids=1", "runs=0", f"out={out}"], "runs needs an integer >= 1"),
                        ([f"bundle={bundle}", f"out={out}"], "exactly one of the extras prompt_ids and prompt"),
                        ([f"bundle={bundle}", "prompt_ids=1", "speed=fast", f"out={out}"], "unknown benchmark extra")]:
        res = logic_tool("bench", *extras, check=False)
        assert res.returncode == 1 and msg in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------------------------
# Plain-Java logic vs the Python side
# ---------------------------------------------------------------------------------------------------------------

def _manifest_variants(good: dict) -> list[dict]:
    out = [good]

    def variant(fn):
        m = copy.deepcopy(good)
        fn(m)
        out.append(m)

    variant(lambda m: m.pop("files"))
    variant(lambda m: m.pop("routing") and m.pop("versions"))
    variant(lambda m: m.update(format="other"))
    variant(lambda m: m.update(format_version=2))
    variant(lambda m: m["model"].pop("eos_ids"))
    variant(lambda m: m["model"].update(num_layers=0))
    variant(lambda m: m.update(max_seq_len="24"))
    variant(lambda m: m["routing"].pop("policy"))
    variant(lambda m: m["routing"].update(protected_layers=[0, 4]))
    variant(lambda m: m.update(backends={}))
    variant(lambda m: m["backends"].update(tflite={}))
    variant(lambda m: m.update(files=[]))
    variant(lambda m: m["files"].update({"../evil": {"sha256": "0" * 64, "size": 1}}))
    variant(lambda m: m["files"].update({"x": {"size": 1}}))
    variant(lambda m: m["backends"]["executorch"].update(file="other.pte"))
    variant(lambda m: m["backends"]["executorch"]["methods"].pop("layer_2"))
    variant(lambda m: m["backends"]["onnx"]["decode"].update(file="onnx/missing.onnx"))
    # chat_template (JSON schema: null or an object with string prefix and suffix), checked after the rules above
    for bad in ["<|im_start|>user\n{{ content }}", 5, 1.5e-07, True, [], {}, {"prefix": "a"}, {"suffix": "b"},
                {"prefix": 1, "suffix": "b"}, {"prefix": "a", "suffix": None}, {"prefix": ["x"], "suffix": 2.0},
                {"suffix": {"k": 1}}, {"x": [1, 2.5, None, False, "it's", 'say "hi"', "both ' \"", "\\"]},
                "tab\t nl\n\x01 \x7f \u00a0 é ✓ \u2028 \U0001f600 \ud800" + "y" * 300]:
        variant(lambda m, bad=bad: m.update(chat_template=bad))
    variant(lambda m: m.update(format="other", chat_template=5))  # the first rule that fails names the problem
    return out


def _good_manifest_variants(good: dict) -> list[dict]:
    """Manifests both accept: chat_template absent, null or any object with string prefix and suffix."""
    without = copy.deepcopy(good)
    without.pop("chat_template", None)
    return [without, {**good, "chat_template": None}, {**good, "chat_template": {"prefix": "", "suffix": ""}},
            {**good, "chat_template": {"suffix": "\n<|a|>", "prefix": "<|u|>", "extra": 1}}]


def test_manifest_check_equals_python_runtime(tmp_path):
    from firstkit.runtime.bundle import BundleError, validate_manifest

    good = json.loads((tiny_bundle() / "manifest.json").read_text())
    chat_good = json.loads((chat_bundle() / "manifest.json").read_text())
    bad = _manifest_variants(good)[1:]
    accepted = [good, chat_good, *_good_manifest_variants(good)]
    variants = accepted + bad
    f = tmp_path / "manifests.json"
    f.write_text(json.dumps(variants))
    java = json.loads(logic_tool("check-manifests", f).stdout)
    assert len(java) == len(variants)
    for m, jerr in zip(variants, java, strict=True):
        try:
            validate_manifest(m, "manifest.json")
            perr = None
        except BundleError as e:
            perr = str(e)
        assert jerr == perr, (jerr, perr)
    assert all(e is None for e in java[: len(accepted)]) and all(e is not None for e in java[len(accepted):])
    assert sum("chat_template" in e for e in java[len(accepted):]) == 14


def test_manifest_file_checks(tmp_path):
    bundle = bundle_copy("edited")
    ok = json.loads(logic_tool("manifest", bundle).stdout)
    assert ok["ok"] and ok["num_layers"] == 4 and ok["pte"] == "model.pte"
    tok = bundle / "tokenizer" / "tokenizer.json"
    tok.write_bytes(tok.read_bytes() + b" ")  # one byte more
    res = logic_tool("manifest", bundle, check=False)
    assert res.returncode == 1 and "tokenizer/tokenizer.json has" in res.stderr and "truncated?" in res.stderr
    tok.write_bytes(tok.read_bytes()[:-2] + b"x")  # same size, other content
    res = logic_tool("manifest", bundle, check=False)
    assert res.returncode == 1 and "sha256 of tokenizer/tokenizer.json does not match" in res.stderr
    assert logic_tool("manifest", bundle, "--no-hashes").returncode == 0
    res = logic_tool("manifest", tmp_path, check=False)
    assert res.returncode == 1 and "no manifest.json (not a firstkit bundle)" in res.stderr


def _one_line_error(res: subprocess.CompletedProcess, *parts: str) -> None:
    """LogicTool failed with one 'error: ...' line naming the problem (no stack trace, no unchecked exception)."""
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Exception" not in lines[0] and "\tat " not in res.stderr, res.stderr
    for p in parts:
        assert p in lines[0], (p, lines[0])


def test_malformed_json_gives_one_line_errors(tmp_path):
    """org.json parses; every malformed document is a one-line BundleException/IllegalArgumentException."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for text, why in [('{"format": "firstkit-bundle",', "invalid JSON"), ('{"a": 1} {"b": 2}', "trailing characters"),
                      ("[" * 100000, "invalid JSON"), ("", "invalid JSON"),
                      ("[1, 2]", "manifest must be a JSON object")]:
        (bundle / "manifest.json").write_text(text)
        _one_line_error(logic_tool("manifest", bundle, check=False), str(bundle / "manifest.json"), why)
    good = {"text": "hi", "tokens": [1, 2], "prompt_tokens": 3, "mask": "1011", "skip_ratio": 0.25, "prefill_ms": 1.5,
            "decode_ms_per_token": 2.0, "decode_ms": [2.0], "tokens_per_s": 500.0, "peak_rss_mb": 10.0, "threads": 1,
            "backend": "executorch", "runner": "android", "bundle_sha256": "0" * 64}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(good) + "\n")
    assert logic_tool("result", results).stdout.count("skipped 1/4 layers") == 1
    for line, why in [("{not json", "run result: invalid JSON"), ("[1]", "run result: not a JSON object"),
                      (json.dumps(good) + " x", "run result: invalid JSON (trailing"),
                      (json.dumps({**good, "tokens": [1, 2.5]}), "run result: tokens must be integers"),
                      (json.dumps({**good, "threads": None}), "run result: threads must be a non-negative integer"),
                      (json.dumps({**good, "mask": "10x1"}), "run result: mask must be a non-empty 0/1 string"),
                      (json.dumps({k: v for k, v in good.items() if k != "text"}), "run result lacks keys text")]:
        results.write_text(line + "\n")
        _one_line_error(logic_tool("result", results, check=False), why)
    tok = tmp_path / "tok"
    tok.mkdir()
    texts = tmp_path / "texts.json"
    texts.write_text('["a"]')
    for doc, why in [('{"model": {"type": "BPE"', "tokenizer: tokenizer.json: invalid JSON"),
                     ({"model": {"type": "BPE", "vocab": {"a": "x"}, "merges": []}}, "model.vocab must hold integers"),
                     ({"model": {"type": "BPE", "vocab": {"a": 0}}}, "model.merges is missing"),
                     ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [3]}}, "model.merges must hold strings"),
                     ({"model": []}, "tokenizer: model must be an object")]:
        (tok / "tokenizer.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
        _one_line_error(logic_tool("encode-json", tok, texts, check=False), why)
    # a chat_template value given to the encoder is checked like the manifest's, in the Python runtime's words
    shutil.copy(tiny_bundle() / "tokenizer" / "tokenizer.json", tok / "tokenizer.json")
    template = tmp_path / "template.json"
    for value, why in [('{"prefix": "a"', "invalid JSON"), ('{"prefix": "a"}', "chat_template: 'suffix' is a required"),
                       ('"<|im_start|>"', "chat_template: '<|im_start|>' is not valid under any of the given schemas")]:
        template.write_text(value)
        _one_line_error(logic_tool("encode-json", tok, texts, template, check=False), str(template), why)
    # a non-object in check-manifests is refused with the Python runtime's message
    from firstkit.runtime.bundle import BundleError, validate_manifest

    f = tmp_path / "manifests.json"
    f.write_text(json.dumps([5, None, "x"]))
    java = json.loads(logic_tool("check-manifests", f).stdout)
    for m, jerr in zip([5, None, "x"], java, strict=True):
        with pytest.raises(BundleError) as e:
            validate_manifest(m, "manifest.json")
        assert jerr == str(e.value)


TEXTS = ["Hello, world!", "The capital of France is Paris.", "  leading and trailing  ", "tabs\tand\nnewlines\n\n",
         "numbers 12345 and 3.14159", "don't you'll we've I'm", "ünïcödé café naïve", "日本語のテキスト",
         "emoji 😀🚀 mixed", "<|im_start|>user\nhi<|im_end|>", "a" * 50, "x<|im_end|>y", ""]


@functools.cache
def trained_tokenizer_dir() -> Path:
    """A small byte-level BPE tokenizer trained offline (real merges), ChatML specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for t in TEXTS if t] * 20 + ["the quick brown fox jumps over the lazy dog " * 5,
                                             "The capital of France is Paris and Berlin is in Germany."] * 20
    tok.train_from_iterator(corpus, trainer)
    template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a tiny test assistant<|im_end|>\n' }}{% endif %}"
                "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = template
    out = _ROOT / "trained-tokenizer"
    fast.save_pretrained(out)
    return out


def _compare_tokenizer(tok_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    f = tmp_path / "texts.json"
    f.write_text(json.dumps(TEXTS))
    from firstkit.export.pipeline import render_chat_template

    raw = json.loads(logic_tool("encode-json", tok_dir, f).stdout)
    assert raw == [hf(t).input_ids for t in TEXTS]
    prompts = [t for t in TEXTS if t]
    f.write_text(json.dumps(prompts))
    # the chat_template first-export writes into the manifest, given to the app's encoder as the manifest holds it
    template = tmp_path / "chat_template.json"
    template.write_text(json.dumps(render_chat_template(hf)))
    chat = json.loads(logic_tool("encode-json", tok_dir, f, template).stdout)
    expected = []
    for p in prompts:  # exactly FirstModel.encode_chat (Jinja, in Python)
        text = hf.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        expected.append(hf(text, add_special_tokens=False).input_ids)
    assert chat == expected
    assert any(len(ids) < len(t.encode()) for ids, t in zip(raw, TEXTS, strict=True))  # merges were applied


def test_prompt_encoder_equals_hf_tokenizer_trained(tmp_path):
    _compare_tokenizer(trained_tokenizer_dir(), tmp_path)


SMOLLM2 = Path.home() / ".cache" / "firstkit" / "models" / "smollm2-135m-instruct"


@pytest.mark.realmodel
@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="default model not converted yet "
                    "(first use of firstkit.models.resolve_model downloads and caches it)")
def test_prompt_encoder_equals_hf_tokenizer_smollm2(tmp_path):
    _compare_tokenizer(SMOLLM2, tmp_path)


def test_unsupported_tokenizer_is_refused_clearly(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.normalizer = normalizers.Lowercase()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "texts.json").write_text('["a"]')
    res = logic_tool("encode-json", tmp_path, tmp_path / "texts.json", check=False)
    assert res.returncode == 1 and "only BPE models are supported" in res.stderr


def test_skipped_layers_view():
    assert logic_tool("describe", "1011").stdout.strip() == "█·██ — skipped 1/4 (layer 1)"
    line = logic_tool("describe", "1" + "0" * 3 + "11" + "0" * 2 + "1" * 4).stdout.strip()
    assert line == "█···██··██ ██ — skipped 5/12 (layers 1-3, 6-7)"


@pytest.mark.slow
@pytest.mark.realmodel
def test_real_default_model_through_the_app_logic(tmp_path):
    """SmolLM2-135M-Instruct with its shipped routers: the app's path (manifest check, chat-template encoding
    in Java, the core through JNI) gives first-run's tokens, text and mask. FIRSTKIT_REAL_BUNDLE reuses a bundle."""
    from click.testing import CliRunner

    from firstkit.export.cli import main as export_main
    from firstkit.runtime import load_bundle

    bundle = os.environ.get("FIRSTKIT_REAL_BUNDLE")
    if not bundle:
        bundle = tmp_path / "smollm2"
        res = CliRunner().invoke(export_main, ["--output", str(bundle), "--max-seq-len", "96", "--quantize", "none"])
        assert res.exit_code == 0, res.output
    bundle = Path(bundle)
    prompt = "What is the capital of France?"
    out = tmp_path / "real.jsonl"
    logic_tool("bench", f"bundle={bundle}", f"prompt={prompt}", "max_new_tokens=16", "threads=1", f"out={out}",
               timeout=1200)
    r = json.loads(out.read_text().splitlines()[0])
    ref = load_bundle(bundle, threads=1).generate(prompt, max_new_tokens=16)
    assert r["tokens"] == ref["tokens"] and r["text"] == ref["text"] and r["mask"] == ref["mask"]
    assert r["prompt_tokens"] == ref["prompt_tokens"] and "Paris" in r["text"]


@pytest.mark.slow
def test_kotlin_sources_parse_and_use_the_logic_api_correctly():
    """kotlinc (Debian `kotlin`) on the app's Kotlin with the logic classes on the classpath but no android.jar:
    the only errors allowed are those caused by the missing Android classes, so there is no syntax error and
    every use of the logic module and of the app's own classes type-checks."""
    kotlinc = _need("kotlinc", "kotlin")
    out = _ROOT / "kotlin-out"
    sources = sorted(str(p) for p in (APP / "java").rglob("*.kt"))
    res = subprocess.run([kotlinc, "-cp", java_classpath(), *sources, "-d", str(out)], capture_output=True,
                         text=True, timeout=600)
    errors = [line.split("error: ", 1)[1] for line in res.stderr.splitlines() if " error: " in line]
    for e in errors:
        allowed = (e.startswith("unresolved reference: ") or e.endswith("overrides nothing")
                   or e.startswith("cannot infer a type for this parameter"))
        assert allowed, f"Kotlin error not explained by the missing android.jar: {e}"
        name = e.removeprefix("unresolved reference: ")
        if e.startswith("unresolved reference: "):
            assert name in ANDROID_NAMES, f"Kotlin refers to {name!r}: not in the logic module nor a known Android name"
    assert "R" in {e.removeprefix("unresolved reference: ") for e in errors}  # kotlinc really ran on the app


# Android SDK names the Kotlin sources use (unresolvable without android.jar). A new one must be added here
# deliberately, so a typo in a call to the logic module cannot hide among them.
ANDROID_NAMES = {
    "R", "android", "findViewById", "DocumentsContract", "TextView", "Log", "Context", "Uri", "Intent", "EditText",
    "Button", "onCreate", "getColor", "ContentResolver", "Bundle", "Activity", "startActivityForResult",
    "setContentView", "runOnUiThread", "onDestroy", "onActivityResult", "it", "intent", "getString",
    "getExternalFilesDir", "finish", "filesDir", "Switch", "RESULT_OK", "Looper", "Handler",
}
