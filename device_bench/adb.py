"""Thin wrapper around the real ``adb`` client (Debian ``adb`` or the binary inside PyPI ``adbutils``).

Every shell argument is quoted with ``shlex.quote``; push/pull paths go through the sync protocol
unquoted (they are not interpreted by a shell). Errors raise :class:`AdbError` with adb's own message.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass


class AdbError(RuntimeError):
    """An adb command failed; ``kind`` is one of: missing, offline, timeout, push, pull, shell."""

    def __init__(self, message: str, kind: str = "shell", returncode: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.returncode = returncode


def find_adb(explicit: str | None = None) -> str:
    """Path of the adb client: ``explicit``, ``$FIRSTKIT_ADB``, ``adb`` on PATH, or adbutils' bundled one."""
    for cand in (explicit, os.environ.get("FIRSTKIT_ADB"), shutil.which("adb")):
        if cand and (os.path.isfile(cand) or shutil.which(cand)):
            return cand
    try:
        import adbutils  # type: ignore[import-not-found]

        path = adbutils.adb_path()
        if path and os.path.isfile(path):
            return path
    except Exception:  # noqa: BLE001 - adbutils is optional
        pass
    raise AdbError("adb not found: install Debian's 'adb' package (or pip install adbutils), or pass --adb",
                   kind="missing")


def quote_cmd(argv: Sequence[str]) -> str:
    """One shell command line with every argument quoted."""
    return " ".join(shlex.quote(str(a)) for a in argv)


@dataclass
class ShellResult:
    returncode: int
    stdout: str
    stderr: str


class Adb:
    """The adb client, optionally bound to one device serial."""

    def __init__(self, adb_path: str | None = None, serial: str | None = None) -> None:
        self.path = find_adb(adb_path)
        self.serial = serial

    def for_device(self, serial: str) -> Adb:
        a = Adb.__new__(Adb)
        a.path, a.serial = self.path, serial
        return a

    def _argv(self, *args: str) -> list[str]:
        base = [self.path]
        if self.serial:
            base += ["-s", self.serial]
        return base + list(args)

    def run(self, *args: str, timeout: float | None = 60.0, check: bool = True) -> ShellResult:
        """Run ``adb [-s SERIAL] args...``."""
        try:
            p = subprocess.run(self._argv(*args), capture_output=True, text=True, timeout=timeout,
                               errors="replace", stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AdbError(f"adb {' '.join(args[:2])} timed out after {timeout:.0f} s", kind="timeout") from e
        res = ShellResult(p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise AdbError(_message(res, f"adb {' '.join(args[:2])}"), kind=_kind(res), returncode=p.returncode)
        return res

    # -- host side
    def start_server(self) -> None:
        self.run("start-server", timeout=30)

    def devices(self) -> list[dict[str, str]]:
        """``adb devices -l`` as a list of {serial, state, model, ...}."""
        out = self.run("devices", "-l", timeout=30).stdout
        devs = []
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) < 2:
                continue
            d = {"serial": parts[0], "state": parts[1]}
            for p in parts[2:]:
                if ":" in p:
                    k, v = p.split(":", 1)
                    d[k] = v
            devs.append(d)
        return devs

    def connect(self, serial: str, timeout: float = 10.0) -> None:
        """``adb connect`` a TCP device (host:port); a USB serial needs no connect."""
        if ":" not in serial:
            return
        r = self.run("connect", serial, timeout=timeout, check=False)
        text = (r.stdout + r.stderr).strip()
        if "connected to" not in text:
            raise AdbError(f"cannot connect to {serial}: {text or 'no answer'}", kind="offline")

    def state(self) -> str:
        r = self.run("get-state", timeout=10, check=False)
        return r.stdout.strip() if r.returncode == 0 else "offline"

    def wait_online(self, timeout: float = 20.0) -> bool:
        """Reconnect (TCP) and wait until the device answers; True when it does."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.serial and ":" in self.serial:
                try:
                    self.run("disconnect", self.serial, timeout=5, check=False)
                    self.connect(self.serial, timeout=5)
                except AdbError:
                    pass
            if self.state() == "device":
                try:
                    if self.shell(["true"], timeout=10).returncode == 0:
                        return True
                except AdbError:
                    pass
            time.sleep(0.5)
        return False

    # -- device side
    def shell(self, argv: Sequence[str] | str, timeout: float | None = 60.0, check: bool = False) -> ShellResult:
        """Run a command on the device; a list is quoted argument by argument, a str is sent as is."""
        cmd = argv if isinstance(argv, str) else quote_cmd(argv)
        try:
            p = subprocess.run(self._argv("shell", cmd), capture_output=True, text=True, timeout=timeout,
                               errors="replace", stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AdbError(f"device command timed out after {timeout:.0f} s", kind="timeout") from e
        res = ShellResult(p.returncode, p.stdout, p.stderr)
        if res.returncode == 255 or _offline(res):  # adb's own failure, not the command's
            raise AdbError(_message(res, "adb shell"), kind="offline", returncode=res.returncode)
        if check and res.returncode != 0:
            raise AdbError(_message(res, "device command"), kind="shell", returncode=res.returncode)
        return res

    def push(self, local: str, remote: str, timeout: float = 600.0) -> None:
        r = self.run("push", local, remote, timeout=timeout, check=False)
        if r.returncode != 0:
            raise AdbError(f"push {os.path.basename(local)} failed: " + _message(r, "adb push"),
                           kind="offline" if _offline(r) else "push", returncode=r.returncode)

    def pull(self, remote: str, local: str, timeout: float = 600.0) -> None:
        r = self.run("pull", remote, local, timeout=timeout, check=False)
        if r.returncode != 0:
            raise AdbError(f"pull {remote} failed: " + _message(r, "adb pull"),
                           kind="offline" if _offline(r) else "pull", returncode=r.returncode)

    def getprop(self, name: str) -> str:
        r = self.shell(f"getprop {shlex.quote(name)} 2>/dev/null", timeout=20)
        return r.stdout.strip() if r.returncode == 0 else ""


def _offline(r: ShellResult) -> bool:
    text = (r.stdout[-500:] + r.stderr).lower()
    return any(s in text for s in ("device offline", "no devices/emulators", "device not found",
                                   "error: closed", "connection reset", "protocol fault",
                                   "device '", "failed to get feature set"))


def _kind(r: ShellResult) -> str:
    return "offline" if _offline(r) else "shell"


def _message(r: ShellResult, what: str) -> str:
    lines = [ln.strip() for ln in (r.stderr + "\n" + r.stdout).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower() or "fail" in ln.lower()]
    text = (errs or lines or [f"exit status {r.returncode}"])[-1]
    return f"{what}: {text}"
