"""The firstkit demo app "installed" on a loopback adb device, for testing ``first-bench --app`` without a phone.

:class:`FakeApp` puts ``am``, ``pm`` and ``pidof`` on the :class:`~.adbd.LoopbackAdbd`'s PATH
(:mod:`.fake_android_shim`). They run the app's real headless benchmark on this host: the plain-Java logic
module (``android_demo/logic``, compiled with ``javac``) calling ``Benchmark.runIntent`` (what
``BenchmarkActivity`` calls on the phone), and the app's JNI bridge built for Linux by the app's own
``CMakeLists.txt`` against the shared runner core (``device_bench/runner/core``) and the executorch wheel. So
the records ``first-bench --app`` collects come from the same C++ core through the same Java code as on a phone;
only Android itself (the activity manager, the APK, scoped storage) is stood in for. The app's external files
directory is ``<device root>/sdcard/Android/data/org.firstkit.demo/files`` (pass it as ``--app-dir``).

Both builds are cached under ``$FIRSTKIT_CACHE/android-host`` (default ``~/.cache/firstkit/android-host``), keyed
by a hash of their sources, like first-build-runner's runner cache.

Run standalone: ``python -m fakes.fake_android (from tests/) --root DIR`` (then
``first-bench BUNDLE --device 127.0.0.1:PORT --app --app-dir DIR/sdcard/Android/data/org.firstkit.demo/files``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .adbd import LoopbackAdbd

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "android_demo"
LOGIC_SRC = DEMO / "logic" / "src" / "main" / "java"
#: org.json, built into Android; on the desktop the Debian package libandroid-json-java (the same classes)
ORG_JSON = Path("/usr/share/java/com.android.json.jar")


def org_json_jar() -> Path:
    if not ORG_JSON.is_file():
        raise FakeAndroidError(f"{ORG_JSON} missing: install the Debian package libandroid-json-java "
                               "(org.json, which Android has built in)")
    return ORG_JSON
JNI_SRC = DEMO / "app" / "src" / "main" / "cpp"
CORE_SRC = REPO / "device_bench" / "runner" / "core"
SHIM = Path(__file__).resolve().parent / "fake_android_shim.py"
PACKAGE = "org.firstkit.demo"


class FakeAndroidError(RuntimeError):
    """A tool is missing or a build failed; ``missing`` names the missing system tool, if that is the cause."""

    def __init__(self, message: str, missing: str | None = None) -> None:
        super().__init__(message)
        self.missing = missing


def cache_root() -> Path:
    base = os.environ.get("FIRSTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "firstkit")
    return Path(base) / "android-host"


def _which(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise FakeAndroidError(f"{tool} missing: install {package} (tests/install_system_deps.sh)", missing=tool)
    return path


def _hash(files: list[Path], *extra: str) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(str(p).encode() + b"\0" + p.read_bytes() + b"\0")
    for e in extra:
        h.update(e.encode() + b"\0")
    return h.hexdigest()[:16]


def _publish(tmp: Path, dest: Path) -> Path:
    """Rename a finished build into place (another process may have won the race: keep theirs)."""
    try:
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def java_home() -> Path:
    javac = Path(os.path.realpath(_which("javac", "openjdk-17-jdk-headless")))
    home = Path(os.environ.get("JAVA_HOME") or javac.parents[1])
    if not (home / "include" / "jni.h").is_file():
        raise FakeAndroidError(f"jni.h not found under {home}/include: install openjdk-17-jdk-headless or set "
                               "JAVA_HOME", missing="jni.h")
    return home


def logic_classes(cache: Path | None = None) -> Path:
    """``android_demo/logic`` compiled with javac (Java 11 language level, as its Gradle module declares)."""
    javac = os.path.realpath(_which("javac", "openjdk-17-jdk-headless"))
    sources = sorted(LOGIC_SRC.rglob("*.java"))
    root = cache or cache_root()
    dest = root / f"logic-{_hash(sources, javac)}"
    if (dest / "org" / "firstkit" / "demo" / "logic" / "LogicTool.class").is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-logic-", dir=root))
    res = subprocess.run([javac, "--release", "11", "-Xlint:all", "-Werror", "-cp", str(org_json_jar()), "-d", str(tmp),
                          *map(str, sources)],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FakeAndroidError("javac failed on android_demo/logic:\n" + res.stderr[-4000:])
    return _publish(tmp, dest)


def jni_library(cache: Path | None = None) -> Path:
    """``libfirstkit_jni.so`` built for this host by the app's CMakeLists.txt (package mode, executorch wheel)."""
    import executorch

    home = java_home()
    cmake = _which("cmake", "pip install cmake")
    _which("ninja", "pip install ninja")
    et_root = list(executorch.__path__)[0]
    from importlib.metadata import version

    sources = sorted(p for d in (JNI_SRC, CORE_SRC) for p in d.rglob("*") if p.is_file())
    key = _hash(sources, str(home), et_root, version("executorch"))
    root = cache or cache_root()
    dest = root / f"jni-{key}"
    lib = dest / "libfirstkit_jni.so"
    if lib.is_file():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".tmp-jni-build-", dir=root))
    env = dict(os.environ, JAVA_HOME=str(home))
    try:
        for cmd in ([cmake, "-S", str(JNI_SRC), "-B", str(build), "-G", "Ninja", f"-DEXECUTORCH_ROOT={et_root}",
                     "-DCMAKE_BUILD_TYPE=Release"], [cmake, "--build", str(build)]):
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
            if res.returncode != 0:
                raise FakeAndroidError("building the JNI bridge failed:\n" + (res.stdout + res.stderr)[-4000:])
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-jni-", dir=root))
        shutil.copy2(build / "libfirstkit_jni.so", tmp / "libfirstkit_jni.so")
        _publish(tmp, dest)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return lib


