"""JSONL result store and the summary table (no device needed)."""

from __future__ import annotations

import json

from firstkit.device_bench.report import format_table, summarize
from firstkit.device_bench.store import RECORD_SCHEMA, ResultStore


def _rec(mask_spec, mask, tps, i, device="d1", emulated=False):
    return {"schema": RECORD_SCHEMA, "device": device, "bundle_sha256": "ab" * 32, "target": "linux-x86_64",
            "mask_spec": mask_spec, "prompt_len": 8, "threads": 2, "max_new_tokens": 5, "run_index": i,
            "emulated": emulated, "tokens_match": True,
            "result": {"text": "", "tokens": [1, 2, 3, 4, 5], "prompt_tokens": 8, "mask": mask,
                       "skip_ratio": mask.count("0") / 4, "prefill_ms": 4.0, "decode_ms_per_token": 1000 / tps,
                       "decode_ms": [1000 / tps] * 4, "tokens_per_s": tps, "peak_rss_mb": 50.0, "threads": 2,
                       "backend": "executorch", "runner": "native", "bundle_sha256": "ab" * 32}}


def test_store_survives_torn_line_and_counts(tmp_path):
    st = ResultStore(tmp_path / "r.jsonl")
    assert st.append([_rec("all", "1111", 10.0, 0), _rec("all", "1111", 12.0, 1)]) == 2
    with open(st.path, "a") as f:
        f.write('{"schema": "firstkit.bench.run/1", "device": "d1", "resu')  # crash mid-write
    assert len(st.records()) == 2
    st.append([_rec("auto", "1001", 20.0, 0)])
    recs = st.records()
    assert len(recs) == 3 and recs[-1]["mask_spec"] == "auto"
    lines = st.path.read_text().splitlines()
    assert json.loads(lines[-1])["mask_spec"] == "auto"  # the new record starts on its own line
    c = st.counts()
    assert sorted(c.values()) == [1, 2]


def test_store_refuses_directory(tmp_path):
    import pytest

    with pytest.raises(ValueError):
        ResultStore(tmp_path)


def test_summary_median_spread_speedup_and_table():
    recs = [_rec("all", "1111", v, i) for i, v in enumerate([10.0, 11.0, 12.0])]
    recs += [_rec("auto", "1001", v, i) for i, v in enumerate([18.0, 22.0, 20.0])]
    recs += [_rec("all", "1111", 1.0, 0, device="q", emulated=True)]
    rows = summarize(recs)
    by = {(r["device"], r["mask_spec"]): r for r in rows}
    a, b = by[("d1", "all")], by[("d1", "auto")]
    assert a["decode_tokens_per_s"] == 11.0 and a["decode_tokens_per_s_sd"] == 1.0 and a["runs"] == 3
    assert b["decode_tokens_per_s"] == 20.0 and b["speedup_vs_all"] == 20.0 / 11.0
    assert b["skip_ratio"] == 0.5 and b["prefill_tokens_per_s"] == 2000.0 and b["tokens_match"] is True
    t = format_table(rows, {"runs": 3})
    assert "1.82x" in t and "q (qemu)" in t and "NOT real" in t and "settings: runs=3" in t
    assert "20.00 ± 2.00" in t
