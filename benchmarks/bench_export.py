"""Export benchmark: layer-skipping speedup on one bundle, router overhead, export time and sizes, peers.

Measured in one run, on one machine, with a fixed thread count:

* decode tokens/s of the same bundle with a skipping mask vs all layers, and the ratio to the ideal
  ``L / L_active`` (goal: >= 0.9 x ideal);
* router overhead as % of prefill: the routers' own work (RMS-norm pooling + MLP for every layer, lowered
  to XNNPACK and timed in the ExecuTorch runtime on the prompt's hidden-state shape) over the bundle's
  prefill time;
* export time and bundle sizes (8da4w vs fp32) from the bundles' manifests;
* optional peers on the same prompt and threads: llama.cpp (``--gguf``, needs ``llama-cpp-python``) and
  a stock single-method ExecuTorch LLM ``.pte`` (``--stock-pte``, e.g. from optimum-executorch, which
  ``--setup-optimum DIR`` exports in its own virtual environment because it pins an older transformers).

Example::

    python benchmarks/bench_export.py --bundle bundles/smollm2-135m-instruct-8da4w \
        --fp32-bundle bundles/smollm2-135m-instruct-none --threads 2 --json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

PROMPT = ("You are a helpful assistant. Summarize in two sentences why the sky appears blue during the day and "
          "red at sunset, mentioning Rayleigh scattering and the path length of sunlight through the atmosphere.")


def uniform_skip_mask(n_layers: int, protected: list[int], n_skip: int) -> str:
    """Skip ``n_skip`` skippable layers spread evenly (a static stand-in when no routers are shipped)."""
    skippable = [i for i in range(n_layers) if i not in set(protected)]
    n_skip = min(n_skip, len(skippable))
    bits = ["1"] * n_layers
    for k in range(n_skip):
        bits[skippable[int((k + 0.5) * len(skippable) / n_skip)]] = "0"
    return "".join(bits)


def decode_tok_s(runner, ids: list[int], mask: str, steps: int) -> tuple[float, float, str]:
    """(decode tok/s from the median step time, prefill ms, mask used)."""
    res = runner.generate(ids, max_new_tokens=steps + 1, mask=mask, stop_at_eos=False)
    med = statistics.median(res["decode_ms"])
    return 1000.0 / med, res["prefill_ms"], res["mask"]


def router_overhead_ms(hidden: int, n_layers: int, router_dim: int, prompt_len: int, reps: int = 50,
                       threads: int = 2) -> float:
    """Time of all routers' work for one prompt (pool + MLP per layer) as an XNNPACK-lowered ExecuTorch
    program, the way it runs inside ``prefill``; median over ``reps``."""
    import tempfile

    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from firstkit.router import RouterStack, pool_prompt
    from firstkit.runtime.backends import set_executorch_threads

    class AllRouters(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack = RouterStack(n_layers, hidden, router_dim).eval()

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            # each router pools its own input (here the same tensor shifted, so nothing is shared)
            return torch.stack([self.stack.routers[i](pool_prompt(h + i)) for i in range(n_layers)])

    h = torch.randn(1, prompt_len, hidden)
    ep = torch.export.export(AllRouters(), (h,), strict=False)
    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    with tempfile.NamedTemporaryFile(suffix=".pte") as f:
        f.write(prog.buffer)
        f.flush()
        set_executorch_threads(threads)
        method = Runtime.get().load_program(f.name).load_method("forward")
        method.execute([h])
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            method.execute([h])
            times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def bundle_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_llama_cpp(gguf: str, prompt: str, steps: int, threads: int) -> dict:
    """llama.cpp decode tok/s on the same prompt (greedy), via llama-cpp-python."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_completion(prompt, max_tokens=4, temperature=0.0)  # warm-up
    t = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=steps, temperature=0.0)
    total = time.perf_counter() - t
    timings = llm._ctx.get_timings() if hasattr(llm._ctx, "get_timings") else None
    n = out["usage"]["completion_tokens"]
    res = {"runtime": "llama.cpp", "gguf": gguf, "completion_tokens": n, "wall_s": total}
    if timings is not None and getattr(timings, "n_eval", 0):
        res["tokens_per_s"] = 1000.0 * timings.n_eval / timings.t_eval_ms
    else:
        res["tokens_per_s_incl_prefill"] = n / total
    return res


