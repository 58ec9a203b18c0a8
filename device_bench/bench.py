"""first-bench: the settings, the configurations they expand into, the ``Target`` interface and the one loop.

Shaped like llama.cpp's ``llama-bench``:

* :class:`Settings` (built once, by the CLI, from its options) expands into a list of :class:`Config` — every
  combination of prompt length x threads x mask, each carrying every setting of one measured configuration;
* :func:`bench_target` is the one loop: for one :class:`Target` it checks the settings against the bundle,
  prepares the target, stores the runs an earlier lost session finished, then runs every configuration the store
  does not hold completely yet (resume), with warm-ups, retries, the reference-token check, the store and the
  progress bar; :func:`bench_targets` runs it on several targets in parallel;
* a :class:`Target` is where runs happen: :class:`LocalTarget` and :class:`AdbTarget` run the native runner
  (:class:`RunnerTarget`), ``app_target.AppTarget`` drives the Android demo app. A target prepares itself
  (device facts, verified pushes), runs one configuration (one invocation: warm-ups + runs, then the raw result
  lines it finished), discards a stored attempt's files, profiles, aborts and closes.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
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
from .store import RECORD_SCHEMA, ResultStore, check_result, config_key, record_error

SIGNAMES = {getattr(signal, n): n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_")}
OWNER_FILE = "owner.json"  # in every device session folder: which first-bench (host, pid) it belongs to

Log = Callable[[str], None]


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
    num_layers: int
    protected: list[int] = field(default_factory=list)
    tokenizer: object | None = None  # the bundle's tokenizer (listed files only), None without one

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

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


def mask_override(spec: str, n_layers: int) -> list[int] | None:
    """Override vector of a mask spec for a reference run; ``None`` for ``auto`` (the routers decide)."""
    return None if spec == "auto" else parse_mask_spec(spec, n_layers)


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Config:
    """One configuration (llama-bench's test instance): every setting of one measured table row."""

    mask: str
    prompt_len: int
    threads: int
    max_new_tokens: int
    warmup: int
    runs: int

    def record(self) -> dict:
        """This configuration's fields in a bench record (``mask_spec`` ... ``warmup``)."""
        return {"mask_spec": self.mask, "prompt_len": self.prompt_len, "threads": self.threads,
                "max_new_tokens": self.max_new_tokens, "warmup": self.warmup}

    def describe(self) -> str:
        return f"mask {self.mask}, pp {self.prompt_len}, {self.threads} threads"


@dataclass
class Settings:
    """Every benchmark setting, built in one place (``cli.invocation``) from the command line."""

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

    def configs(self) -> list[Config]:
        """Every configuration, in run order: prompt length, then threads, then mask."""
        return [Config(mask, plen, th, self.max_new_tokens, self.warmup, self.runs)
                for plen, th, mask in itertools.product(self.prompt_lengths, self.threads, self.masks)]

    def profile_configs(self) -> list[Config]:
        """With ``profile``: one ETDump-recorded run per mask, at the first prompt length and thread count."""
        if not self.profile:
            return []
        return [Config(mask, self.prompt_lengths[0], self.threads[0], self.max_new_tokens, 0, 1)
                for mask in self.masks]

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


def check_stop(s: Settings) -> None:
    """Raise ``BenchInterrupted`` once a stop was requested."""
    if s.stopped():
        raise BenchInterrupted("interrupted: no further runs started; finished runs are stored, rerun to resume")


# ----------------------------------------------------------------------------------------------- target interface
@dataclass
class Facts:
    """What a prepared target runs: the program's constants as it sees them, and the extra fields of its records."""

    num_layers: int
    max_seq_len: int
    vocab_size: int
    bos_id: int
    record: dict = field(default_factory=dict)  # e.g. runner_key; app_package and device_abi for the app


@dataclass
class Job:
    """One invocation of a configuration: ``warmup`` warm-ups (first attempt only), then ``runs`` measured runs."""

    cfg: Config
    prompt: list[int]
    warmup: int
    runs: int
    attempt: int
    meta: dict  # what this invocation is (record, run_index, expected): kept next to its results on a device


@dataclass
class Attempt:
    """What one invocation left: the raw run-result lines it finished (one per measured run) and how it ended."""

    lines: list[str]
    complete: bool               # it ended normally: a last line that is not JSON is malformed, not torn
    error: str | None = None     # why it failed (crash, hang, disconnect, the app's message), None when it did not
    retry: bool = True           # whether running the missing runs again can help
    interrupted: bool = False    # stopped by SIGINT/SIGTERM
    run_id: str | None = None    # records get run_id <run_id>#<line>: runs collected twice are stored once
    reported_runs: int | None = None  # how many runs the invocation says it wrote (the app's status file)
    files: list[str] = field(default_factory=list)  # its result files on the target (removed once stored)


@dataclass
class Orphan:
    """Results an earlier, lost session (its first-bench is gone) left on a target."""

    name: str
    results: list[tuple[dict, list[str]]]  # (meta written with the invocation, its result lines)
    discard: Callable[[], None]            # remove the session once its results are stored


class Target(ABC):
    """Where runs happen. :func:`bench_target` calls ``prepare``, ``orphans``, then per configuration ``run`` and
    ``discard`` (again for a retry), ``profile`` with ``--profile``, and always ``close``; ``abort`` comes from
    another thread on SIGINT/SIGTERM."""

    name: str = "?"
    model: str = ""
    runner_target: str = ""         # the records' "target"
    emulated: bool = False
    what: str = "runner"            # who writes the run results, in messages
    result_runner: str = "native"   # the run results' "runner"
    label: str = ""                 # put before a configuration in messages

    @abstractmethod
    def prepare(self, bundle: Bundle, s: Settings, log: Log) -> Facts:
        """Check the device, push what it lacks (only the manifest's files, verified by sha256), return its facts."""

    @abstractmethod
    def orphans(self, log: Log) -> list[Orphan]:
        """Finished runs that earlier, lost sessions left on this target (stored, then discarded, by the loop)."""

    @abstractmethod
    def run(self, job: Job, s: Settings, log: Log) -> Attempt:
        """Run one invocation of ``job`` (within ``s.timeout``, stopping on ``s.stop``) and collect its results."""

    @abstractmethod
    def discard(self, attempt: Attempt) -> None:
        """Remove an attempt's result files once its runs are stored (a later session must not collect them)."""

    @abstractmethod
    def profile(self, cfg: Config, prompt: list[int], s: Settings, log: Log) -> dict:
        """One ETDump-recorded run of ``cfg``, summarized per method."""

    @abstractmethod
    def abort(self) -> None:
        """Kill what runs now (called from another thread on SIGINT/SIGTERM)."""

    @abstractmethod
    def close(self, purge: bool) -> None:
        """Remove this session's files; with ``purge`` also the bundle (and runner) it pushed."""


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class TargetReport:
    name: str
    errors: list[str] = field(default_factory=list)
    new_runs: int = 0
    skipped_configs: int = 0
    profiles: list[dict] = field(default_factory=list)
    emulated: bool = False
    interrupted: bool = False


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


def make_record(rec0: dict, res: object, run_index: int, expected: list[int] | None, run_id: str | None) -> dict:
    """A bench record: the configuration's fields, one run result, whether its tokens equal the reference's."""
    match = None if expected is None or not isinstance(res, dict) else (res.get("tokens") == expected)
    rec = {**rec0, "run_index": run_index, "result": res, "tokens_match": match, "time": _now()}
    if run_id is not None:
        rec["run_id"] = run_id
    return rec


def bench_target(target: Target, bundle: Bundle, s: Settings, store: ResultStore, refs: References | None,
                 log: Log, progress: Callable[[int], None] | None = None) -> TargetReport:
    """Run every configuration that is not complete in the store on one target: the one benchmark loop."""
    rep = TargetReport(target.name)
    prog = progress or (lambda n: None)
    try:
        check_masks(s.masks, bundle.num_layers, bundle.protected)  # all before anything is pushed
        for plen in s.prompt_lengths:
            check_prompt_fits(plen, s.max_new_tokens, bundle.max_seq_len)
        check_stop(s)
        facts = target.prepare(bundle, s, log)
        rep.emulated = target.emulated
        check_masks(s.masks, facts.num_layers, bundle.protected)  # the program's own constants
        for plen in s.prompt_lengths:
            check_prompt_fits(plen, s.max_new_tokens, facts.max_seq_len)
        _store_orphans(target, store, log)
        done = store.counts()  # resume: a configuration with all its runs stored is skipped
        base = {"schema": RECORD_SCHEMA, "device": target.name, "device_model": target.model,
                "target": target.runner_target, "emulated": target.emulated, "bundle_sha256": bundle.sha256,
                **facts.record}
        prompts: dict[int, list[int]] = {}

        def prompt(plen: int) -> list[int]:
            if plen not in prompts:
                prompts[plen] = make_prompt(bundle, plen, facts.vocab_size, facts.bos_id, s.prompt_text)
            return prompts[plen]

        for cfg in s.configs():
            check_stop(s)
            rec0 = {**base, **cfg.record()}
            remaining = cfg.runs - done.get(config_key(rec0), 0)
            if remaining <= 0:
                rep.skipped_configs += 1
                prog(cfg.runs)
                continue
            ids = prompt(cfg.prompt_len)
            expected = None
            if refs is not None:
                expected = refs.tokens(ids, cfg.max_new_tokens, mask_override(cfg.mask, facts.num_layers))
            err = _run_config(target, s, store, cfg, rec0, ids, remaining, expected, facts.num_layers, rep, log, prog)
            if err:
                rep.errors.append(f"{target.name}: {target.label}{cfg.describe()}: {err}")
        for cfg in s.profile_configs():
            check_stop(s)
            rep.profiles.append(target.profile(cfg, prompt(cfg.prompt_len), s, log))
    except (BenchError, BuildError, AdbError) as e:
        rep.interrupted = isinstance(e, BenchInterrupted)
        msg = str(e)
        rep.errors.append(msg if msg.startswith(target.name) else f"{target.name}: {msg}")
    finally:
        try:
            target.close(s.purge)
        except (BenchError, AdbError) as e:
            rep.errors.append(str(e))
    return rep


def _run_config(target: Target, s: Settings, store: ResultStore, cfg: Config, rec0: dict, prompt: list[int],
                remaining: int, expected: list[int] | None, n_layers: int, rep: TargetReport, log: Log,
                progress: Callable[[int], None]) -> str | None:
    """Measured runs of one configuration, with retries; every finished run is stored. Error text or None."""
    attempt, last_err, retryable = 0, None, True
    run_index = cfg.runs - remaining
    while remaining > 0 and attempt <= s.retries:
        check_stop(s)
        job = Job(cfg, prompt, cfg.warmup if attempt == 0 else 0, remaining, attempt,
                  {"record": rec0, "run_index": run_index, "expected": expected})
        a = target.run(job, s, log)
        recs, malformed = _records(a, target, cfg, rec0, run_index, expected, n_layers)
        got = store.append(recs[:remaining])
        target.discard(a)  # stored (or nothing to store): a later session must not collect it again
        rep.new_runs += got
        remaining -= got
        run_index += got
        if got:
            progress(got)
        if a.interrupted:
            raise BenchInterrupted(f"{target.name}: interrupted during {target.label}{cfg.describe()}: "
                                   f"{a.error or 'stopped'}, {got} finished run(s) of it stored; rerun to resume")
        err, retry = (malformed, False) if malformed else (a.error, a.retry)
        if err is None and remaining > 0:
            err, retry = f"the {target.what} exited without finishing {remaining} run(s)", True
        if err:
            last_err, retryable = err, retry
            kept = f" ({got} finished run(s) kept)" if got else ""
            log(f"{target.name}: {target.label}mask {cfg.mask}: {err}{kept}")
            if not retry:
                break
            attempt += 1
    if remaining > 0:
        progress(remaining)
        return f"{last_err}; {remaining} run(s) missing" + (" (rerun to resume)" if retryable else "")
    return None


def _records(a: Attempt, target: Target, cfg: Config, rec0: dict, run_index: int, expected: list[int] | None,
             n_layers: int) -> tuple[list[dict], str | None]:
    """Bench records from an attempt's lines, each checked (schema, answers the request, record schema); on the
    first bad line none (``nothing stored``) and why. A torn last line of an invocation that was cut short is
    not a run."""
    recs: list[dict] = []
    bad = f"malformed result from the {target.what}"
    for i, line in enumerate(a.lines):
        if not line.strip():
            continue
        try:
            res = json.loads(line)
        except json.JSONDecodeError:
            if i == len(a.lines) - 1 and not a.complete:
                continue  # the line a killed runner or app was writing
            return [], f"{bad} (line {i + 1} is not JSON); nothing stored"
        why = check_result(res, runner=target.result_runner, bundle_sha256=rec0["bundle_sha256"],
                           prompt_len=cfg.prompt_len, max_new_tokens=cfg.max_new_tokens, n_layers=n_layers,
                           spec=cfg.mask, threads=cfg.threads)
        rec = make_record(rec0, res, run_index + len(recs), expected, f"{a.run_id}#{i}" if a.run_id else None)
        why = why or record_error(rec)  # what the store accepts on read (strict integers)
        if why:
            return [], f"{bad} (line {i + 1}): {why}; nothing stored"
        recs.append(rec)
    if a.reported_runs is not None and a.reported_runs != len(recs):
        return [], (f"{bad}: the status says {a.reported_runs} run(s), {len(recs)} line(s) were written; "
                    "nothing stored")
    return recs, None


def _store_orphans(target: Target, store: ResultStore, log: Log) -> int:
    """Store the runs earlier, lost sessions finished on the target (each run once: records carry ``run_id``),
    then remove those sessions."""
    stored = 0
    for orphan in target.orphans(log):
        have = {r.get("run_id") for r in store.records()}
        recs: list[dict] = []
        for meta, lines in orphan.results:
            try:
                rec0, base_index = dict(meta["record"]), int(meta["run_index"])
            except (ValueError, KeyError, TypeError):
                continue  # no description of what ran: nothing to store it under
            got = []
            for i, line in enumerate(lines):
                try:
                    res = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    continue  # torn line of a run that did not finish
                if res is None:
                    continue
                rec = make_record(rec0, res, base_index + len(got), meta.get("expected"), f"{meta['run_id']}#{i}")
                if record_error(rec) is None:
                    got.append(rec)
            done = store.counts().get(config_key(rec0), 0) + sum(config_key(r) == config_key(rec0) for r in recs)
            for rec in got:
                if rec["run_id"] not in have:
                    rec["run_index"] = done
                    done += 1
                    recs.append(rec)
        n = store.append(recs)
        stored += n
        orphan.discard()
        log(f"{target.name}: earlier session {orphan.name} (its first-bench is gone): {n} finished run(s) stored, "
            "folder removed")
    return stored


def bench_targets(targets: list[Target], bundle: Bundle, s: Settings, store: ResultStore, refs: References | None,
                  log: Log) -> list[TargetReport]:
    """:func:`bench_target` on every target in parallel, one progress bar each; on a stop request what runs now is
    aborted on every target."""
    from tqdm import tqdm

    total = len(s.configs()) * s.runs
    bars = [tqdm(total=total, desc=t.name, position=i, unit="run", file=sys.stderr, leave=False, disable=None)
            for i, t in enumerate(targets)]
    lock = threading.Lock()

    def work(i: int) -> TargetReport:
        def progress(n: int) -> None:
            with lock:
                bars[i].update(n)
        return bench_target(targets[i], bundle, s, store, refs, log, progress)

    try:
        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            futures = [pool.submit(work, i) for i in range(len(targets))]
            while wait(futures, timeout=0.5).not_done:
                if s.stopped():  # kill what runs now on every target (again: a runner may start in between)
                    for t in targets:
                        t.abort()
            return [f.result() for f in futures]
    finally:
        for bar in bars:
            bar.close()


# ----------------------------------------------------------------------------------------------- native runner
@dataclass
class RunOutcome:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    disconnected: bool = False  # the device dropped off during the run (and came back)


def _describe_failure(o: RunOutcome, timeout: float) -> str:
    if o.timed_out:
        return f"runner timed out after {timeout:.0f} s (hung?) and was killed"
    if o.returncode >= 128:
        sig = o.returncode - 128
        return f"runner crashed ({SIGNAMES.get(sig, 'signal')} {sig})"
    msg = [ln for ln in o.stderr.splitlines() if "first_runner: error" in ln or "error" in ln.lower()]
    return (msg[-1].strip() if msg else f"runner failed with exit status {o.returncode}")


class RunnerTarget(Target):
    """The native runner (``run.sh`` + ``first_runner``): one runner invocation per attempt, writing one run-result
    line per measured run to a file in a session folder, next to a ``.meta.json`` describing it. Subclasses say
    where the runner runs (this host, an adb device)."""

    def __init__(self) -> None:
        self._bundle_dir = ""
        self._launcher = ""
        self._prompt_files: dict[tuple[int, ...], str] = {}

    # -- where the runner runs
    @abstractmethod
    def describe_device(self) -> None:
        """Check the device is there; set ``runner_target``, ``model`` and ``emulated``."""

    @abstractmethod
    def install(self, bundle: Bundle, pkg: RunnerPackage, log: Log) -> tuple[str, str]:
        """Make the bundle and the runner package available there; returns their folders there."""

    @abstractmethod
    def session_dir(self) -> str:
        """This session's folder there (prompts, results, traces)."""

    @abstractmethod
    def write_text(self, path: str, text: str) -> None:
        """Write a small file there."""

    @abstractmethod
    def exec(self, argv: list[str], env: dict[str, str], timeout: float, log: Log, expect_lines: int = 0) -> RunOutcome:
        """Run a runner command there; returns once it is gone (killed after ``timeout``). ``expect_lines``: result
        lines a complete run prints on stdout (fewer make a device check whether it dropped off)."""

    @abstractmethod
    def fetch(self, path: str, local: Path) -> bool:
        """Copy a file from there; False when it does not exist."""

    @abstractmethod
    def remove(self, paths: list[str]) -> None:
        """Delete files of this session there (best effort)."""

    # -- the Target interface
    def prepare(self, bundle: Bundle, s: Settings, log: Log) -> Facts:
        self.describe_device()
        if s.runner_dir:
            rd = Path(s.runner_dir)
            if not (rd / "run.sh").is_file() or not (rd / "first_runner").is_file():
                raise BenchError(f"--runner-dir {rd} has no run.sh + first_runner (see first-build-runner)")
            pkg = RunnerPackage(rd.resolve(), self.runner_target, "custom", True, 0.0)
        else:
            pkg = build(self.runner_target, s.cache_dir)
        self._bundle_dir, rrunner = self.install(bundle, pkg, log)
        self._launcher = f"{rrunner}/run.sh"
        check_stop(s)
        o = self.exec([self._launcher, "--bundle", self._bundle_dir, "--info", "--no-verify"], {},
                      min(s.timeout, 300), log)
        if o.returncode != 0:
            raise BenchError(f"runner cannot open the bundle: {_describe_failure(o, s.timeout)}")
        try:
            info = json.loads((o.stdout.strip().splitlines() or [""])[-1])
            facts = Facts(int(info["num_layers"]), int(info["max_seq_len"]), int(info["vocab_size"]),
                          int(info["bos_id"]), {"runner_key": pkg.key})
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"runner --info printed no bundle facts: {o.stdout.strip()[-200:]!r}") from None
        if info.get("bundle_sha256") != bundle.sha256:
            raise BenchError("bundle on the device differs from the host's (manifest sha256)")
        return facts

    def _prompt_file(self, prompt: list[int]) -> str:
        key = tuple(prompt)
        if key not in self._prompt_files:
            path = f"{self.session_dir()}/prompt-{len(prompt)}-{len(self._prompt_files)}.txt"
            self.write_text(path, ",".join(map(str, prompt)))
            self._prompt_files[key] = path
        return self._prompt_files[key]

    def _argv(self, cfg: Config, prompt: list[int]) -> list[str]:
        return [self._launcher, "--bundle", self._bundle_dir, "--prompt-ids-file", self._prompt_file(prompt),
                "--max-new-tokens", str(cfg.max_new_tokens), "--threads", str(cfg.threads), "--mask", cfg.mask]

    def run(self, job: Job, s: Settings, log: Log) -> Attempt:
        sess = self.session_dir()
        cfg = job.cfg
        tag = f"{cfg.mask}-{cfg.prompt_len}-{cfg.threads}-{job.attempt}-{uuid.uuid4().hex[:6]}"
        out, pid = f"{sess}/out-{tag}.jsonl", f"{sess}/pid-{tag}"
        meta = out.removesuffix(".jsonl") + ".meta.json"
        run_id = f"{sess.rstrip('/').rsplit('/', 1)[-1]}/{tag}"
        argv = [*self._argv(cfg, job.prompt), "--warmup", str(job.warmup), "--runs", str(job.runs), "--ignore-eos",
                "--no-verify", "--out", out]
        # what this run is, next to its results: a later first-bench stores them if this one is lost
        self.write_text(meta, json.dumps({**job.meta, "run_id": run_id}))
        o = self.exec(argv, {"FIRSTKIT_PIDFILE": pid}, s.timeout, log, expect_lines=job.runs)
        interrupted = s.stopped()
        if interrupted:
            err = "the runner was killed"
        elif o.disconnected:
            err = "device disconnected during the run"
        elif o.returncode != 0:
            err = _describe_failure(o, s.timeout)
        else:
            err = None
        # collect every run that finished, even after a failure
        with tempfile.TemporaryDirectory() as td:
            local = Path(td) / "out.jsonl"
            lines = local.read_text(encoding="utf-8", errors="replace").splitlines() if self.fetch(out, local) else []
        return Attempt(lines, complete=err is None, error=err, interrupted=interrupted, run_id=run_id,
                       files=[out, meta])

    def discard(self, attempt: Attempt) -> None:
        self.remove(attempt.files)

    def profile(self, cfg: Config, prompt: list[int], s: Settings, log: Log) -> dict:
        from .profile import summarize_etdump

        remote = f"{self.session_dir()}/profile-{cfg.mask}-{cfg.prompt_len}-{cfg.threads}.etdp"
        argv = [*self._argv(cfg, prompt), "--runs", "1", "--ignore-eos", "--no-verify", "--etdump", remote]
        o = self.exec(argv, {}, s.timeout, log)
        entry = {"device": self.name, "mask_spec": cfg.mask, "prompt_len": cfg.prompt_len, "threads": cfg.threads,
                 "emulated": self.emulated}
        if o.returncode != 0:
            entry["error"] = _describe_failure(o, s.timeout)
            return entry
        pdir = Path(s.profile_dir or tempfile.mkdtemp(prefix="firstkit-profile-"))
        pdir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        local = pdir / f"profile_{safe}_{cfg.mask}_{cfg.prompt_len}_{cfg.threads}.etdp"
        if not self.fetch(remote, local):
            entry["error"] = "ETDump file not produced"
            return entry
        entry["etdump"] = str(local)
        entry["summary"] = summarize_etdump(str(local))
        log(f"{self.name}: profiled mask {cfg.mask} -> {local}")
        return entry


