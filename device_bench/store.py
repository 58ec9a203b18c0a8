"""Append-only JSONL result store: one line per finished run, fsynced, safe to resume.

A crash can at worst leave a truncated last line: it is ignored on read and the next append starts
on a new line. Every other line that claims the bench-record schema must match
``device_bench/schemas/bench_record.schema.json``; one that does not is a ``StoreError`` naming the line (the
store is never rewritten, so nothing in it is lost). Writers in several threads are serialized with a lock;
one process at a time writes a store: ``lock_writer`` holds an exclusive ``fcntl.flock`` on it until
``close``, and a second ``first-bench`` on the same store is refused instead of measuring everything twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections import Counter
from collections.abc import Iterable
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
