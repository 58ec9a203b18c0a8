"""Bad input never costs a user data (issue 13), without a device: export output folders, stale temporary folders,
GGUF / Hugging Face / router checkpoints that are incomplete or corrupt, manifests and stores of the wrong shape,
undecodable prompts, a malformed program for the native runner, ``first-train --val-prompts 0``; plus property
tests that mutate valid manifests and store lines and find only one-line errors.

Each case asserts the one-line message, the exit status, and that nothing outside the tool's own files changed.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bench_support import runner
from test_export_support import copy_bundle, tiny_bundle, tiny_folders

from firstkit.device_bench.cli import main as bench_main
from firstkit.device_bench.store import RECORD_SCHEMA, ResultStore, StoreError
from firstkit.export.cli import main as export_main
from firstkit.runtime import BundleError, read_manifest
from firstkit.runtime.cli import main as run_main


def _invoke(main, args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res, needle: str, code: int = 1) -> str:
    """The CLI failed with exit ``code`` and one click error line containing ``needle``, no traceback."""
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    errs = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errs) == 1, res.output
    assert needle in errs[0], errs[0]
    return errs[0]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content), symlinks as their target."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = b"-> " + os.readlink(p).encode()
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel + "/"] = b""
    return out


def _rehash(bundle: Path, rel: str) -> None:
    """Make the manifest agree with the (edited) file ``rel``."""
    m = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / rel).read_bytes()
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(m))


# ------------------------------------------------------------------------------------------- 1. --output folders
def test_export_output_replaces_only_a_bundle(tmp_path):
    model_dir, router_dir = tiny_folders("llama")
    base = ["--model", model_dir, "--routers", router_dir, "--max-seq-len", 16, "--output"]
    web = tmp_path / "webapp"  # a folder that merely contains a manifest.json
    (web / "src").mkdir(parents=True)
    (web / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
    (web / "index.html").write_text("<html></html>")
    (web / "src" / "app.js").write_text("console.log(1)")
    extra = copy_bundle("llama", tmp_path / "bundle+notes")  # a real bundle plus a file of the user's
    (extra / "notes.txt").write_text("mine")
    linked = copy_bundle("llama", tmp_path / "bundle+link")
    os.symlink("/etc", linked / "etc")
    for folder, why in ((web, "missing keys"), (extra, "notes.txt is not one of its files"),
                        (linked, "etc is a symbolic link")):
        before = _tree(folder)
        err = _one_line_error(_invoke(export_main, [*base, folder]), "is not a firstkit bundle")
        assert why in err and "refusing to overwrite it" in err
        assert _tree(folder) == before  # nothing lost
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_line_error(_invoke(export_main, [*base, a_file]), "it is not a folder")
    assert a_file.read_text() == "x"

    # an empty folder is accepted (docs/troubleshooting.md): the bundle is published into it
    from firstkit.export.pipeline import _atomic_publish, check_output

    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty)
    tmp = tmp_path / ".empty.tmp-test"
    shutil.copytree(tiny_bundle("llama")[0], tmp)
    _atomic_publish(tmp, empty)
    assert read_manifest(empty) and not tmp.exists()
    # ... and a bundle that holds only its own files is replaced
    tmp2 = tmp_path / ".empty.tmp-again"
    shutil.copytree(tiny_bundle("llama")[0], tmp2)
    _atomic_publish(tmp2, empty)
    assert read_manifest(empty) and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------------------- 8. stale temp folders
def test_export_removes_stale_temp_folders_of_that_output(tmp_path):
    model_dir, _ = tiny_folders("llama")
    out = tmp_path / "b"
    stale = tmp_path / ".b.tmp-dead1234"  # left by a SIGKILLed export: a complete, unverified bundle
    shutil.copytree(tiny_bundle("llama")[0], stale)
    stale_old = tmp_path / ".b.old-99999"  # the previous bundle of a replace that never finished
    shutil.copytree(tiny_bundle("llama")[0], stale_old)
    live = tmp_path / ".b.tmp-live5678"  # a concurrent export holds its folder locked
    live.mkdir()
    (live / "model.pte").write_bytes(b"partial")
    other = tmp_path / ".c.tmp-abc"  # another output's: not ours to judge
    other.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        # fails right after the output checks (no such routers): the cleanup has run by then
        res = _invoke(export_main, ["--model", model_dir, "--routers", tmp_path / "none", "--output", out])
        _one_line_error(res, "does not exist")
    finally:
        os.close(fd)
    assert not stale.exists()
    assert live.is_dir() and (live / "model.pte").read_bytes() == b"partial"
    assert other.is_dir()
    assert read_manifest(out)  # the abandoned previous bundle went back to its place (nothing was there)


@pytest.mark.slow
def test_sigterm_during_export_leaves_no_temp_folder(tmp_path):
    import signal
    import time

    model_dir, router_dir = tiny_folders("llama")
    p = subprocess.Popen([sys.executable, "-m", "firstkit.export.cli", "--model", str(model_dir), "--routers",
                          str(router_dir), "--max-seq-len", "16", "--output", str(tmp_path / "b")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(".b.tmp-*")):
        time.sleep(0.2)
    assert list(tmp_path.glob(".b.tmp-*")), "the export never started writing"
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    assert p.returncode != 0 and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- 4. GGUF without weights
def write_tiny_gguf(path: Path, tensors: bool = True, drop: tuple[str, ...] = (), layers: int = 2) -> Path:
    """A tiny Llama GGUF (gpt2-style vocabulary of 64 tokens); ``tensors=False`` = a llama.cpp vocab-only file."""
    import gguf

    hidden, ffn, heads, kv, vocab = 32, 64, 4, 2, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(33 + i) for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    hd = hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (heads * hd, hidden), f"blk.{i}.attn_k.weight": (kv * hd, hidden),
                       f"blk.{i}.attn_v.weight": (kv * hd, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    rng = np.random.default_rng(0)
    if tensors:
        for name, shape in shapes.items():
            if name not in drop:
                w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_without_weights_is_refused_before_allocating(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("FIRSTKIT_CACHE", str(tmp_path / "cache"))

    def never(*_a, **_k):
        raise AssertionError("the model was allocated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    vocab_only = write_tiny_gguf(tmp_path / "vocab-only.gguf", tensors=False)
    partial = write_tiny_gguf(tmp_path / "partial.gguf", drop=("blk.1.ffn_up.weight",))
    for path, needle in ((vocab_only, "holds no weight tensors"), (partial, "lacks 1 of the model's 20 weight")):
        res = _invoke(export_main, ["--model", path, "--routers", "none", "--output", tmp_path / "out"])
        _one_line_error(res, needle)
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "cache").glob("models/gguf-*"))  # nothing entered the model cache


@pytest.mark.slow
def test_complete_tiny_gguf_still_loads(tmp_path, monkeypatch):
    from firstkit.models import resolve_model

    monkeypatch.setenv("FIRSTKIT_CACHE", str(tmp_path / "cache"))
    model, tok, _ = resolve_model(write_tiny_gguf(tmp_path / "full.gguf"))
    assert model.config.num_hidden_layers == 2 and tok is not None


# ------------------------------------------------------------------------------------------- 10. models, routers
def test_broken_models_and_routers_are_one_line_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    from firstkit.evaluation.cli import main as eval_main

    model_dir, router_dir = tiny_folders("llama")
    full = write_tiny_gguf(tmp_path / "full.gguf")
    data = full.read_bytes()
    ggufs = {"truncated": data[: len(data) // 2], "empty": b"", "random": random.Random(0).randbytes(4096)}
    cases = []
    for name, blob in ggufs.items():
        (tmp_path / f"{name}.gguf").write_bytes(blob)
        cases.append((["--model", tmp_path / f"{name}.gguf", "--routers", "none"], "could not read GGUF"))

    def hf(name: str, edit) -> Path:
        d = tmp_path / f"hf-{name}"
        shutil.copytree(model_dir, d)
        edit(d)
        return d

    no_weights = hf("no-weights", lambda d: (d / "model.safetensors").unlink())
    def cut(d: Path) -> None:
        st_file = d / "model.safetensors"
        st_file.write_bytes(st_file.read_bytes()[:-999])

    trunc = hf("truncated", cut)
    cases += [(["--model", no_weights, "--routers", "none"], "has no weights"),
              (["--model", trunc, "--routers", "none"], "is truncated")]

    def routers(name: str, edit) -> Path:
        d = tmp_path / f"routers-{name}"
        shutil.copytree(router_dir, d)
        edit(d)
        return d

    def wrong_hidden(d: Path) -> None:  # weights of a 32-wide model under a config that says 64
        sd = load_file(d / "routers.safetensors")
        save_file({k: (v[:, :32].contiguous() if k.endswith("proj.weight") else v) for k, v in sd.items()},
                  d / "routers.safetensors")

    hidden = routers("hidden", wrong_hidden)
    corrupt = routers("corrupt", lambda d: (d / "routers.safetensors").write_bytes(b"\x10" * 300))
    cases += [(["--model", model_dir, "--routers", hidden], "router_config.json implies [16, 64]"),
              (["--model", model_dir, "--routers", corrupt], "is not a readable safetensors file")]
    for args, needle in cases:
        err = _one_line_error(_invoke(export_main, [*args, "--output", tmp_path / "out"]), needle)
        assert "size mismatch" not in err
    assert not (tmp_path / "out").exists()
    # first-eval reports the same errors (it loads the model the same way)
    for args, needle in [cases[0], cases[3]]:
        res = _invoke(eval_main, [*args[:2], "--task", "copa", "--systems", "base", "--limit", "1", "--quiet"])
        assert res.exit_code != 0 and "Traceback" not in res.output and isinstance(res.exception, SystemExit | None)
        assert needle in res.output, res.output


# ------------------------------------------------------------------------------------------- 9. schema, tokenizer
def test_malformed_manifest_and_tokenizer_are_one_line_errors(tmp_path):
    cases = [(lambda m: m["routing"].update(protected_layers=3), "routing.protected_layers: 3 is not of type"),
             (lambda m: m["backends"].update(executorch="model.pte"), "backends.executorch: 'model.pte' is not of"),
             (lambda m: m["model"].update(eos_ids="2"), "model.eos_ids: '2' is not of type 'array'"),
             (lambda m: m["model"].update(vocab_size=256.0), "model.vocab_size: 256.0 is not of type 'integer'")]
    for i, (edit, needle) in enumerate(cases):
        b = copy_bundle("llama", tmp_path / f"m{i}")
        m = json.loads((b / "manifest.json").read_text())
        edit(m)
        (b / "manifest.json").write_text(json.dumps(m))
        _one_line_error(_invoke(run_main, [b, "--prompt", "hi", "--max-new-tokens", 2]), needle)
        out = tmp_path / f"r{i}.jsonl"
        _one_line_error(_invoke(bench_main, [b, "--local", "--out", out, "--no-plots"]), needle)
        assert not out.exists() or out.read_text() == ""
    # tokenizer.json with the right sha256 (manifest updated) but not a tokenizer
    b = copy_bundle("llama", tmp_path / "tok")
    (b / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    _rehash(b, "tokenizer/tokenizer.json")
    _one_line_error(_invoke(run_main, [b, "--prompt", "hi"]), "the tokenizer in tokenizer/ cannot be loaded")
    _one_line_error(_invoke(bench_main, [b, "--local", "--out", tmp_path / "t.jsonl"]), "cannot be loaded")


def _record(sha: str, i: int = 0) -> dict:
    return {"schema": RECORD_SCHEMA, "device": "d1", "device_model": "m", "target": "linux-x86_64", "emulated": False,
            "bundle_sha256": sha, "runner_key": "k", "max_new_tokens": 4, "warmup": 0, "mask_spec": "all",
            "prompt_len": 6, "threads": 1, "run_index": i, "tokens_match": True, "time": "2025-01-01T00:00:00Z",
            "run_id": f"s/t#{i}",
            "result": {"text": "", "tokens": [5, 6, 7, 8], "prompt_tokens": 6, "mask": "1111", "skip_ratio": 0.0,
                       "prefill_ms": 2.0, "decode_ms_per_token": 1.0, "decode_ms": [1.0, 1.0, 1.0],
                       "tokens_per_s": 1000.0, "peak_rss_mb": 20.0, "threads": 1, "backend": "executorch",
                       "runner": "native", "bundle_sha256": sha}}


def test_malformed_store_line_is_a_one_line_error_and_the_store_is_kept(tmp_path):
    bundle = tiny_bundle("llama")[0]
    sha = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    out = tmp_path / "res.jsonl"
    bad = _record(sha, 1)
    bad["result"]["tokens_per_s"] = "fast"
    bad.pop("threads")
    out.write_text(json.dumps(_record(sha)) + "\n" + json.dumps(bad) + "\n")
    before = out.read_bytes()
    err = _one_line_error(_invoke(bench_main, [bundle, "--local", "--out", out, "--no-plots"]), "line 2")
    assert "not a valid bench record" in err
    assert out.read_bytes() == before


# ------------------------------------------------------------------------------------------- 11. undecodable prompt
def test_prompt_with_invalid_utf8_is_a_clean_error(tmp_path):
    bundle = tiny_bundle("llama")[0]
    _one_line_error(_invoke(run_main, [bundle, "--prompt", "caf\udce9 \udcff"]), "not valid UTF-8 text (byte 0xe9")
    res = _invoke(bench_main, [bundle, "--local", "--prompt", "x\udcff", "--out", tmp_path / "r.jsonl"])
    assert res.exit_code == 2 and "not valid UTF-8" in res.output and "Traceback" not in res.output
    # the real thing: undecodable bytes in argv
    p = subprocess.run([sys.executable, "-m", "firstkit.runtime.cli", str(bundle), "--prompt", b"\xff\xfeabc"],
                       capture_output=True, text=True, errors="replace", timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "Error: --prompt is not valid UTF-8 text (byte 0xff at character 0); " \
                                               "pass UTF-8 text"


# ------------------------------------------------------------------------------------------- 12. malformed .pte
def test_native_runner_refuses_malformed_program_with_matching_sha():
    from test_bench_support import adb_server, bundle_copy

    adb_server()  # sets the session's HOME (and so the runner cache) before the first runner(), as the bench tests do
    pkg = runner("linux-x86_64")
    bad = bundle_copy("malformed-pte")
    good = (bad / "model.pte").read_bytes()
    rng = random.Random(0)
    for trial in range(4):  # bytes flipped in the flatbuffer (these crashed with SIGSEGV before)
        data = bytearray(good)
        for _ in range(20):
            data[rng.randrange(8, min(4096, len(data)))] = rng.getrandbits(8)
        (bad / "model.pte").write_bytes(bytes(data))
        _rehash(bad, "model.pte")
        p = subprocess.run([str(pkg.launcher), "--bundle", str(bad), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"],
                           capture_output=True, text=True, errors="replace", timeout=120)
        assert p.returncode in (0, 1), (trial, p.returncode, p.stderr[-300:])  # never a signal
        if p.returncode == 1:
            errs = [ln for ln in p.stderr.splitlines() if ln.startswith("first_runner: error:")]
            assert len(errs) == 1 and "cannot load" in errs[0], p.stderr


# ------------------------------------------------------------------------------------------- 13. --val-prompts 0
def test_train_val_prompts_zero_is_refused(tmp_path):
    from firstkit.training.cli import main as train_main

    model_dir, _ = tiny_folders("llama")
    out = tmp_path / "ck"
    res = _invoke(train_main, ["--model", model_dir, "--out", out, "--skip-budget", "0.25", "--val-prompts", "0"])
    assert res.exit_code == 2 and "--val-prompts 0 leaves no held-out prompts" in res.output
    assert "--no-calibrate" in res.output and not out.exists()
    res = _invoke(train_main, ["--model", model_dir, "--out", out, "--skip-budget", "0.25", "--val-prompts", "-3"])
    assert res.exit_code == 2 and not out.exists()


# ------------------------------------------------------------------------------------------- property tests
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=8)


def _mutate(data, doc):
    """One random edit somewhere in the JSON document ``doc``: replace, delete or add a value."""
    doc = copy.deepcopy(doc)
    parent, key = None, None
    node = doc
    while isinstance(node, dict | list) and node and data.draw(st.booleans(), label="descend"):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        k = data.draw(st.sampled_from(keys), label="key")
        parent, key, node = node, k, node[k]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    if parent is None:
        return data.draw(JSON, label="root") if action == "replace" else doc
    if action == "replace":
        parent[key] = data.draw(JSON, label="value")
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=6), label="new key")] = data.draw(JSON, label="value")
    else:
        parent.append(data.draw(JSON, label="value"))
    return doc


@pytest.fixture(scope="module")
def prop_bundle(tmp_path_factory):
    b = copy_bundle("llama", tmp_path_factory.mktemp("prop") / "b")
    return b, json.loads((b / "manifest.json").read_text())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifests_give_one_line_errors(prop_bundle, data):
    from firstkit.device_bench.bench import BenchError, load_bundle

    bundle, good = prop_bundle
    (bundle / "manifest.json").write_text(json.dumps(_mutate(data, good)))
    try:
        for check in (lambda: read_manifest(bundle), lambda: load_bundle(bundle)):
            try:
                check()
            except (BundleError, BenchError) as e:
                msg = str(e)
                assert msg and "\n" not in msg and len(msg) < 600, msg
        # first-run end to end: a result or one click error line, never a traceback
        res = _invoke(run_main, [bundle, "--prompt", "hi", "--max-new-tokens", 1, "--json"])
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        if res.exit_code:
            assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith("Error: "), res.output
    finally:
        (bundle / "manifest.json").write_text(json.dumps(good))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_store_lines_give_one_line_errors(tmp_path_factory, data):
    from firstkit.device_bench.report import format_table, summarize

    sha = "ab" * 32
    lines = [_record(sha, 0), _mutate(data, _record(sha, 1))]
    out = tmp_path_factory.mktemp("store") / "r.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    store = ResultStore(out)
    try:
        recs = store.records()
    except StoreError as e:
        assert "\n" not in str(e) and "line 2" in str(e), str(e)
        return
    format_table(summarize(recs), {"runs": 2})  # whatever the store accepts, the report can show
    assert store.counts()
