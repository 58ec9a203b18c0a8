"""first-bench --app: the demo app's headless benchmark driven over the real adb client, end to end.

The phone is a loopback adbd (tests/fakes/adbd.py) with the demo app "installed"
(tests/fakes/fake_android.py): ``am``, ``pm`` and ``pidof`` on the device's PATH start the app's real
headless entry point (``Benchmark.runIntent``, what BenchmarkActivity calls) from android_demo/logic compiled with
javac, with the app's JNI bridge built for Linux against the shared C++ runner core. So the records first-bench
stores come from the core through the app's Java code; only Android itself is stood in for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from fakes.adbd import LoopbackAdbd
from fakes.fake_android import FakeAndroidError, FakeApp, jni_library, logic_classes
from test_bench_support import adb_server, read_jsonl, run_json, runner, tiny_bundle, tmpdir

from firstkit.device_bench import SCHEMA_PATH
from firstkit.device_bench.cli import main
from firstkit.device_bench.store import check_result, schema_errors

WEIRD = "phone 'q' \"dq\" $x;y"  # the device's home: every path first-bench sends goes through a shell


def _system_tools() -> None:
    for tool, pkg in (("javac", "openjdk-17-jdk-headless"), ("java", "openjdk-17-jdk-headless"), ("adb", "adb")):
        if not shutil.which(tool):
            pytest.skip(f"{tool} missing: install {pkg} (tests/install_system_deps.sh)")


@pytest.fixture
def phone(request):
    _system_tools()
    adb_server()
    try:
        classes, lib = logic_classes(), jni_library()
    except FakeAndroidError as e:
        if e.missing:
            pytest.skip(str(e))
        raise
    made: list[tuple[LoopbackAdbd, FakeApp]] = []

    def make(name: str, installed: bool = True) -> tuple[LoopbackAdbd, FakeApp]:
        d = LoopbackAdbd(tmpdir(f"{request.node.name}-{name}") / WEIRD).start()
        app = FakeApp(d, installed=installed, classes=classes, jni_lib=lib)
        made.append((d, app))
        return d, app
    yield make
    for d, app in made:
        app.stop()
        subprocess.run(["adb", "disconnect", d.serial], capture_output=True, timeout=30)
        d.stop()


def _bench(dev: LoopbackAdbd, app: FakeApp | None, out, *extra, runs=2, masks="auto", warmup=0):
    args = [str(tiny_bundle()), "--device", dev.serial, "--runs", str(runs), "--warmup", str(warmup), "--masks", masks,
            "--prompt-lengths", "6", "--max-new-tokens", "5", "--threads", "1", "--out", str(out), "--no-plots"]
    if app is not None:
        args += ["--app", "--app-dir", str(app.files_dir)]
    return CliRunner().invoke(main, [*args, *extra])


def _errors(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


def _leftovers(app: FakeApp) -> list[str]:
    """Result or status files first-bench left in the app's files directory."""
    if not app.files_dir.is_dir():
        return []
    return sorted(p.name for p in app.files_dir.iterdir() if p.name.startswith("firstkit-bench-"))


