"""Peer: our all-layers 8da4w bundle vs the stock ExecuTorch export of the same model (optimum-executorch).

    python benchmarks/stock_executorch.py --bundle /tmp/dev/smol-8da4w --threads 1,2 --json out.json

Three steps, each cached, so a re-run only measures:

1. **Environment.** optimum-executorch 1.1.0 pins ``transformers==5.0.0rc1`` and ``optimum~=2.0.0``, which
   cannot live beside firstkit's transformers 5.24, so it gets its own virtual environment (default
   ``$FIRSTKIT_CACHE/peers/optimum-executorch``, reused when its pins import). It is a plain
   ``python -m venv`` (no ``--system-site-packages``) with
   ``pip install torch==2.13.0 executorch==1.5.1 optimum-executorch==1.1.0``: torch and executorch are the
   same releases as firstkit's, so the exported ``.pte`` runs in this process's runtime. Before installing,
   ``pip install --dry-run --report`` shows which torch file pip would take; when it is not a ``+cpu``
   build on Linux x86_64 (PyPI's plain torch wheel pulls several GB of CUDA libraries) the script stops
   and asks for ``--torch-spec`` (e.g. the path of a CPU wheel). On the reference machine pip's
   find-links hold ``torch-2.13.0+cpu``, which it prefers (local version label), so nothing big is
   downloaded; the venv is ~1.7 GB on disk.
2. **Export** with optimum-executorch's XNNPACK recipe from our local float folder of the model
   (``firstkit.models.ensure_named_model``; ``HF_HUB_OFFLINE=1``, no hub access)::

       optimum-cli export executorch --model <folder> --task text-generation --recipe xnnpack \\
           --qlinear 8da4w --qembedding 8w --use_custom_sdpa --use_custom_kv_cache \\
           --max_seq_len <bundle's max_seq_len> --output_dir <export dir>

   8da4w = int8 dynamic activations + int4 weights, group 32 (the recipe's default, the same as our
   bundle's), embedding int8 per row, ``--max_seq_len`` equal to our bundle's so both KV caches are the
   same size. Output under ``$FIRSTKIT_CACHE/peers/exports/<name>/model.pte`` with ``export.json``
   (command, wall time, versions). It takes tens of minutes on 2 cores: ``--export-only`` under
   ``nohup`` and poll, then run again to measure.
3. **Measure** in ONE process, alternating rounds, the same prompt token ids (a chat prompt through the
   bundle's template) and the same number of new tokens (greedy, EOS ignored), for each thread count:
   the stock ``.pte`` (``forward(input_ids, cache_position)``, through ``executorch.runtime``), our
   bundle through ``firstkit.runtime`` (Python, one method call per layer) and through the native runner
   (``first_runner``, the C++ runner ``first-bench`` uses, built or reused from its cache), each with all
   layers and with the routers' mask. Threads: ``_unsafe_reset_threadpool(n)`` for the ExecuTorch
   runtime **and** ``torch.set_num_threads(n)`` (the stock program runs kernels outside XNNPACK on torch's
   intra-op pool: left at its default on this loaded 2-core machine, single decode steps of the stock
   ``.pte`` stalled for 1-5 s and its tok/s swung 1.4-27; sized to n, they did not), ``--threads n`` for
   the native runner. Both programs are (re)loaded after the pools are sized (the ``_unsafe_`` reset
   replaces the pool). Decode tok/s = decode steps / total decode time (the
   native runner's definition); prefill ms = time to the first token's logits.

The routers' mask: when the bundle ships routers, its prefill decides (``auto``); otherwise the shipped
default routers decide it in eager float PyTorch on the same prompt (as docs/results_export.md did), and it
is passed as explicit bits. Greedy tokens of every side are compared with eager float tokens (``FirstModel.generate``,
EOS ignored) and with each other. Peak RSS of the stock ``.pte`` is measured in a child process.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import click

OPTIMUM_EXECUTORCH = "optimum-executorch==1.1.0"
TORCH_SPEC = "torch==2.13.0"
EXECUTORCH_SPEC = "executorch==1.5.1"
PINS = {"optimum-executorch": "1.1.0", "torch": "2.13.0", "executorch": "1.5.1"}
PROMPT = ("You are a helpful assistant. Summarize in two sentences why the sky appears blue during the day and "
          "red at sunset, mentioning Rayleigh scattering and the path length of sunlight through the atmosphere.")
VERSIONS_PY = ("import json, importlib.metadata as m\n"
               "names = ['torch', 'executorch', 'torchao', 'transformers', 'optimum', 'optimum-executorch']\n"
               "out = {}\n"
               "for n in names:\n"
               "    try:\n"
               "        out[n] = m.version(n)\n"
               "    except m.PackageNotFoundError:\n"
               "        out[n] = None\n"
               "print(json.dumps(out))\n")


def cache_root() -> Path:
    from firstkit.models import cache_dir

    return cache_dir()


def log(msg: str) -> None:
    click.echo(msg, err=True)


# --------------------------------------------------------------------------------------------- environment
def venv_versions(venv: Path) -> dict | None:
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", VERSIONS_PY], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def venv_ok(versions: dict | None) -> bool:
    return bool(versions) and all((versions.get(k) or "").split("+")[0] == v for k, v in PINS.items())


def check_torch_choice(py: Path, torch_spec: str) -> str:
    """Which torch file pip would install (dry run); refuse a CUDA build on Linux x86_64."""
    report = py.parent.parent / "torch-dry-run.json"
    r = subprocess.run([str(py), "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", "--report",
                        str(report), torch_spec], capture_output=True, text=True)
    if r.returncode != 0:
        raise click.ClickException(f"pip cannot resolve {torch_spec}: {r.stderr.strip()[-2000:]}")
    items = json.loads(report.read_text()).get("install", [])
    if not items:
        return "the torch already installed in the venv"
    url = items[0]["download_info"]["url"]
    name = urllib.parse.unquote(url.rsplit("/", 1)[-1])
    if sys.platform == "linux" and platform.machine() == "x86_64" and "+cpu" not in name:
        raise click.ClickException(
            f"pip would install {name or torch_spec} for torch, which is not a +cpu build (a CUDA wheel pulls "
            "several GB). Pass --torch-spec with a CPU wheel, e.g. the path of torch-2.13.0+cpu-...whl")
    return name


def ensure_venv(venv: Path, torch_spec: str) -> dict:
    """Create (or reuse) the venv with the pinned optimum-executorch; returns the installed versions."""
    have = venv_versions(venv)
    if venv_ok(have):
        log(f"venv {venv}: reused ({json.dumps(have)})")
        return have
    if not (venv / "bin" / "python").exists():
        log(f"venv {venv}: creating")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    wheel = check_torch_choice(py, torch_spec)
    log(f"venv {venv}: torch from {wheel}; installing {OPTIMUM_EXECUTORCH} (a few minutes)")
    subprocess.run([str(py), "-m", "pip", "install", torch_spec, EXECUTORCH_SPEC, OPTIMUM_EXECUTORCH], check=True)
    have = venv_versions(venv)
    if not venv_ok(have):
        raise click.ClickException(f"venv {venv} does not hold the pins {PINS} after pip install: {have}")
    cuda = subprocess.run([str(py), "-c", "import torch; print(torch.version.cuda)"], capture_output=True,
                          text=True).stdout.strip()
    if cuda not in ("None", ""):
        log(f"warning: the venv's torch is a CUDA build ({cuda})")
    return have


# --------------------------------------------------------------------------------------------- export
def export_command(venv: Path, model_dir: Path, out: Path, max_seq_len: int) -> list[str]:
    return [str(venv / "bin" / "optimum-cli"), "export", "executorch", "--model", str(model_dir),
            "--task", "text-generation", "--recipe", "xnnpack", "--qlinear", "8da4w", "--qembedding", "8w",
            "--use_custom_sdpa", "--use_custom_kv_cache", "--max_seq_len", str(max_seq_len),
            "--output_dir", str(out)]


def ensure_export(venv: Path, model_dir: Path, out: Path, max_seq_len: int, versions: dict) -> dict:
    """Run the optimum-executorch export unless ``out/model.pte`` exists; returns export.json's content."""
    meta_path = out / "export.json"
    if (out / "model.pte").is_file():
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"note": "no export.json"}
        log(f"stock export {out}/model.pte: reused")
        return meta
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    cmd = export_command(venv, model_dir, partial, max_seq_len)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log("stock export (tens of minutes on 2 cores): " + " ".join(cmd))
    t0 = time.time()
    with open(partial / "export.log", "w") as fh:
        r = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if r.returncode != 0 or not (partial / "model.pte").is_file():
        raise click.ClickException(f"optimum-cli export failed (exit {r.returncode}); see {partial / 'export.log'}")
    meta = {"command": " ".join(export_command(venv, model_dir, out, max_seq_len)), "wall_s": round(wall, 1),
            "versions": versions, "model_dir": str(model_dir), "max_seq_len": max_seq_len,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (partial / "export.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return meta


# --------------------------------------------------------------------------------------------- runtimes
def _load_stock_modules() -> None:
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::embedding_byte)
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama::custom_sdpa, update_cache)


