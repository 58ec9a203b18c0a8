"""``first-bench --app``: the firstkit demo app (android_demo) as a :class:`~firstkit.device_bench.bench.Target`.

The app's headless entry point is ``BenchmarkActivity`` (android_demo/README.md, "Headless benchmark"): started
with ``am start -n org.firstkit.demo/.BenchmarkActivity -e KEY VALUE ...`` it appends one run-result JSON line
per measured run to ``out`` (relative to the app's external files directory) and then writes ``out.done`` =
``{"ok", "runs", "error"}``. The benchmark loop is the native runner's (``bench.bench_target``: settings checked
against the bundle before anything is pushed, resume, retries, reference tokens, result checks, store); this
target

1. ``prepare``: checks that the app is installed (``pm path``) and pushes every file the manifest lists (the app
   checks them all) to ``<app dir>/bundles/firstkit-<sha>/``, only those whose sha256 differs on the device,
   re-hashed after the push;
2. ``run`` (one configuration): removes stale result files, starts the activity with ``am start -S -W`` (a fresh
   app process, like one runner invocation), polls for ``out.done`` (and that the app process is alive) up to
   ``--timeout`` (then ``am force-stop``) and pulls ``out``; the loop checks every line against
   ``device_bench/schemas/run_result.schema.json`` and the request and stores it with ``target: "app"``.

Every shell argument is quoted (:meth:`~firstkit.device_bench.adb.Adb.shell` with a list, ``shlex.quote``).
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
import threading
import time
import uuid
from pathlib import Path

from .adb import Adb, AdbError
from .bench import AdbDevice, Attempt, BenchError, Bundle, Config, Facts, Job, Log, Orphan, Settings, Target

PACKAGE = "org.firstkit.demo"
ACTIVITY = ".BenchmarkActivity"
APP_TARGET = "app"
POLL_S = 0.5


def default_app_dir(package: str = PACKAGE) -> str:
    """The app's external files directory as adb sees it (getExternalFilesDir(null) in the app)."""
    return f"/sdcard/Android/data/{package}/files"


def app_bundle_facts(bundle: Bundle) -> Facts:
    """The app's view of the bundle. ``load_bundle`` already validated it on the host (the manifest schema that the
    app's Java check equals, an ExecuTorch program, every listed file's size and sha256)."""
    m = bundle.manifest
    model = m["model"]
    bos = model.get("bos_id")
    return Facts(int(model["num_layers"]), int(m["max_seq_len"]), int(model["vocab_size"]),
                 int(bos) if isinstance(bos, int) else -1)


