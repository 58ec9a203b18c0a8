"""first-export CLI: clean errors, atomic output (a failed verification leaves nothing behind)."""

from __future__ import annotations

from click.testing import CliRunner
from test_export_support import copy_bundle, tiny_folders

from firstkit.export.cli import main as export_main
from firstkit.runtime import read_manifest


def _invoke(args):
    return CliRunner().invoke(export_main, [str(a) for a in args])


def test_failed_export_keeps_old_bundle_then_replace(tmp_path):
    model_dir, router_dir = tiny_folders("llama")
    out = copy_bundle("llama", tmp_path / "bundle")
    before = read_manifest(out)
    args = ["--model", model_dir, "--routers", router_dir, "--backend", "onnx", "--quantize", "none",
            "--max-seq-len", 16, "--output", out]
    # fp32 ONNX differs from eager by ~1e-7: a zero tolerance is a real verification failure
    res = _invoke([*args, "--atol", 0.0])
    assert res.exit_code == 1
    assert "verification failed" in res.output and "no bundle written" in res.output
    assert read_manifest(out) == before  # the existing bundle is untouched (hashes still verify)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp dir left behind
    # a passing export replaces it atomically
    res = _invoke([*args, "--json"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    after = read_manifest(out)
    assert set(after["backends"]) == {"onnx"} and after["max_seq_len"] == 16
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


def test_summary_table_reports_files_verification_and_time():
    from pathlib import Path

    from test_export_support import tiny_bundle

    from firstkit.export.cli import summary_table
    from firstkit.export.pipeline import ExportResult

    bundle, js = tiny_bundle("llama")
    res = ExportResult(output=Path(js["output"]), manifest=js["manifest"], timings=js["timings"],
                       verification=js["verification"])
    table = summary_table(res)
    assert str(bundle) in table and "model.pte" in table and "onnx/decode.onnx" in table and "tokenizer/" in table
    assert table.count("PASS") == 2 and "executorch" in table and "onnx" in table
    assert "mask policy: routers from" in table
    assert "executorch_lower" in table and "onnx_export" in table


def test_onnx_int4_export_runs(tmp_path):
    """--backend onnx --quantize 8da4w: a float core exported to ONNX, then int4 MatMulNBits; it loads and runs."""
    from firstkit.runtime import load_bundle

    model_dir, router_dir = tiny_folders("llama")
    out = tmp_path / "b"
    res = _invoke(["--model", model_dir, "--routers", router_dir, "--backend", "onnx", "--quantize", "8da4w",
                   "--max-seq-len", 16, "--verify-tokens", 2, "--output", out, "--json"])
    assert res.exit_code == 0, res.output
    m = read_manifest(out)
    assert m["backends"]["onnx"]["quantization"]["scheme"] == "int4-matmulnbits"
    r = load_bundle(out, backend="onnx").generate([5, 9, 13], max_new_tokens=3, mask="all", stop_at_eos=False)
    assert len(r["tokens"]) == 3 and r["mask"] == "1111"