class StockPte:
    """optimum-executorch's single-method ``.pte``: ``forward(input_ids[1, T], cache_position[T]) -> logits``."""

    def __init__(self, path: Path) -> None:
        _load_stock_modules()
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(Path(path))
        self.forward = self.program.load_method("forward")

    def _logits(self, ids: list[int], pos: int):
        import torch

        out = self.forward.execute([torch.tensor([ids], dtype=torch.long),
                                    torch.arange(pos, pos + len(ids), dtype=torch.long)])[0]
        return out.reshape(-1, out.shape[-1])[-1]

    def generate(self, ids: list[int], new_tokens: int) -> dict:
        # timed like firstkit.runtime: the program call(s) only, argmax outside
        t0 = time.perf_counter()
        logits = self._logits(ids, 0)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        out, decode_ms = [int(logits.argmax())], []
        for k in range(new_tokens - 1):
            s = time.perf_counter()
            logits = self._logits([out[-1]], len(ids) + k)
            decode_ms.append((time.perf_counter() - s) * 1e3)
            out.append(int(logits.argmax()))
        return {"tokens": out, "prefill_ms": prefill_ms, "decode_ms": decode_ms}


def native_generate(launcher: str, bundle: Path, ids: list[int], new_tokens: int, threads: int, mask: str,
                    warmup: int = 1) -> dict:
    argv = [launcher, "--bundle", str(bundle), "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens",
            str(new_tokens), "--threads", str(threads), "--mask", mask, "--warmup", str(warmup), "--runs", "1",
            "--ignore-eos", "--no-verify"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise click.ClickException(f"native runner failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def _vm_mb(field: str = "VmRSS") -> float | None:
    """``/proc/self/status`` field in MiB (VmHWM, unlike ru_maxrss, does not inherit the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def stock_child(pte: str, ids_csv: str, new_tokens: int, threads: int) -> None:
    """Child process: one stock generation; prints peak RSS and tok/s (memory of the stock .pte alone)."""
    import torch
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(threads)
    torch.set_num_threads(threads)
    _load_stock_modules()
    import executorch.runtime  # noqa: F401

    base = _vm_mb()  # Python + torch + the ExecuTorch pybindings, before the program is loaded
    res = StockPte(Path(pte)).generate([int(x) for x in ids_csv.split(",")], new_tokens)
    print(json.dumps({"peak_rss_mb": _vm_mb("VmHWM"),
                      "rss_before_load_mb": base, "tokens_per_s": tok_s(res["decode_ms"])}))


# --------------------------------------------------------------------------------------------- helpers
def tok_s(decode_ms: list[float]) -> float:
    return 1000.0 * len(decode_ms) / sum(decode_ms) if decode_ms else 0.0


def agreement(a: list[int], b: list[int]) -> dict:
    n = min(len(a), len(b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    return {"positions_equal": sum(x == y for x, y in zip(a, b, strict=False)) / n if n else 0.0,
            "common_prefix": prefix, "compared": n}


def eager_reference(model_name: str, ids: list[int], new_tokens: int, mask_bits: str | None,
                    need_router_mask: bool) -> dict:
    """Eager float tokens (all layers, and with ``mask_bits``) and the shipped routers' mask for ``ids``."""
    import torch

    import firstkit
    from firstkit.routers import default_routers_path

    routers = default_routers_path(model_name) if need_router_mask else None
    model = firstkit.load_model(model_name, routers=routers)
    out: dict = {"routers_path": str(routers) if routers else None}
    x = torch.tensor([ids], dtype=torch.long)
    if need_router_mask:
        mask_bits = "".join("1" if b else "0" for b in model.decide_mask(x))
        out["router_mask"] = mask_bits
    n = model.num_layers
    for key, bits in (("all", "1" * n), ("mask", mask_bits)):
        if bits is None:
            continue
        with torch.no_grad():  # greedy with a KV cache; eos_token_id=-1 never matches, so EOS is ignored
            seq = model.generate(x, max_new_tokens=new_tokens, mask=bits, eos_token_id=[-1])
        out[f"tokens_{key}"] = [int(t) for t in seq[0, len(ids):]]
    return out


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


# --------------------------------------------------------------------------------------------- main
def measurement_options(command):
    """``--threads``, ``--tokens`` (-> ``new_tokens``), ``--rounds``: how every peer benchmark here measures."""
    for option in reversed([
        click.option("--threads", default="1,2", show_default=True, help="Comma-separated thread counts."),
        click.option("--tokens", "new_tokens", type=click.IntRange(2), default=64, show_default=True,
                     help="New tokens per generation (greedy, EOS ignored)."),
        click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
                     help="Alternating measured rounds per thread count (after one warm-up round)."),
    ]):
        command = option(command)
    return command


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Our 8da4w bundle (first-export --quantize 8da4w --backend executorch); required unless a "
                   "child mode.")