class LocalTarget(RunnerTarget):
    """The runner on this host (an edge board running firstkit itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "local"
        self.runner_target = host_target()
        self._session: str | None = None
        self._proc: subprocess.Popen | None = None

    def describe_device(self) -> None:
        import platform

        self.model = platform.node() or "host"
        self.runner_target = host_target()

    def install(self, bundle: Bundle, pkg: RunnerPackage, log: Log) -> tuple[str, str]:
        return str(bundle.path), str(pkg.path)  # checked by load_bundle and first-build-runner: used in place

    def session_dir(self) -> str:
        if self._session is None:
            self._session = tempfile.mkdtemp(prefix="firstkit-bench-")
        return self._session

    def write_text(self, path: str, text: str) -> None:
        Path(path).write_text(text)

    def exec(self, argv: list[str], env: dict[str, str], timeout: float, log: Log, expect_lines: int = 0) -> RunOutcome:
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
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the terminal's Ctrl-C never reached it
            except ProcessLookupError:
                pass

    def fetch(self, path: str, local: Path) -> bool:
        if not os.path.exists(path):
            return False
        shutil.copyfile(path, local)
        return True

    def remove(self, paths: list[str]) -> None:
        for path in paths:
            try:
                os.remove(path)
            except OSError:
                pass

    def orphans(self, log: Log) -> list[Orphan]:
        """None: this host's session folder is removed when first-bench ends (also on Ctrl-C and errors)."""
        return []

    def close(self, purge: bool) -> None:
        if self._session:
            shutil.rmtree(self._session, ignore_errors=True)
            self._session = None


