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
    t = format_table(rows, {"runs": 3, "bundle": "tiny", "warmup": 1}, ["results in r.jsonl"])
    assert "1.82x" in t and "q (qemu)" in t and "NOT real" in t and t.endswith("results in r.jsonl")
    assert "20.00 ± 2.00" in t
    # one table with every setting: the shared ones (bundle, warmup) as columns, runs once (per row)
    head = [c.strip() for c in t.splitlines()[0].strip("|").split("|")]
    assert head[:9] == ["device", "target", "bundle", "warmup", "mask", "threads", "pp", "tg", "runs"]
    assert head.count("runs") == 1
    row = [c.strip() for c in t.splitlines()[2].strip("|").split("|")]
    assert row[:9] == ["d1", "linux-x86_64", "tiny", "1", "all", "2", "8", "5", "3"]


# ------------------------------------------------------------------------------------------- the loop, fake target
SHA = "cd" * 32


def _settings(**kw):
    from firstkit.device_bench.bench import Settings

    return Settings(**{"runs": 2, "warmup": 1, "masks": ["all", "auto", "1001"], "prompt_lengths": [4, 8],
                       "threads": [1, 2], "max_new_tokens": 3, "retries": 1, "reference": False, **kw})


def _bundle(tmp_path):
    from firstkit.device_bench.bench import Bundle

    manifest = {"max_seq_len": 32, "files": {}, "model": {"num_layers": 4}}
    return Bundle(tmp_path, manifest, SHA, ["manifest.json"], "model.pte", 4, [0, 3])


def _fake_target(script=()):
    """A Target that answers from a script: 'ok' (all runs), 'crash1' (one run, then a crash), 'malformed',
    'reported' (the app's failure: not retried), 'interrupt'."""
    from firstkit.device_bench.bench import Attempt, Facts, Target

    class Fake(Target):
        name, runner_target, model = "fake", "fake-x86_64", "m"

        def __init__(self):
            self.script, self.jobs, self.discarded, self.closed = list(script), [], [], None

        def prepare(self, bundle, s, log):
            return Facts(4, 32, 100, 1, {"runner_key": "k"})

        def orphans(self, log):
            return []

        def run(self, job, s, log):
            self.jobs.append(job)
            what = self.script.pop(0) if self.script else "ok"
            cfg = job.cfg
            mask = {"all": "1111", "auto": "1011"}.get(cfg.mask, cfg.mask)
            res = {"text": "", "tokens": [5] * cfg.max_new_tokens, "prompt_tokens": cfg.prompt_len, "mask": mask,
                   "skip_ratio": mask.count("0") / 4, "prefill_ms": 2.0, "decode_ms_per_token": 1.0,
                   "decode_ms": [1.0] * (cfg.max_new_tokens - 1), "tokens_per_s": 1000.0, "peak_rss_mb": 20.0,
                   "threads": cfg.threads, "backend": "executorch", "runner": "native", "bundle_sha256": SHA}
            n = {"ok": job.runs, "crash1": 1, "interrupt": 1}.get(what, 0)
            lines = [json.dumps(res)] * n + (['{"text": "to'] if what == "crash1" else [])
            if what == "malformed":
                lines = [json.dumps({**res, "tokens": [5]})]
            err = {"crash1": "runner crashed (SIGSEGV 11)", "reported": "the app reported: no",
                   "interrupt": "the runner was killed"}.get(what)
            if what == "interrupt":
                s.stop.set()
            return Attempt(lines, complete=err is None, error=err, retry=what != "reported",
                           interrupted=what == "interrupt", files=[f"f{len(self.jobs)}"])

        def discard(self, attempt):
            self.discarded += attempt.files

        def profile(self, cfg, prompt, s, log):
            return {"device": self.name, "mask_spec": cfg.mask, "prompt_len": len(prompt)}

        def abort(self):
            self.script.insert(0, "interrupt")

        def close(self, purge):
            self.closed = purge

    return Fake()


def test_settings_expand_into_configurations():
    s = _settings(profile=True)
    cfgs = s.configs()
    assert len(cfgs) == 2 * 2 * 3  # prompt lengths x threads x masks, every setting in each
    assert [(c.prompt_len, c.threads, c.mask) for c in cfgs[:4]] == [(4, 1, "all"), (4, 1, "auto"), (4, 1, "1001"),
                                                                      (4, 2, "all")]
    assert {(c.max_new_tokens, c.warmup, c.runs) for c in cfgs} == {(3, 1, 2)}
    assert cfgs[0].record() == {"mask_spec": "all", "prompt_len": 4, "threads": 1, "max_new_tokens": 3, "warmup": 1}
    assert [(c.mask, c.prompt_len, c.threads, c.runs) for c in s.profile_configs()] == [
        ("all", 4, 1, 1), ("auto", 4, 1, 1), ("1001", 4, 1, 1)]
    assert _settings().profile_configs() == []


