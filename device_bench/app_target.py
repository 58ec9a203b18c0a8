"""``first-bench --app``: benchmark a bundle through the firstkit demo app (android_demo) instead of the bare runner.

The app's headless entry point is ``BenchmarkActivity`` (android_demo/README.md, "Headless benchmark"): started
with ``am start -n org.firstkit.demo/.BenchmarkActivity -e KEY VALUE ...`` it appends one run-result JSON line
per measured run to ``out`` (relative to the app's external files directory) and then writes ``out.done`` =
``{"ok", "runs", "error"}``. Per device, :func:`bench_app`:

1. checks the bundle on the host with the app's own rules (``firstkit.runtime.bundle.validate_manifest``, which
   the app's Java check equals, plus sizes and sha256 of every listed file), the masks and the prompt lengths;
2. checks that the app is installed (``pm path``);
3. pushes every file the manifest lists (the app checks them all) to ``<app dir>/bundles/firstkit-<sha>/``,
   only those whose sha256 differs on the device, re-hashed after the push;
4. per configuration (prompt length x threads x mask) removes stale result files, starts the activity with
   ``am start -S -W`` (a fresh app process, like one runner invocation), polls for ``out.done`` (and that the
   app process is alive) up to ``--timeout`` (then ``am force-stop``), pulls ``out``, validates every line
   against ``device_bench/schemas/run_result.schema.json`` and the request, and stores it in the same JSONL store
   as the native runner, with ``target: "app"``.

Every shell argument is quoted (:meth:`~firstkit.device_bench.adb.Adb.shell` with a list, ``shlex.quote``).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from . import SCHEMA_PATH
from .adb import Adb, AdbError
from .bench import (
    AdbTarget,
    BenchError,
    BenchInterrupted,
    Bundle,
    References,
    Settings,
    TargetReport,
    check_masks,
    check_prompt_fits,
    check_stop,
    make_prompt,
    mask_override,
    remaining_runs,
)
from .store import RECORD_SCHEMA, ResultStore, record_error

PACKAGE = "org.firstkit.demo"
ACTIVITY = ".BenchmarkActivity"
APP_TARGET = "app"
POLL_S = 0.5


def default_app_dir(package: str = PACKAGE) -> str:
    """The app's external files directory as adb sees it (getExternalFilesDir(null) in the app)."""
    return f"/sdcard/Android/data/{package}/files"


