"""first-export CLI: clean errors, atomic output (a failed verification leaves nothing behind)."""

from __future__ import annotations

from click.testing import CliRunner
from test_export_support import tiny_folders

from firstkit.export.cli import main as export_main


def _invoke(args):
    return CliRunner().invoke(export_main, [str(a) for a in args])


def test_failed_verification_leaves_no_bundle(tmp_path):
    model_dir, router_dir = tiny_folders("llama")
    out = tmp_path / "bundle"
    # fp32 ONNX differs from eager by ~1e-7: a zero tolerance is a real verification failure
    res = _invoke(["--model", model_dir, "--routers", router_dir, "--backend", "onnx", "--max-seq-len", 16,
                   "--output", out, "--atol", 0.0])
    assert res.exit_code == 1
    assert "verification failed" in res.output and "no bundle written" in res.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left either


def test_onnx_export_and_replace_existing_bundle(tmp_path):
    model_dir, router_dir = tiny_folders("llama")
    out = tmp_path / "bundle"
    for _ in range(2):  # the second export atomically replaces the first bundle
        res = _invoke(["--model", model_dir, "--routers", router_dir, "--backend", "onnx", "--max-seq-len", 16,
                       "--output", out, "--json"])
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert (out / "onnx" / "decode.onnx").is_file() and not (out / "model.pte").exists()


def test_bad_arguments(tmp_path):
    model_dir, router_dir = tiny_folders("llama")
    res = _invoke(["--model", tmp_path / "nope", "--output", tmp_path / "b"])
    assert res.exit_code == 1 and "unknown model" in res.output
    res = _invoke(["--model", model_dir, "--routers", tmp_path / "no-routers", "--output", tmp_path / "b"])
    assert res.exit_code == 1 and "does not exist" in res.output
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "data.txt").write_text("x")
    res = _invoke(["--model", model_dir, "--routers", router_dir, "--output", keep])
    assert res.exit_code == 1 and "not a firstkit bundle" in res.output
    assert (keep / "data.txt").read_text() == "x"
    res = _invoke(["--model", model_dir, "--backend", "tflite"])
    assert res.exit_code == 2 and "tflite" in res.output
    assert not (tmp_path / "b").exists()