def test_target_interface_is_abstract():
    import pytest

    from firstkit.device_bench.app_target import AppTarget
    from firstkit.device_bench.bench import AdbTarget, LocalTarget, RunnerTarget, Target

    with pytest.raises(TypeError):
        Target()
    with pytest.raises(TypeError):
        RunnerTarget()
    for cls in (LocalTarget, AdbTarget, AppTarget):
        assert not cls.__abstractmethods__, cls


def test_one_loop_stores_resumes_retries(tmp_path):
    from firstkit.device_bench.bench import bench_target

    st = ResultStore(tmp_path / "r.jsonl")
    s, b, logs, bar = _settings(), _bundle(tmp_path), [], []
    t = _fake_target(["crash1"])  # the first configuration: one run, a crash, a retry of the missing run
    rep = bench_target(t, b, s, st, None, logs.append, bar.append)
    assert rep.errors == [] and rep.new_runs == 24 and t.closed is False
    assert [(j.warmup, j.runs) for j in t.jobs[:2]] == [(1, 2), (0, 1)]  # warm-ups on the first attempt only
    assert any("runner crashed (SIGSEGV 11) (1 finished run(s) kept)" in m for m in logs)
    recs = st.records()
    assert len(recs) == 24 and sum(bar) == 24 and len(t.discarded) == len(t.jobs)
    first = [r for r in recs if (r["mask_spec"], r["prompt_len"], r["threads"]) == ("all", 4, 1)]
    assert sorted(r["run_index"] for r in first) == [0, 1]
    assert {r["target"] for r in recs} == {"fake-x86_64"} and all(r["runner_key"] == "k" for r in recs)
    # resume: everything is stored, nothing runs; with --runs 3 only the missing run of each configuration
    t2 = _fake_target()
    rep = bench_target(t2, b, s, st, None, logs.append)
    assert t2.jobs == [] and rep.skipped_configs == 12
    t3 = _fake_target()
    bench_target(t3, b, _settings(runs=3), st, None, logs.append)
    assert {j.runs for j in t3.jobs} == {1} and len(t3.jobs) == 12 and len(st.records()) == 36


def test_one_loop_failures(tmp_path):
    import threading

    from firstkit.device_bench.bench import bench_target

    b = _bundle(tmp_path)
    # a malformed line: nothing stored for that configuration, not retried; an error the target says is final
    st = ResultStore(tmp_path / "a.jsonl")
    t = _fake_target(["malformed", "reported"])
    rep = bench_target(t, b, _settings(masks=["all"], prompt_lengths=[4], threads=[1, 2]), st, None, lambda m: None)
    assert len(t.jobs) == 2 and st.records() == []
    assert rep.errors[0] == ("fake: mask all, pp 4, 1 threads: malformed result from the runner (line 1): 1 tokens "
                             "generated, 3 asked for (EOS ignored); nothing stored; 2 run(s) missing")
    assert rep.errors[1].endswith("the app reported: no; 2 run(s) missing")  # final: no "rerun to resume"
    # crashes every time: retried --retries times, then the missing runs are reported
    t = _fake_target(["crash1", "crash1"])
    rep = bench_target(t, b, _settings(masks=["all"], prompt_lengths=[4], threads=[1], runs=3), st, None,
                       lambda m: None)
    assert len(t.jobs) == 2 and rep.errors == [
        "fake: mask all, pp 4, 1 threads: runner crashed (SIGSEGV 11); 1 run(s) missing (rerun to resume)"]
    # settings that do not fit the bundle: refused before the target is prepared
    t = _fake_target()
    rep = bench_target(t, b, _settings(prompt_lengths=[31]), st, None, lambda m: None)
    assert t.jobs == [] and "exceeds the bundle's max_seq_len 32" in rep.errors[0] and t.closed is False
    # SIGINT: the finished run is stored, nothing else starts
    st = ResultStore(tmp_path / "b.jsonl")
    t = _fake_target(["interrupt"])
    rep = bench_target(t, b, _settings(stop=threading.Event()), st, None, lambda m: None)
    assert rep.interrupted and len(t.jobs) == 1 and len(st.records()) == 1
    assert "interrupted during mask all, pp 4, 1 threads: the runner was killed, 1 finished run(s)" in rep.errors[0]