def test_app_results_equal_native_runner_and_first_run(phone):
    import jsonschema

    runner("linux-x86_64")
    dev, app = phone("ok")
    out = tmpdir("app-ok") / "res.jsonl"
    r = _bench(dev, app, out, "--json", masks="all,auto,1001", warmup=1)
    assert r.exit_code == 0, r.output
    rows = run_json(r.stdout)
    assert {row["mask_spec"] for row in rows} == {"all", "auto", "1001"}
    assert all(row["target"] == "app" and row["runs"] == 2 and row["tokens_match"] is True for row in rows)
    assert re.search(r"\| app +\|", r.stderr) and re.search(r"\| org\.firstkit\.demo +\|", r.stderr)
    # one am start per configuration, with the request the activity understands
    starts = app.starts()
    assert len(starts) == 3
    extras = [json.loads(s.split(" ", 3)[3].rsplit(" faults=", 1)[0]) for s in starts]
    assert [e["mask"] for e in extras] == ["all", "auto", "1001"]
    for e in extras:
        assert e["bundle"].startswith("firstkit-") and e["out"].startswith("firstkit-bench-")
        assert (e["runs"], e["warmup"], e["threads"], e["max_new_tokens"]) == ("2", "1", "1", "5")
        assert e["ignore_eos"] == "true" and len(e["prompt_ids"].split(",")) == 6
    # every file the manifest lists was pushed into the app's bundle store; no result file left behind
    manifest = json.loads((tiny_bundle() / "manifest.json").read_text())
    pushed = app.files_dir / "bundles" / extras[0]["bundle"]
    assert all((pushed / f).is_file() for f in manifest["files"]) and (pushed / "manifest.json").is_file()
    assert _leftovers(app) == []
    # stored records: the run-result schema, answers from the app (runner "android") through the core
    schema = json.loads(SCHEMA_PATH.read_text())
    recs = read_jsonl(out)
    assert len(recs) == 6
    for rec in recs:
        jsonschema.validate(rec["result"], schema)
        assert rec["target"] == "app" and rec["app_package"] == "org.firstkit.demo" and rec["device"] == dev.serial
        assert rec["result"]["runner"] == "android" and rec["result"]["threads"] == 1
        assert rec["tokens_match"] is True and len(rec["result"]["tokens"]) == 5
    app_tokens = {(rec["mask_spec"], rec["result"]["mask"], tuple(rec["result"]["tokens"])) for rec in recs}
    assert {m for m, *_ in app_tokens} == {"all", "auto", "1001"} and len(app_tokens) == 3  # same every run
    # the bare native runner on the same device, same prompts: the same masks and tokens
    r = _bench(dev, None, out, "--json", masks="all,auto,1001")
    assert r.exit_code == 0, r.output
    assert {row["target"] for row in run_json(r.stdout)} == {"linux-x86_64"}  # app rows stay out of its table
    native = [rec for rec in read_jsonl(out) if rec["target"] == "linux-x86_64"]
    assert len(native) == 6 and all(rec["result"]["runner"] == "native" for rec in native)
    assert {(rec["mask_spec"], rec["result"]["mask"], tuple(rec["result"]["tokens"])) for rec in native} == app_tokens
    # resume: everything is stored, so the app is not started again
    r = _bench(dev, app, out, masks="all,auto,1001", warmup=1)
    assert r.exit_code == 0, r.output
    assert len(app.starts()) == 3 and len(read_jsonl(out)) == 12
    assert "0 file(s) pushed" in r.output


def test_app_not_installed(phone):
    dev, app = phone("none", installed=False)
    out = tmpdir("app-none") / "res.jsonl"
    r = _bench(dev, app, out)
    assert r.exit_code == 1
    err = _errors(r.output)
    assert len(err) == 1 and dev.serial in err[0]
    assert "org.firstkit.demo) is not installed" in err[0] and "adb install" in err[0]
    assert app.starts() == [] and not (app.files_dir / "bundles").exists()  # nothing pushed
    assert read_jsonl(out) == []


def test_app_reports_failure(phone):
    dev, app = phone("fail")
    # the bundle is damaged on the device after the push: the app's own manifest check refuses it
    app.set_faults(corrupt=1, corrupt_file="model.pte")
    out = tmpdir("app-fail") / "res.jsonl"
    r = _bench(dev, app, out, masks="all")
    assert r.exit_code == 1
    err = _errors(r.output)
    assert len(err) == 1 and "the app reported:" in err[0]
    assert "model.pte has" in err[0] and "bytes, manifest says" in err[0]  # the Java check's own words
    assert len(app.starts()) == 1  # an error the app reports is not retried
    assert read_jsonl(out) == [] and _leftovers(app) == []
    # the next run finds the damaged file by sha256, pushes it again and completes
    r = _bench(dev, app, out, masks="all")
    assert r.exit_code == 0, r.output
    assert "push model.pte" in r.output and len(read_jsonl(out)) == 2


def test_app_timeout_is_force_stopped_and_retried(phone):
    dev, app = phone("hang")
    app.set_faults(hang=1)
    out = tmpdir("app-hang") / "res.jsonl"
    r = _bench(dev, app, out, "--timeout", "3", "--retries", "0", masks="all", runs=1)
    assert r.exit_code == 1
    err = _errors(r.output)
    assert len(err) == 1 and "did not finish within 3 s" in err[0] and "force-stopped" in err[0]
    assert "am force-stop org.firstkit.demo" in app.logcat() and app.app_pid() is None
    assert read_jsonl(out) == [] and _leftovers(app) == []
    # with a retry, a hang costs one timeout and the configuration still completes
    app.set_faults(hang=1)
    r = _bench(dev, app, out, "--timeout", "3", "--retries", "1", masks="all", runs=1)
    assert r.exit_code == 0, r.output
    assert "force-stopped" in r.output and len(read_jsonl(out)) == 1