class AdbDevice:
    """One device reached with the real adb client: its properties, sha256-checked pushes, reconnects. Every shell
    argument is quoted (a list goes through ``shlex.quote``; scripts quote their paths themselves)."""

    def __init__(self, adb: Adb, serial: str, reconnect_s: float = 20.0) -> None:
        self.adb = adb.for_device(serial)
        self.serial = serial
        self.reconnect_s = reconnect_s
        self.props: dict[str, str] = {}

    def probe(self) -> dict[str, str]:
        """Online (``adb connect`` a host:port device), then ``$TMPDIR``, ``uname -m``, ABI, SDK, model, cpus."""
        if self.adb.state() != "device":
            self.adb.connect(self.serial)
            if self.adb.state() != "device":
                raise BenchError(f"device {self.serial} is not online (adb get-state: {self.adb.state()})")
        script = ('echo "tmp=${TMPDIR:-/tmp}"; echo "machine=$(uname -m 2>/dev/null)"; '
                  'echo "abi=$(getprop ro.product.cpu.abi 2>/dev/null)"; '
                  'echo "sdk=$(getprop ro.build.version.sdk 2>/dev/null)"; '
                  'echo "model=$(getprop ro.product.model 2>/dev/null)"; '
                  'echo "wrapper=${FIRSTKIT_RUNNER_WRAPPER:-}"; echo "cpus=$(nproc 2>/dev/null)"')
        r = self.adb.shell(script, timeout=30)
        self.props = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        return self.props

    @property
    def android(self) -> bool:
        return bool(self.props.get("sdk"))

    def model(self) -> str:
        if self.props.get("model"):
            return self.props["model"]
        try:
            devices = self.adb.devices()
        except AdbError:
            devices = []
        return next((d.get("model", "") for d in devices if d["serial"] == self.serial), "")

    def hashes(self, paths: list[str]) -> dict[str, str]:
        """sha256 of files on the device (missing ones absent)."""
        if not paths:
            return {}
        r = self.adb.shell(f"sha256sum {quote_cmd(paths)} 2>/dev/null", timeout=300)
        out = {}
        for line in r.stdout.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and len(parts[0]) == 64:
                out[parts[1].lstrip("*").strip()] = parts[0]
        return out

    def sync(self, local_root: Path, rel: list[str], remote_root: str, log: Log,
             expected: dict[str, str] | None = None) -> int:
        """Push the files whose sha256 differs on the device; verify after pushing. Returns files pushed.

        ``expected``: the sha256 each file must have (the bundle's manifest); a local file that no longer has
        it (changed since the bundle was checked) is refused, never pushed.
        """
        want = {f"{remote_root}/{r}": (expected or {}).get(r) or sha256_file(local_root / r) for r in rel}
        have = self.hashes(list(want))
        todo = [(r, f"{remote_root}/{r}") for r in rel if have.get(f"{remote_root}/{r}") != want[f"{remote_root}/{r}"]]
        for r, remote in todo:
            if expected is not None and sha256_file(local_root / r) != want[remote]:
                raise BenchError(f"{local_root}: {r} changed since the bundle was checked (sha256 differs from the "
                                 "manifest); not pushed")
            log(f"push {r}")
            self.adb.push(str(local_root / r), remote)
        if todo:
            got = self.hashes([remote for _, remote in todo])
            bad = [r for r, remote in todo if got.get(remote) != want[remote]]
            if bad:
                raise BenchError(f"device {self.serial}: sha256 mismatch after push for {', '.join(bad)}")
        return len(todo)

    def write_text(self, remote: str, text: str) -> None:
        with tempfile.NamedTemporaryFile("w", delete=False, suffix=".txt") as f:
            f.write(text)
        try:
            self.adb.push(f.name, remote)
        finally:
            os.unlink(f.name)

    def fetch(self, remote: str, local: Path) -> bool:
        """Pull ``remote``; False when it does not exist. A dropped connection is reconnected once."""
        for again in (False, True):
            try:
                if self.adb.shell(f"test -f {shlex.quote(remote)}", timeout=30).returncode != 0:
                    return False
                self.adb.pull(remote, str(local))
                return True
            except AdbError as e:
                if again or not self.recover():
                    raise BenchError(f"{self.serial}: cannot pull results ({e}); rerun to resume") from e
        return False

    def recover(self) -> bool:
        return self.adb.wait_online(self.reconnect_s)

    def online(self) -> bool:
        if self.adb.state() != "device":
            return False
        try:
            return self.adb.shell(["true"], timeout=15).returncode == 0
        except AdbError:
            return False

    def clean_push_failure(self, e: AdbError, paths: list[str], what: str) -> BenchError:
        """A failed push: remove the half-written ``paths`` (they would look cached next time); the error to raise."""
        try:
            self.adb.shell(["rm", "-rf", *paths], timeout=60)
        except AdbError:
            pass
        hint = " (device storage full: free space or run with --purge)" if "space" in str(e).lower() else ""
        return BenchError(f"device {self.serial}: {e}{hint}; {what}")


