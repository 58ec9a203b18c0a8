"""``first-bench``: benchmark a firstkit bundle with the native runner on adb devices or this host, or through
the firstkit demo app (``--app``) on Android devices.

    first-bench BUNDLE [--device SERIAL ...|--all-devices|--local] [--runs N] [--warmup N]
                [--masks auto,all,BITS...] [--prompt-lengths ...] [--threads ...] [--out results.jsonl]
                [--json] [--profile] [--app [--app-package PKG] [--app-dir DIR]]

click declares the options; :func:`invocation` turns them into one :class:`Invocation` (where to run, where
results go, and the :class:`~firstkit.device_bench.bench.Settings` that expand into the configurations), and
:func:`run` runs the one benchmark loop (``bench.bench_targets``) and prints the table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from firstkit.mask_spec import MASK_SPEC_HELP, is_mask_spec

from .adb import Adb, AdbError
from .app_target import APP_TARGET, PACKAGE, AppTarget
from .bench import (
    AdbTarget,
    BenchError,
    Bundle,
    LocalTarget,
    References,
    Settings,
    Target,
    TargetReport,
    bench_targets,
    check_masks,
    load_bundle,
)
from .report import format_table, summarize, write_plots
from .store import ResultStore, StoreError


def _csv(values: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def _ints(values: tuple[str, ...], name: str, lo: int) -> list[int]:
    out = []
    for x in _csv(values):
        try:
            n = int(x)
        except ValueError as e:
            raise click.BadParameter(f"{x!r} is not an integer", param_hint=name) from e
        if n < lo:
            raise click.BadParameter(f"{n} must be >= {lo}", param_hint=name)
        out.append(n)
    return out


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, log) -> Iterator[list[int]]:
    """SIGINT/SIGTERM set ``stop`` (the benchmark finishes nothing new); a second one exits at once.

    Yields a list that receives the signal numbers; the previous handlers come back afterwards.
    """
    got: list[int] = []

    def handler(signum, _frame) -> None:
        got.append(signum)
        if stop.is_set():  # the worker threads would be waited for: leave now (stored runs are fsynced)
            log(f"{SIGNALS.get(signum, signum)} again: exiting now")
            os._exit(128 + signum)
        stop.set()
        log(f"{SIGNALS.get(signum, signum)}: stopping the runner now; finished runs are kept "
            "(again to exit at once)")

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield got
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--device", "devices", multiple=True, metavar="SERIAL",
              help="adb device serial (repeatable; host:port devices are adb-connected first).")
@click.option("--all-devices", is_flag=True, help="Every device `adb devices` lists as online.")
@click.option("--local", is_flag=True, help="Run the native runner on this host.")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True,
              help="Measured runs per configuration.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Warm-up runs per configuration.")
@click.option("--masks", multiple=True, default=("all,auto",), show_default=True,
              help="auto (routers decide), all, or BITS (one 0/1 per layer, 1 = runs); comma separated.")
@click.option("--prompt-lengths", multiple=True, default=("32",), show_default=True, help="Prompt tokens, e.g. 16,64.")
@click.option("--threads", "threads_opt", multiple=True, default=("2",), show_default=True,
              help="Thread counts, e.g. 1,2.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True,
              help="Tokens generated per run (EOS ignored, so every run generates this many).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="results.jsonl", show_default=True,
              help="Append-only JSONL store (resumable: finished runs are not repeated).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per configuration on stdout.")
@click.option("--profile", is_flag=True, help="Record an ExecuTorch ETDump per mask on the device and summarize it.")
@click.option("--timeout", type=click.FloatRange(1), default=600.0, show_default=True,
              help="Seconds one runner invocation may take before it is killed.")
@click.option("--retries", type=click.IntRange(0), default=1, show_default=True,
              help="Retries of a configuration after a crash, hang or disconnect.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Write <out>_decode.png and <out>_prefill.png.")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Compare tokens with first-run's Python runtime on the host (tokens_match).")
@click.option("--device-dir", default=None, help="Folder on the device [/data/local/tmp/firstkit or $TMPDIR/firstkit].")
@click.option("--runner-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Use this packaged runner (e.g. an Android NDK build) instead of building one.")
@click.option("--purge", is_flag=True, help="Also delete the cached bundle and runner on the device at the end.")
@click.option("--prompt", "prompt_text", default=None,
              help="Text the prompts are made of (tokenized with the bundle's tokenizer).")
@click.option("--adb", "adb_path", default=None, help="adb client binary [adb on PATH, else adbutils' copy].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Runner build cache.")
@click.option("--app", "use_app", is_flag=True,
              help="On the --device/--all-devices devices, drive the installed firstkit demo app (android_demo, "
                   "BenchmarkActivity) instead of the bare native runner; rows show target 'app'.")
@click.option("--app-package", default=PACKAGE, show_default=True, help="Package of the demo app (with --app).")
@click.option("--app-dir", default=None,
              help="The app's external files directory on the device, where bundles are pushed and results "
                   "written (with --app) [/sdcard/Android/data/<package>/files].")
def main(**options) -> None:
    """Benchmark BUNDLE (a first-export bundle) base vs layer skipping with the native runner (or the demo app)."""
    code = run(invocation(options))
    if code:
        sys.exit(code)


@dataclass
class Invocation:
    """Every first-bench option, grouped: the bundle, where to run, where results go, and the benchmark settings."""

    bundle: str
    settings: Settings
    devices: list[str] = field(default_factory=list)
    all_devices: bool = False
    local: bool = False
    adb_path: str | None = None
    device_dir: str | None = None
    app: bool = False
    app_package: str = PACKAGE
    app_dir: str | None = None
    out_path: str = "results.jsonl"
    as_json: bool = False
    plots: bool = True
    added_all: bool = False  # 'all' was not asked for and is measured anyway (the speedup baseline)

    def table_settings(self, b: Bundle) -> dict[str, object]:
        """The settings every row of the table shares (the rows show the others themselves)."""
        out: dict[str, object] = {"bundle": b.path.name, "warmup": self.settings.warmup}
        if self.app:
            out["app"] = self.app_package
        return out

    def table_notes(self, b: Bundle) -> list[str]:
        notes = [f"bundle {b.path} (manifest sha256 {b.sha256[:12]}), results in {self.out_path}"]
        if self.added_all:
            notes.append("mask 'all' was added to --masks: it is the speedup baseline")
        return notes


def invocation(o: dict) -> Invocation:
    """The one place where click's option values become an :class:`Invocation`; usage errors are raised here,
    before the bundle is read."""
    devices, all_devices, local, use_app = list(dict.fromkeys(o["devices"])), o["all_devices"], o["local"], o["use_app"]
    if not (devices or all_devices or local):
        raise click.UsageError("say where to run: --device SERIAL, --all-devices or --local")
    if use_app:
        if not (devices or all_devices):
            raise click.UsageError("--app drives the app on adb devices: add --device SERIAL or --all-devices")
        for flag, given in (("--profile", o["profile"]), ("--runner-dir", o["runner_dir"]),
                            ("--device-dir", o["device_dir"])):
            if given:
                raise click.UsageError(f"{flag} is for the native runner; the app (--app) does not use it")
    elif o["app_dir"] is not None or o["app_package"] != PACKAGE:
        raise click.UsageError("--app-dir and --app-package need --app")
    if o["prompt_text"] is not None:
        from firstkit.runtime.runner import check_text

        try:
            check_text(o["prompt_text"], "--prompt")
        except ValueError as e:
            raise click.BadParameter(str(e).removeprefix("--prompt "), param_hint="--prompt") from None
    masks = _csv(o["masks"])
    for m in masks:
        if not is_mask_spec(m):
            raise click.BadParameter(f"{m!r}: use {MASK_SPEC_HELP}", param_hint="--masks")
    added_all = "all" not in masks
    if added_all:
        masks.insert(0, "all")  # the speedup baseline
    out_path = o["out_path"]
    settings = Settings(runs=o["runs"], warmup=o["warmup"], masks=list(dict.fromkeys(masks)),
                        prompt_lengths=_ints(o["prompt_lengths"], "--prompt-lengths", 1),
                        threads=_ints(o["threads_opt"], "--threads", 1), max_new_tokens=o["max_new_tokens"],
                        timeout=o["timeout"], retries=o["retries"], profile=o["profile"], reference=o["reference"],
                        purge=o["purge"], prompt_text=o["prompt_text"], runner_dir=o["runner_dir"],
                        cache_dir=o["cache_dir"], profile_dir=str(Path(out_path).with_suffix("")) + "_profiles",
                        stop=threading.Event())
    return Invocation(bundle=o["bundle"], settings=settings, devices=devices, all_devices=all_devices, local=local,
                      adb_path=o["adb_path"], device_dir=o["device_dir"], app=use_app, app_package=o["app_package"],
                      app_dir=o["app_dir"], out_path=out_path, as_json=o["as_json"], plots=o["plots"],
                      added_all=added_all)


def _targets(inv: Invocation) -> list[Target]:
    """The adb devices (connected, online) and this host, as benchmark targets."""
    targets: list[Target] = []
    if inv.devices or inv.all_devices:
        try:
            adb = Adb(inv.adb_path)
            adb.start_server()
            serials = list(inv.devices)
            for s in serials:
                if ":" in s:
                    adb.connect(s)
            listed = adb.devices()
            if inv.all_devices:
                serials += [d["serial"] for d in listed if d["state"] == "device" and d["serial"] not in serials]
                if not serials:
                    raise click.ClickException("no online adb device (adb devices lists none)")
            states = {d["serial"]: d["state"] for d in listed}
            for s in serials:
                if states.get(s) != "device":
                    raise click.ClickException(f"device {s} is {states.get(s, 'not connected')} (see adb devices)")
        except AdbError as e:
            raise click.ClickException(str(e)) from e
        if inv.app:
            targets += [AppTarget(adb, s, inv.app_package, inv.app_dir) for s in serials]
        else:
            targets += [AdbTarget(adb, s, inv.device_dir) for s in serials]
    if inv.local:
        targets.append(LocalTarget())
    return targets


def run(inv: Invocation) -> int:
    """Check the bundle and the store, run every target, print the table (and plots, profiles); the exit status."""
    s = inv.settings
    try:
        b = load_bundle(inv.bundle)
        check_masks(s.masks, b.num_layers, b.protected)  # bad masks fail before anything is pushed
        store = ResultStore(inv.out_path)
        store.lock_writer()  # one first-bench per store: a second would measure everything again, concurrently
        click.get_current_context().call_on_close(store.close)
        store.records()  # a malformed record is reported now, before anything runs
    except (BenchError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    targets = _targets(inv)

    from tqdm import tqdm

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    refs = References(b) if s.reference else None
    assert s.stop is not None
    with stop_on_signals(s.stop, log) as signals:
        reports = bench_targets(targets, b, s, store, refs, log)
    try:
        rows = summarize(_shown_records(store, b, inv, targets))
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    table = format_table(rows, inv.table_settings(b), inv.table_notes(b))
    if inv.as_json:
        for r in rows:
            click.echo(json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=True))
        click.echo(table, err=True)
    else:
        click.echo(table)
    if refs is not None and refs.error:
        click.echo(f"note: tokens_match unavailable: {refs.error}", err=True)
    _profiles(reports, inv)
    if inv.plots and rows:
        for p in write_plots(rows, str(Path(inv.out_path).with_suffix(""))):
            click.echo(f"plot: {p}", err=True)
    failed = [e for rep in reports for e in rep.errors]
    for e in failed:
        click.echo(f"error: {e}", err=True)
    if signals:
        click.echo(f"error: interrupted by {SIGNALS.get(signals[0], signals[0])}: finished runs are stored in "
                   f"{inv.out_path}; rerun the same command to resume", err=True)
        return 128 + signals[0]
    return 1 if failed else 0


def _shown_records(store: ResultStore, b: Bundle, inv: Invocation, targets: list[Target]) -> list[dict]:
    """The stored runs of this invocation's configurations on its targets (native and app rows of one device stay
    apart; a target whose probe failed: its native rows, as before)."""
    s = inv.settings
    measured = {(t.name, t.runner_target or None) for t in targets}

    def shown(r: dict) -> bool:
        return (r["device"], r.get("target")) in measured or (
            (r["device"], None) in measured and r.get("target") != APP_TARGET)

    return [r for r in store.records() if r["bundle_sha256"] == b.sha256 and shown(r)
            and r["max_new_tokens"] == s.max_new_tokens and r["mask_spec"] in s.masks
            and r["prompt_len"] in s.prompt_lengths and r["threads"] in s.threads]


def _profiles(reports: list[TargetReport], inv: Invocation) -> None:
    """Print the ETDump summaries; with --profile save them to <out>_profiles/profiles.json."""
    from .profile import format_profile

    for rep in reports:
        for p in rep.profiles:
            title = f"{p['device']} mask {p['mask_spec']} pp {p['prompt_len']} {p['threads']} thr" + (
                " (qemu: not real timings)" if p.get("emulated") else "")
            click.echo(format_profile(p["summary"], title) if "summary" in p else f"profile {title}: {p['error']}",
                       err=inv.as_json)
    if inv.settings.profile and inv.settings.profile_dir:
        pj = Path(inv.settings.profile_dir) / "profiles.json"
        pj.parent.mkdir(parents=True, exist_ok=True)
        tmp = pj.with_suffix(".json.tmp")
        tmp.write_text(json.dumps([p for rep in reports for p in rep.profiles], indent=2))
        tmp.replace(pj)


if __name__ == "__main__":
    main()