def test_app_crash_keeps_finished_runs(phone):
    dev, app = phone("crash")
    app.set_faults(crash=1, crash_after_runs=1)
    out = tmpdir("app-crash") / "res.jsonl"
    r = _bench(dev, app, out, masks="all", runs=3)
    assert r.exit_code == 0, r.output
    assert "process died before finishing" in r.output and "1 finished run(s) kept" in r.output
    recs = read_jsonl(out)
    assert sorted(rec["run_index"] for rec in recs) == [0, 1, 2] and all(rec["tokens_match"] for rec in recs)
    assert [json.loads(s.split(" ", 3)[3].rsplit(" faults=", 1)[0])["runs"] for s in app.starts()] == ["3", "2"]


def test_app_malformed_results_are_refused(phone):
    dev, app = phone("bad")
    app.set_faults(malformed=1)
    out = tmpdir("app-bad") / "res.jsonl"
    r = _bench(dev, app, out, masks="all")
    assert r.exit_code == 1
    err = _errors(r.output)
    assert len(err) == 1 and "malformed result from the app (line 1)" in err[0]
    assert "missing key 'decode_ms'" in err[0] and "nothing stored" in err[0]
    assert read_jsonl(out) == []


def test_result_checks_agree_with_jsonschema():
    """first-bench's own run-result check (no jsonschema at run time) rejects what jsonschema rejects."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    good = {"text": "hi", "tokens": [1, 2], "prompt_tokens": 3, "mask": "1011", "skip_ratio": 0.25,
            "prefill_ms": 1.5, "decode_ms_per_token": 2.0, "decode_ms": [2.0], "tokens_per_s": 500.0,
            "peak_rss_mb": 12.0, "threads": 1, "backend": "executorch", "runner": "android",
            "bundle_sha256": "a" * 64}
    variants = [good, {**good, "tokens": [1, -2]}, {**good, "mask": "10x1"}, {**good, "skip_ratio": 2},
                {**good, "threads": None}, {**good, "threads": True}, {**good, "runner": "ios"},
                {**good, "decode_ms": "2"}, {**good, "bundle_sha256": "A" * 64}, {**good, "prompt_tokens": 0},
                {k: v for k, v in good.items() if k != "text"}, [good]]
    for v in variants:
        ok = jsonschema.Draft202012Validator(schema).is_valid(v)
        assert (schema_errors(v, schema) == []) == ok, v
    request = {"runner": "android", "bundle_sha256": "a" * 64, "prompt_len": 3, "max_new_tokens": 2, "n_layers": 4,
               "threads": 1}
    assert check_result(good, **request, spec="1011") is None
    assert check_result(good, **request, spec="all") == "mask 1011 ran, all was asked for"
    assert check_result(good, **{**request, "runner": "native"}, spec="1011") == "runner is 'android', not 'native'"


def test_app_flag_usage_errors():
    bundle = str(tmpdir("usage"))  # refused before the bundle is read
    for args, msg in [(["--local", "--app"], "--app drives the app on adb devices"),
                      (["--device", "x", "--app", "--profile"], "--profile is for the native runner"),
                      (["--device", "x", "--app", "--runner-dir", os.getcwd()], "--runner-dir is for the native"),
                      (["--device", "x", "--app-dir", "/sdcard/x"], "--app-dir and --app-package need --app")]:
        r = CliRunner().invoke(main, [bundle, *args])
        assert r.exit_code == 2 and msg in r.output, r.output


def test_device_drop_while_the_app_runs(phone):
    dev, app = phone("drop")
    dev.faults.disconnect_on_shell = "FIRSTKIT_APP_DEAD"  # the first status poll loses the connection
    dev.faults.disconnect_after_s = 0.0
    out = tmpdir("app-drop") / "res.jsonl"
    r = _bench(dev, app, out, masks="all")
    assert r.exit_code == 0, r.output
    assert any(e.startswith("disconnect") for e in dev.faults.events)
    assert len(read_jsonl(out)) == 2 and len(app.starts()) == 1  # the app ran on; nothing was started twice
