"""Perplexity cost of each quantization choice, in eager PyTorch on the weights a bundle holds.

    python benchmarks/quant_perplexity.py --tokens 4096 --window 512

Loads the default model once, then for fp32, 8da8w, 8da4w with an 8-bit LM head (the default) and 8da4w with a
4-bit head (as the stock ExecuTorch recipe) quantizes a private copy exactly as ``first-export`` does
(``firstkit.export.quantize.quantize``) and scores the first ``--tokens`` tokens of the WikiText-2 test set in
non-overlapping windows of ``--window`` tokens, all layers. The exported ``.pte`` matches its eager quantized model
(the bundle's verification reports both perplexities), so this is the cost a bundle pays, without an export.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

DATA = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "perplexity" / "wikitext-2-raw"
        / "wiki.test.raw")
CHOICES = [("fp32", "none", 8), ("8da8w", "8da8w", 8), ("8da4w, 8-bit head (default)", "8da4w", 8),
           ("8da4w, 4-bit head (--head-bits 4)", "8da4w", 4)]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="smollm2-135m-instruct", show_default=True)
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DATA, show_default=True)
@click.option("--tokens", type=click.IntRange(64), default=4096, show_default=True)
@click.option("--window", type=click.IntRange(16), default=512, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(model: str, data: Path, tokens: int, window: int, threads: int, json_out: Path | None) -> None:
    """Perplexity of fp32 / 8da8w / 8da4w (8-bit and 4-bit head) on WikiText-2 test."""
    import torch
    from tqdm import tqdm

    import firstkit
    from firstkit.export.quantize import detached_base, quantize

    torch.set_num_threads(threads)
    fm = firstkit.load_model(model)
    ids = fm.tokenizer(data.read_text(encoding="utf-8")).input_ids[:tokens]
    rows = []
    for label, scheme, head_bits in CHOICES:
        base = detached_base(fm)
        quantize(base, scheme, head_bits=head_bits)
        nll, n, t0 = 0.0, 0, time.perf_counter()
        with torch.no_grad():
            for s in tqdm(range(0, len(ids) - 1, window), desc=label, leave=False):
                x = torch.tensor([ids[s:s + window + 1]])
                if x.shape[1] < 2:
                    break
                logits = base(x[:, :-1]).logits[0].float()
                nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
                n += x.shape[1] - 1
        rows.append({"quantization": label, "scheme": scheme, "head_bits": head_bits, "tokens": n,
                     "perplexity": math.exp(nll / n), "seconds": time.perf_counter() - t0})
        del base
    ref = rows[0]["perplexity"]
    click.echo(f"WikiText-2 test, first {rows[0]['tokens']} tokens, windows of {window}, all layers ({model})")
    click.echo("| quantization | perplexity | vs fp32 |\n|---|---|---|")
    for r in rows:
        r["ratio_vs_fp32"] = r["perplexity"] / ref
        click.echo(f"| {r['quantization']} | {r['perplexity']:.2f} | {100 * (r['ratio_vs_fp32'] - 1):+.1f} % |")
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