@click.option("--model", "model_name", default="smollm2-135m-instruct", show_default=True,
              help="Named model whose local float folder the stock export reads.")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Float Hugging Face folder to export instead of the named model's cached one.")
@click.option("--venv", type=click.Path(path_type=Path), default=None,
              help="optimum-executorch venv [$FIRSTKIT_CACHE/peers/optimum-executorch].")
@click.option("--export-dir", type=click.Path(path_type=Path), default=None,
              help="Stock export folder [$FIRSTKIT_CACHE/peers/exports/<model>-xnnpack-8da4w-8w-s<max_seq_len>].")
@click.option("--stock-pte", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Measure this stock .pte; skips the venv and the export.")
@click.option("--torch-spec", default=TORCH_SPEC, show_default=True,
              help="What the venv installs for torch (a requirement or a CPU wheel path).")
@measurement_options
@click.option("--prompt", default=PROMPT, show_default=False, help="User message (through the chat template).")
@click.option("--mask", "mask_opt", default=None,
              help="Skipping mask BITS for 'routers' rows [bundle's routers (auto), else the shipped routers "
                   "in eager].")
@click.option("--native/--no-native", default=True, show_default=True, help="Also time the native runner.")
@click.option("--python-runtime/--no-python-runtime", "py_rt", default=True, show_default=True,
              help="Also time firstkit.runtime (Python).")
@click.option("--eager/--no-eager", default=True, show_default=True, help="Eager float reference tokens.")
@click.option("--setup-only", is_flag=True, help="Create the venv and stop.")
@click.option("--export-only", is_flag=True, help="Create the venv, export, and stop.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full results here.")
@click.option("--stock-child", "child", nargs=4, default=None, hidden=True)
def main(bundle: Path, model_name: str, model_dir: Path | None, venv: Path | None, export_dir: Path | None,
         stock_pte: Path | None, torch_spec: str, threads: str, new_tokens: int, rounds: int, prompt: str,
         mask_opt: str | None, native: bool, py_rt: bool, eager: bool, setup_only: bool, export_only: bool,
         json_out: Path | None, child) -> None:
    """Stock ExecuTorch (optimum-executorch 8da4w) vs our all-layers 8da4w bundle: decode tok/s, prefill, tokens."""
    if child:
        stock_child(child[0], child[1], int(child[2]), int(child[3]))
        return
    if bundle is None:
        raise click.UsageError("--bundle is required")
    manifest = json.loads((bundle / "manifest.json").read_text())
    max_seq_len = int(manifest["max_seq_len"])
    result: dict = {"bundle": str(bundle), "model": model_name, "host": platform.node(),
                    "machine": platform.machine(), "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if stock_pte is None:
        venv = venv or cache_root() / "peers" / "optimum-executorch"
        versions = ensure_venv(venv, torch_spec)
        result["venv"] = {"path": str(venv), "versions": versions}
        if setup_only:
            click.echo(json.dumps(result["venv"], indent=2))
            return
        if model_dir is None:
            from firstkit.models import ensure_named_model

            model_dir = ensure_named_model(model_name)
        export_dir = export_dir or cache_root() / "peers" / "exports" / f"{model_name}-xnnpack-8da4w-8w-s{max_seq_len}"
        result["stock_export"] = ensure_export(venv, model_dir, export_dir, max_seq_len, versions)
        stock_pte = export_dir / "model.pte"
        if export_only:
            click.echo(json.dumps(result["stock_export"], indent=2))
            return
    measure(result, bundle, manifest, stock_pte, model_name, threads, new_tokens, rounds, prompt, mask_opt, native,
            py_rt, eager, json_out)


def measure(result: dict, bundle: Path, manifest: dict, stock_pte: Path, model_name: str, threads: str,
            new_tokens: int, rounds: int, prompt: str, mask_opt: str | None, native: bool, py_rt: bool,
            eager: bool, json_out: Path | None) -> None:
    import torch
    import transformers

    from firstkit.runtime import load_bundle
    from firstkit.runtime.backends import set_executorch_threads

    thread_list = [int(t) for t in threads.split(",") if t.strip()]
    runner = load_bundle(bundle, threads=None)
    ids = runner.encode(prompt)
    n_layers = runner.n_layers
    if ids and len(ids) + new_tokens > runner.max_seq_len:
        raise click.ClickException("prompt + new tokens exceed the bundle's max_seq_len")
    has_routers = manifest["routing"]["policy"] == "routers"
    ref: dict = {}
    if mask_opt:
        mask, mask_source = mask_opt, "given (--mask)"
    elif has_routers:
        _, bits = runner.prefill(ids, "auto")
        mask, mask_source = "".join(map(str, bits)), "the bundle's routers (prefill, auto)"
    else:
        mask, mask_source = None, "shipped default routers, decided in eager float PyTorch (bundle has no routers)"
    if eager or mask is None:
        log("eager float reference (and routers' mask) ...")
        ref = eager_reference(model_name, ids, new_tokens, mask, need_router_mask=mask is None)
        mask = mask or ref["router_mask"]
    active = mask.count("1")
    result.update({
        "versions": {"torch": torch.__version__, "executorch": importlib.metadata.version("executorch"),
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "prompt": prompt, "prompt_tokens": len(ids), "prompt_ids": ids, "new_tokens": new_tokens, "rounds": rounds,
        "threads": thread_list, "mask": mask, "mask_source": mask_source, "layers": n_layers,
        "layers_active": active,
        "sizes_bytes": {"stock_pte": stock_pte.stat().st_size, "ours_pte": (bundle / "model.pte").stat().st_size,
                        "ours_bundle": sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())},
        "stock_pte": str(stock_pte), "quantization_ours": manifest.get("quantization", {}),
    })
    launcher = None
    if native:
        from firstkit.device_bench.build_runner import build

        pkg = build()
        launcher = str(pkg.path / "run.sh")
        result["native_runner"] = {"path": str(pkg.path), "key": pkg.key}
    sides = ["stock"] + (["py_all", "py_mask"] if py_rt else []) + (["native_all", "native_mask"] if native else [])
    runs: dict = {str(t): {s: [] for s in sides} for t in thread_list}
    tokens: dict = {}
    for th in thread_list:
        # size the pools first, then (re)load both programs: _unsafe_reset_threadpool replaces the pool under
        # programs already loaded
        set_executorch_threads(th)
        torch.set_num_threads(th)  # the stock program's kernels outside XNNPACK use torch's intra-op pool
        stock = StockPte(stock_pte)
        ours = load_bundle(bundle, threads=None) if py_rt else None  # threads=None: no second reset

        def one(side: str, th: int = th, stock=stock, ours=ours) -> dict:
            if side == "stock":
                return stock.generate(ids, new_tokens)
            if side.startswith("py_"):
                m = "all" if side == "py_all" else mask
                return ours.generate(ids, max_new_tokens=new_tokens, mask=m, stop_at_eos=False)
            m = "all" if side == "native_all" else mask
            return native_generate(launcher, bundle, ids, new_tokens, th, m)

        log(f"{th} thread(s): warm-up round")
        for s in sides:
            res = one(s)
            tokens.setdefault(s, res["tokens"])
        for r in range(rounds):
            order = sides if r % 2 == 0 else list(reversed(sides))  # alternate so drift hits every side alike
            for s in order:
                res = one(s)
                runs[str(th)][s].append({"tokens_per_s": tok_s(res["decode_ms"]),
                                         "median_step_tok_s": 1000.0 / statistics.median(res["decode_ms"]),
                                         "prefill_ms": res["prefill_ms"], "peak_rss_mb": res.get("peak_rss_mb")})
            log(f"{th} thread(s): round {r + 1}/{rounds}: " + ", ".join(
                f"{s} {runs[str(th)][s][-1]['tokens_per_s']:.1f}" for s in sides))
        del stock, ours
    # summary per thread count: medians over rounds, ratios ours/stock
    summary = {}
    for th in thread_list:
        row = {}
        for s in sides:
            rr = runs[str(th)][s]
            row[s] = {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in rr),
                      "tokens_per_s_runs": [round(x["tokens_per_s"], 2) for x in rr],
                      "median_step_tok_s": statistics.median(x["median_step_tok_s"] for x in rr),
                      "prefill_ms": statistics.median(x["prefill_ms"] for x in rr)}
            if rr[0].get("peak_rss_mb") is not None and s.startswith("native"):
                row[s]["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rr)
        base = row["stock"]["tokens_per_s"]
        for s in sides[1:]:
            row[s]["ratio_vs_stock"] = row[s]["tokens_per_s"] / base
            row[s]["prefill_ratio_vs_stock"] = row[s]["prefill_ms"] / row["stock"]["prefill_ms"]
        summary[str(th)] = row
    result["summary"] = summary
    result["runs"] = runs
    # stock peak RSS alone, in a child process (this one also holds our bundle and PyTorch)
    child = subprocess.run([sys.executable, __file__, "--stock-child", str(stock_pte), ",".join(map(str, ids)),
                            str(new_tokens), str(thread_list[0])], capture_output=True, text=True)
    if child.returncode == 0:
        result["stock_child"] = json.loads(child.stdout.strip().splitlines()[-1])
    # greedy tokens
    result["tokens"] = tokens
    agree = {}
    pairs = [("stock", "py_all"), ("stock", "native_all"), ("py_all", "native_all"), ("py_mask", "native_mask")]
    for a, b in pairs:
        if a in tokens and b in tokens:
            agree[f"{a}~{b}"] = agreement(tokens[a], tokens[b])
    if ref:
        tokens["eager_all"] = ref["tokens_all"]
        if "tokens_mask" in ref:
            tokens["eager_mask"] = ref["tokens_mask"]
        for s in sides:
            key = "eager_mask" if s.endswith("_mask") else "eager_all"
            if key in tokens:
                agree[f"{s}~{key}"] = agreement(tokens[s], tokens[key])
        result["routers_path"] = ref.get("routers_path")
    result["agreement"] = agree
    if runner.tokenizer is not None:
        result["texts"] = {k: runner.decode_text(v) for k, v in tokens.items()}
    print_report(result, sides)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
        log(f"wrote {json_out}")


NAMES = {"stock": "stock ExecuTorch .pte (optimum-executorch 8da4w), all layers",
         "py_all": "ours, firstkit.runtime (Python), all layers",
         "py_mask": "ours, firstkit.runtime (Python), routers' mask",
         "native_all": "ours, native runner, all layers",
         "native_mask": "ours, native runner, routers' mask"}


def print_report(res: dict, sides: list[str]) -> None:
    mb = {k: v / 1e6 for k, v in res["sizes_bytes"].items()}
    click.echo(f"prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens (greedy, EOS ignored), "
               f"{res['rounds']} alternating rounds; mask {res['mask']} ({res['layers_active']}/{res['layers']} "
               f"layers; {res['mask_source']})")
    click.echo(f"sizes: stock model.pte {mb['stock_pte']:.1f} MB, ours model.pte {mb['ours_pte']:.1f} MB "
               f"(bundle {mb['ours_bundle']:.1f} MB)")
    click.echo("| threads | side | decode tok/s (median of rounds) | prefill ms | ours/stock tok/s |")
    click.echo("|---|---|---|---|---|")
    for th, row in res["summary"].items():
        for s in sides:
            r = row[s]
            click.echo(f"| {th} | {NAMES[s]} | {r['tokens_per_s']:.2f} ({', '.join(map(str, r['tokens_per_s_runs']))})"
                       f" | {r['prefill_ms']:.1f} | {fmt(r.get('ratio_vs_stock'), '.3f')} |")
    if "stock_child" in res:
        click.echo(f"stock .pte alone (child process, {res['threads'][0]} thread): peak RSS "
                   f"{res['stock_child']['peak_rss_mb']:.0f} MB ({fmt(res['stock_child']['rss_before_load_mb'], '.0f')}"
                   " MB before the program was loaded: Python, torch, pybindings)")
    for k, v in res["agreement"].items():
        click.echo(f"tokens {k}: {v['positions_equal']:.2f} of positions equal, common prefix "
                   f"{v['common_prefix']}/{v['compared']}")


if __name__ == "__main__":
    main()
