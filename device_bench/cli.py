"""``first-bench``: benchmark a firstkit bundle with the native runner on adb devices or this host, or through
the firstkit demo app (``--app``) on Android devices.

    first-bench BUNDLE [--device SERIAL ...|--all-devices|--local] [--runs N] [--warmup N]
                [--masks auto,all,BITS...] [--prompt-lengths ...] [--threads ...] [--out results.jsonl]
                [--json] [--profile] [--app [--app-package PKG] [--app-dir DIR]]
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
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import click

from firstkit.mask_spec import MASK_SPEC_HELP, is_mask_spec

from .adb import Adb, AdbError
from .app_target import APP_TARGET, PACKAGE, AppTarget, bench_app
from .bench import (
    AdbTarget,
    BenchError,
    LocalTarget,
    References,
    Settings,
    Target,
    bench_target,
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
def main(bundle: str, devices: tuple[str, ...], all_devices: bool, local: bool, runs: int, warmup: int,
         masks: tuple[str, ...], prompt_lengths: tuple[str, ...], threads_opt: tuple[str, ...], max_new_tokens: int,
         out_path: str, as_json: bool, profile: bool, timeout: float, retries: int, plots: bool, reference: bool,
         device_dir: str | None, runner_dir: str | None, purge: bool, prompt_text: str | None,
         adb_path: str | None, cache_dir: str | None, use_app: bool, app_package: str, app_dir: str | None) -> None:
    """Benchmark BUNDLE (a first-export bundle) base vs layer skipping with the native runner (or the demo app)."""
    from tqdm import tqdm

    if not (devices or all_devices or local):
        raise click.UsageError("say where to run: --device SERIAL, --all-devices or --local")
    if use_app:
        if not (devices or all_devices):
            raise click.UsageError("--app drives the app on adb devices: add --device SERIAL or --all-devices")
        for flag, given in (("--profile", profile), ("--runner-dir", runner_dir), ("--device-dir", device_dir)):
            if given:
                raise click.UsageError(f"{flag} is for the native runner; the app (--app) does not use it")
    elif app_dir is not None or app_package != PACKAGE:
        raise click.UsageError("--app-dir and --app-package need --app")
    if prompt_text is not None:
        from firstkit.runtime.runner import check_text

        try:
            check_text(prompt_text, "--prompt")
        except ValueError as e:
            raise click.BadParameter(str(e).removeprefix("--prompt "), param_hint="--prompt") from None
    mask_list = _csv(masks)
    for m in mask_list:
        if not is_mask_spec(m):
            raise click.BadParameter(f"{m!r}: use {MASK_SPEC_HELP}", param_hint="--masks")
    added_all = "all" not in mask_list
    if added_all:
        mask_list.insert(0, "all")  # the speedup baseline
    mask_list = list(dict.fromkeys(mask_list))
    stop = threading.Event()
    settings = Settings(runs=runs, warmup=warmup, masks=mask_list, stop=stop,
                        prompt_lengths=_ints(prompt_lengths, "--prompt-lengths", 1),
                        threads=_ints(threads_opt, "--threads", 1), max_new_tokens=max_new_tokens, timeout=timeout,
                        retries=retries, profile=profile, reference=reference, purge=purge, prompt_text=prompt_text,
                        runner_dir=runner_dir, cache_dir=cache_dir,
                        profile_dir=str(Path(out_path).with_suffix("")) + "_profiles")
    try:
        b = load_bundle(bundle)
        if b.num_layers is not None:  # bad masks fail before anything is pushed
            check_masks(mask_list, b.num_layers, b.protected)
        store = ResultStore(out_path)
        store.lock_writer()  # one first-bench per store: a second would measure everything again, concurrently
        click.get_current_context().call_on_close(store.close)
        store.records()  # a malformed record is reported now, before anything runs
    except (BenchError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None

    targets: list[Target] = []
    if devices or all_devices:
        try:
            adb = Adb(adb_path)
            adb.start_server()
            serials = list(dict.fromkeys(devices))
            for s in serials:
                if ":" in s:
                    try:
                        adb.connect(s)
                    except AdbError as e:
                        raise click.ClickException(str(e)) from e
            listed = adb.devices()
            if all_devices:
                serials += [d["serial"] for d in listed if d["state"] == "device" and d["serial"] not in serials]
                if not serials:
                    raise click.ClickException("no online adb device (adb devices lists none)")
            states = {d["serial"]: d["state"] for d in listed}
            for s in serials:
                if states.get(s) != "device":
                    raise click.ClickException(f"device {s} is {states.get(s, 'not connected')} (see adb devices)")
            if use_app:
                targets += [AppTarget(adb, s, app_package, app_dir) for s in serials]
            else:
                targets += [AdbTarget(adb, s, device_dir, runner_dir) for s in serials]
        except AdbError as e:
            raise click.ClickException(str(e)) from e
    if local:
        targets.append(LocalTarget())

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    refs = References(b) if reference else None
    n_cfg = len(settings.masks) * len(settings.prompt_lengths) * len(settings.threads)
    bars = {t.name: tqdm(total=n_cfg * runs, desc=t.name, position=i, unit="run", file=sys.stderr, leave=False,
                         disable=None) for i, t in enumerate(targets)}
    lock = threading.Lock()

    def work(t: Target):
        def prog(n: int) -> None:
            with lock:
                bars[t.name].update(n)
        if isinstance(t, AppTarget):
            return bench_app(t, b, settings, store, refs, log, prog)
        return bench_target(t, b, settings, store, refs, log, prog)

    with stop_on_signals(stop, log) as signals, ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
        futures = [pool.submit(work, t) for t in targets]
        while wait(futures, timeout=0.5).not_done:
            if stop.is_set():  # kill what runs now on every target (again: a runner may start in between)
                for t in targets:
                    t.abort()
        reports = [f.result() for f in futures]
    for bar in bars.values():
        bar.close()

    # native and app rows of one device stay apart (a target whose probe failed: its native rows, as before)
    measured = {(t.name, t.runner_target or None) for t in targets}

    def shown(r: dict) -> bool:
        return (r["device"], r.get("target")) in measured or (
            (r["device"], None) in measured and r.get("target") != APP_TARGET)

    try:
        all_records = store.records()
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    records = [r for r in all_records if r["bundle_sha256"] == b.sha256 and shown(r)
               and r["max_new_tokens"] == max_new_tokens and r["mask_spec"] in settings.masks
               and r["prompt_len"] in settings.prompt_lengths and r["threads"] in settings.threads]
    rows = summarize(records)
    settings_line = {"bundle": str(b.path), "bundle_sha256": b.sha256[:12], "runs": runs, "warmup": warmup,
                     "masks": ",".join(settings.masks) + (" ('all' added as baseline)" if added_all else ""),
                     "prompt_lengths": ",".join(map(str, settings.prompt_lengths)),
                     "threads": ",".join(map(str, settings.threads)), "max_new_tokens": max_new_tokens,
                     "store": out_path}
    if use_app:
        settings_line["app"] = app_package
    table = format_table(rows, settings_line)
    if as_json:
        for r in rows:
            click.echo(json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=True))
        click.echo(table, err=True)
    else:
        click.echo(table)
    if refs is not None and refs.error:
        click.echo(f"note: tokens_match unavailable: {refs.error}", err=True)
    for rep in reports:
        for p in rep.profiles:
            from .profile import format_profile

            title = f"{p['device']} mask {p['mask_spec']} pp {p['prompt_len']} {p['threads']} thr" + (
                " (qemu: not real timings)" if p.get("emulated") else "")
            click.echo(format_profile(p["summary"], title) if "summary" in p else f"profile {title}: {p['error']}",
                       err=as_json)
    if profile:
        pj = Path(settings.profile_dir) / "profiles.json"
        pj.parent.mkdir(parents=True, exist_ok=True)
        tmp = pj.with_suffix(".json.tmp")
        tmp.write_text(json.dumps([p for rep in reports for p in rep.profiles], indent=2))
        tmp.replace(pj)
    if plots and rows:
        for p in write_plots(rows, str(Path(out_path).with_suffix(""))):
            click.echo(f"plot: {p}", err=True)
    failed = [e for rep in reports for e in rep.errors]
    for e in failed:
        click.echo(f"error: {e}", err=True)
    if signals:
        click.echo(f"error: interrupted by {SIGNALS.get(signals[0], signals[0])}: finished runs are stored in "
                   f"{out_path}; rerun the same command to resume", err=True)
        sys.exit(128 + signals[0])
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
