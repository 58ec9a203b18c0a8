"""first-bench against loopback adb devices driven by the real adb client: x86_64 and aarch64 (qemu),
paths with spaces and quotes, unchanged files not pushed again, and fault injection."""

from __future__ import annotations

import os
import subprocess

import pytest
from click.testing import CliRunner
from fakes.adbd import LoopbackAdbd
from test_bench_support import adb_server, need, read_jsonl, run_json, runner, tiny_bundle, tmpdir

from firstkit.device_bench.adb import Adb
from firstkit.device_bench.cli import main

WEIRD = "dev root 'q' \"dq\" $x;y"


@pytest.fixture
def device(request):
    adb_server()
    runner("linux-x86_64")
    devs = []

    def make(name: str, arch: str = "x86_64") -> LoopbackAdbd:
        d = LoopbackAdbd(tmpdir(f"{request.node.name}-{name}") / WEIRD, arch=arch).start()
        devs.append(d)
        return d
    yield make
    for d in devs:
        subprocess.run(["adb", "disconnect", d.serial], capture_output=True, timeout=30)
        d.stop()


def _bench(dev_serials, out, *extra, runs=2, masks="auto"):
    args = [str(tiny_bundle())]
    for s in dev_serials:
        args += ["--device", s]
    args += ["--runs", str(runs), "--warmup", "0", "--masks", masks, "--prompt-lengths", "6",
             "--max-new-tokens", "5", "--out", str(out), "--no-plots", *extra]
    return CliRunner().invoke(main, args)


def _leftovers(dev: LoopbackAdbd) -> list[str]:
    """Session folders or partial files left on the device."""
    base = os.path.join(dev.root, "firstkit")
    out = []
    for dirpath, dirs, files in os.walk(base):
        out += [os.path.join(dirpath, d) for d in dirs if d.startswith("session-")]
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".adbd-partial")]
    return out


def test_adb_shell_quoting(device):
    d = device("q")
    adb = Adb()
    adb.connect(d.serial)
    a = adb.for_device(d.serial)
    nasty = "a b 'c' \"d\" $(touch pwned) `touch pwned2`; touch pwned3 && echo *"
    r = a.shell(["printf", "%s|", nasty, "x"], timeout=30)
    assert r.returncode == 0 and r.stdout == nasty + "|x|"
    assert not any(os.path.exists(os.path.join(d.root, f)) for f in ("pwned", "pwned2", "pwned3"))
    assert a.shell(["sh", "-c", "exit 7"]).returncode == 7  # shell v2 exit codes


def test_x86_and_aarch64_devices_in_parallel(device):
    need("qemu-aarch64-static")
    runner("linux-aarch64")
    x86, arm = device("x86"), device("arm", arch="aarch64")
    out = tmpdir("par") / "res.jsonl"
    r = _bench([x86.serial, arm.serial], out, "--json")
    assert r.exit_code == 0, r.output
    rows = run_json(r.stdout)
    assert len(rows) == 4  # 2 devices x (all, auto)
    by = {(row["device"], row["mask_spec"]): row for row in rows}
    assert by[(arm.serial, "auto")]["target"] == "linux-aarch64" and by[(arm.serial, "auto")]["emulated"]
    assert by[(x86.serial, "auto")]["target"] == "linux-x86_64" and not by[(x86.serial, "auto")]["emulated"]
    assert all(row["tokens_match"] is True and row["runs"] == 2 for row in rows)
    # the same tokens on both architectures
    recs = read_jsonl(out)
    assert len(recs) == 8
    toks = {(rec["device"], rec["mask_spec"]): rec["result"]["tokens"] for rec in recs}
    assert toks[(x86.serial, "auto")] == toks[(arm.serial, "auto")]
    assert "(qemu)" in r.stderr and "NOT real" in r.stderr
    assert "file(s) pushed" in r.stderr
    for d in (x86, arm):
        assert _leftovers(d) == []
    # second invocation with more runs: nothing pushed again, only the missing runs
    r2 = _bench([x86.serial], out, runs=3)
    assert r2.exit_code == 0, r2.output
    assert "0 file(s) pushed" in r2.output and "push " not in r2.output.replace("pushed", "")
    assert len(read_jsonl(out)) == 10
    # a changed file on the device is detected by sha256 and pushed again
    pte = next(p for p in (os.path.join(dp, f) for dp, _, fs in os.walk(x86.root) for f in fs) if p.endswith(".pte"))
    with open(pte, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    r3 = _bench([x86.serial], out, runs=4)
    assert r3.exit_code == 0, r3.output
    assert "push model.pte" in r3.output and "1 file(s) pushed" in r3.output


def test_disconnect_mid_run_resumes_without_losing_runs(device):
    # an aarch64 device (runner under qemu): runs are slow enough that the drop lands between runs
    need("qemu-aarch64-static")
    runner("linux-aarch64")
    d = device("dc", arch="aarch64")
    d.faults.disconnect_on_shell = "--prompt-ids-file"
    d.faults.disconnect_after_output = "\n"  # right after the first finished run
    out = tmpdir("dc") / "res.jsonl"
    r = _bench([d.serial], out, runs=3)
    assert r.exit_code == 0, r.output
    assert any(e.startswith("disconnect") for e in d.faults.events)
    assert "disconnected during the run" in r.output and "reconnected" in r.output
    recs = read_jsonl(out)
    assert len(recs) == 6
    for spec in ("all", "auto"):
        got = sorted(rec["run_index"] for rec in recs if rec["mask_spec"] == spec)
        assert got == [0, 1, 2]
    assert _leftovers(d) == []


def test_push_failure_is_clear_cleaned_and_rerun_works(device):
    d = device("pf")
    d.faults.push_fail_match = "model.pte"
    out = tmpdir("pf") / "res.jsonl"
    r = _bench([d.serial], out)
    assert r.exit_code == 1
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "push model.pte failed" in err[0] and "device folder cleaned" in err[0]
    assert not os.path.exists(os.path.join(d.root, "firstkit", "bundles")) or not any(
        f.endswith(".pte") for _, _, fs in os.walk(os.path.join(d.root, "firstkit", "bundles")) for f in fs)
    assert _leftovers(d) == [] and read_jsonl(out) == []
    r = _bench([d.serial], out)  # the fault was one-shot: a rerun completes
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(out)) == 4


