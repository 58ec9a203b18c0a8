"""``first-build-runner``: build the native C++ runner for a target and cache it.

Targets: ``linux-x86_64`` (host compiler) and ``linux-aarch64`` (Debian ``g++-aarch64-linux-gnu``
against the aarch64 executorch wheel). A built runner is a folder ``<cache>/<target>-<key>/`` with
``first_runner``, ``lib/`` (the ExecuTorch ``.so`` files it needs), ``run.sh`` (launcher) and
``runner.json``; ``key`` hashes the runner sources, the executorch version and the target, so a
source change rebuilds and an unchanged tree is reused. Android (``android-arm64-v8a``) needs the
NDK and ExecuTorch built with its android preset: see docs/device_bench.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import click

RUNNER_SRC = Path(__file__).resolve().parent / "runner"
EXECUTORCH_VERSION = "1.5.1"
TARGETS = ("linux-x86_64", "linux-aarch64")
ANDROID_TARGETS = ("android-arm64-v8a", "android-x86_64")

LAUNCHER = """#!/bin/sh
# firstkit runner launcher: libraries live next to the binary (lib/). FIRSTKIT_RUNNER_WRAPPER, when set
# by the device, runs the binary through an emulator (e.g. qemu-user: timings are then not real).
d=$(cd "$(dirname "$0")" && pwd)
if [ -n "$FIRSTKIT_PIDFILE" ]; then echo $$ > "$FIRSTKIT_PIDFILE"; fi
LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec $FIRSTKIT_RUNNER_WRAPPER "$d/first_runner" "$@"
"""


class BuildError(RuntimeError):
    """The runner could not be built (missing toolchain, wheel, compiler error)."""


@dataclass
class RunnerPackage:
    """A built, packaged runner."""

    path: Path
    target: str
    key: str
    cached: bool
    build_s: float

    @property
    def binary(self) -> Path:
        return self.path / "first_runner"

    @property
    def launcher(self) -> Path:
        return self.path / "run.sh"

    def files(self) -> list[Path]:
        """Every file of the package (relative paths), runner.json excluded."""
        return sorted(p.relative_to(self.path) for p in self.path.rglob("*")
                      if p.is_file() and p.name != "runner.json")


def default_cache_dir() -> Path:
    """``$FIRSTKIT_CACHE/runners`` or ``~/.cache/firstkit/runners``."""
    base = os.environ.get("FIRSTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "firstkit")
    return Path(base) / "runners"


def host_target() -> str:
    """Runner target matching this machine."""
    m = platform.machine().lower()
    return {"x86_64": "linux-x86_64", "amd64": "linux-x86_64", "aarch64": "linux-aarch64",
            "arm64": "linux-aarch64"}.get(m, f"linux-{m}")


def target_for_abi(abi: str, android: bool) -> str:
    """Runner target for a device ABI (``uname -m`` on Linux, ``ro.product.cpu.abi`` on Android)."""
    a = abi.strip().lower()
    if android:
        return {"arm64-v8a": "android-arm64-v8a", "x86_64": "android-x86_64"}.get(a, f"android-{a}")
    return {"x86_64": "linux-x86_64", "amd64": "linux-x86_64", "aarch64": "linux-aarch64",
            "arm64": "linux-aarch64", "armv8l": "linux-aarch64"}.get(a, f"linux-{a}")


def source_hash() -> str:
    """sha256 over the runner sources (relative path + content)."""
    h = hashlib.sha256()
    for p in sorted(RUNNER_SRC.rglob("*")):
        if p.is_file() and p.suffix in {".cpp", ".h", ".txt", ".cmake"}:
            h.update(str(p.relative_to(RUNNER_SRC)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def build_key(target: str) -> str:
    h = hashlib.sha256(f"{source_hash()}|{target}|executorch={EXECUTORCH_VERSION}".encode())
    return h.hexdigest()[:16]


def host_executorch_root() -> Path:
    import executorch

    return Path(list(executorch.__path__)[0])


def aarch64_executorch_root(cache: Path) -> Path:
    """The aarch64 wheel's ``executorch/`` (lib, include, share), downloaded once with pip."""
    env = os.environ.get("FIRSTKIT_EXECUTORCH_AARCH64")
    if env:
        root = Path(env)
        if not (root / "lib" / "libexecutorch.so").exists():
            raise BuildError(f"FIRSTKIT_EXECUTORCH_AARCH64={env} has no lib/libexecutorch.so")
        return root
    dest = cache.parent / "executorch-aarch64" / EXECUTORCH_VERSION
    root = dest / "executorch"
    if (root / "lib" / "libexecutorch.so").exists():
        return root
    wheels = cache.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"executorch-{EXECUTORCH_VERSION}-*aarch64.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11",
               f"executorch=={EXECUTORCH_VERSION}", "-d", str(wheels)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"executorch-{EXECUTORCH_VERSION}-*aarch64.whl"))
        if r.returncode != 0 or not found:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise BuildError("cannot download the aarch64 executorch wheel: " + last)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-et-", dir=dest.parent if dest.parent.exists() else None))
    try:
        with zipfile.ZipFile(found[-1]) as z:
            members = [n for n in z.namelist() if n.startswith(("executorch/lib/", "executorch/include/",
                                                                  "executorch/share/"))]
            z.extractall(tmp, members)
        dest.mkdir(parents=True, exist_ok=True)
        if root.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp / "executorch", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _needed(binary: Path) -> list[str]:
    """DT_NEEDED entries of an ELF file (via readelf, which binutils ships with every gcc)."""
    r = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"readelf failed on {binary}: {r.stderr.strip()}")
    out = []
    for line in r.stdout.splitlines():
        if "(NEEDED)" in line and "[" in line:
            out.append(line.split("[", 1)[1].split("]", 1)[0])
    return out