def bench_stock_pte(pte: str, ids: list[int], steps: int, threads: int) -> dict:
    """A stock single-method ExecuTorch LLM (``forward(tokens, input_pos)``, KV inside): decode tok/s."""
    import executorch.kernels.quantized  # noqa: F401
    import torch
    from executorch.runtime import Runtime

    from firstkit.runtime.backends import set_executorch_threads

    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except ImportError:
        pass
    set_executorch_threads(threads)
    prog = Runtime.get().load_program(Path(pte))
    fwd = prog.load_method("forward")
    meta = prog.metadata("forward")
    second = meta.input_tensor_meta(1) if meta.num_inputs() > 1 else None
    pos_is_cache_position = second is not None and len(second.sizes()) == 1

    def call(tok: list[int], pos: int):
        t = torch.tensor([tok], dtype=torch.long)
        p = torch.arange(pos, pos + len(tok), dtype=torch.long) if pos_is_cache_position else \
            torch.tensor([pos], dtype=torch.long)
        return fwd.execute([t, p])[0].clone()

    logits = call(ids, 0)
    times = []
    tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
    for k in range(steps):
        t = time.perf_counter()
        logits = call([tok], len(ids) + k)
        times.append((time.perf_counter() - t) * 1000.0)
        tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
    return {"runtime": "stock ExecuTorch .pte", "pte": pte, "tokens_per_s": 1000.0 / statistics.median(times),
            "size_mb": Path(pte).stat().st_size / 1e6}


def export_optimum(venv: Path, out: Path) -> Path:
    """Export SmolLM2-135M 8da4w with optimum-executorch in its own venv (needs network for the HF hub)."""
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "optimum-executorch==1.1.0"], check=True)
    subprocess.run([str(venv / "bin" / "optimum-cli"), "export", "executorch", "--model",
                    "HuggingFaceTB/SmolLM2-135M-Instruct", "--task", "text-generation", "--recipe", "xnnpack",
                    "--qlinear", "8da4w", "--qembedding", "8w", "--use_custom_sdpa", "--use_custom_kv_cache",
                    "--output_dir", str(out)], check=True)
    return out / "model.pte"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Bundle to time (ideally the 8da4w one).")