def test_storage_full(device):
    d = device("full")
    d.faults.storage_quota_bytes = 2_000_000  # the runner's libraries alone are larger
    out = tmpdir("full") / "res.jsonl"
    r = _bench([d.serial], out)
    assert r.exit_code == 1
    assert "No space left on device" in r.output and "--purge" in r.output
    assert any(e.startswith("storage-full") for e in d.faults.events)
    assert _leftovers(d) == []
    assert d.used_bytes() < 2_000_000


def test_runner_crash_keeps_finished_runs_and_resumes(device):
    need("qemu-aarch64-static")
    runner("linux-aarch64")
    d = device("crash", arch="aarch64")  # slow runs under qemu: the crash lands after the first run
    d.faults.crash_match = "--prompt-ids-file"  # SIGSEGV after the first finished run, twice (run + retry)
    d.faults.crash_count = 2
    out = tmpdir("crash") / "res.jsonl"
    r = _bench([d.serial], out, runs=3, masks="all")
    assert r.exit_code == 1
    assert "runner crashed (SIGSEGV 11)" in r.output and "rerun to resume" in r.output
    assert len(read_jsonl(out)) == 2  # one finished run kept from each crashed invocation
    assert _leftovers(d) == []
    r = _bench([d.serial], out, runs=3, masks="all")
    assert r.exit_code == 0, r.output
    recs = read_jsonl(out)
    assert sorted(rec["run_index"] for rec in recs) == [0, 1, 2]


def test_runner_hang_times_out_and_is_killed(device):
    d = device("hang")
    d.faults.hang_match = "--prompt-ids-file"
    out = tmpdir("hang") / "res.jsonl"
    r = _bench([d.serial], out, "--timeout", "4", "--retries", "0", masks="all", runs=1)
    assert r.exit_code == 1
    assert "timed out after 4 s" in r.output
    ps = subprocess.run(["pgrep", "-f", str(d.root)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""  # the hung runner was killed on the device
    assert _leftovers(d) == []
    r = _bench([d.serial], out, "--timeout", "60", masks="all", runs=1)
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(out)) == 1


def test_two_devices_one_failing(device):
    good, bad = device("good"), device("bad")
    bad.faults.crash_match = "--prompt-ids-file"
    bad.faults.crash_after_output = None  # crashes at once, every time
    bad.faults.crash_count = 100
    out = tmpdir("two") / "res.jsonl"
    r = _bench([good.serial, bad.serial], out, "--json")
    assert r.exit_code == 1
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errs and all(bad.serial in e and "crashed" in e for e in errs)
    recs = read_jsonl(out)
    assert len(recs) == 4 and {rec["device"] for rec in recs} == {good.serial}
    rows = run_json(r.stdout)
    assert {row["device"] for row in rows} == {good.serial} and len(rows) == 2
    assert _leftovers(good) == [] and _leftovers(bad) == []


def test_all_devices_discovers_connected_devices(device):
    d = device("all")
    Adb().connect(d.serial)
    out = tmpdir("alldev") / "res.jsonl"
    r = CliRunner().invoke(main, [str(tiny_bundle()), "--all-devices", "--runs", "1", "--warmup", "0", "--masks",
                                  "all", "--prompt-lengths", "4", "--max-new-tokens", "3", "--out", str(out),
                                  "--no-plots", "--json"])
    assert r.exit_code == 0, r.output
    assert d.serial in {row["device"] for row in run_json(r.stdout)}
    assert any(rec["device"] == d.serial and rec["device_model"] == d.model for rec in read_jsonl(out))
