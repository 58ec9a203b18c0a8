"""first-bench --local on a real first-export bundle: table, JSONL, --json, resume, plots, profile."""

from __future__ import annotations

import json

from click.testing import CliRunner
from test_bench_support import read_jsonl, run_json, runner, tiny_bundle

from firstkit.device_bench.cli import main


def test_local_bench_table_json_resume_plots_profile(tmp_path):
    runner("linux-x86_64")
    out = tmp_path / "res.jsonl"
    args = [str(tiny_bundle()), "--local", "--runs", "2", "--warmup", "1", "--masks", "auto,1001",
            "--prompt-lengths", "4,8", "--threads", "1", "--max-new-tokens", "6", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--json", "--profile"])
    assert r.exit_code == 0, r.output
    rows = run_json(r.stdout)
    assert len(rows) == 2 * 3  # 2 prompt lengths x (all [added baseline], auto, 1001)
    for row in rows:
        for k in ("device", "mask", "skip_ratio", "prefill_ms", "decode_tokens_per_s", "runs", "tokens_match"):
            assert k in row
        assert row["device"] == "local" and row["runs"] == 2 and row["tokens_match"] is True
        assert row["decode_tokens_per_s"] > 0 and row["prefill_ms"] > 0
    bits = {r["mask_spec"]: r for r in rows if r["prompt_len"] == 8}
    assert bits["1001"]["mask"] == "1001" and bits["1001"]["skip_ratio"] == 0.5
    assert bits["all"]["mask"] == "1111" and bits["all"]["speedup_vs_all"] == 1.0
    recs = read_jsonl(out)
    assert len(recs) == 12 and all(rec["result"]["runner"] == "native" for rec in recs)
    assert {rec["run_index"] for rec in recs} == {0, 1}
    assert (tmp_path / "res_decode.png").stat().st_size > 1000 and (tmp_path / "res_prefill.png").exists()
    profiles = json.loads((tmp_path / "res_profiles" / "profiles.json").read_text())
    assert {p["mask_spec"] for p in profiles} == {"all", "auto", "1001"}
    prof = next(p for p in profiles if p["mask_spec"] == "1001")
    calls = {m["method"]: m["calls"] for m in prof["summary"]["methods"]}
    assert calls == {"embed": 6, "route": 4, "prefill_0": 1, "prefill_3": 1, "layer_0": 5, "layer_3": 5, "head": 6}
    assert "time per method" in r.stderr
    # resume: everything is complete, nothing runs again, the table still shows every configuration
    r2 = CliRunner().invoke(main, args)
    assert r2.exit_code == 0, r2.output
    assert len(read_jsonl(out)) == 12
    assert r2.stdout.count("| local") == 6 and "speedup" in r2.stdout
    # more runs requested: only the missing ones run
    r3 = CliRunner().invoke(main, [*args[:3], "3", *args[4:]])
    assert r3.exit_code == 0, r3.output
    assert len(read_jsonl(out)) == 18


def test_bad_input_is_refused_before_running(tmp_path):
    b = str(tiny_bundle())
    out = tmp_path / "x.jsonl"
    cases = [
        ([b, "--local", "--masks", "10", "--out", str(out)], "has 2 entries"),
        ([b, "--local", "--masks", "0111", "--out", str(out)], "skips protected layer 0"),
        ([b, "--local", "--masks", "1x01", "--out", str(out)], "use auto, all or a string of 0/1"),
        ([b, "--out", str(out)], "--device SERIAL, --all-devices or --local"),
        ([str(tmp_path), "--local", "--out", str(out)], "no manifest.json"),
        ([b, "--local", "--out", str(tmp_path)], "is a directory"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
    assert not out.exists()
    r = CliRunner().invoke(main, [b, "--local", "--prompt-lengths", "20", "--max-new-tokens", "8",
                                  "--out", str(out), "--no-plots"])
    assert r.exit_code == 1 and "exceeds the bundle's max_seq_len 24" in r.output


def test_corrupt_or_truncated_bundle_is_refused_before_anything_runs(tmp_path):
    import shutil

    out = tmp_path / "x.jsonl"
    for damage, msg in (("truncate", "manifest says"), ("flip", "does not match the manifest"),
                        ("manifest", "missing keys")):
        b = tmp_path / damage
        shutil.copytree(tiny_bundle(), b)
        pte = b / "model.pte"
        data = bytearray(pte.read_bytes())
        if damage == "truncate":
            pte.write_bytes(bytes(data[: len(data) // 2]))
        elif damage == "flip":
            data[len(data) // 2] ^= 0xFF
            pte.write_bytes(bytes(data))
        else:
            m = json.loads((b / "manifest.json").read_text())
            del m["versions"]
            (b / "manifest.json").write_text(json.dumps(m))
        r = CliRunner().invoke(main, [str(b), "--local", "--out", str(out), "--no-plots"])
        assert r.exit_code != 0 and msg in r.output, (damage, r.output)
    assert not out.exists()