@click.option("--fp32-bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="fp32 bundle of the same model, for the size ratio.")
@click.option("--backend", default="executorch", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--steps", type=int, default=64, show_default=True, help="Decode steps per run.")
@click.option("--reps", type=int, default=3, show_default=True, help="Alternating runs per mask.")
@click.option("--mask", "skip_mask", default="auto", show_default=True,
              help="Skipping mask to time: auto (routers; falls back to --skip uniform when routers skip "
                   "nothing or there are none) or BITS.")
@click.option("--skip", "n_skip", type=int, default=8, show_default=True,
              help="Layers skipped by the uniform fallback mask.")
@click.option("--gguf", default=None, help="GGUF for the llama.cpp peer (needs llama-cpp-python).")
@click.option("--stock-pte", default=None, help="Stock single-method ExecuTorch .pte peer.")
@click.option("--setup-optimum", type=click.Path(path_type=Path), default=None,
              help="Create a venv here, export the optimum-executorch 8da4w peer and time it.")
@click.option("--json", "as_json", is_flag=True)
def main(bundle: Path, fp32_bundle: Path | None, backend: str, threads: int, steps: int, reps: int,
         skip_mask: str, n_skip: int, gguf: str | None, stock_pte: str | None, setup_optimum: Path | None,
         as_json: bool) -> None:
    """Time BUNDLE with and without layer skipping and report the ratios."""
    from firstkit.runtime import load_bundle

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    runner = load_bundle(bundle, backend=backend, threads=threads)
    m = runner.manifest
    n = runner.n_layers
    ids = runner.encode(PROMPT) if runner.tokenizer is not None else list(range(10, 90))
    mask = skip_mask
    mask_source = "BITS given"
    if skip_mask == "auto":
        _, bits = runner.prefill(ids, "auto")
        if 0 in bits:
            mask, mask_source = "".join(map(str, bits)), "routers (prefill on the benchmark prompt)"
        else:
            mask = uniform_skip_mask(n, runner.protected, n_skip)
            mask_source = (f"uniform static mask skipping {n_skip} layers (the bundle's routers skip nothing on "
                           "this prompt or there are none)")
    decode_tok_s(runner, ids, "all", 4)  # warm-up
    all_runs, skip_runs, prefill_all, prefill_skip = [], [], [], []
    for _ in range(reps):  # alternate so drift and neighbours' load hit both alike
        tps, pms, _ = decode_tok_s(runner, ids, "all", steps)
        all_runs.append(tps)
        prefill_all.append(pms)
        tps, pms, used = decode_tok_s(runner, ids, mask, steps)
        skip_runs.append(tps)
        prefill_skip.append(pms)
    active = used.count("1")
    tps_all, tps_skip = statistics.median(all_runs), statistics.median(skip_runs)
    ideal = n / active
    routing = m["routing"]
    router_dim = routing.get("router_dim", 64)
    r_ms = router_overhead_ms(m["model"]["hidden_size"], n, router_dim, len(ids), threads=threads)
    prefill_ms = statistics.median(prefill_all)
    result = {
        "bundle": str(bundle), "backend": backend, "threads": threads, "quantization": m["quantization"]["scheme"],
        "prompt_tokens": len(ids), "decode_steps": steps, "reps": reps,
        "mask": used, "mask_source": mask_source, "layers": n, "layers_active": active,
        "tokens_per_s_all_layers": tps_all, "tokens_per_s_masked": tps_skip,
        "speedup": tps_skip / tps_all, "ideal_speedup": ideal, "fraction_of_ideal": (tps_skip / tps_all) / ideal,
        "runs_all": all_runs, "runs_masked": skip_runs,
        "prefill_ms": prefill_ms, "router_ms": r_ms, "router_overhead_pct_of_prefill": 100.0 * r_ms / prefill_ms,
        "router_source": "routers of the bundle's shape (pool + MLP x L) lowered to XNNPACK, timed in the ExecuTorch "
                         "runtime on the prompt length"
                         + ("" if routing["policy"] == "routers" else " (bundle has no routers: default shape)"),
        "peak_rss_mb": runner.generate(ids, max_new_tokens=2, mask="all")["peak_rss_mb"],
        "size_mb": bundle_size(bundle) / 1e6,
    }
    exp = m.get("export") or {}
    if exp.get("timings"):
        result["export_timings_s"] = exp["timings"]
    if fp32_bundle is not None:
        fm = json.loads((fp32_bundle / "manifest.json").read_text())
        result["fp32_size_mb"] = bundle_size(fp32_bundle) / 1e6
        et_q = m["files"].get("model.pte", {}).get("size")
        et_f = fm["files"].get("model.pte", {}).get("size")
        if et_q and et_f:
            result["pte_size_ratio_vs_fp32"] = et_q / et_f
        if (fm.get("export") or {}).get("timings"):
            result["fp32_export_timings_s"] = fm["export"]["timings"]
    peers = []
    if setup_optimum is not None:
        stock_pte = str(export_optimum(setup_optimum / "venv", setup_optimum / "out"))
    if stock_pte:
        peers.append(bench_stock_pte(stock_pte, ids, steps, threads))
    if gguf:
        peers.append(bench_llama_cpp(gguf, runner.tokenizer.decode(ids) if runner.tokenizer else PROMPT, steps,
                                     threads))
    for p in peers:
        if "tokens_per_s" in p:
            p["ours_all_layers_over_peer"] = tps_all / p["tokens_per_s"]
            p["ours_masked_over_peer"] = tps_skip / p["tokens_per_s"]
    result["peers"] = peers
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"bundle {bundle} ({result['quantization']}, {backend}, {threads} threads, {len(ids)}-token prompt, "
               f"{steps} steps x {reps})")
    click.echo(f"mask {used} ({mask_source})")
    click.echo(f"decode tok/s: all layers {tps_all:.1f}, masked {tps_skip:.1f} -> x{tps_skip / tps_all:.3f} "
               f"(ideal x{ideal:.3f}, {100 * result['fraction_of_ideal']:.1f}% of ideal)")
    click.echo(f"router overhead: {r_ms:.3f} ms of {prefill_ms:.1f} ms prefill = "
               f"{result['router_overhead_pct_of_prefill']:.2f}%")
    click.echo(f"size {result['size_mb']:.1f} MB" + (f", .pte {100 * result['pte_size_ratio_vs_fp32']:.1f}% of fp32"
                                                     if "pte_size_ratio_vs_fp32" in result else ""))
    for p in peers:
        click.echo(f"peer {p['runtime']}: {p.get('tokens_per_s', float('nan')):.1f} tok/s; ours all-layers "
                   f"x{p.get('ours_all_layers_over_peer', float('nan')):.2f}, masked "
                   f"x{p.get('ours_masked_over_peer', float('nan')):.2f}")


if __name__ == "__main__":
    main()