class AdbTarget(RunnerTarget):
    """The native runner on a device reached with the real adb client."""

    def __init__(self, adb: Adb, serial: str, device_dir: str | None = None, reconnect_s: float = 20.0) -> None:
        super().__init__()
        self.dev = AdbDevice(adb, serial, reconnect_s)
        self.name = serial
        self.base = device_dir
        self.session = f"session-{uuid.uuid4().hex[:12]}"
        self._prepared: list[str] = []  # the bundle and runner folders this session uses (--purge removes them)
        self._running_pidfile: str | None = None
        self._aborted = False

    def describe_device(self) -> None:
        props = self.dev.probe()
        android = self.dev.android
        abi = props.get("abi") if android else props.get("machine")
        if not abi:
            raise BenchError(f"device {self.name}: cannot read its ABI (uname -m / getprop ro.product.cpu.abi)")
        self.runner_target = target_for_abi(abi, android)
        self.emulated = "qemu" in props.get("wrapper", "")
        self.model = self.dev.model()
        if self.base is None:
            self.base = ("/data/local/tmp" if android else props.get("tmp") or "/tmp").rstrip("/") + "/firstkit"

    def session_dir(self) -> str:
        return f"{self.base}/{self.session}"

    def install(self, bundle: Bundle, pkg: RunnerPackage, log: Log) -> tuple[str, str]:
        sess = self.session_dir()
        rbundle = f"{self.base}/bundles/{bundle.sha256[:16]}"
        rrunner = f"{self.base}/runners/{pkg.path.name}"
        self._prepared = [rbundle, rrunner]
        self.dev.adb.shell(["mkdir", "-p", sess, rbundle, rrunner], timeout=30, check=True)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.write_text(f"{sess}/{OWNER_FILE}", json.dumps(owner))
        for local_root, rel, remote_root, expected in ((pkg.path, [str(f) for f in pkg.files()], rrunner, None),
                                                       (bundle.path, bundle.files, rbundle, bundle.hashes())):
            try:
                n = self.dev.sync(local_root, rel, remote_root, log, expected)
            except AdbError as e:
                raise self.dev.clean_push_failure(e, [remote_root, sess], "device folder cleaned") from e
            log(f"{remote_root}: {n} file(s) pushed, {len(rel) - n} unchanged")
        self.dev.adb.shell(["chmod", "755", f"{rrunner}/run.sh", f"{rrunner}/first_runner"], timeout=30, check=True)
        return rbundle, rrunner

    def write_text(self, path: str, text: str) -> None:
        self.dev.write_text(path, text)

    def exec(self, argv: list[str], env: dict[str, str], timeout: float, log: Log, expect_lines: int = 0) -> RunOutcome:
        cmd = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + quote_cmd(argv)
        pidfile = env.get("FIRSTKIT_PIDFILE")
        self._running_pidfile = pidfile
        dropped = False
        try:
            r = self.dev.adb.shell(cmd, timeout=timeout)
            o = RunOutcome(r.returncode, r.stdout, r.stderr)
        except AdbError as e:
            if e.kind == "timeout":
                o = RunOutcome(-9, "", str(e), timed_out=True)
            elif e.kind == "offline":
                o, dropped = RunOutcome(-1, "", str(e)), True
            else:
                raise
        finally:
            self._running_pidfile = None
        if pidfile and (o.timed_out or self._aborted):
            self._kill(pidfile)  # adb gave up on it; the runner may still run on the device
        n_lines = sum(1 for ln in o.stdout.splitlines() if ln.startswith("{"))
        # adb reports exit status 0 with truncated output when the transport drops: ask the device
        if not dropped and not self._aborted and (o.returncode != 0 or n_lines < expect_lines):
            dropped = not self.dev.online()
        if dropped:
            log(f"{self.name}: device disconnected during the run; reconnecting")
            if not self.dev.recover():
                raise BenchError(f"{self.name}: device disconnected during the run and did not come back; "
                                 "finished runs stay on the device until the next run, rerun to resume")
            log(f"{self.name}: reconnected, resuming")
            o.disconnected = True
        return o

    def _kill(self, pidfile: str) -> None:
        q = shlex.quote(pidfile)
        try:
            self.dev.adb.shell(f'test -f {q} && kill -9 "$(cat {q})" 2>/dev/null; true', timeout=30)
        except AdbError:
            pass

    def abort(self) -> None:
        self._aborted = True
        pidfile = self._running_pidfile
        if pidfile:
            self._kill(pidfile)

    def fetch(self, path: str, local: Path) -> bool:
        return self.dev.fetch(path, local)

    def remove(self, paths: list[str]) -> None:
        try:
            self.dev.adb.shell(["rm", "-f", *paths], timeout=30)
        except AdbError:
            pass  # the records carry run_id: a file collected again is not stored twice

    def close(self, purge: bool) -> None:
        """Remove this session's folder; with ``purge`` also the bundle and runner folders it used, and the
        ``bundles``/``runners``/device folder when that leaves them empty (never anything else there)."""
        paths = [self.session_dir(), *(self._prepared if purge else [])]
        try:
            self.dev.adb.shell(["rm", "-rf", *paths], timeout=60, check=True)
            if purge and self.base:
                parents = [f"{self.base}/bundles", f"{self.base}/runners", self.base]
                self.dev.adb.shell(f"rmdir {quote_cmd(parents)} 2>/dev/null; true", timeout=60)
        except AdbError as e:
            raise BenchError(f"device {self.name}: could not clean {paths[0]}: {e}") from e

    def orphans(self, log: Log) -> list[Orphan]:
        """Sessions whose first-bench is gone (device lost, process killed): every ``out-*.jsonl`` with its
        ``.meta.json``. Sessions of a live first-bench on this host, or of another host, are left alone."""
        if not self.base:
            return []
        q = shlex.quote(self.base)
        script = (f'for d in {q}/session-*/; do [ -d "$d" ] || continue; echo "DIR $d"; '
                  f'if [ -f "${{d}}{OWNER_FILE}" ]; then echo "OWNER $(cat "${{d}}{OWNER_FILE}")"; fi; '
                  'for f in "$d"out-*.jsonl; do [ -f "$f" ] && echo "OUT $f"; done; done; true')
        r = self.dev.adb.shell(script, timeout=60)
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
        found = []
        host = socket.gethostname()
        for sdir, info in sessions.items():
            if sdir == self.session_dir():
                continue
            owner = info["owner"] if isinstance(info["owner"], dict) else {}
            if owner.get("host") not in (None, host):
                continue  # another host's first-bench may still be running there
            if owner.get("host") == host and _pid_alive(owner.get("pid")):
                continue  # a live first-bench on this host
            found.append(Orphan(sdir.rsplit("/", 1)[-1], self._session_results(info["outs"]),
                                lambda sdir=sdir: self.dev.adb.shell(["rm", "-rf", sdir], timeout=60)))
        return found

    def _session_results(self, outs: list[str]) -> list[tuple[dict, list[str]]]:
        got = []
        with tempfile.TemporaryDirectory() as td:
            for i, remote in enumerate(outs):
                lo, lm = Path(td) / f"{i}.jsonl", Path(td) / f"{i}.meta.json"
                if not (self.fetch(remote.removesuffix(".jsonl") + ".meta.json", lm) and self.fetch(remote, lo)):
                    continue  # no description of what ran: nothing to store it under
                try:
                    meta = json.loads(lm.read_text())
                except ValueError:
                    continue
                if not isinstance(meta, dict):
                    continue
                meta["run_id"] = str(meta.get("run_id", remote))
                got.append((meta, lo.read_text(encoding="utf-8", errors="replace").splitlines()))
        return got
