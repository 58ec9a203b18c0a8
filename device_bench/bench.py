"""first-bench orchestration: bundle checks, targets (local host or adb device), runs, resume, faults."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from firstkit.hashing import sha256_file
from firstkit.mask_spec import parse_mask_spec
from firstkit.runtime.bundle import (
    MANIFEST,
    TOKENIZER_DIR,
    BundleError,
    listed_files,
    load_tokenizer,
    manifest_sha256,
    one_line,
    read_manifest,
)

from .adb import Adb, AdbError, quote_cmd
from .build_runner import BuildError, RunnerPackage, build, host_target, target_for_abi
from .store import RECORD_SCHEMA, ResultStore, config_key, record_error

SIGNAMES = {getattr(signal, n): n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_")}
OWNER_FILE = "owner.json"  # in every device session folder: which first-bench (host, pid) it belongs to


def _pid_alive(pid: object) -> bool:
    """Whether process ``pid`` exists on this host."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _records_from_out(local: Path, rec0: dict, run_index: int, expected: list[int] | None,
                      run_id: str) -> tuple[list[dict], list[str]]:
    """Bench records from a runner's ``--out`` file, and why lines were refused (a torn last line is not).

    Each record gets ``run_id`` = ``<session>/<tag>#<line>``, so a run collected twice is stored once.
    """
    recs: list[dict] = []
    bad: list[str] = []
    lines = local.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            res = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn line of a run that did not finish
        match = None if expected is None or not isinstance(res, dict) else (res.get("tokens") == expected)
        rec = {**rec0, "run_index": run_index + len(recs), "result": res, "tokens_match": match,
               "run_id": f"{run_id}#{i}", "time": _now()}
        why = record_error(rec)
        if why:
            bad.append(f"malformed result from the runner (line {i + 1}: {why}); not stored")
            continue
        recs.append(rec)
    return recs, bad


class BenchError(RuntimeError):
    """A clear, one-line failure (bad bundle, device gone, runner crash...)."""


class BenchInterrupted(BenchError):
    """SIGINT/SIGTERM: the current runner was killed, finished runs are stored, nothing else starts."""


# ----------------------------------------------------------------------------------------------- bundle
@dataclass
class Bundle:
    path: Path
    manifest: dict
    sha256: str                 # sha256 of manifest.json: the bundle's identity
    files: list[str]            # relative paths the native runner needs (pushed to devices), all listed
    pte: str
    num_layers: int | None
    protected: list[int] = field(default_factory=list)
    tokenizer: object | None = None  # the bundle's tokenizer (listed files only), None without one

    def hashes(self) -> dict[str, str]:
        """sha256 each pushed file must have: the manifest's, and the manifest's own identity."""
        listed = self.manifest["files"]
        return {r: (self.sha256 if r == MANIFEST else listed[r]["sha256"]) for r in self.files}


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Check a bundle before anything is pushed: the manifest's schema, and every listed file's size and sha256.

    The checks are ``firstkit.runtime.bundle.read_manifest``'s (the same as ``first-run``'s: every listed file
    a regular file inside the bundle with its size and sha256); the native runner needs the ExecuTorch program,
    so a bundle without one is refused too. Only listed files are ever pushed: the manifest, the program and
    the listed ``tokenizer/`` files (which must load as a tokenizer).
    """
    p = Path(path)
    try:
        manifest = read_manifest(p, check_hashes=True)
        tokenizer = load_tokenizer(p, manifest)
    except BundleError as e:
        raise BenchError(str(e)) from None
    ex = manifest["backends"].get("executorch")
    if ex is None:
        raise BenchError(f"bundle {p} has no ExecuTorch program (backends: {', '.join(manifest['backends'])}); "
                         "export it with --backend executorch")
    pte = ex["file"]
    files = [MANIFEST, pte, *listed_files(manifest, TOKENIZER_DIR + "/")]
    protected = [int(i) for i in manifest["routing"]["protected_layers"]]
    return Bundle(p.resolve(), manifest, manifest_sha256(p), files, pte, int(manifest["model"]["num_layers"]),
                  protected, tokenizer)


# ----------------------------------------------------------------------------------------------- prompts
DEFAULT_PROMPT_TEXT = (
    "The history of computing is a story of ever smaller machines doing ever larger jobs. Early "
    "computers filled rooms and were programmed with switches and punched cards; today a phone in a "
    "pocket runs language models that answer questions, summarize articles and translate between "
    "languages. Running such models on the device keeps data private and works without a network, but "
    "phones have little memory and a tight power budget, so every layer that can be skipped matters. ")


def make_prompt(bundle: Bundle, length: int, vocab_size: int, bos_id: int, text: str | None = None) -> list[int]:
    """``length`` token ids: the bundle's tokenizer on a fixed English text (repeated), else fixed ids."""
    ids: list[int] = []
    if bundle.tokenizer is not None:
        try:
            base = bundle.tokenizer.encode(text or DEFAULT_PROMPT_TEXT, add_special_tokens=False)
        except Exception as e:  # noqa: BLE001 - load_bundle checked it loads; the text may still fail
            raise BenchError(f"the bundle's tokenizer cannot encode the prompt text ({one_line(e, 160)})") from None
        if vocab_size > 0 and any(not 0 <= t < vocab_size for t in base):
            raise BenchError(f"the bundle's tokenizer produced token ids outside the vocabulary ({vocab_size})")
        if base:
            ids = [bos_id] if bos_id >= 0 else []
            while len(ids) < length:
                ids += base
    if not ids:
        lo = 3 if vocab_size > 16 else 0
        ids = ([bos_id] if 0 <= bos_id < vocab_size else []) + [
            lo + (i * 7919 + 13) % max(1, vocab_size - lo) for i in range(length)]
    return [int(x) for x in ids[:length]]


