"""Append-only JSONL result store: one line per finished run, fsynced, safe to resume.

A crash can at worst leave a truncated last line: it is ignored on read and the next append starts
on a new line. Every other line that claims the bench-record schema must match
``device_bench/schemas/bench_record.schema.json``; one that does not is a ``StoreError`` naming the line (the
store is never rewritten, so nothing in it is lost). Writers in several threads are serialized with a lock;
one process at a time writes a store: ``lock_writer`` holds an exclusive ``fcntl.flock`` on it until
``close``, and a second ``first-bench`` on the same store is refused instead of measuring everything twice.

:func:`check_result` is the one check of a run result before it becomes a record (the native runner's lines and
the app's alike): the run-result schema, then that it answers the request.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

RECORD_SCHEMA = "firstkit.bench.run/1"
KEY_FIELDS = ("device", "bundle_sha256", "target", "mask_spec", "prompt_len", "threads", "max_new_tokens")


class StoreError(ValueError):
    """The store holds a malformed record, or another process is writing it (one-line message)."""


def config_key(rec: dict) -> tuple:
    """Identity of a measured configuration (runs of the same key are repetitions)."""
    return tuple(rec.get(k) for k in KEY_FIELDS)


def _no_constants(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def record_error(rec: object) -> str | None:
    """Why ``rec`` is not a valid bench record (one line), or None."""
    from firstkit.runtime.bundle import schema_error

    return schema_error(rec, "bench_record.schema.json")


# ----------------------------------------------------------------------------------------------- run results
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
    items, enum, pattern, minimum, maximum), in short words that name the key."""
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
    """``device_bench/schemas/run_result.schema.json``."""
    global _SCHEMA
    if _SCHEMA is None:
        from . import SCHEMA_PATH

        _SCHEMA = json.loads(Path(SCHEMA_PATH).read_text())
    return _SCHEMA


def check_result(res: object, *, runner: str, bundle_sha256: str, prompt_len: int, max_new_tokens: int,
                 n_layers: int, spec: str, threads: int) -> str | None:
    """Why one run result (a line from the native runner or the app) is unusable, or None: the run-result schema,
    then that it answers the request (who ran it, bundle, prompt, mask, generated tokens, threads)."""
    errs = schema_errors(res, run_result_schema())
    if errs:
        return "; ".join(errs[:3])
    assert isinstance(res, dict)
    if res["runner"] != runner:
        return f"runner is {res['runner']!r}, not {runner!r}"
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


# ----------------------------------------------------------------------------------------------- the store
class ResultStore:
    """JSONL file of bench records."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None  # held while this process is the store's writer (lock_writer)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"{self.path} is a directory, not a JSONL file")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def lock_writer(self) -> None:
        """Become the store's only writer until ``close``; ``StoreError`` when another process writes it."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path} is being written by another first-bench process; wait for it to finish "
                             "or pass another --out") from None
        self._fd = fd

    def close(self) -> None:
        """Release the writer lock (also released when the process exits)."""
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def records(self) -> list[dict]:
        """Every complete record; a torn line from a crash is skipped, a malformed record is a ``StoreError``."""
        if not self.path.exists():
            return []
        out = []
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError as e:
            raise StoreError(f"cannot read {self.path}: {e.strerror or e}") from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line, parse_constant=_no_constants)
            except json.JSONDecodeError:
                continue  # a torn line (a crash mid-write): the run is not counted
            except (ValueError, RecursionError) as e:
                raise StoreError(f"{self.path} line {n}: {e if isinstance(e, ValueError) else 'nested too deeply'}; "
                                 "fix or delete that line (first-bench never rewrites the store)") from None
            if not isinstance(rec, dict) or rec.get("schema") != RECORD_SCHEMA:
                continue  # not a bench record
            why = record_error(rec)
            if why:
                raise StoreError(f"{self.path} line {n} is not a valid bench record ({why}); fix or delete that "
                                 "line (first-bench never rewrites the store)")
            out.append(rec)
        return out

    def counts(self) -> Counter:
        return Counter(config_key(r) for r in self.records())

    def append(self, records: Iterable[dict]) -> int:
        """Append records durably; returns how many were written."""
        lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records]
        if not lines:
            return 0
        data = "".join(lines).encode("utf-8")
        with self._lock:
            held = self._fd is not None
            fd = self._fd if held else os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            assert fd is not None
            try:
                if not held:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size:  # make sure a torn last line does not swallow ours
                    with open(self.path, "rb") as rf:
                        rf.seek(size - 1)
                        if rf.read(1) != b"\n":
                            data = b"\n" + data
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                if not held:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
        return len(lines)