class AppTarget(Target):
    """The demo app on an adb device; files live in the app's external files directory (``app_dir``)."""

    what = "app"
    result_runner = "android"
    label = "app, "

    def __init__(self, adb: Adb, serial: str, package: str = PACKAGE, app_dir: str | None = None,
                 reconnect_s: float = 20.0, poll_s: float = POLL_S) -> None:
        self.dev = AdbDevice(adb, serial, reconnect_s)
        self.name = serial
        self.package = package
        self.app_dir = (app_dir or default_app_dir(package)).rstrip("/") or "/"
        self.runner_target = APP_TARGET
        self.poll_s = poll_s
        self.abi = ""
        self.apk = ""
        self.out_rel = f"firstkit-bench-{uuid.uuid4().hex[:12]}.jsonl"
        self._bundle_dir: str | None = None
        self._bundle_name = ""
        self._aborted = threading.Event()

    @property
    def out(self) -> str:
        return f"{self.app_dir}/{self.out_rel}"

    # -- the Target interface
    def prepare(self, bundle: Bundle, s: Settings, log: Log) -> Facts:
        """The device online, the app installed, every file the manifest lists in the app's bundle store."""
        facts = app_bundle_facts(bundle)
        props = self.dev.probe()
        self.abi = props.get("abi") or props.get("machine") or ""
        self.model = self.dev.model()
        r = self.dev.adb.shell(["pm", "path", self.package], timeout=60)
        apks = [ln.strip()[len("package:"):] for ln in r.stdout.splitlines() if ln.strip().startswith("package:")]
        if r.returncode == 127 or "not found" in r.stderr:
            raise BenchError(f"{self.name}: no 'pm' on the device: --app needs an Android device with the firstkit "
                             "demo app installed")
        if not apks:
            raise BenchError(f"{self.name}: the firstkit demo app ({self.package}) is not installed "
                             f"(pm path {self.package} found nothing); build android_demo and install it: "
                             "adb install -r app-debug.apk (android_demo/README.md)")
        self.apk = apks[0]
        self._bundle_name = self._push_bundle(bundle, ["manifest.json", *sorted(bundle.manifest["files"])], log)
        log(f"{self.name}: {self.package} ({self.apk}), bundle {self._bundle_name}")
        facts.record = {"runner_key": f"app:{self.package}", "app_package": self.package, "device_abi": self.abi}
        return facts

    def orphans(self, log: Log) -> list[Orphan]:
        """None: an earlier session's result file holds no description of its request (a rerun measures again)."""
        return []

    def run(self, job: Job, s: Settings, log: Log) -> Attempt:
        """One ``am start`` of the benchmark activity for the job, then its result lines."""
        cfg = job.cfg
        extras = [("bundle", self._bundle_name), ("prompt_ids", ",".join(map(str, job.prompt))),
                  ("max_new_tokens", str(cfg.max_new_tokens)), ("threads", str(cfg.threads)), ("mask", cfg.mask),
                  ("warmup", str(job.warmup)), ("runs", str(job.runs)),
                  ("ignore_eos", "true"), ("verify", "false"),  # sha256 checked after the push, sizes by the app
                  ("out", self.out_rel)]
        self._remove_outputs()
        self._start(extras)
        state, status = self._wait(s.timeout, log, s.stop)
        err, retry = None, True
        if state == "interrupted":
            self._force_stop()
            err = "the app was force-stopped"
        elif state == "timeout":
            self._force_stop()
            err = f"the app did not finish within {s.timeout:.0f} s (hung?) and was force-stopped"
        elif state == "dead":
            err = "the app process died before finishing (crash? see adb logcat -s firstkit AndroidRuntime:E)"
        elif status is not None and not status["ok"]:
            err, retry = f"the app reported: {status.get('error') or 'failure without a message'}", False
        return Attempt(self._results() or [], complete=state == "done", error=err, retry=retry,
                       interrupted=state == "interrupted",
                       reported_runs=status.get("runs") if state == "done" and status is not None else None,
                       files=self._outputs())

    def discard(self, attempt: Attempt) -> None:
        try:
            self.dev.adb.shell(["rm", "-f", *attempt.files], timeout=30)
        except AdbError:
            pass  # removed before the next start and at the end

    def profile(self, cfg: Config, prompt: list[int], s: Settings, log: Log) -> dict:
        raise BenchError("--profile is for the native runner; the app (--app) records no ETDump traces")

    def abort(self) -> None:
        self._aborted.set()  # _wait sees it within one poll and force-stops the app

    def close(self, purge: bool) -> None:
        try:
            self.dev.adb.shell(["rm", "-f", *self._outputs()], timeout=60, check=True)
            if purge and self._bundle_dir:
                self.dev.adb.shell(["rm", "-rf", self._bundle_dir], timeout=120, check=True)
        except AdbError as e:
            raise BenchError(f"device {self.name}: could not clean up {self.app_dir}: {e}") from e

    # -- the app
    def _push_bundle(self, bundle: Bundle, files: list[str], log: Log) -> str:
        """Push the bundle under the app's bundle store; returns its name there (the ``bundle`` extra)."""
        name = f"firstkit-{bundle.sha256[:16]}"
        remote = f"{self.app_dir}/bundles/{name}"
        self._bundle_dir = remote
        self.dev.adb.shell(["mkdir", "-p", remote], timeout=30, check=True)
        try:
            n = self.dev.sync(bundle.path, files, remote, log)
        except AdbError as e:
            raise self.dev.clean_push_failure(e, [remote], "half-pushed bundle removed") from e
        log(f"{remote}: {n} file(s) pushed, {len(files) - n} unchanged")
        return name

    def _outputs(self) -> list[str]:
        return [self.out, f"{self.out}.done", f"{self.out}.done.tmp"]

    def _remove_outputs(self) -> None:
        self.dev.adb.shell(["rm", "-f", *self._outputs()], timeout=30, check=True)

    def _start(self, extras: list[tuple[str, str]]) -> str:
        """``am start -S -W`` the benchmark activity; raises BenchError when Android refuses."""
        argv = ["am", "start", "-S", "-W", "-n", f"{self.package}/{ACTIVITY}"]
        for k, v in extras:
            argv += ["-e", k, v]
        r = self.dev.adb.shell(argv, timeout=120)
        text = (r.stdout + "\n" + r.stderr).strip()
        bad = [ln.strip() for ln in text.splitlines() if re.match(r"\s*(Error|Exception|java\.)", ln)]
        if r.returncode != 0 or bad:
            msg = bad[-1] if bad else (text.splitlines() or [f"exit status {r.returncode}"])[-1]
            raise BenchError(f"am start {self.package}/{ACTIVITY} failed: {msg}")
        return text

    def _poll(self) -> tuple[str, dict | None]:
        """One look: ("done", status) | ("running", None) | ("dead", None) (no app process, no status file)."""
        done, pkg = shlex.quote(f"{self.out}.done"), shlex.quote(self.package)
        script = (f"if [ -f {done} ]; then cat {done}; exit 0; fi; "
                  f"if command -v pidof >/dev/null 2>&1 && ! pidof {pkg} >/dev/null 2>&1; "
                  "then echo FIRSTKIT_APP_DEAD; else echo FIRSTKIT_APP_RUNNING; fi")
        r = self.dev.adb.shell(script, timeout=60)
        text = r.stdout.strip()
        if text.startswith("{"):
            try:
                status = json.loads(text)
            except json.JSONDecodeError:
                return "running", None  # caught mid-write: look again
            if not isinstance(status, dict) or not isinstance(status.get("ok"), bool):
                raise BenchError(f"malformed status file from the app: {text[:200]}")
            return "done", status
        return ("dead", None) if "FIRSTKIT_APP_DEAD" in text else ("running", None)

    def _wait(self, timeout: float, log: Log, stop: threading.Event | None) -> tuple[str, dict | None]:
        """Poll until the status file appears, the app process is gone, ``timeout`` s pass or a stop is requested
        (state ``interrupted``)."""
        deadline = time.monotonic() + timeout
        dead = 0
        while True:
            if self._aborted.is_set() or (stop is not None and stop.is_set()):
                return "interrupted", None
            try:
                state, status = self._poll()
            except AdbError as e:
                if e.kind not in ("offline", "timeout"):
                    raise
                log(f"{self.name}: device disconnected while the app runs; reconnecting")
                if not self.dev.recover():
                    raise BenchError(f"{self.name}: device disconnected during the run and did not come back; "
                                     "rerun to resume") from e
                log(f"{self.name}: reconnected, the app kept running")
                continue
            if state == "done":
                return state, status
            dead = dead + 1 if state == "dead" else 0
            if dead >= 2:  # twice in a row: not a process that is just starting
                return "dead", None
            if time.monotonic() >= deadline:
                return "timeout", None
            time.sleep(self.poll_s)

    def _force_stop(self) -> None:
        try:
            self.dev.adb.shell(["am", "force-stop", self.package], timeout=60)
        except AdbError:
            pass

    def _results(self) -> list[str] | None:
        """The lines of ``out`` (None when the app wrote none)."""
        r = self.dev.adb.shell(f"test -f {shlex.quote(self.out)}", timeout=30)
        if r.returncode != 0:
            return None
        with tempfile.TemporaryDirectory() as td:
            local = Path(td) / "out.jsonl"
            self.dev.adb.pull(self.out, str(local))
            return local.read_text(encoding="utf-8", errors="replace").splitlines()


__all__ = ["ACTIVITY", "APP_TARGET", "PACKAGE", "AppTarget", "app_bundle_facts", "default_app_dir"]
