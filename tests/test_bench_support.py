"""Shared helpers for the native-runner and first-bench tests (no tests here).

Everything expensive is built once per test session: the runner packages (first-build-runner's cache),
the tiny real bundle (exported with first-export by test_export_support), and one adb server on a
private port with HOME in a temp dir (adb writes ~/.android/adbkey there).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="firstkit-bench-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


def need(tool: str) -> None:
    """Fail (not skip) with the apt package to install when a system tool is missing."""
    pkgs = {"adb": "adb", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
            "qemu-aarch64-static": "qemu-user-static", "cmake": "pip install cmake", "ninja": "pip install ninja"}
    if not shutil.which(tool):
        pytest.fail(f"{tool} missing: install {pkgs.get(tool, tool)} (tests/install_system_deps.sh)")


@functools.cache
def runner(target: str):
    """Built (or cached) runner package for target."""
    from firstkit.device_bench.build_runner import build

    need("cmake")
    need("ninja")
    if target == "linux-aarch64":
        need("aarch64-linux-gnu-g++")
    return build(target)


@functools.cache
def tiny_bundle() -> Path:
    """The tiny Llama bundle written by the real first-export (shared with the export tests)."""
    from test_export_support import tiny_bundle as export_tiny

    path, _ = export_tiny("llama")
    return path


def bundle_copy(name: str) -> Path:
    """A private copy of the tiny bundle (for tests that damage it)."""
    dest = _ROOT / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(tiny_bundle(), dest)
    return dest


def tmpdir(name: str) -> Path:
    p = _ROOT / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def adb_server() -> str:
    """Start a private adb server (its own port and HOME); returns the adb path."""
    need("adb")
    home = tmpdir("adb-home")
    os.environ["HOME"] = str(home)
    os.environ["ANDROID_ADB_SERVER_PORT"] = str(_free_port())
    subprocess.run(["adb", "start-server"], capture_output=True, timeout=60, check=True)
    atexit.register(lambda: subprocess.run(["adb", "kill-server"], capture_output=True, timeout=30))
    return shutil.which("adb") or "adb"


def run_json(stdout: str) -> list[dict]:
    """JSON objects printed one per line."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
