"""first-run CLI and bundle validation: JSON result, both backends, and every bad input as a clean error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from test_export_support import TINY_MAX_SEQ, copy_bundle, tiny_bundle

from firstkit.runtime import BundleError, load_bundle, read_manifest
from firstkit.runtime.bundle import file_table
from firstkit.runtime.cli import main as run_main

KEYS = {"text", "tokens", "prompt_tokens", "mask", "skip_ratio", "prefill_ms", "decode_ms_per_token", "decode_ms",
        "tokens_per_s", "peak_rss_mb", "threads", "backend", "runner", "bundle_sha256"}


def _run(args):
    return CliRunner().invoke(run_main, [str(a) for a in args])


def _assert_clean_error(res, needle: str):
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    # the last line is click's one-line message (ExecuTorch may log its own native line before it)
    msg = res.output.strip().splitlines()[-1]
    assert msg.startswith("Error:"), res.output
    assert needle in msg, msg


@pytest.mark.parametrize("backend", ["executorch", "onnx"])
def test_first_run_json(backend):
    bundle, _ = tiny_bundle("llama")
    res = _run([bundle, "--prompt", "hello", "--max-new-tokens", 5, "--backend", backend, "--json",
                "--mask", "all", "--threads", 1])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert KEYS <= set(out)
    assert out["backend"] == backend and out["runner"] == "python" and out["threads"] == 1
    assert out["prompt_tokens"] == 5  # byte tokenizer, no chat template: one token per byte
    assert 1 <= len(out["tokens"]) <= 5 and out["mask"] == "1111" and out["skip_ratio"] == 0.0
    assert len(out["decode_ms"]) == len(out["tokens"]) - 1
    assert out["prefill_ms"] > 0 and out["peak_rss_mb"] > 0
    assert out["bundle_sha256"] == load_bundle(bundle).sha256


def test_backends_agree_and_skip_layers():
    bundle, _ = tiny_bundle("gemma3_text")
    et = load_bundle(bundle, backend="executorch")
    ox = load_bundle(bundle, backend="onnx")
    ids = list(range(30, 45))
    for mask in ("auto", "all", "10"):
        a = et.generate(ids, max_new_tokens=6, mask=mask, stop_at_eos=False)
        b = ox.generate(ids, max_new_tokens=6, mask=mask, stop_at_eos=False)
        assert a["tokens"] == b["tokens"] and a["mask"] == b["mask"]
    assert a["mask"] == "10" and a["skip_ratio"] == pytest.approx(1 / 2)


def test_onnx_decode_cross_cache_boundary_matches_eager():
    from test_export_support import load_reference

    bundle, _ = tiny_bundle("llama")
    ref = load_reference("llama")
    ox = load_bundle(bundle, backend="onnx")
    ids = list(range(60, 60 + TINY_MAX_SEQ - 4))
    res = ox.generate(ids, max_new_tokens=5, mask="1011", stop_at_eos=False)
    want = ref.generate(torch.tensor([ids]), max_new_tokens=5, mask="1011", eos_token_id=[-1])
    assert res["tokens"] == want[0, len(ids):].tolist()
    with pytest.raises(ValueError, match="max_seq_len"):
        ox.generate(ids, max_new_tokens=6)


def test_streaming_text_output():
    bundle, _ = tiny_bundle("llama")
    res = _run([bundle, "--prompt", "abc", "--max-new-tokens", 4, "--mask", "all"])
    assert res.exit_code == 0, res.output
    runner = load_bundle(bundle)
    want = runner.generate("abc", max_new_tokens=4, mask="all")["text"]
    assert res.stdout.startswith(want)


def test_cli_bad_inputs():
    bundle, _ = tiny_bundle("llama")
    _assert_clean_error(_run([bundle, "--prompt", "hi", "--backend", "tflite"]), "unknown backend")
    _assert_clean_error(_run([bundle, "--prompt", "hi", "--mask", "111", "--max-new-tokens", 2]),
                        "mask has 3 entries")
    _assert_clean_error(_run([bundle, "--prompt", "hi", "--mask", "0111", "--max-new-tokens", 2]), "protected")
    _assert_clean_error(_run([bundle, "--prompt", "x" * (TINY_MAX_SEQ + 1)]), "max_seq_len")
    _assert_clean_error(_run([bundle.parent / "no-such-bundle", "--prompt", "hi"]), "not a bundle directory")


def test_corrupt_truncated_and_mismatched_bundles(tmp_path):
    # sha256 mismatch: one byte changed, manifest untouched
    b = copy_bundle("llama", tmp_path / "flip")
    data = bytearray((b / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.pte").write_bytes(bytes(data))
    _assert_clean_error(_run([b, "--prompt", "hi"]), "sha256 of model.pte does not match")
    # truncated file: size check
    b = copy_bundle("llama", tmp_path / "trunc")
    data = (b / "model.pte").read_bytes()
    (b / "model.pte").write_bytes(data[: len(data) // 3])
    _assert_clean_error(_run([b, "--prompt", "hi"]), "truncated")
    # truncated .pte with a manifest rewritten to match: the runtime itself must refuse it cleanly
    m = json.loads((b / "manifest.json").read_text())
    m["files"] = file_table(b)
    (b / "manifest.json").write_text(json.dumps(m))
    _assert_clean_error(_run([b, "--prompt", "hi"]), "ExecuTorch could not load")
    with pytest.raises(BundleError):
        load_bundle(b)
    # garbage ONNX with a matching manifest
    b = copy_bundle("llama", tmp_path / "onnx")
    (b / "onnx" / "decode.onnx").write_bytes(b"not an onnx model")
    m = json.loads((b / "manifest.json").read_text())
    m["files"] = file_table(b)
    (b / "manifest.json").write_text(json.dumps(m))
    _assert_clean_error(_run([b, "--prompt", "hi", "--backend", "onnx"]), "onnxruntime could not load")
    # manifest problems
    b = copy_bundle("llama", tmp_path / "manifest")
    m = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text("{not json")
    _assert_clean_error(_run([b, "--prompt", "hi"]), "invalid JSON")
    (b / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    _assert_clean_error(_run([b, "--prompt", "hi"]), "format_version 99")
    bad = dict(m)
    del bad["files"]
    (b / "manifest.json").write_text(json.dumps(bad))
    _assert_clean_error(_run([b, "--prompt", "hi"]), "missing keys files")
    (b / "manifest.json").write_text(json.dumps({**m, "model": {**m["model"], "num_layers": 5}}))
    _assert_clean_error(_run([b, "--prompt", "hi"]), "methods must be")
    (b / "manifest.json").unlink()
    _assert_clean_error(_run([b, "--prompt", "hi"]), "no manifest.json")
    shutil.rmtree(tmp_path)


def test_read_manifest_lists_every_file():
    bundle, _ = tiny_bundle("llama")
    m = read_manifest(bundle)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    assert {"model.pte", "onnx/prefill.onnx", "onnx/decode.onnx"} <= on_disk