class FakeApp:
    """The demo app on a loopback device: ``am``/``pm``/``pidof`` stand-ins running the app's real benchmark."""

    def __init__(self, dev: LoopbackAdbd, installed: bool = True, package: str = PACKAGE,
                 classes: Path | None = None, jni_lib: Path | None = None) -> None:
        self.dev = dev
        self.package = package
        self.state = Path(dev.root).parent / f".fake-android-{dev.port}"
        self.files_dir = Path(dev.root) / "sdcard" / "Android" / "data" / package / "files"
        self._installed = installed
        self.classes = classes or logic_classes()
        self.jni_lib = jni_lib or jni_library()
        self.install()

    @property
    def installed(self) -> bool:
        return self._installed

    @installed.setter
    def installed(self, value: bool) -> None:
        self._installed = value
        self._write_config()

    def _write_config(self) -> None:
        cfg = {"package": self.package, "files_dir": str(self.files_dir), "installed": self._installed,
               "java": shutil.which("java") or "java", "classes": str(self.classes), "org_json": str(org_json_jar()),
               "jni_dir": str(self.jni_lib.parent)}
        (self.state / "config.json").write_text(json.dumps(cfg, indent=2))

    def install(self) -> FakeApp:
        """Write the state folder and the stand-ins into the device's PATH (the adbd's shim folder)."""
        _which("java", "openjdk-17-jdk-headless")
        self.state.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self.set_faults()
        bin_dir = self.dev._bin  # the folder LoopbackAdbd puts first on its shells' PATH
        py, shim, st = shlex.quote(sys.executable), shlex.quote(str(SHIM)), shlex.quote(str(self.state))
        scripts = {
            "am": f'exec {py} {shim} {st} am "$@"\n',
            "pm": f'exec {py} {shim} {st} pm "$@"\n',
        }
        real_pidof = shutil.which("pidof")
        fallback = f'exec {shlex.quote(real_pidof)} "$@"' if real_pidof else "exit 1"
        scripts["pidof"] = (f'if [ "$#" -eq 1 ] && [ "$1" = {shlex.quote(self.package)} ]; then\n'
                            f'  exec {py} {shim} {st} pidof "$@"\nfi\n{fallback}\n')
        for name, body in scripts.items():
            p = bin_dir / name
            p.write_text("#!/bin/sh\n# firstkit loopback stand-in (tests/fakes/fake_android.py)\n" + body)
            p.chmod(0o755)
        return self

    def set_faults(self, **faults: int | str) -> None:
        """Faults for the next ``am start``s (counts), e.g. ``hang=1``, ``corrupt=1, corrupt_file="model.pte"``,
        ``crash=1, crash_after_runs=1``, ``malformed=1``; none clears them."""
        (self.state / "faults.json").write_text(json.dumps(faults))

    def logcat(self) -> str:
        p = self.state / "logcat.txt"
        return p.read_text(errors="replace") if p.exists() else ""

    def starts(self) -> list[str]:
        """The ``am start`` lines logged so far (one per benchmark invocation)."""
        return [ln for ln in self.logcat().splitlines() if ln.startswith("am start ")]

    def app_pid(self) -> int | None:
        """The app process, when one is running."""
        try:
            pid = int((self.state / "app.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        return pid

    def stop(self) -> None:
        """Kill a still-running app process (test teardown)."""
        subprocess.run([sys.executable, str(SHIM), str(self.state), "am", "force-stop", self.package],
                       capture_output=True, timeout=60)


def main() -> None:
    """A loopback device with the demo app installed, until interrupted."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="device home directory")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    dev = LoopbackAdbd(a.root, a.port).start()
    try:
        app = FakeApp(dev)
    except FakeAndroidError as e:
        dev.stop()
        sys.exit(f"error: {e}")
    print(f"loopback adbd on {dev.serial} with {app.package} (root {dev.root}); then:\n"
          f"  adb connect {dev.serial}\n"
          f"  first-bench BUNDLE --device {dev.serial} --app --app-dir {shlex.quote(str(app.files_dir))}",
          flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
    app.stop()
    dev.stop()


if __name__ == "__main__":
    main()
