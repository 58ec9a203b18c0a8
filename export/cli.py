"""``first-export``: export a model with its FiRST routers to an ExecuTorch/ONNX bundle, verified."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from .pipeline import BACKEND_CHOICES, ExportError, export_bundle
from .quantize import SCHEMES


def _default_output(model: str, scheme: str, head_bits: int = 8) -> Path:
    name = Path(model).name if ("/" in model or Path(model).exists()) else model
    name = name.removesuffix(".gguf")
    return Path("bundles") / f"{name}-{scheme}{'-head4' if head_bits == 4 else ''}"


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _fmt_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def summary_table(result) -> str:
    """Plain-text summary: files and sizes, verification per backend, time per step."""
    m = result.manifest
    lines = [f"bundle: {result.output}", f"model: {m['model']['id']} ({m['model']['architecture']}, "
             f"{m['model']['num_layers']} layers), quantization: {m['quantization']['scheme']}, "
             f"max_seq_len: {m['max_seq_len']}", f"mask policy: {m['routing']['description']}", "",
             f"{'file':<44} {'size':>10}"]
    groups: dict[str, int] = {}
    for rel, e in m["files"].items():
        key = rel if not rel.startswith("tokenizer/") else "tokenizer/"
        groups[key] = groups.get(key, 0) + e["size"]
    for k, size in groups.items():
        lines.append(f"{k:<44} {_fmt_size(size):>10}")
    lines.append("")
    if result.verification:
        lines.append(f"{'verification':<12} {'result':<7} {'greedy equal':>12} {'max|dlogit|':>12} "
                     f"{'agreement':>9} {'ppl delta':>10}")
        for b, v in result.verification.items():
            ppl = v.get("perplexity", {}).get("ppl_delta")
            lines.append(f"{b:<12} {'PASS' if v['passed'] else 'FAIL':<7} "
                         f"{v['greedy_tokens_equal']:>5}/{v['cases_total']:<6} {v['max_abs_logit_diff']:>12.2e} "
                         f"{v['token_agreement']:>9.3f} {'' if ppl is None else f'{ppl:+.3f}':>10}")
    else:
        lines.append("verification: skipped (--no-verify)")
    lines.append("")
    lines.append("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in result.timings.items()))
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="Named model, Hugging Face folder or .gguf file.")
@click.option("--routers", default="auto", show_default=True,
              help="Router checkpoint folder, 'auto' (shipped trained routers if any) or 'none'.")
@click.option("--budget", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help="Skip budget of the shipped routers to use with --routers auto (default: shipped default).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="executorch", show_default=True)
@click.option("--quantize", "scheme", type=click.Choice(SCHEMES), default="8da4w", show_default=True,
              help="8da4w = int8 dynamic activations + int4 weights (ExecuTorch; the bundle a phone runs), int4 "
                   "MatMulNBits (ONNX); 8da8w = int8 dynamic activations + int8 weights (ExecuTorch only); "
                   "none = fp32.")
@click.option("--head-bits", type=click.Choice(["4", "8"]), default="8", show_default=True,
              help="LM-head weight bits under 8da4w: 8 keeps quality, 4 (as the stock ExecuTorch recipe) reads "
                   "half the head's bytes per token.")
@click.option("--max-seq-len", type=click.IntRange(2, 32768), default=2048, show_default=True,
              help="KV-cache length (prompt + generated tokens). Decode reads only the filled rows, so a long "
                   "context costs memory, not speed.")
@click.option("--prefill-chunk", type=click.IntRange(1, 32768), default=128, show_default=True,
              help="Most prompt tokens per prefill call: longer prompts are prefilled in chunks. Bounds the "
                   "runtime's activation memory (XNNPACK plans it for the largest chunk).")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Bundle directory (default bundles/<model>-<quantize>). A new path or an empty folder is "
                   "written, an existing bundle (nothing in it but its listed files) replaced; anything else is "
                   "refused.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare the artifacts with the eager model; a failure writes no bundle.")
@click.option("--verify-tokens", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--atol", type=float, default=1e-3, show_default=True, help="fp32 logit tolerance.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Runtime threads for verification.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (manifest + timings) on stdout.")
def main(model: str, routers: str, budget: float | None, backend: str, scheme: str, head_bits: str, max_seq_len: int,
         prefill_chunk: int, output: Path | None, verify: bool, verify_tokens: int, atol: float, threads: int | None,
         as_json: bool) -> None:
    """Export MODEL's prefill + per-layer decode graphs to a verified bundle."""
    from tqdm import tqdm

    output = output or _default_output(model, scheme, int(head_bits))
    bar = tqdm(desc="first-export", unit="step", file=sys.stderr, disable=as_json and not sys.stderr.isatty())

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    t0 = time.perf_counter()

    def on_sigterm(signum, _frame) -> None:  # unwind like Ctrl-C, so the temporary bundle folder is removed
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    try:
        result = export_bundle(model, routers, backend, scheme, max_seq_len, output, verify=verify,
                               threads=threads, verify_tokens=verify_tokens, atol=atol, progress=progress,
                               budget=budget, head_bits=int(head_bits), prefill_chunk=prefill_chunk)
    except (ExportError, ValueError, FileNotFoundError, OSError) as e:
        bar.close()
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except KeyboardInterrupt:
        bar.close()
        click.echo("first-export: interrupted; nothing was written to the output", err=True)
        sys.exit(130)
    finally:
        bar.close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    result.timings["total_s"] = time.perf_counter() - t0
    click.echo(f"mask policy: {result.manifest['routing']['description']}", err=True)
    if as_json:
        click.echo(json.dumps({"output": str(result.output), "manifest": result.manifest,
                               "timings": result.timings, "verification": result.verification}))
    else:
        click.echo(summary_table(result))


if __name__ == "__main__":
    main()
