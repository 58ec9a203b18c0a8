"""The native C++ runner: same tokens/text/mask as first-run, result schema, errors, ETDump, builds."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from test_bench_support import bundle_copy, need, runner, tiny_bundle

MASKS = ["auto", "all", "1001", "1101"]
RESULT_KEYS = ["text", "tokens", "prompt_tokens", "mask", "skip_ratio", "prefill_ms", "decode_ms_per_token",
               "decode_ms", "tokens_per_s", "peak_rss_mb", "threads", "backend", "runner", "bundle_sha256"]
PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119]


def _native(pkg, bundle, *args, env=None, timeout=120):
    return subprocess.run([str(pkg.launcher), "--bundle", str(bundle), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _python_runtime(bundle, mask, n):
    from firstkit.runtime import load_bundle

    return load_bundle(bundle).generate(PROMPT, max_new_tokens=n, mask=mask, stop_at_eos=False)


@pytest.mark.parametrize("mask", MASKS)
def test_native_equals_python_runtime(mask):
    pkg, bundle = runner("linux-x86_64"), tiny_bundle()
    ref = _python_runtime(bundle, mask, 12)
    p = _native(pkg, bundle, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 12, "--mask", mask,
                "--ignore-eos", "--threads", 1)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["tokens"] == ref["tokens"] and len(res["tokens"]) == 12
    assert res["mask"] == ref["mask"]
    assert res["text"] == ref["text"]  # the C++ detokenizer reads tokenizer/tokenizer.json
    assert res["skip_ratio"] == pytest.approx(res["mask"].count("0") / 4)
    if mask not in ("auto", "all"):
        assert res["mask"] == mask
    assert len(res["decode_ms"]) == 11 and all(d > 0 for d in res["decode_ms"])
    assert res["tokens_per_s"] == pytest.approx(1000 * 11 / sum(res["decode_ms"]), rel=1e-6)
    assert res["bundle_sha256"] == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert res["runner"] == "native" and res["backend"] == "executorch" and res["threads"] == 1
    assert 1 < res["peak_rss_mb"] < 2000


def test_native_aarch64_under_qemu_equals_python_runtime():
    need("qemu-aarch64-static")
    import os

    pkg, bundle = runner("linux-aarch64"), tiny_bundle()
    env = {**os.environ, "FIRSTKIT_RUNNER_WRAPPER": "qemu-aarch64-static -L /usr/aarch64-linux-gnu"}
    for mask in ("auto", "1001"):
        ref = _python_runtime(bundle, mask, 8)
        p = _native(pkg, bundle, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 8, "--mask", mask,
                    "--ignore-eos", env=env)
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert (res["tokens"], res["mask"], res["text"]) == (ref["tokens"], ref["mask"], ref["text"])
    out = subprocess.run(["file", str(pkg.binary)], capture_output=True, text=True).stdout
    assert "aarch64" in out


def test_result_matches_schema_and_runs_append_to_out(tmp_path):
    import jsonschema

    from firstkit.device_bench import SCHEMA_PATH

    schema = json.loads(SCHEMA_PATH.read_text())
    out = tmp_path / "runs dir" / "r.jsonl"
    out.parent.mkdir()
    p = _native(runner("linux-x86_64"), tiny_bundle(), "--prompt-ids", "1,2,3", "--max-new-tokens", 5,
                "--warmup", 1, "--runs", 3, "--out", out)
    assert p.returncode == 0, p.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines == p.stdout.splitlines()
    for line in lines:
        jsonschema.validate(json.loads(line), schema)
        assert list(json.loads(line)) == RESULT_KEYS  # docs/CONTRACTS.md order
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(lines[0]), "mask": "12"}, schema)


def test_eos_stops_unless_ignored():
    pkg, bundle = runner("linux-x86_64"), tiny_bundle()
    info = json.loads(_native(pkg, bundle, "--info").stdout)
    assert info["num_layers"] == 4 and info["max_seq_len"] == 24 and info["has_tokenizer"]
    full = json.loads(_native(pkg, bundle, "--prompt-ids", "1,2,3", "--max-new-tokens", 20, "--ignore-eos").stdout)
    eos = set(info["eos_ids"])
    hit = next((i for i, t in enumerate(full["tokens"]) if t in eos), None)
    stopped = json.loads(_native(pkg, bundle, "--prompt-ids", "1,2,3", "--max-new-tokens", 20).stdout)
    if hit is None:
        assert stopped["tokens"] == full["tokens"]
    else:
        assert stopped["tokens"] == full["tokens"][:hit + 1]


@pytest.mark.parametrize("args,rc,msg", [
    (["--prompt-ids", "1,2", "--mask", "101"], 1, "has 3 bits, model has 4 layers"),
    (["--prompt-ids", "1,2", "--mask", "0111"], 1, "skips protected layer 0"),
    (["--prompt-ids", "1,2", "--mask", "10x1"], 1, "string of 0/1"),
    (["--prompt-ids", ",".join(["5"] * 20), "--max-new-tokens", "8"], 1, "exceeds max_seq_len"),
    (["--prompt-ids", "1,99999"], 1, "outside the vocabulary"),
    (["--prompt-ids", "1,a"], 2, "bad token id"),
    (["--prompt-ids", "1", "--runs", "0"], 2, "--runs needs an integer >= 1"),
    (["--bogus"], 2, "unknown option"),
])
def test_clear_errors(args, rc, msg):
    p = _native(runner("linux-x86_64"), tiny_bundle(), "--max-new-tokens", 4, *args)
    assert p.returncode == rc
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("first_runner: error:")]
    assert len(err) == 1 and msg in err[0], p.stderr
    assert p.stdout == ""


def test_bundle_checks():
    pkg = runner("linux-x86_64")
    bad = bundle_copy("corrupt")
    data = bytearray((bad / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.pte").write_bytes(bytes(data))
    p = _native(pkg, bad, "--prompt-ids", "1")
    assert p.returncode == 1 and "sha256 mismatch for model.pte" in p.stderr
    p = _native(pkg, bad.parent / "no such bundle", "--prompt-ids", "1")
    assert p.returncode == 1 and "manifest.json is missing" in p.stderr
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 2
    (bad / "manifest.json").write_text(json.dumps(m))
    p = _native(pkg, bad, "--prompt-ids", "1")
    assert p.returncode == 1 and "format_version 2" in p.stderr


def _edited(edit):
    def f(m):
        edit(m)
        return json.dumps(m)
    return f


def _more_layers(m):
    m["model"]["num_layers"] = 5
    m["routing"]["protected_layers"] = [0, 4]
    m["backends"]["executorch"]["methods"].update({"prefill_4": {}, "layer_4": {}})


@pytest.mark.parametrize("make,msg", [
    (lambda m: json.dumps(m)[:150], "invalid JSON (parse error at line 1, column"),
    (lambda m: "[" * 100000, "invalid JSON"),  # deep nesting: an error, not a stack overflow
    (lambda m: "[" * 50000 + "]" * 50000, "manifest must be a JSON object"),
    (lambda m: b'{"format": "firstkit-bundle\xff"}', "invalid string: ill-formed UTF-8 byte"),
    (lambda m: json.dumps(m) + " {}", "invalid JSON"),  # trailing data
    (_edited(lambda m: m.pop("files")), "missing keys files"),
    (_edited(lambda m: m.update(format_version="1")), 'unsupported bundle format_version "1"'),
    (_edited(lambda m: m["model"].update(num_layers="4")), 'model.num_layers must be a positive integer, got "4"'),
    (_edited(lambda m: m["model"].update(num_layers=4.0)), "model.num_layers must be a positive integer, got 4.0"),
    (_edited(lambda m: m["model"].pop("num_layers")), "model must have keys"),
    (_edited(_more_layers), "manifest says 5 layers (model.num_layers), program has 4"),
    (_edited(lambda m: m["routing"].update(protected_layers=3)), "routing.protected_layers must be a list"),
    (_edited(lambda m: m["routing"].update(protected_layers=[0, "3"])), 'routing.protected_layers: "3" is not a layer'),
    (_edited(lambda m: m["routing"].update(protected_layers=[0, 4])), "routing.protected_layers: 4 is not a layer"),
    (_edited(lambda m: m["backends"].update(executorch="model.pte")), "backends.executorch.file must be"),
    (_edited(lambda m: m["backends"]["executorch"].update(file=["model.pte"])), "backends.executorch.file must be"),
    (_edited(lambda m: m["backends"]["executorch"]["methods"].pop("layer_3")), "backends.executorch.methods must be"),
    (_edited(lambda m: m["files"]["model.pte"].update(size=str(m["files"]["model.pte"]["size"]))),
     'files["model.pte"] needs sha256 and size'),
    (_edited(lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "size": 1}})), 'files["../x"] escapes'),
    (_edited(lambda m: m["files"].update({"x\ny": {"sha256": "0" * 64, "size": 1}})), "bundle file missing: x\\ny"),
    (_edited(lambda m: m.update(files=[])), "files must be an object"),
])
def test_malformed_manifest_is_a_one_line_error(make, msg):
    """Invalid JSON and wrong types in manifest.json: one error line naming the file (exit 1), never a crash."""
    pkg = runner("linux-x86_64")
    bad = bundle_copy("bad-manifest")
    text = make(json.loads((bad / "manifest.json").read_text()))
    (bad / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    p = subprocess.run([str(pkg.launcher), "--bundle", str(bad), "--prompt-ids", "1,2", "--max-new-tokens", "2"],
                       capture_output=True, text=True, errors="replace", timeout=120)
    assert p.returncode == 1, p.stderr[-500:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("first_runner: error:")]
    assert len(err) == 1 and msg in err[0], p.stderr[-500:]
    if "layers" not in msg and "bundle file" not in msg:
        assert str(bad / "manifest.json") in err[0]
    assert p.stdout == "" and "\ufffd" not in err[0]


def test_alternative_layer_spellings_are_ignored():
    """Only model.num_layers counts (docs/bundle_format.md): old spellings elsewhere are just extra keys."""
    bad = bundle_copy("old-spellings")
    m = json.loads((bad / "manifest.json").read_text())
    m.update(num_layers=7, n_layers=7)
    m["model"]["n_layers"] = 7
    (bad / "manifest.json").write_text(json.dumps(m))
    p = _native(runner("linux-x86_64"), bad, "--info")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["num_layers"] == 4


def test_malformed_tokenizer_and_prompt_file_are_one_line_errors(tmp_path):
    pkg = runner("linux-x86_64")
    bad = bundle_copy("bad-tokenizer")
    for text, msg in [('{"model": {"vocab": {"a": 1}', "malformed tokenizer"), ("[1, 2]", "not a JSON object"),
                      ('{"model": {"vocab": {"a": 1e30}}}', None),  # a non-integer id is ignored
                      ('{"model": {"vocab": {"a": 99999999999}}}', "token id 99999999999 is out of range"),
                      ('{"model": 5}', "has no model.vocab")]:
        tok = bad / "tokenizer" / "tokenizer.json"
        tok.write_text(text)
        m = json.loads((bad / "manifest.json").read_text())
        m["files"]["tokenizer/tokenizer.json"] = {"sha256": hashlib.sha256(tok.read_bytes()).hexdigest(),
                                                  "size": tok.stat().st_size}
        (bad / "manifest.json").write_text(json.dumps(m))
        p = _native(pkg, bad, "--prompt-ids", "1,2", "--max-new-tokens", 2)
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("first_runner: error:")]
        if msg is None:
            assert p.returncode == 0 and json.loads(p.stdout)["text"] == "", p.stderr
        else:
            assert p.returncode == 1 and len(err) == 1 and msg in err[0] and str(tok) in err[0], p.stderr
    ids = tmp_path / "ids.json"
    for text, rc, msg in [("[1, 72, 101]", 0, None), ("1, 72\n101", 0, None), ("[1, 72", 2, "invalid JSON"),
                          ("[1, -3]", 2, "bad token id -3"), ('[1, "2"]', 2, 'bad token id "2"'),
                          ("[1.5]", 2, "bad token id 1.5"), ("[]", 2, "no token ids")]:
        ids.write_text(text)
        p = _native(pkg, tiny_bundle(), "--prompt-ids-file", ids, "--max-new-tokens", 2)
        assert p.returncode == rc, p.stderr
        if rc == 0:
            assert json.loads(p.stdout)["prompt_tokens"] == 3
        else:
            err = [ln for ln in p.stderr.splitlines() if ln.startswith("first_runner: error:")]
            assert len(err) == 1 and msg in err[0], p.stderr


def test_etdump_profile_per_method(tmp_path):
    from firstkit.device_bench.profile import format_profile, summarize_etdump

    trace = tmp_path / "t.etdp"
    p = _native(runner("linux-x86_64"), tiny_bundle(), "--prompt-ids", "1,2,3,4", "--max-new-tokens", 6,
                "--mask", "1001", "--ignore-eos", "--runs", 2, "--etdump", trace)
    assert p.returncode == 0, p.stderr
    s = summarize_etdump(str(trace))
    calls = {r["method"]: r["calls"] for r in s["methods"]}
    # 2 runs, each: a prefill (embed, route before each of the 4 layers, prefill_i of the 2 running ones, head),
    # then 5 decode steps calling embed, the 2 running layers and head; skipped layers are never called
    assert calls == {"embed": 12, "route": 8, "prefill_0": 2, "prefill_3": 2, "layer_0": 10, "layer_3": 10,
                     "head": 12}
    assert s["total_ms"] > 0 and abs(sum(r["share"] for r in s["methods"]) - 1) < 1e-6
    assert "layer_3" in format_profile(s, "t")


def test_build_cache_and_package():
    from firstkit.device_bench.build_runner import build, build_key, source_hash

    pkg = runner("linux-x86_64")
    again = build("linux-x86_64")
    assert again.cached and again.path == pkg.path
    meta = json.loads((pkg.path / "runner.json").read_text())
    assert meta["source_sha256"] == source_hash() and meta["target"] == "linux-x86_64"
    files = {str(f) for f in pkg.files()}
    assert {"first_runner", "run.sh", "lib/libexecutorch.so", "lib/libexecutorch_backend_xnnpack.so"} <= files
    for rel, sha in meta["files"].items():
        assert hashlib.sha256((pkg.path / rel).read_bytes()).hexdigest() == sha
    assert build_key("linux-x86_64") != build_key("linux-aarch64")
    # packaged: runs from a copy elsewhere (libraries found next to the binary, not in the wheel)
    ldd = subprocess.run(["ldd", str(pkg.binary)], capture_output=True, text=True,
                         env={"LD_LIBRARY_PATH": str(pkg.path / "lib")}).stdout
    assert "not found" not in ldd


def test_build_runner_cli_errors():
    from click.testing import CliRunner

    from firstkit.device_bench.build_runner import main

    r = CliRunner().invoke(main, ["--target", "android-arm64-v8a"])
    assert r.exit_code == 1 and "Android NDK" in r.output
    r = CliRunner().invoke(main, ["--target", "linux-x86_64", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["cached"] is True
