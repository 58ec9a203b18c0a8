"""Append-only JSONL result store: one line per finished run, fsynced, safe to resume.

A crash can at worst leave a truncated last line: it is ignored on read and the next append starts
on a new line. Writers in several threads (devices in parallel) or processes are serialized with a
lock and ``fcntl.flock``.
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


def config_key(rec: dict) -> tuple:
    """Identity of a measured configuration (runs of the same key are repetitions)."""
    return tuple(rec.get(k) for k in KEY_FIELDS)


class ResultStore:
    """JSONL file of bench records."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"{self.path} is a directory, not a JSONL file")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def records(self) -> list[dict]:
        """Every complete record (a torn last line from a crash is skipped)."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("schema") == RECORD_SCHEMA:
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
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
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
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        return len(lines)
