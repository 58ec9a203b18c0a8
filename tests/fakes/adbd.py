"""A loopback-only ADB device daemon for tests: the real ``adb`` client drives it end to end.

Speaks the ADB transport protocol over TCP on 127.0.0.1 (``adb connect 127.0.0.1:PORT``):
CNXN (no AUTH), OPEN/OKAY/WRTE/CLSE streams, ``shell`` services with the shell v2 protocol
(stdout/stderr/exit code), and ``sync`` (STAT, LIST, SEND, RECV, QUIT). Shell commands run with
``/bin/sh -c`` on this host, in the device's home directory, so the device is this machine seen
through adb. An ``arch="aarch64"`` device reports ``uname -m`` = aarch64 and sets
``FIRSTKIT_RUNNER_WRAPPER`` so launchers run aarch64 binaries through ``qemu-aarch64-static``
(timings under qemu are not real).

Fault injection (``LoopbackAdbd.faults``, changeable while running) lets tests simulate a device
that disconnects mid-run, a failing push, full storage, a crashing or hanging runner.

Run standalone: ``python -m fakes.adbd (from tests/) --root DIR [--port N] [--arch aarch64]``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

A_CNXN, A_AUTH, A_OPEN, A_OKAY, A_CLSE, A_WRTE = (
    0x4E584E43, 0x48545541, 0x4E45504F, 0x59414B4F, 0x45534C43, 0x45545257)
A_VERSION = 0x01000001
MAX_PAYLOAD = 256 * 1024
SYNC_DATA_MAX = 64 * 1024
FEATURES = "shell_v2,cmd,fixed_push_mkdir"

# shell v2 packet ids
SH_STDIN, SH_STDOUT, SH_STDERR, SH_EXIT, SH_CLOSE_STDIN, SH_WINDOW = 0, 1, 2, 3, 4, 5


@dataclass
class Faults:
    """Faults to inject. Each ``*_match`` is a substring of the shell command or file path."""

    disconnect_on_shell: str | None = None   # drop the connection this many seconds after such a shell starts
    disconnect_after_s: float = 0.5
    disconnect_after_output: str | None = None  # ... or once the command's output contains this text
    disconnect_count: int = 1                # how many times (each firing decrements)
    push_fail_match: str | None = None       # SEND of a matching path fails (once per count)
    push_fail_count: int = 1
    storage_quota_bytes: int | None = None   # SEND fails with ENOSPC once files under root exceed this
    crash_match: str | None = None           # SIGSEGV the matching shell command ...
    crash_after_output: str | None = "\n"    # ... once its stdout contains this text (None: at start)
    crash_count: int = 1
    hang_match: str | None = None            # SIGSTOP the matching shell command after it starts
    hang_count: int = 1
    hang_after_s: float = 0.0                # delay before SIGSTOP
    refuse_connections: bool = False         # close new transport connections immediately
    events: list[str] = field(default_factory=list)  # what was injected (for assertions)


def _ignores_sighup(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGHUP (Linux /proc; False when unknown)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    except OSError:
        pass
    return False


def _hdr(cmd: int, a0: int, a1: int, data: bytes) -> bytes:
    return struct.pack("<6I", cmd, a0, a1, len(data), 0, cmd ^ 0xFFFFFFFF) + data


class _Conn:
    """One transport connection from the adb server."""

    def __init__(self, dev: LoopbackAdbd, sock: socket.socket) -> None:
        self.dev, self.sock = dev, sock
        self.wlock = threading.Lock()
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.alive = True
        self.max_payload = MAX_PAYLOAD

    def send(self, cmd: int, a0: int, a1: int, data: bytes = b"") -> None:
        with self.wlock:
            if not self.alive:
                raise ConnectionError("transport closed")
            self.sock.sendall(_hdr(cmd, a0, a1, data))

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("eof")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        for s in list(self.streams.values()):
            s.on_close()
        self.dev._conn_closed(self)

    def serve(self) -> None:
        try:
            while self.alive:
                cmd, a0, a1, length, _crc, magic = struct.unpack("<6I", self._recv_exact(24))
                if magic != cmd ^ 0xFFFFFFFF:
                    raise ConnectionError("bad magic")
                data = self._recv_exact(length) if length else b""
                self._dispatch(cmd, a0, a1, data)
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def _dispatch(self, cmd: int, a0: int, a1: int, data: bytes) -> None:
        if cmd == A_CNXN:
            self.max_payload = min(MAX_PAYLOAD, a1 or MAX_PAYLOAD)
            banner = (f"device::ro.product.name={self.dev.product};ro.product.model={self.dev.model};"
                      f"ro.product.device={self.dev.product};features={FEATURES}")
            self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, banner.encode())
        elif cmd == A_OPEN:
            service = data.rstrip(b"\0").decode("utf-8", "replace")
            local = self.next_id
            self.next_id += 1
            stream = _Stream(self, local, a0, service)
            self.streams[local] = stream
            self.send(A_OKAY, local, a0)
            threading.Thread(target=stream.run, daemon=True, name=f"adbd-{service[:20]}").start()
        elif cmd == A_OKAY:
            s = self.streams.get(a1)
            if s:
                s.acked.set()
        elif cmd == A_WRTE:
            s = self.streams.get(a1)
            if s:
                s.incoming(data)
                self.send(A_OKAY, a1, a0)
        elif cmd == A_CLSE:
            s = self.streams.pop(a1, None)
            if s:
                s.on_close()


class _Stream:
    """One service stream (shell or sync)."""

    def __init__(self, conn: _Conn, local: int, remote: int, service: str) -> None:
        self.conn, self.local, self.remote, self.service = conn, local, remote, service
        self.acked = threading.Event()
        self.acked.set()
        self.inbuf = bytearray()
        self.cv = threading.Condition()
        self.closed = False
        self.proc: subprocess.Popen | None = None

    # -- transport helpers
    def incoming(self, data: bytes) -> None:
        with self.cv:
            self.inbuf += data
            self.cv.notify_all()

    def on_close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.acked.set()
        p = self.proc
        if p and p.poll() is None:  # like adbd: the shell dies with its connection
            # a device shell has SIGHUP at its default; ours inherit the test process's disposition, which is
            # "ignore" under nohup: then SIGCONT would resume a stopped runner instead of ending it
            hup = signal.SIGKILL if _ignores_sighup(p.pid) else signal.SIGHUP
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, hup)
                os.killpg(p.pid, signal.SIGCONT)

    def read(self, n: int) -> bytes:
        with self.cv:
            while len(self.inbuf) < n and not self.closed:
                self.cv.wait()
            if len(self.inbuf) < n:
                raise ConnectionError("stream closed")
            out = bytes(self.inbuf[:n])
            del self.inbuf[:n]
            return out

    def write(self, data: bytes) -> None:
        step = self.conn.max_payload
        for i in range(0, len(data), step):
            while not self.acked.wait(0.2):
                if self.closed or not self.conn.alive:
                    raise ConnectionError("stream closed")
            if self.closed:
                raise ConnectionError("stream closed")
            self.acked.clear()
            self.conn.send(A_WRTE, self.local, self.remote, data[i:i + step])

    def finish(self) -> None:
        # wait for the last WRTE to be acknowledged, then close
        self.acked.wait(5)
        if not self.closed:
            self.closed = True
            with contextlib.suppress(ConnectionError, OSError):
                self.conn.send(A_CLSE, self.local, self.remote)
        self.conn.streams.pop(self.local, None)

    # -- services
    def run(self) -> None:
        try:
            if self.service.startswith("shell"):
                self._shell()
            elif self.service.startswith("sync:"):
                self._sync()
            else:
                self.write(b"FAIL" + f"{len(b'unknown service'):04x}".encode() + b"unknown service")
        except (ConnectionError, OSError):
            pass
        finally:
            self.finish()

    def _shell(self) -> None:
        head, _, command = self.service.partition(":")
        args = head.split(",")[1:]
        v2 = "v2" in args
        dev = self.conn.dev
        faults = dev.faults
        argv = ["/bin/sh", "-c", command] if command else ["/bin/sh"]
        self.proc = subprocess.Popen(argv, cwd=dev.root, env=dev.shell_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        proc = self.proc
        crash = faults.crash_match is not None and faults.crash_match in command and faults.crash_count > 0
        hang = faults.hang_match is not None and faults.hang_match in command and faults.hang_count > 0
        drop = (faults.disconnect_on_shell is not None and faults.disconnect_on_shell in command
                and faults.disconnect_count > 0)
        if crash:
            faults.crash_count -= 1
        if hang:
            faults.hang_count -= 1
        if drop:
            faults.disconnect_count -= 1
        if hang:
            faults.events.append(f"hang: {command}")

            if faults.hang_after_s <= 0:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGSTOP)
            else:
                def _stop() -> None:
                    time.sleep(faults.hang_after_s)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGSTOP)
                threading.Thread(target=_stop, daemon=True).start()
        if drop and faults.disconnect_after_output is None:
            faults.events.append(f"disconnect: {command}")
            threading.Timer(faults.disconnect_after_s, self.conn.close).start()
        if crash and faults.crash_after_output is None:
            faults.events.append(f"crash: {command}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGSEGV)
        wlock = threading.Lock()
        seen = bytearray()

        def send(kind: int, data: bytes) -> None:
            with wlock:
                if v2:
                    self.write(struct.pack("<BI", kind, len(data)) + data)
                elif data:
                    self.write(data)

        def pump(src, kind: int) -> None:
            with contextlib.suppress(ConnectionError, OSError, ValueError):
                while True:
                    chunk = os.read(src.fileno(), 65536)
                    if not chunk:
                        break
                    send(kind, chunk)
                    if kind == SH_STDOUT:
                        seen.extend(chunk)
                        if crash and faults.crash_after_output is not None and \
                                faults.crash_after_output.encode() in seen:
                            faults.events.append(f"crash: {command}")
                            crash_now()
                        if drop and faults.disconnect_after_output is not None and \
                                faults.disconnect_after_output.encode() in seen:
                            faults.events.append(f"disconnect: {command}")
                            self.conn.close()

        crashed = [False]

        def crash_now() -> None:
            if not crashed[0]:
                crashed[0] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGSEGV)

        def feed_stdin() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while True:
                    if v2:
                        kind, n = struct.unpack("<BI", self.read(5))
                        data = self.read(n) if n else b""
                        if kind == SH_STDIN and data:
                            proc.stdin.write(data)
                            proc.stdin.flush()
                        elif kind == SH_CLOSE_STDIN:
                            proc.stdin.close()
                            return
                    else:
                        data = self.read(1)
                        proc.stdin.write(data)
                        proc.stdin.flush()

        threading.Thread(target=feed_stdin, daemon=True).start()
        t_out = threading.Thread(target=pump, args=(proc.stdout, SH_STDOUT), daemon=True)
        t_err = threading.Thread(target=pump, args=(proc.stderr, SH_STDERR), daemon=True)
        t_out.start()
        t_err.start()
        rc = proc.wait()
        t_out.join()
        t_err.join()
        code = rc if rc >= 0 else 128 - rc  # killed by a signal: 128 + signal, like sh
        if v2:
            send(SH_EXIT, bytes([code & 0xFF]))

    def _sync(self) -> None:
        dev = self.conn.dev
        while True:
            ident, n = struct.unpack("<4sI", self.read(8))
            if ident == b"QUIT":
                return
            path = self.read(n).decode("utf-8", "surrogateescape") if n else ""
            if ident == b"STAT":
                try:
                    st = os.stat(path)
                    self.write(struct.pack("<4sIII", b"STAT", st.st_mode & 0xFFFFFFFF,
                                           min(st.st_size, 0xFFFFFFFF), int(st.st_mtime)))
                except OSError:
                    self.write(struct.pack("<4sIII", b"STAT", 0, 0, 0))
            elif ident == b"LIST":
                out = bytearray()
                with contextlib.suppress(OSError):
                    for name in sorted(os.listdir(path)):
                        with contextlib.suppress(OSError):
                            st = os.lstat(os.path.join(path, name))
                            nb = name.encode("utf-8", "surrogateescape")
                            out += struct.pack("<4sIIII", b"DENT", st.st_mode & 0xFFFFFFFF,
                                               min(st.st_size, 0xFFFFFFFF), int(st.st_mtime), len(nb)) + nb
                out += struct.pack("<4sIIII", b"DONE", 0, 0, 0, 0)
                self.write(bytes(out))
            elif ident == b"SEND":
                self._sync_send(path, dev)
            elif ident == b"RECV":
                try:
                    with open(path, "rb") as f:
                        while True:
                            chunk = f.read(SYNC_DATA_MAX)
                            if not chunk:
                                break
                            self.write(struct.pack("<4sI", b"DATA", len(chunk)) + chunk)
                    self.write(struct.pack("<4sI", b"DONE", 0))
                except OSError as e:
                    self._fail(f"{path}: {os.strerror(e.errno or errno.EIO)}")
            else:
                self._fail(f"unknown sync request {ident!r}")
                return

    def _fail(self, msg: str) -> None:
        m = msg.encode()
        self.write(struct.pack("<4sI", b"FAIL", len(m)) + m)

    def _sync_send(self, spec: str, dev: LoopbackAdbd) -> None:
        path, _, mode_s = spec.rpartition(",")
        mode = int(mode_s) if mode_s.isdigit() else 0o644
        faults = dev.faults
        error: str | None = None
        if faults.push_fail_match and faults.push_fail_match in path and faults.push_fail_count > 0:
            faults.push_fail_count -= 1
            faults.events.append(f"push-fail: {path}")
            error = f"{path}: Read-only file system (injected)"
        tmp = f"{path}.adbd-partial"
        f = None
        if error is None:
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                f = open(tmp, "wb")
            except OSError as e:
                error = f"{path}: {os.strerror(e.errno or errno.EIO)}"
        written = 0
        base = dev.used_bytes() if faults.storage_quota_bytes is not None else 0
        while True:  # always drain the client's DATA/DONE
            ident, n = struct.unpack("<4sI", self.read(8))
            if ident == b"DATA":
                data = self.read(n)
                if f is not None and error is None:
                    written += len(data)
                    if faults.storage_quota_bytes is not None and base + written > faults.storage_quota_bytes:
                        faults.events.append(f"storage-full: {path}")
                        error = f"{path}: No space left on device"
                    else:
                        f.write(data)
            elif ident == b"DONE":
                mtime = n
                break
            else:
                error = error or f"unexpected sync packet {ident!r}"
                break
        if f is not None:
            f.close()
            if error is None:
                os.chmod(tmp, stat.S_IMODE(mode) or 0o644)
                os.replace(tmp, path)
                with contextlib.suppress(OSError):
                    os.utime(path, (mtime, mtime))
            else:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)  # no partial file is left on "storage"
        if error is None:
            self.write(struct.pack("<4sI", b"OKAY", 0))
        else:
            self._fail(error)


class LoopbackAdbd:
    """A device daemon on 127.0.0.1:port; ``root`` is the device's home directory (``$TMPDIR``)."""

    def __init__(self, root: str | os.PathLike, port: int = 0, arch: str = "x86_64",
                 model: str | None = None, qemu: str = "qemu-aarch64-static",
                 qemu_sysroot: str = "/usr/aarch64-linux-gnu") -> None:
        self.root = str(Path(root).resolve())
        os.makedirs(self.root, exist_ok=True)
        self.arch = arch
        self.model = model or f"firstkit_loopback_{arch}"
        self.product = "firstkit_loopback"
        self.qemu, self.qemu_sysroot = qemu, qemu_sysroot
        self.faults = Faults()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))  # loopback only, never a public interface
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._bin = Path(self.root).parent / f".adbd-bin-{self.port}"
        self._make_shims()
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"adbd-{self.port}")

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _make_shims(self) -> None:
        """``uname`` answering the emulated machine (the rest of the host's tools are used as-is)."""
        self._bin.mkdir(parents=True, exist_ok=True)
        uname = self._bin / "uname"
        uname.write_text('#!/bin/sh\nif [ "$1" = "-m" ]; then echo ' + shlex.quote(self.arch) +
                         '; else exec /bin/uname "$@"; fi\n')
        uname.chmod(0o755)

    def shell_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FIRSTKIT_", "ANDROID_", "ADB"))}
        env["PATH"] = f"{self._bin}:{env.get('PATH', '/usr/bin:/bin')}"
        env["HOME"] = self.root
        env["TMPDIR"] = self.root
        if self.arch in ("aarch64", "arm64"):
            env["FIRSTKIT_RUNNER_WRAPPER"] = f"{self.qemu} -L {self.qemu_sysroot}"
        return env

    def used_bytes(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    def start(self) -> LoopbackAdbd:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, addr = self._sock.accept()
            except OSError:
                return
            if addr[0] != "127.0.0.1" or self.faults.refuse_connections:
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self, sock)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=conn.serve, daemon=True).start()

    def _conn_closed(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def disconnect(self) -> None:
        """Drop every transport connection now (the adb server sees the device go offline)."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.close()
        self.disconnect()

    def __enter__(self) -> LoopbackAdbd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Run a loopback device until interrupted."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="device home directory")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--arch", default="x86_64", choices=["x86_64", "aarch64"])
    a = ap.parse_args()
    dev = LoopbackAdbd(a.root, a.port, a.arch).start()
    print(f"loopback adbd on {dev.serial} (root {dev.root}); connect with: adb connect {dev.serial}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