# ----------------------------------------------------------------------------------------------- targets
@dataclass
class RunOutcome:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


class Target:
    """Where the runner runs: the host (``--local``) or an adb device."""

    name: str = "?"
    model: str = ""
    runner_target: str = ""
    emulated: bool = False

    def probe(self) -> None: ...
    def prepare(self, bundle: Bundle, pkg: RunnerPackage, log: Callable[[str], None]) -> tuple[str, str]: ...
    def session_dir(self) -> str: ...
    def write_text(self, remote: str, text: str) -> None: ...
    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> RunOutcome: ...
    def fetch(self, remote: str, local: Path) -> bool: ...
    def kill(self, pidfile: str) -> None: ...
    def recover(self) -> bool:
        return False
    def online(self) -> bool:
        return True
    def cleanup(self, purge: bool) -> None: ...
    def abort(self) -> None:
        """Kill the runner that is running now, if any (called from another thread on SIGINT/SIGTERM)."""
    def remove(self, paths: list[str]) -> None:
        """Delete files of this session (best effort)."""
    def collect_orphans(self, store: ResultStore, log: Callable[[str], None]) -> int:
        """Store the finished runs an earlier, lost session left behind, then remove it; returns runs stored."""
        return 0


class LocalTarget(Target):
    """The runner on this host (an edge board running firstkit itself)."""

    def __init__(self) -> None:
        import platform

        self.name = "local"
        self.model = platform.node() or "host"
        self.runner_target = host_target()
        self._session: str | None = None

    def probe(self) -> None:
        pass

    def prepare(self, bundle: Bundle, pkg: RunnerPackage, log: Callable[[str], None]) -> tuple[str, str]:
        return str(bundle.path), str(pkg.path)

    def session_dir(self) -> str:
        if self._session is None:
            self._session = tempfile.mkdtemp(prefix="firstkit-bench-")
        return self._session

    def write_text(self, remote: str, text: str) -> None:
        Path(remote).write_text(text)

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> RunOutcome:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                env={**os.environ, **env}, start_new_session=True, stdin=subprocess.DEVNULL)
        self._proc = proc
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return RunOutcome(-9, out, err, timed_out=True)
        finally:
            self._proc = None
        rc = proc.returncode
        return RunOutcome(128 - rc if rc < 0 else rc, out, err)

    def abort(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the terminal's Ctrl-C never reached it
            except ProcessLookupError:
                pass

    def fetch(self, remote: str, local: Path) -> bool:
        if not os.path.exists(remote):
            return False
        shutil.copyfile(remote, local)
        return True

    def kill(self, pidfile: str) -> None:
        pass  # the process group was killed in run()

    def remove(self, paths: list[str]) -> None:
        for path in paths:
            try:
                os.remove(path)
            except OSError:
                pass

    def cleanup(self, purge: bool) -> None:
        if self._session:
            shutil.rmtree(self._session, ignore_errors=True)
            self._session = None


class AdbTarget(Target):
    """A device reached with the real adb client."""

    def __init__(self, adb: Adb, serial: str, device_dir: str | None = None, runner_dir: str | None = None,
                 reconnect_s: float = 20.0) -> None:
        self.adb = adb.for_device(serial)
        self.name = serial
        self.base = device_dir
        self.reconnect_s = reconnect_s
        self.session = f"session-{uuid.uuid4().hex[:12]}"
        self._prepared: list[str] = []  # the bundle and runner folders this session uses (--purge removes them)
        self._running_pidfile: str | None = None

    def probe(self) -> None:
        if self.adb.state() != "device":
            self.adb.connect(self.name)
            if self.adb.state() != "device":
                raise BenchError(f"device {self.name} is not online (adb get-state: {self.adb.state()})")
        script = ('echo "tmp=${TMPDIR:-/tmp}"; echo "machine=$(uname -m 2>/dev/null)"; '
                  'echo "abi=$(getprop ro.product.cpu.abi 2>/dev/null)"; '
                  'echo "sdk=$(getprop ro.build.version.sdk 2>/dev/null)"; '
                  'echo "model=$(getprop ro.product.model 2>/dev/null)"; '
                  'echo "wrapper=${FIRSTKIT_RUNNER_WRAPPER:-}"; echo "cpus=$(nproc 2>/dev/null)"')
        r = self.adb.shell(script, timeout=30)
        props = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        self.props = props
        android = bool(props.get("sdk"))
        abi = props.get("abi") if android else props.get("machine")
        if not abi:
            raise BenchError(f"device {self.name}: cannot read its ABI (uname -m / getprop ro.product.cpu.abi)")
        self.runner_target = target_for_abi(abi, android)
        self.emulated = "qemu" in props.get("wrapper", "")
        self.model = props.get("model") or next((d.get("model", "") for d in self._devices()
                                                 if d["serial"] == self.name), "")
        if self.base is None:
            self.base = ("/data/local/tmp" if android else props.get("tmp") or "/tmp").rstrip("/") + "/firstkit"

    def _devices(self) -> list[dict]:
        try:
            return self.adb.devices()
        except AdbError:
            return []

    @property
    def _session(self) -> str:
        return f"{self.base}/{self.session}"

    def session_dir(self) -> str:
        return self._session

    def _remote_hashes(self, paths: list[str]) -> dict[str, str]:
        if not paths:
            return {}
        r = self.adb.shell(f"sha256sum {quote_cmd(paths)} 2>/dev/null", timeout=300)
        out = {}
        for line in r.stdout.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and len(parts[0]) == 64:
                out[parts[1].lstrip("*").strip()] = parts[0]
        return out

    def _sync(self, local_root: Path, rel: list[str], remote_root: str, log: Callable[[str], None],
              expected: dict[str, str] | None = None) -> int:
        """Push the files whose sha256 differs on the device; verify after pushing. Returns files pushed.

        ``expected``: the sha256 each file must have (the bundle's manifest); a local file that no longer has
        it (changed since the bundle was checked) is refused, never pushed.
        """
        want = {f"{remote_root}/{r}": (expected or {}).get(r) or sha256_file(local_root / r) for r in rel}
        have = self._remote_hashes(list(want))
        todo = [(r, f"{remote_root}/{r}") for r in rel if have.get(f"{remote_root}/{r}") != want[f"{remote_root}/{r}"]]
        for r, remote in todo:
            if expected is not None and sha256_file(local_root / r) != want[remote]:
                raise BenchError(f"{local_root}: {r} changed since the bundle was checked (sha256 differs from the "
                                 "manifest); not pushed")
            log(f"push {r}")
            self.adb.push(str(local_root / r), remote)
        if todo:
            got = self._remote_hashes([remote for _, remote in todo])
            bad = [r for r, remote in todo if got.get(remote) != want[remote]]
            if bad:
                raise BenchError(f"device {self.name}: sha256 mismatch after push for {', '.join(bad)}")
        return len(todo)

    def prepare(self, bundle: Bundle, pkg: RunnerPackage, log: Callable[[str], None]) -> tuple[str, str]:
        rbundle = f"{self.base}/bundles/{bundle.sha256[:16]}"
        rrunner = f"{self.base}/runners/{pkg.path.name}"
        self._prepared = [rbundle, rrunner]
        self.adb.shell(["mkdir", "-p", self._session, rbundle, rrunner], timeout=30, check=True)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.write_text(f"{self._session}/{OWNER_FILE}", json.dumps(owner))
        for local_root, rel, remote_root, expected in ((pkg.path, [str(f) for f in pkg.files()], rrunner, None),
                                                       (bundle.path, bundle.files, rbundle, bundle.hashes())):
            try:
                n = self._sync(local_root, rel, remote_root, log, expected)
            except AdbError as e:
                # never leave a half-pushed folder behind: it would look cached next time
                try:
                    self.adb.shell(["rm", "-rf", remote_root, self._session], timeout=60)
                except AdbError:
                    pass
                hint = " (device storage full: free space or run with --purge)" if "space" in str(e).lower() else ""
                raise BenchError(f"device {self.name}: {e}{hint}; device folder cleaned") from e
            log(f"{remote_root}: {n} file(s) pushed, {len(rel) - n} unchanged")
        self.adb.shell(["chmod", "755", f"{rrunner}/run.sh", f"{rrunner}/first_runner"], timeout=30, check=True)
        return rbundle, rrunner

    def write_text(self, remote: str, text: str) -> None:
        with tempfile.NamedTemporaryFile("w", delete=False, suffix=".txt") as f:
            f.write(text)
        try:
            self.adb.push(f.name, remote)
        finally:
            os.unlink(f.name)

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> RunOutcome:
        cmd = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + quote_cmd(argv)
        self._running_pidfile = env.get("FIRSTKIT_PIDFILE")
        try:
            r = self.adb.shell(cmd, timeout=timeout)
        except AdbError as e:
            if e.kind == "timeout":
                return RunOutcome(-9, "", str(e), timed_out=True)
            raise
        finally:
            self._running_pidfile = None
        return RunOutcome(r.returncode, r.stdout, r.stderr)

    def abort(self) -> None:
        pidfile = self._running_pidfile
        if pidfile:
            self.kill(pidfile)

    def fetch(self, remote: str, local: Path) -> bool:
        r = self.adb.shell(f"test -f {shlex.quote(remote)}", timeout=30)
        if r.returncode != 0:
            return False
        self.adb.pull(remote, str(local))
        return True

    def kill(self, pidfile: str) -> None:
        q = shlex.quote(pidfile)
        try:
            self.adb.shell(f'test -f {q} && kill -9 "$(cat {q})" 2>/dev/null; true', timeout=30)
        except AdbError:
            pass

    def remove(self, paths: list[str]) -> None:
        try:
            self.adb.shell(["rm", "-f", *paths], timeout=30)
        except AdbError:
            pass  # the records carry run_id: a file collected again is not stored twice

    def recover(self) -> bool:
        return self.adb.wait_online(self.reconnect_s)

    def online(self) -> bool:
        if self.adb.state() != "device":
            return False
        try:
            return self.adb.shell(["true"], timeout=15).returncode == 0
        except AdbError:
            return False

    def cleanup(self, purge: bool) -> None:
        """Remove this session's folder; with ``purge`` also the bundle and runner folders it used, and the
        ``bundles``/``runners``/device folder when that leaves them empty (never anything else there)."""
        paths = [self._session, *(self._prepared if purge else [])]
        try:
            self.adb.shell(["rm", "-rf", *paths], timeout=60, check=True)
            if purge and self.base:
                parents = [f"{self.base}/bundles", f"{self.base}/runners", self.base]
                self.adb.shell(f"rmdir {quote_cmd(parents)} 2>/dev/null; true", timeout=60)
        except AdbError as e:
            raise BenchError(f"device {self.name}: could not clean {paths[0]}: {e}") from e

    def collect_orphans(self, store: ResultStore, log: Callable[[str], None]) -> int:
        """Finished runs of earlier sessions whose first-bench is gone (device lost, process killed): every
        ``out-*.jsonl`` with its ``.meta.json`` is stored (runs already in the store, by ``run_id``, are not
        stored twice), then the session folder is removed. Sessions of a live first-bench on this host, or of
        another host, are left alone."""
        if not self.base:
            return 0
        q = shlex.quote(self.base)
        script = (f'for d in {q}/session-*/; do [ -d "$d" ] || continue; echo "DIR $d"; '
                  f'if [ -f "${{d}}{OWNER_FILE}" ]; then echo "OWNER $(cat "${{d}}{OWNER_FILE}")"; fi; '
                  'for f in "$d"out-*.jsonl; do [ -f "$f" ] && echo "OUT $f"; done; done; true')
        r = self.adb.shell(script, timeout=60)
        sessions: dict[str, dict] = {}
        cur = None
        for line in r.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "DIR":
                cur = rest.rstrip("/")
                sessions[cur] = {"owner": None, "outs": []}
            elif cur is not None and kind == "OWNER":
                try:
                    sessions[cur]["owner"] = json.loads(rest)
                except json.JSONDecodeError:
                    pass
            elif cur is not None and kind == "OUT":
                sessions[cur]["outs"].append(rest)
        stored = 0
        host = socket.gethostname()
        for sdir, info in sessions.items():
            if sdir == self._session:
                continue
            owner = info["owner"] if isinstance(info["owner"], dict) else {}
            if owner.get("host") not in (None, host):
                continue  # another host's first-bench may still be running there
            if owner.get("host") == host and _pid_alive(owner.get("pid")):
                continue  # a live first-bench on this host
            n = self._collect_session(sdir, info["outs"], store)
            stored += n
            self.adb.shell(["rm", "-rf", sdir], timeout=60)
            log(f"{self.name}: earlier session {sdir.rsplit('/', 1)[-1]} (its first-bench is gone): "
                f"{n} finished run(s) stored, folder removed")
        return stored

    def _collect_session(self, sdir: str, outs: list[str], store: ResultStore) -> int:
        have = {r.get("run_id") for r in store.records()}
        recs: list[dict] = []
        with tempfile.TemporaryDirectory() as td:
            for i, remote in enumerate(outs):
                meta_remote = remote.removesuffix(".jsonl") + ".meta.json"
                lo, lm = Path(td) / f"{i}.jsonl", Path(td) / f"{i}.meta.json"
                if not (self.fetch(meta_remote, lm) and self.fetch(remote, lo)):
                    continue  # no description of what ran: nothing to store it under
                try:
                    meta = json.loads(lm.read_text())
                    rec0, base_index = dict(meta["record"]), int(meta["run_index"])
                except (ValueError, KeyError, TypeError):
                    continue
                got, _ = _records_from_out(lo, rec0, base_index, meta.get("expected"), str(meta.get("run_id", remote)))
                done = store.counts().get(config_key(rec0), 0) + sum(config_key(r) == config_key(rec0) for r in recs)
                for rec in got:
                    if rec["run_id"] not in have:
                        rec["run_index"] = done
                        done += 1
                        recs.append(rec)
        return store.append(recs)


# ----------------------------------------------------------------------------------------------- bench
@dataclass
class Settings:
    runs: int = 3
    warmup: int = 1
    masks: list[str] = field(default_factory=lambda: ["all", "auto"])
    prompt_lengths: list[int] = field(default_factory=lambda: [32])
    threads: list[int] = field(default_factory=lambda: [2])
    max_new_tokens: int = 32
    timeout: float = 600.0
    retries: int = 1
    profile: bool = False
    reference: bool = True
    purge: bool = False
    prompt_text: str | None = None
    runner_dir: str | None = None
    cache_dir: str | None = None
    profile_dir: str | None = None
    stop: threading.Event | None = None  # set on SIGINT/SIGTERM: finish nothing new, keep what finished


def check_stop(s: Settings) -> None:
    """Raise ``BenchInterrupted`` once a stop was requested."""
    if s.stop is not None and s.stop.is_set():
        raise BenchInterrupted("interrupted: no further runs started; finished runs are stored, rerun to resume")


@dataclass
class TargetReport:
    name: str
    errors: list[str] = field(default_factory=list)
    new_runs: int = 0
    skipped_configs: int = 0
    profiles: list[dict] = field(default_factory=list)
    emulated: bool = False
    interrupted: bool = False


def _describe_failure(o: RunOutcome, timeout: float) -> str:
    if o.timed_out:
        return f"runner timed out after {timeout:.0f} s (hung?) and was killed"
    if o.returncode >= 128:
        sig = o.returncode - 128
        return f"runner crashed ({SIGNAMES.get(sig, 'signal')} {sig})"
    msg = [ln for ln in o.stderr.splitlines() if "first_runner: error" in ln or "error" in ln.lower()]
    return (msg[-1].strip() if msg else f"runner failed with exit status {o.returncode}")


class References:
    """Host-side reference tokens, computed once per (prompt, length, mask): ``first-run``'s runtime
    (``firstkit.runtime.BundleRunner``, ExecuTorch backend) on the same bundle."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._ref = None
        self._cache: dict[tuple, list[int]] = {}
        self._lock = threading.Lock()
        self.error: str | None = None

    def tokens(self, prompt: list[int], max_new: int, override: list[int] | None) -> list[int] | None:
        key = (tuple(prompt), max_new, tuple(override) if override is not None else None)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            if self.error:
                return None
            try:
                if self._ref is None:
                    from firstkit.runtime import load_bundle

                    self._ref = load_bundle(self.bundle.path, backend="executorch")
                mask = "auto" if override is None else "".join(map(str, override))
                toks = self._ref.generate(prompt, max_new, mask=mask, stop_at_eos=False)["tokens"]
            except Exception as e:  # noqa: BLE001 - reported, not fatal: tokens_match becomes null
                self.error = f"reference run failed: {e}"
                return None
            self._cache[key] = toks
            return toks


def check_masks(masks: list[str], n_layers: int, protected: list[int]) -> None:
    """Every mask spec must be valid for this bundle (one bit per layer, protected layers running)."""
    for m in masks:
        try:
            parse_mask_spec(m, n_layers, protected)
        except ValueError as e:
            raise BenchError(f"--masks {m}: {e}") from None


def check_prompt_fits(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Prompt + generated tokens must fit the bundle's static KV cache."""
    if prompt_len + max_new_tokens - 1 > max_seq_len:
        raise BenchError(f"prompt length {prompt_len} + {max_new_tokens} new tokens exceeds the bundle's "
                         f"max_seq_len {max_seq_len}")


def remaining_runs(s: Settings, rec0: dict, done: dict, rep: TargetReport,
                   progress: Callable[[int], None] | None) -> int:
    """Runs still missing from the store for configuration ``rec0``; a complete one is counted as skipped."""
    remaining = s.runs - done.get(config_key(rec0), 0)
    if remaining <= 0:
        rep.skipped_configs += 1
        if progress:
            progress(s.runs)
    return remaining


def mask_override(spec: str, n_layers: int) -> list[int] | None:
    """Override vector of a mask spec for a reference run; ``None`` for ``auto`` (the routers decide)."""
    return None if spec == "auto" else parse_mask_spec(spec, n_layers)


def bench_target(target: Target, bundle: Bundle, s: Settings, store: ResultStore, refs: References | None,
                 log: Callable[[str], None], progress: Callable[[int], None] | None = None) -> TargetReport:
    """Run every configuration that is not complete in the store on one target."""
    rep = TargetReport(target.name)
    try:
        target.probe()
        rep.emulated = target.emulated
        if s.runner_dir:
            rd = Path(s.runner_dir)
            if not (rd / "run.sh").is_file() or not (rd / "first_runner").is_file():
                raise BenchError(f"--runner-dir {rd} has no run.sh + first_runner (see first-build-runner)")
            pkg = RunnerPackage(rd.resolve(), target.runner_target, "custom", True, 0.0)
        else:
            pkg = build(target.runner_target, s.cache_dir)
        rbundle, rrunner = target.prepare(bundle, pkg, log)
        sess = target.session_dir()
        launcher = f"{rrunner}/run.sh"
        check_stop(s)
        info_run = target.run([launcher, "--bundle", rbundle, "--info", "--no-verify"], {}, min(s.timeout, 300))
        if info_run.returncode != 0:
            raise BenchError(f"runner cannot open the bundle: {_describe_failure(info_run, s.timeout)}")
        try:
            info = json.loads((info_run.stdout.strip().splitlines() or [""])[-1])
            n_layers = int(info["num_layers"])
            int(info["max_seq_len"]), int(info["vocab_size"]), int(info["bos_id"])
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"runner --info printed no bundle facts: {info_run.stdout.strip()[-200:]!r}") from None
        if info.get("bundle_sha256") != bundle.sha256:
            raise BenchError("bundle on the device differs from the host's (manifest sha256)")
        check_masks(s.masks, n_layers, bundle.protected)
        target.collect_orphans(store, log)
        done = store.counts()
        base_rec = {"schema": RECORD_SCHEMA, "device": target.name, "device_model": target.model,
                    "target": target.runner_target, "emulated": target.emulated, "bundle_sha256": bundle.sha256,
                    "runner_key": pkg.key, "max_new_tokens": s.max_new_tokens, "warmup": s.warmup}
        for plen in s.prompt_lengths:
            check_prompt_fits(plen, s.max_new_tokens, int(info["max_seq_len"]))
            prompt = make_prompt(bundle, plen, int(info["vocab_size"]), int(info["bos_id"]), s.prompt_text)
            pfile = f"{sess}/prompt-{plen}.txt"
            target.write_text(pfile, ",".join(map(str, prompt)))
            for th in s.threads:
                for spec in s.masks:
                    check_stop(s)
                    rec0 = {**base_rec, "mask_spec": spec, "prompt_len": plen, "threads": th}
                    remaining = remaining_runs(s, rec0, done, rep, progress)
                    if remaining <= 0:
                        continue
                    expected = None
                    if refs is not None:
                        expected = refs.tokens(prompt, s.max_new_tokens, mask_override(spec, n_layers))
                    err = _run_config(target, s, store, rec0, spec, th, pfile, rbundle, launcher, remaining,
                                      expected, rep, log, progress)
                    if err:
                        rep.errors.append(f"{target.name}: mask {spec}, pp {plen}, {th} threads: {err}")
            if s.profile:
                th = s.threads[0]
                for spec in s.masks:
                    check_stop(s)
                    rep.profiles.append(_profile(target, s, spec, th, plen, pfile, rbundle, launcher, log))
                s = Settings(**{**s.__dict__, "profile": False})  # profile the first prompt length only
    except (BenchError, BuildError, AdbError) as e:
        rep.interrupted = isinstance(e, BenchInterrupted)
        msg = str(e)
        rep.errors.append(msg if msg.startswith(target.name) else f"{target.name}: {msg}")
    finally:
        try:
            target.cleanup(s.purge)
        except (BenchError, AdbError) as e:
            rep.errors.append(str(e))
    return rep


