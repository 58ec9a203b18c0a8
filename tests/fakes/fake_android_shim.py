"""``am``, ``pm`` and ``pidof`` for a loopback device that stands in for a phone with the firstkit demo app.

Standard library only (it runs for every ``adb shell am ...`` and must start fast); installed by
:mod:`fakes.fake_android`, which writes ``STATE/config.json``:

    {"package": "org.firstkit.demo", "files_dir": "...", "installed": true, "java": "java",
     "classes": "<compiled android_demo/logic>", "org_json": "<org.json jar>", "jni_dir": "<dir of libfirstkit_jni.so>"}

``am start [-S] [-W] -n PKG/.BenchmarkActivity -e KEY VALUE ...`` does what Android does for the app: creates
the external files directory (getExternalFilesDir) and the bundle store, then starts "the app process" in the
background and returns at once. The app process runs the app's real headless entry point,
``org.firstkit.demo.logic.Benchmark.runIntent`` (the code BenchmarkActivity calls), on this host's JVM with the
Linux build of the app's JNI bridge, so results come from the shared C++ core through the app's Java code.
``am force-stop PKG`` kills it; ``pidof PKG`` finds it; ``pm path PKG`` says whether the app is installed.
Output goes to ``STATE/logcat.txt``.

Faults (``STATE/faults.json``, each a count consumed by ``am start``): ``hang`` (the benchmark thread never
returns), ``crash`` (the process dies after ``crash_after_runs`` runs were written, before the status file),
``corrupt`` (a bundle file is truncated on the device before the app reads it), ``malformed`` (the result
lines lose a required key).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ACTIVITY = ".BenchmarkActivity"


def _cfg(state: Path) -> dict:
    return json.loads((state / "config.json").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # an exited child nobody reaped yet is gone for Android's purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _app_pid(state: Path) -> int | None:
    try:
        pid = int((state / "app.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _kill_app(state: Path) -> None:
    pid = _app_pid(state)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.02)
    with contextlib.suppress(OSError):
        (state / "app.pid").unlink()


def _take_fault(state: Path) -> dict:
    """The faults that fire for this start (counts decremented)."""
    path = state / "faults.json"
    try:
        faults = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    fired = {}
    for k in ("hang", "crash", "corrupt", "malformed"):
        if faults.get(k, 0) > 0:
            faults[k] -= 1
            fired[k] = True
    if fired.get("crash"):
        fired["crash_after_runs"] = int(faults.get("crash_after_runs", 1))
    if fired.get("corrupt"):
        fired["corrupt_file"] = faults.get("corrupt_file", "model.pte")
    path.write_text(json.dumps(faults))
    return fired


def _log(state: Path, text: str) -> None:
    with open(state / "logcat.txt", "a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


# ------------------------------------------------------------------------------------------------------------- am
def am(state: Path, args: list[str]) -> int:
    cfg = _cfg(state)
    pkg = cfg["package"]
    if not args:
        print("usage: am start|force-stop ...", file=sys.stderr)
        return 1
    if args[0] == "force-stop":
        if len(args) >= 2 and args[-1] == pkg:
            _log(state, f"am force-stop {pkg}")
            _kill_app(state)
        return 0
    if args[0] != "start":
        print(f"Error: unknown command '{args[0]}' (stand-in am: start, force-stop)", file=sys.stderr)
        return 1
    wait = stop = False
    comp = None
    extras: dict[str, str] = {}
    i = 1
    while i < len(args):
        a = args[i]
        if a == "-W":
            wait = True
        elif a == "-S":
            stop = True
        elif a == "-n" and i + 1 < len(args):
            comp = args[i + 1]
            i += 1
        elif a in ("-e", "--es") and i + 2 < len(args):
            extras[args[i + 1]] = args[i + 2]
            i += 2
        else:
            print(f"Error: stand-in am does not understand {a!r}", file=sys.stderr)
            return 1
        i += 1
    if comp is None:
        print("Error: no component (-n)", file=sys.stderr)
        return 1
    cpkg, _, cls = comp.partition("/")
    print(f"Starting: Intent {{ cmp={comp}{' (has extras)' if extras else ''} }}", flush=True)
    if cpkg != pkg or not cfg.get("installed") or cls not in (ACTIVITY, pkg + ACTIVITY):
        full = cls if not cls.startswith(".") else cpkg + cls
        print(f"Error type 3\nError: Activity class {{{cpkg}/{full}}} does not exist.", file=sys.stderr)
        return 0  # like Android's am: the exit status says nothing, the text does
    if stop:
        _kill_app(state)
    files = Path(cfg["files_dir"])
    (files / "bundles").mkdir(parents=True, exist_ok=True)  # getExternalFilesDir + BundleStore.root
    fired = _take_fault(state)
    _log(state, f"am start {comp} {json.dumps(extras, sort_keys=True)} faults={json.dumps(fired)}")
    t0 = time.time()
    logf = open(state / "logcat.txt", "a", encoding="utf-8")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(state), "_app", json.dumps(fired),
                             json.dumps(extras)], stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True)
    logf.close()
    (state / "app.pid").write_text(str(proc.pid))
    if wait:
        ms = int((time.time() - t0) * 1000)
        print(f"Status: ok\nLaunchState: COLD\nActivity: {comp}\nTotalTime: {ms}\nWaitTime: {ms}\nComplete",
              flush=True)
    return 0


def app_process(state: Path, fired: dict, extras: dict[str, str]) -> int:
    """The app's process: BenchmarkActivity.onCreate's thread, i.e. Benchmark.runIntent on this JVM."""
    cfg = _cfg(state)
    files = Path(cfg["files_dir"])
    bundles = files / "bundles"
    if fired.get("hang"):
        while True:  # the benchmark thread is stuck: no status file, ever
            time.sleep(3600)
    if fired.get("corrupt"):
        b = extras.get("bundle", "")
        victim = (Path(b) if b.startswith("/") else bundles / b) / fired["corrupt_file"]
        with contextlib.suppress(OSError):
            data = victim.read_bytes()
            victim.write_bytes(data[: max(0, len(data) - 10)])
            print(f"fault: truncated {victim}", flush=True)
    out = extras.get("out", "")
    real_out = Path(out) if out.startswith("/") else files / out
    private = state / "private.jsonl"  # faults that touch the results: the app writes here first
    if fired.get("malformed") or fired.get("crash"):
        for p in (private, Path(f"{private}.done")):
            with contextlib.suppress(OSError):
                p.unlink()
        extras = dict(extras, out=str(private))
        if fired.get("crash"):
            extras["runs"] = str(min(int(extras.get("runs", "1")), fired["crash_after_runs"]))
    argv = [cfg.get("java", "java"), "-cp", cfg["classes"] + os.pathsep + cfg["org_json"],
            f"-Djava.library.path={cfg['jni_dir']}",
            "org.firstkit.demo.logic.LogicTool", "activity", str(files), str(bundles),
            *(f"{k}={v}" for k, v in extras.items())]
    java = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    rc = java.wait()
    if fired.get("crash"):  # the runs written so far survive; the process dies before the status file
        real_out.write_bytes(private.read_bytes() if private.exists() else b"")
        print(f"fault: the app process dies after {fired['crash_after_runs']} run(s)", flush=True)
        os._exit(134)
    if fired.get("malformed"):
        lines = private.read_text().splitlines() if private.exists() else []
        broken = []
        for ln in lines:
            rec = json.loads(ln)
            rec.pop("decode_ms", None)
            broken.append(json.dumps(rec))
        real_out.write_text("".join(x + "\n" for x in broken))
        os.replace(f"{private}.done", f"{real_out}.done")
    return rc


# ------------------------------------------------------------------------------------------------------ pm, pidof
def pm(state: Path, args: list[str]) -> int:
    cfg = _cfg(state)
    if len(args) >= 2 and args[0] == "path":
        if args[1] == cfg["package"] and cfg.get("installed"):
            print(f"package:/data/app/{cfg['package']}-1/base.apk")
            return 0
        return 1
    if args[:2] == ["list", "packages"]:
        if cfg.get("installed"):
            print(f"package:{cfg['package']}")
        return 0
    print(f"Error: stand-in pm does not implement {' '.join(args)}", file=sys.stderr)
    return 1


def pidof(state: Path, args: list[str]) -> int:
    """``pidof PKG`` (the wrapper hands any other name to the host's pidof)."""
    pid = _app_pid(state)
    if pid is None:
        return 1
    print(pid)
    return 0


def main(argv: list[str]) -> int:
    state, cmd, args = Path(argv[1]), argv[2], argv[3:]
    if cmd == "_app":
        return app_process(state, json.loads(args[0]), json.loads(args[1]))
    return {"am": am, "pm": pm, "pidof": pidof}[cmd](state, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
