"""Does skipping layers save time? Eager CPU decode at 0/10/20/30% of layers skipped, side by side.

Runs the default model's greedy decode with a frozen mask that skips a fraction of the skippable
layers (evenly spaced, the ``uniform`` policy), interleaving the configurations round by round so that
machine noise hits all of them alike, and prints per-token decode time, the measured speedup over all
layers, the ideal speedup ``L / L_active``, and their ratio (1.0 = skipping saves exactly its share).

    python benchmarks/bench_eager_skip.py                 # default model, 1 thread
    python benchmarks/bench_eager_skip.py --json --threads 2 --rounds 5

The LM head and final norm run every step whatever the mask, so the measured speedup stays below the
ideal one; the script also reports the share of a step spent outside the decoder layers.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import click
import torch

import firstkit
from firstkit.policies import uniform_policy
from firstkit.routed_model import RoutedCache


def decode_ms_per_token(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill ms, decode ms/token) of a greedy decode of ``new_tokens`` with ``mask`` frozen."""
    cache = RoutedCache(config=model.base.config)
    attn = torch.ones_like(ids)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.forward(ids, attention_mask=attn, mask=mask, cache=cache, logits_to_keep=1)
        t1 = time.perf_counter()
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        pos = ids.shape[1]
        for _ in range(new_tokens):
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            step = model.forward(token, attention_mask=attn, mask=mask, cache=cache,
                                 position_ids=torch.tensor([[pos]]), logits_to_keep=1)
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            pos += 1
        t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / new_tokens


def head_share(model, ids: torch.Tensor) -> float:
    """Fraction of one all-layers decode step spent outside the decoder layers (embed, norm, LM head)."""
    inside = [0.0]
    starts = {}

    def pre(module, args):
        starts[id(module)] = time.perf_counter()

    def post(module, args, out):
        inside[0] += time.perf_counter() - starts[id(module)]

    hooks = [m for layer in model.base_layers() for m in
             (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))]
    try:
        mask = torch.ones(1, model.num_layers, dtype=torch.bool)
        cache = RoutedCache(config=model.base.config)
        with torch.no_grad():
            model.forward(ids, mask=mask, cache=cache, logits_to_keep=1)
            inside[0] = 0.0
            total = 0.0
            for step in range(16):
                t0 = time.perf_counter()
                model.forward(ids[:, -1:], mask=mask, cache=cache, position_ids=torch.tensor([[ids.shape[1] + step]]),
                              attention_mask=torch.ones(1, ids.shape[1] + step + 1, dtype=torch.long),
                              logits_to_keep=1)
                total += time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return 1.0 - inside[0] / total


@click.command()
@click.option("--model", "model_name", default=firstkit.DEFAULT_MODEL, show_default=True)
@click.option("--ratios", default="0,0.1,0.2,0.3", show_default=True, help="fractions of all layers skipped")
@click.option("--new-tokens", default=32, show_default=True)
@click.option("--rounds", default=3, show_default=True, help="interleaved measured rounds per configuration")
@click.option("--threads", default=1, show_default=True)
@click.option("--prompt", default="Explain in two sentences why the sky is blue.", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
def main(model_name: str, ratios: str, new_tokens: int, rounds: int, threads: int, prompt: str, as_json: bool) -> None:
    torch.set_num_threads(threads)
    model = firstkit.load_model(model_name)
    ids = model.encode_chat(prompt)
    configs = []
    for r in (float(x) for x in ratios.split(",")):
        policy = uniform_policy(model, ratio=r)
        mask = policy.mask(model, ids)
        configs.append({"skip_ratio_requested": r, "skipped_layers": policy.skipped,
                        "active_layers": int(mask.sum()), "mask": mask, "prefill_ms": [], "decode_ms": []})
    decode_ms_per_token(model, ids, configs[0]["mask"], 4)  # warm-up
    for _ in range(rounds):
        for c in configs:
            p, d = decode_ms_per_token(model, ids, c["mask"], new_tokens)
            c["prefill_ms"].append(p)
            c["decode_ms"].append(d)
    base = statistics.median(configs[0]["decode_ms"])
    rows = []
    for c in configs:
        med = statistics.median(c["decode_ms"])
        ideal = model.num_layers / c["active_layers"]
        rows.append({
            "skip_ratio": round(1 - c["active_layers"] / model.num_layers, 4),
            "active_layers": c["active_layers"], "skipped_layers": c["skipped_layers"],
            "decode_ms_per_token": round(med, 3), "decode_ms_min": round(min(c["decode_ms"]), 3),
            "decode_ms_max": round(max(c["decode_ms"]), 3),
            "prefill_ms": round(statistics.median(c["prefill_ms"]), 2),
            "speedup": round(base / med, 4), "ideal_speedup": round(ideal, 4),
            "fraction_of_ideal": round((base / med) / ideal, 4),
        })
    share = head_share(model, ids)
    result = {"model": model.info.model_id, "num_layers": model.num_layers, "prompt_tokens": ids.shape[1],
              "new_tokens": new_tokens, "rounds": rounds, "threads": threads, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "outside_layers_share": round(share, 4),
              "results": rows}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"model {result['model']}  layers {model.num_layers}  prompt {ids.shape[1]} tok  "
               f"decode {new_tokens} tok  rounds {rounds}  threads {threads}  torch {torch.__version__}")
    click.echo(f"share of an all-layers decode step outside the decoder layers (embed/norm/head): {share:.1%}")
    click.echo("| skip | active | decode ms/tok (min-max) | prefill ms | speedup | ideal L/L_active | of ideal |")
    click.echo("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        click.echo(f"| {r['skip_ratio']:.0%} | {r['active_layers']} | {r['decode_ms_per_token']:.2f} "
                   f"({r['decode_ms_min']:.2f}-{r['decode_ms_max']:.2f}) | {r['prefill_ms']:.1f} | "
                   f"{r['speedup']:.3f} | {r['ideal_speedup']:.3f} | {r['fraction_of_ideal']:.3f} |")


if __name__ == "__main__":
    main()