def _run_config(target: Target, s: Settings, store: ResultStore, rec0: dict, spec: str, threads: int, pfile: str,
                rbundle: str, launcher: str, remaining: int, expected: list[int] | None, rep: TargetReport,
                log: Callable[[str], None], progress: Callable[[int], None] | None) -> str | None:
    """Measured runs of one configuration, with retries; every finished run is stored. Error text or None."""
    sess = target.session_dir()
    attempt, last_err = 0, None
    run_index = s.runs - remaining
    while remaining > 0 and attempt <= s.retries:
        check_stop(s)
        tag = f"{spec}-{rec0['prompt_len']}-{threads}-{attempt}-{uuid.uuid4().hex[:6]}"
        out, pid = f"{sess}/out-{tag}.jsonl", f"{sess}/pid-{tag}"
        meta = out.removesuffix(".jsonl") + ".meta.json"
        run_id = f"{sess.rstrip('/').rsplit('/', 1)[-1]}/{tag}"
        argv = [launcher, "--bundle", rbundle, "--prompt-ids-file", pfile, "--max-new-tokens", str(s.max_new_tokens),
                "--threads", str(threads), "--mask", spec, "--warmup", str(s.warmup if attempt == 0 else 0),
                "--runs", str(remaining), "--ignore-eos", "--no-verify", "--out", out]
        # what this run is, next to its results: a later first-bench stores them if this one is lost
        target.write_text(meta, json.dumps({"record": rec0, "run_index": run_index, "expected": expected,
                                            "run_id": run_id}))
        err = None
        disconnected = False
        interrupted = False
        try:
            o = target.run(argv, {"FIRSTKIT_PIDFILE": pid}, s.timeout)
            interrupted = s.stop is not None and s.stop.is_set()
            if interrupted:
                err = "interrupted"
                target.kill(pid)
            elif o.returncode != 0:
                err = _describe_failure(o, s.timeout)
                if o.timed_out:
                    target.kill(pid)
            n_lines = sum(1 for ln in o.stdout.splitlines() if ln.startswith("{"))
            # adb reports exit status 0 with truncated output when the transport drops: ask the device
            if not interrupted and (o.returncode != 0 or n_lines < remaining) and not target.online():
                disconnected = True
        except AdbError as e:
            if e.kind not in ("offline", "timeout"):
                raise
            disconnected = True
        if disconnected:
            err = "device disconnected during the run"
            log(f"{target.name}: {err}; reconnecting")
            if not target.recover():
                raise BenchError(f"{target.name}: device disconnected during the run and did not come back; "
                                 "finished runs stay on the device until the next run, rerun to resume")
            log(f"{target.name}: reconnected, resuming")
        # collect every run that finished, even after a failure
        got = 0
        with tempfile.TemporaryDirectory() as td:
            local = Path(td) / "out.jsonl"
            try:
                present = target.fetch(out, local)
            except AdbError as e:
                if not target.recover():
                    raise BenchError(f"{target.name}: cannot pull results ({e}); rerun to resume") from e
                present = target.fetch(out, local)
            if present:
                recs, bad = _records_from_out(local, rec0, run_index, expected, run_id)
                got = store.append(recs)
                if bad and err is None:
                    err = bad[0]
        target.remove([out, meta])  # stored (or nothing to store): a later session must not collect it again
        rep.new_runs += got
        remaining -= got
        run_index += got
        if progress and got:
            progress(got)
        if err is None and remaining > 0:
            err = f"runner exited without finishing {remaining} run(s)"
        if interrupted:
            raise BenchInterrupted(f"{target.name}: interrupted during mask {spec}, pp {rec0['prompt_len']}, "
                                   f"{threads} threads: the runner was killed, {got} finished run(s) of it stored; "
                                   "rerun to resume")
        if err:
            last_err = err
            log(f"{target.name}: mask {spec}: {err}" + (f" ({got} finished run(s) kept)" if got else ""))
            attempt += 1
    if remaining > 0:
        if progress:
            progress(remaining)
        return f"{last_err}; {remaining} run(s) missing (rerun to resume)"
    return None