# ----------------------------------------------------------------------------------------------- result checks
_TYPES: dict[str, Callable[[object], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def schema_errors(value: object, schema: dict, where: str = "") -> list[str]:
    """Errors of ``value`` against the JSON-Schema subset run_result.schema.json uses (type, required, properties,
    items, enum, pattern, minimum, maximum); no dependency on the ``jsonschema`` package."""
    errs: list[str] = []
    name = where or "result"
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_TYPES[x](value) for x in types):
            return [f"{name}: {json.dumps(value)[:60]} is not of type {' or '.join(types)}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{name}: {json.dumps(value)[:60]} is not one of {schema['enum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errs.append(f"{name}: {value[:60]!r} does not match {schema['pattern']}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{name}: {value} is less than {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{name}: {value} is greater than {schema['maximum']}")
    if isinstance(value, dict):
        errs += [f"{name}: missing key {k!r}" for k in schema.get("required", []) if k not in value]
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                errs += schema_errors(value[k], sub, k)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, x in enumerate(value):
            errs += schema_errors(x, schema["items"], f"{name}[{i}]")
    return errs


_SCHEMA: dict | None = None


def run_result_schema() -> dict:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads(Path(SCHEMA_PATH).read_text())
    return _SCHEMA


def check_result(res: object, *, bundle_sha256: str, prompt_len: int, max_new_tokens: int, n_layers: int,
                 spec: str, threads: int) -> str | None:
    """Why a result line from the app is unusable, or None: the schema, then that it answers this request."""
    errs = schema_errors(res, run_result_schema())
    if errs:
        return "; ".join(errs[:3])
    assert isinstance(res, dict)
    if res["runner"] != "android":
        return f"runner is {res['runner']!r}, not 'android'"
    if res["bundle_sha256"] != bundle_sha256:
        return "bundle_sha256 differs from the host's bundle (another bundle ran)"
    if res["prompt_tokens"] != prompt_len:
        return f"prompt_tokens {res['prompt_tokens']}, {prompt_len} were sent"
    if len(res["mask"]) != n_layers:
        return f"mask {res['mask']} has {len(res['mask'])} bits, the model has {n_layers} layers"
    want = {"all": "1" * n_layers, "auto": None}.get(spec, spec)
    if want is not None and res["mask"] != want:
        return f"mask {res['mask']} ran, {spec} was asked for"
    if len(res["tokens"]) != max_new_tokens:
        return f"{len(res['tokens'])} tokens generated, {max_new_tokens} asked for (EOS ignored)"
    if res["threads"] is not None and res["threads"] != threads:
        return f"threads {res['threads']}, {threads} asked for"
    return None


# ----------------------------------------------------------------------------------------------- the device
class AppTarget(AdbTarget):
    """The demo app on an adb device; files live in the app's external files directory (``app_dir``)."""

    def __init__(self, adb: Adb, serial: str, package: str = PACKAGE, app_dir: str | None = None,
                 reconnect_s: float = 20.0, poll_s: float = POLL_S) -> None:
        super().__init__(adb, serial, reconnect_s=reconnect_s)
        self.package = package
        self.app_dir = (app_dir or default_app_dir(package)).rstrip("/") or "/"
        self.runner_target = APP_TARGET
        self.poll_s = poll_s
        self.abi = ""
        self.apk = ""
        self.out_rel = f"firstkit-bench-{self.session.removeprefix('session-')}.jsonl"
        self._bundle_dir: str | None = None

    @property
    def out(self) -> str:
        return f"{self.app_dir}/{self.out_rel}"

    def probe(self) -> None:
        super().probe()  # online, ABI, model
        self.abi = self.props.get("abi") or self.props.get("machine") or ""
        self.runner_target = APP_TARGET
        r = self.adb.shell(["pm", "path", self.package], timeout=60)
        apks = [ln.strip()[len("package:"):] for ln in r.stdout.splitlines() if ln.strip().startswith("package:")]
        if r.returncode == 127 or "not found" in r.stderr:
            raise BenchError(f"{self.name}: no 'pm' on the device: --app needs an Android device with the firstkit "
                             "demo app installed")
        if not apks:
            raise BenchError(f"{self.name}: the firstkit demo app ({self.package}) is not installed "
                             f"(pm path {self.package} found nothing); build android_demo and install it: "
                             "adb install -r app-debug.apk (android_demo/README.md)")
        self.apk = apks[0]

    def prepare_bundle(self, bundle: Bundle, files: list[str], log: Callable[[str], None]) -> str:
        """Push the bundle under the app's bundle store; returns its name there (the ``bundle`` extra)."""
        name = f"firstkit-{bundle.sha256[:16]}"
        remote = f"{self.app_dir}/bundles/{name}"
        self._bundle_dir = remote
        self.adb.shell(["mkdir", "-p", remote], timeout=30, check=True)
        try:
            n = self._sync(bundle.path, files, remote, log)
        except AdbError as e:
            try:  # never leave a half-pushed bundle behind: it would look cached next time
                self.adb.shell(["rm", "-rf", remote], timeout=60)
            except AdbError:
                pass
            hint = " (device storage full: free space or run with --purge)" if "space" in str(e).lower() else ""
            raise BenchError(f"device {self.name}: {e}{hint}; half-pushed bundle removed") from e
        log(f"{remote}: {n} file(s) pushed, {len(files) - n} unchanged")
        return name

    def remove_outputs(self) -> None:
        self.adb.shell(["rm", "-f", self.out, f"{self.out}.done", f"{self.out}.done.tmp"], timeout=30, check=True)

    def start(self, extras: list[tuple[str, str]]) -> str:
        """``am start -S -W`` the benchmark activity; raises BenchError when Android refuses."""
        argv = ["am", "start", "-S", "-W", "-n", f"{self.package}/{ACTIVITY}"]
        for k, v in extras:
            argv += ["-e", k, v]
        r = self.adb.shell(argv, timeout=120)
        text = (r.stdout + "\n" + r.stderr).strip()
        bad = [ln.strip() for ln in text.splitlines() if re.match(r"\s*(Error|Exception|java\.)", ln)]
        if r.returncode != 0 or bad:
            msg = bad[-1] if bad else (text.splitlines() or [f"exit status {r.returncode}"])[-1]
            raise BenchError(f"am start {self.package}/{ACTIVITY} failed: {msg}")
        return text

    def poll(self) -> tuple[str, dict | None]:
        """One look: ("done", status) | ("running", None) | ("dead", None) (no app process, no status file)."""
        done, pkg = shlex.quote(f"{self.out}.done"), shlex.quote(self.package)
        script = (f"if [ -f {done} ]; then cat {done}; exit 0; fi; "
                  f"if command -v pidof >/dev/null 2>&1 && ! pidof {pkg} >/dev/null 2>&1; "
                  "then echo FIRSTKIT_APP_DEAD; else echo FIRSTKIT_APP_RUNNING; fi")
        r = self.adb.shell(script, timeout=60)
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

    def wait(self, timeout: float, log: Callable[[str], None], stop=None) -> tuple[str, dict | None]:
        """Poll until the status file appears, the app process is gone, ``timeout`` s pass or ``stop`` is set
        (state ``interrupted``)."""
        deadline = time.monotonic() + timeout
        dead = 0
        while True:
            if stop is not None and stop.is_set():
                return "interrupted", None
            try:
                state, status = self.poll()
            except AdbError as e:
                if e.kind not in ("offline", "timeout"):
                    raise
                log(f"{self.name}: device disconnected while the app runs; reconnecting")
                if not self.recover():
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

    def force_stop(self) -> None:
        try:
            self.adb.shell(["am", "force-stop", self.package], timeout=60)
        except AdbError:
            pass

    def abort(self) -> None:
        pass  # wait() sees the stop request within one poll and force-stops the app

    def results(self) -> list[str] | None:
        """The lines of ``out`` (None when the app wrote none)."""
        import tempfile

        r = self.adb.shell(f"test -f {shlex.quote(self.out)}", timeout=30)
        if r.returncode != 0:
            return None
        with tempfile.TemporaryDirectory() as td:
            local = Path(td) / "out.jsonl"
            self.adb.pull(self.out, str(local))
            return local.read_text(encoding="utf-8", errors="replace").splitlines()

    def cleanup(self, purge: bool) -> None:
        paths = [self.out, f"{self.out}.done", f"{self.out}.done.tmp"]
        try:
            self.adb.shell(["rm", "-f", *paths], timeout=60, check=True)
            if purge and self._bundle_dir:
                self.adb.shell(["rm", "-rf", self._bundle_dir], timeout=120, check=True)
        except AdbError as e:
            raise BenchError(f"device {self.name}: could not clean up {self.app_dir}: {e}") from e


# ----------------------------------------------------------------------------------------------- the benchmark
def app_bundle_facts(bundle: Bundle) -> dict:
    """The app's view of the bundle. ``load_bundle`` already validated it on the host (the manifest schema that the
    app's Java check equals, an ExecuTorch program, every listed file's size and sha256)."""
    m = bundle.manifest
    model = m["model"]
    bos = model.get("bos_id")
    return {"num_layers": int(model["num_layers"]), "max_seq_len": int(m["max_seq_len"]),
            "vocab_size": int(model["vocab_size"]), "bos_id": int(bos) if isinstance(bos, int) else -1,
            "files": ["manifest.json", *sorted(m["files"])],
            "protected": [int(i) for i in m["routing"]["protected_layers"]]}


def bench_app(target: AppTarget, bundle: Bundle, s: Settings, store: ResultStore, refs: References | None,
              log: Callable[[str], None], progress: Callable[[int], None] | None = None) -> TargetReport:
    """Every configuration that is not complete in the store, through the app on one device."""
    rep = TargetReport(target.name)
    try:
        facts = app_bundle_facts(bundle)
        n_layers = facts["num_layers"]
        check_masks(s.masks, n_layers, facts["protected"])
        for plen in s.prompt_lengths:
            check_prompt_fits(plen, s.max_new_tokens, facts["max_seq_len"])
        target.probe()
        name = target.prepare_bundle(bundle, facts["files"], log)
        log(f"{target.name}: {target.package} ({target.apk}), bundle {name}")
        done = store.counts()
        base_rec = {"schema": RECORD_SCHEMA, "device": target.name, "device_model": target.model,
                    "target": APP_TARGET, "emulated": False, "bundle_sha256": bundle.sha256,
                    "runner_key": f"app:{target.package}", "app_package": target.package, "device_abi": target.abi,
                    "max_new_tokens": s.max_new_tokens, "warmup": s.warmup}
        for plen in s.prompt_lengths:
            prompt = make_prompt(bundle, plen, facts["vocab_size"], facts["bos_id"], s.prompt_text)
            for th in s.threads:
                for spec in s.masks:
                    check_stop(s)
                    rec0 = {**base_rec, "mask_spec": spec, "prompt_len": plen, "threads": th}
                    remaining = remaining_runs(s, rec0, done, rep, progress)
                    if remaining <= 0:
                        continue
                    expected = refs.tokens(prompt, s.max_new_tokens, mask_override(spec, n_layers)) if refs else None
                    err = _run_app_config(target, s, store, rec0, name, prompt, n_layers, remaining, expected, rep,
                                          log, progress)
                    if err:
                        rep.errors.append(f"{target.name}: app, mask {spec}, pp {plen}, {th} threads: {err}")
    except (BenchError, AdbError) as e:
        rep.interrupted = isinstance(e, BenchInterrupted)
        msg = str(e)
        rep.errors.append(msg if msg.startswith(target.name) else f"{target.name}: {msg}")
    finally:
        try:
            target.cleanup(s.purge)
        except (BenchError, AdbError) as e:
            rep.errors.append(str(e))
    return rep


def _run_app_config(target: AppTarget, s: Settings, store: ResultStore, rec0: dict, bundle_name: str,
                    prompt: list[int], n_layers: int, remaining: int, expected: list[int] | None, rep: TargetReport,
                    log: Callable[[str], None], progress: Callable[[int], None] | None) -> str | None:
    """Measured runs of one configuration through the app, with retries after a hang or a crash."""
    spec, plen, threads = rec0["mask_spec"], rec0["prompt_len"], rec0["threads"]
    attempt, last_err, last_retry = 0, None, False
    run_index = s.runs - remaining
    while remaining > 0 and attempt <= s.retries:
        extras = [("bundle", bundle_name), ("prompt_ids", ",".join(map(str, prompt))),
                  ("max_new_tokens", str(s.max_new_tokens)), ("threads", str(threads)), ("mask", spec),
                  ("warmup", str(s.warmup if attempt == 0 else 0)), ("runs", str(remaining)),
                  ("ignore_eos", "true"), ("verify", "false"),  # sha256 checked after the push, sizes by the app
                  ("out", target.out_rel)]
        target.remove_outputs()
        target.start(extras)
        state, status = target.wait(s.timeout, log, s.stop)
        err, retry = None, False
        if state == "interrupted":
            target.force_stop()
            err = "interrupted"
        elif state == "timeout":
            target.force_stop()
            err, retry = f"the app did not finish within {s.timeout:.0f} s (hung?) and was force-stopped", True
        elif state == "dead":
            err, retry = ("the app process died before finishing (crash? see adb logcat -s firstkit "
                          "AndroidRuntime:E)"), True
        elif status is not None and not status["ok"]:
            err = f"the app reported: {status.get('error') or 'failure without a message'}"
        lines = target.results() or []
        recs = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                res = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1 and state != "done":
                    continue  # the line a killed app was writing
                return f"malformed result from the app (line {i + 1} of {target.out_rel} is not JSON); nothing stored"
            why = check_result(res, bundle_sha256=rec0["bundle_sha256"], prompt_len=plen,
                               max_new_tokens=s.max_new_tokens, n_layers=n_layers, spec=spec, threads=threads)
            if why:
                return f"malformed result from the app (line {i + 1}): {why}; nothing stored"
            match = None if expected is None else (res["tokens"] == expected)
            rec = {**rec0, "run_index": run_index + len(recs), "result": res, "tokens_match": match,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            why = record_error(rec)  # what the store accepts on read (strict integers)
            if why:
                return f"malformed result from the app (line {i + 1}): {why}; nothing stored"
            recs.append(rec)
        if state == "done" and status is not None and status.get("runs") != len(recs):
            return (f"malformed result from the app: the status says {status.get('runs')} run(s), "
                    f"{len(recs)} line(s) were written; nothing stored")
        got = store.append(recs[:remaining])
        rep.new_runs += got
        remaining -= got
        run_index += got
        if progress and got:
            progress(got)
        if state == "interrupted":
            raise BenchInterrupted(f"{target.name}: interrupted during app, mask {spec}, pp {plen}, {threads} "
                                   f"threads: the app was force-stopped, {got} finished run(s) stored; rerun to resume")
        if err is None and remaining > 0:
            err = f"the app finished without writing {remaining} run(s)"
        if err:
            last_err, last_retry = err, retry
            log(f"{target.name}: app, mask {spec}: {err}" + (f" ({got} finished run(s) kept)" if got else ""))
            if not retry:
                break
            attempt += 1
    if remaining > 0:
        if progress:
            progress(remaining)
        return f"{last_err}; {remaining} run(s) missing" + (" (rerun to resume)" if last_retry else "")
    return None


__all__ = ["ACTIVITY", "APP_TARGET", "PACKAGE", "AppTarget", "app_bundle_facts", "bench_app", "check_result",
           "default_app_dir", "schema_errors"]
