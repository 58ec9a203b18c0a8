"""Bad input never costs a user data (issue 13), first-bench side: --purge, exactly the listed files pushed (and
read), SIGINT/SIGTERM, one writer per store, orphaned device sessions. Loopback adb devices, real adb client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakes.adbd import LoopbackAdbd
from test_bench_support import adb_server, bundle_copy, read_jsonl, runner, tiny_bundle, tmpdir

from firstkit.device_bench.cli import main
from firstkit.device_bench.store import RECORD_SCHEMA, ResultStore
from firstkit.runtime.cli import main as run_main


@pytest.fixture
def device(request):
    adb_server()
    runner("linux-x86_64")
    devs = []

    def make(name: str) -> LoopbackAdbd:
        d = LoopbackAdbd(tmpdir(f"{request.node.name}-{name}") / "dev root").start()
        devs.append(d)
        return d
    yield make
    for d in devs:
        subprocess.run(["adb", "disconnect", d.serial], capture_output=True, timeout=30)
        d.stop()


def _bench(bundle, serials, out, *extra, runs=1, masks="all"):
    args = [str(bundle)]
    for s in serials:
        args += ["--device", s]
    args += ["--runs", str(runs), "--warmup", "0", "--masks", masks, "--prompt-lengths", "6", "--max-new-tokens",
             "5", "--out", str(out), "--no-plots", "--no-reference", *map(str, extra)]
    return CliRunner().invoke(main, args)


def _tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _sha(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- 2. --purge
def test_purge_deletes_only_firstkits_own_paths(device):
    d = device("purge")
    shared = Path(d.root) / "shared"  # a --device-dir the user also keeps files in
    (shared / "photos").mkdir(parents=True)
    (shared / "photos" / "a.jpg").write_bytes(b"\xff\xd8jpeg")
    (shared / "notes.txt").write_text("mine")
    (shared / "bundles" / "mine").mkdir(parents=True)  # named like firstkit's folder
    (shared / "bundles" / "mine" / "x.txt").write_text("also mine")
    before = _tree(shared)
    out = tmpdir("purge") / "res.jsonl"
    r = _bench(tiny_bundle(), [d.serial], out, "--device-dir", shared, "--purge")
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(out)) == 1
    assert _tree(shared) == before  # firstkit's bundle, runner and session are gone; nothing else is
    assert sorted(p.name for p in shared.iterdir()) == ["bundles", "notes.txt", "photos"]
    # a device folder holding only firstkit's paths is removed entirely
    own = Path(d.root) / "fk"
    r = _bench(tiny_bundle(), [d.serial], tmpdir("purge2") / "res.jsonl", "--device-dir", own, "--purge")
    assert r.exit_code == 0, r.output
    assert not own.exists()


# ------------------------------------------------------------------------------------------- 3. only listed files
def test_only_listed_files_are_pushed_and_read(device, tmp_path):
    d = device("listed")
    b = bundle_copy("unlisted")
    (b / "tokenizer" / "secret.txt").write_text("host file, not in the manifest")
    (b / "notes.txt").write_text("not in the manifest either")
    fk = Path(d.root) / "fk"
    r = _bench(b, [d.serial], tmpdir("listed") / "res.jsonl", "--device-dir", fk)
    assert r.exit_code == 0, r.output
    manifest = json.loads((b / "manifest.json").read_text())
    pushed = set(_tree(fk / "bundles" / _sha(b)[:16]))
    listed_tok = {rel for rel in manifest["files"] if rel.startswith("tokenizer/")}
    assert pushed == {"manifest.json", "model.pte", *listed_tok}

    # a tokenizer/ that is a symlink out of the bundle: refused by first-bench, first-run and the native runner
    outside = tmp_path / "elsewhere"
    esc = bundle_copy("escape")
    (esc / "tokenizer").rename(outside)
    os.symlink(outside, esc / "tokenizer")
    out = tmp_path / "res.jsonl"
    r = _bench(esc, [d.serial], out, "--device-dir", Path(d.root) / "fk2")
    assert r.exit_code == 1 and "resolves outside the bundle" in r.output and "Traceback" not in r.output
    assert not (Path(d.root) / "fk2").exists() and not out.exists()  # refused before anything was pushed
    res = CliRunner().invoke(run_main, [str(esc), "--prompt", "hi"])
    assert res.exit_code == 1 and "resolves outside the bundle" in res.output.splitlines()[-1]
    p = subprocess.run([str(runner("linux-x86_64").launcher), "--bundle", str(esc), "--prompt-ids", "1,2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "resolves outside the bundle" in p.stderr and p.stdout == ""


# ------------------------------------------------------------------------------------------- 5. SIGINT / SIGTERM
@pytest.mark.parametrize("sig,where", [(signal.SIGINT, "device"), (signal.SIGTERM, "local")])
def test_signal_stops_after_the_current_run_and_keeps_results(device, tmp_path, sig, where):
    out = tmp_path / "res.jsonl"
    (tmp_path / "tmp").mkdir()
    args = [sys.executable, "-m", "firstkit.device_bench.cli", str(tiny_bundle()), "--runs", "100000", "--warmup", "0",
            "--masks", "all,auto", "--prompt-lengths", "6", "--max-new-tokens", "5", "--out", str(out), "--no-plots",
            "--no-reference"]
    if where == "device":
        d = device("sig")
        root = Path(d.root)
        args += ["--device", d.serial, "--device-dir", str(root / "fk")]
        pattern = (root / "fk", "session-*/out-*.jsonl")
    else:
        runner("linux-x86_64")
        args += ["--local"]
        pattern = (tmp_path / "tmp", "firstkit-bench-*/out-*.jsonl")  # the local session folder: $TMPDIR
    started = time.time()

    def running() -> bool:  # a results file of this run that already holds a finished run
        return any(f.stat().st_mtime >= started and f.stat().st_size > 0 for f in pattern[0].glob(pattern[1]))

    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                         env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not running():
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    time.sleep(0.5)  # a few more finished runs
    t0 = time.time()
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert time.time() - t0 < 60  # not the 200000 remaining runs
    assert p.returncode == 128 + sig, stderr[-2000:]
    assert "Traceback" not in stderr
    assert f"interrupted by {sig.name}" in stderr and "rerun the same command to resume" in stderr
    recs = read_jsonl(out)
    assert recs and {r["mask_spec"] for r in recs} == {"all"}  # the 'auto' configuration never started
    assert sorted(r["run_index"] for r in recs) == list(range(len(recs)))
    assert "| all" in stdout  # the table of what finished
    if where == "device":
        ps = subprocess.run(["pgrep", "-f", d.root], capture_output=True, text=True)
        assert ps.stdout.strip() == ""  # the device-side runner was killed
        assert not list((root / "fk").glob("session-*"))


# ------------------------------------------------------------------------------------------- 6. one writer
def test_store_written_by_another_process_is_refused(tmp_path):
    out = tmp_path / "res.jsonl"
    out.write_text("")
    other = ResultStore(out)  # stands for another live first-bench on the same store
    other.lock_writer()
    try:
        r = CliRunner().invoke(main, [str(tiny_bundle()), "--local", "--out", str(out), "--no-plots"])
        assert r.exit_code == 1 and "Traceback" not in r.output
        err = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
        assert len(err) == 1 and "being written by another first-bench process" in err[0]
        assert out.read_text() == ""
    finally:
        other.close()
    ResultStore(out).lock_writer()  # free again once the other one is done


# ------------------------------------------------------------------------------------------- 7. orphaned sessions
def test_orphaned_device_sessions_are_collected_then_removed(device):
    d = device("orphans")
    bundle = tiny_bundle()
    sha = _sha(bundle)
    fk = Path(d.root) / "fk"
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    rec0 = {"schema": RECORD_SCHEMA, "device": d.serial, "device_model": d.model, "target": "linux-x86_64",
            "emulated": False, "bundle_sha256": sha, "runner_key": "k", "max_new_tokens": 5, "warmup": 0,
            "mask_spec": "all", "prompt_len": 6, "threads": 2}
    result = {"text": "", "tokens": [5, 6, 7, 8, 9], "prompt_tokens": 6, "mask": "1111", "skip_ratio": 0.0,
              "prefill_ms": 2.0, "decode_ms_per_token": 1.0, "decode_ms": [1.0] * 4, "tokens_per_s": 1000.0,
              "peak_rss_mb": 20.0, "threads": 2, "backend": "executorch", "runner": "native", "bundle_sha256": sha}
    sessions = {"session-aaaaaaaaaaaa": {"host": host, "pid": dead.pid},  # its first-bench died: collect
                "session-bbbbbbbbbbbb": None,  # an older firstkit's session, no owner file: remove
                "session-cccccccccccc": {"host": host, "pid": os.getpid()},  # live: leave alone
                "session-dddddddddddd": {"host": "another-host", "pid": 1}}  # another host's: leave alone
    for name, owner in sessions.items():
        s = fk / name
        s.mkdir(parents=True)
        if owner:
            (s / "owner.json").write_text(json.dumps({**owner, "started": 0}))
        (s / "out-all-6-2-0-abc.jsonl").write_text(json.dumps(result) + "\n" + '{"text": "torn')
        (s / "out-all-6-2-0-abc.meta.json").write_text(json.dumps({"record": rec0, "run_index": 0, "expected": None,
                                                                   "run_id": f"{name}/all-6-2-0-abc"}))
    out = tmpdir("orphans") / "res.jsonl"
    r = _bench(bundle, [d.serial], out, "--device-dir", fk, "--threads", "2")
    assert r.exit_code == 0, r.output
    assert "earlier session session-aaaaaaaaaaaa" in r.output and "1 finished run(s) stored" in r.output
    recs = read_jsonl(out)
    ids = sorted(rec["run_id"] for rec in recs)
    # the orphan's run (aaaa) and the legacy session's (bbbb) were stored; the config was complete: nothing ran
    assert ids == ["session-aaaaaaaaaaaa/all-6-2-0-abc#0", "session-bbbbbbbbbbbb/all-6-2-0-abc#0"]
    assert all(rec["result"]["tokens"] == [5, 6, 7, 8, 9] for rec in recs)
    assert sorted(p.name for p in fk.glob("session-*")) == ["session-cccccccccccc", "session-dddddddddddd"]
    r = _bench(bundle, [d.serial], out, "--device-dir", fk, "--threads", "2", "--runs", "3")
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(out)) == 3  # one more run, nothing stored twice