def _profile(target: Target, s: Settings, spec: str, threads: int, plen: int, pfile: str, rbundle: str,
             launcher: str, log: Callable[[str], None]) -> dict:
    """One ETDump-recorded run, pulled back and summarized per method."""
    from .profile import summarize_etdump

    sess = target.session_dir()
    remote = f"{sess}/profile-{spec}-{plen}-{threads}.etdp"
    argv = [launcher, "--bundle", rbundle, "--prompt-ids-file", pfile, "--max-new-tokens", str(s.max_new_tokens),
            "--threads", str(threads), "--mask", spec, "--runs", "1", "--ignore-eos", "--no-verify",
            "--etdump", remote]
    o = target.run(argv, {}, s.timeout)
    entry = {"device": target.name, "mask_spec": spec, "prompt_len": plen, "threads": threads,
             "emulated": target.emulated}
    if o.returncode != 0:
        entry["error"] = _describe_failure(o, s.timeout)
        return entry
    pdir = Path(s.profile_dir or tempfile.mkdtemp(prefix="firstkit-profile-"))
    pdir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in target.name)
    local = pdir / f"profile_{safe}_{spec}_{plen}_{threads}.etdp"
    if not target.fetch(remote, local):
        entry["error"] = "ETDump file not produced"
        return entry
    entry["etdump"] = str(local)
    entry["summary"] = summarize_etdump(str(local))
    log(f"{target.name}: profiled mask {spec} -> {local}")
    return entry