def _run(cmd: list[str], cwd: Path, log: list[str]) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    log.append("$ " + " ".join(cmd) + "\n" + r.stdout + r.stderr)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        raise BuildError(f"{' '.join(cmd[:2])} failed:\n" + "\n".join(tail))


def build(target: str | None = None, cache_dir: str | os.PathLike | None = None, force: bool = False,
          jobs: int | None = None) -> RunnerPackage:
    """Build (or reuse) the runner for ``target`` and return the package folder."""
    target = target or host_target()
    if target in ANDROID_TARGETS:
        raise BuildError(f"{target}: Android builds need the Android NDK and ExecuTorch's android preset, "
                         "which this machine lacks; build it as in docs/device_bench.md and pass --runner-dir")
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; known: {', '.join(TARGETS + ANDROID_TARGETS)}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = build_key(target)
    final = cache / f"{target}-{key}"
    if (final / "runner.json").exists() and not force:
        meta = json.loads((final / "runner.json").read_text())
        return RunnerPackage(final, target, key, True, float(meta.get("build_s", 0.0)))
    for tool in ("cmake", "ninja", "readelf"):
        if not shutil.which(tool):
            raise BuildError(f"{tool} not found (pip install cmake ninja; apt-get install binutils)")
    cmake_args = []
    if target == host_target():
        et_root = host_executorch_root()
    elif target == "linux-aarch64":
        if not shutil.which("aarch64-linux-gnu-g++"):
            raise BuildError("aarch64-linux-gnu-g++ not found: apt-get install g++-aarch64-linux-gnu")
        et_root = aarch64_executorch_root(cache)
        cmake_args.append(f"-DCMAKE_TOOLCHAIN_FILE={RUNNER_SRC / 'toolchains' / 'aarch64-linux-gnu.cmake'}")
    else:
        raise BuildError(f"cannot build {target} on a {host_target()} host")
    t0 = time.time()
    log: list[str] = []
    work = Path(tempfile.mkdtemp(prefix=f".tmp-build-{target}-", dir=cache))
    try:
        bdir = work / "build"
        _run(["cmake", "-S", str(RUNNER_SRC), "-B", str(bdir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              f"-DEXECUTORCH_ROOT={et_root}", *cmake_args], work, log)
        _run(["cmake", "--build", str(bdir), "--target", "first_runner", "--", f"-j{jobs or os.cpu_count() or 2}"],
             work, log)
        pkg = work / "pkg"
        (pkg / "lib").mkdir(parents=True)
        shutil.copy2(bdir / "first_runner", pkg / "first_runner")
        # Copy the executorch libraries the binary needs, transitively.
        todo, seen = _needed(pkg / "first_runner"), set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            src = et_root / "lib" / name
            if src.exists():
                shutil.copy2(src, pkg / "lib" / name)
                todo.extend(_needed(src))
        (pkg / "run.sh").write_text(LAUNCHER)
        (pkg / "run.sh").chmod(0o755)
        build_s = time.time() - t0
        files = {str(p.relative_to(pkg)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(pkg.rglob("*")) if p.is_file()}
        (pkg / "runner.json").write_text(json.dumps({
            "target": target, "key": key, "source_sha256": source_hash(), "executorch": EXECUTORCH_VERSION,
            "build_s": round(build_s, 2), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files}, indent=2))
        (work / "build.log").write_text("\n".join(log))
        if final.exists():
            shutil.rmtree(final)
        os.replace(pkg, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return RunnerPackage(final, target, key, False, build_s)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", "targets", multiple=True, type=click.Choice(TARGETS + ANDROID_TARGETS + ("host", "all")),
              default=("host",), show_default=True, help="What to build (repeatable).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where built runners are cached [default: ~/.cache/firstkit/runners].")
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per target.")
def main(targets: tuple[str, ...], cache_dir: str | None, force: bool, as_json: bool) -> None:
    """Build and cache the native first_runner (linux-x86_64, linux-aarch64)."""
    wanted: list[str] = []
    for t in targets:
        for x in (TARGETS if t == "all" else (host_target(),) if t == "host" else (t,)):
            if x not in wanted:
                wanted.append(x)
    failed = False
    for t in wanted:
        try:
            pkg = build(t, cache_dir, force)
        except BuildError as e:
            failed = True
            msg = str(e)
            if as_json:
                click.echo(json.dumps({"target": t, "error": msg}))
            else:
                click.echo(f"error: {msg}", err=True)
            continue
        if as_json:
            click.echo(json.dumps({"target": t, "path": str(pkg.path), "key": pkg.key, "cached": pkg.cached,
                                   "build_s": round(pkg.build_s, 2)}))
        else:
            how = "cached" if pkg.cached else f"built in {pkg.build_s:.1f} s"
            click.echo(f"{t}: {pkg.path} ({how})")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
