"""Per-operator profile of one decode step: our bundle next to the stock ExecuTorch program (ETDump).

    python benchmarks/profile_decode.py --bundle bundles/smollm2-135m-instruct-8da4w \
        --stock-pte ~/.cache/firstkit/peers/exports/smollm2-135m-instruct-xnnpack-8da4w-8w-s2048/model.pte \
        --steps 32 --threads 1 --doc docs/results_decode_profile.md

Both programs run in this process through ``executorch.runtime`` with ETDump on: the same chat prompt is
prefilled, then ``--steps`` greedy decode steps (all layers for ours, and the bundle's routers' mask with
``--mask auto``). Every operator / delegate call recorded during the decode steps is summed and divided by the
number of steps, so each row is "microseconds per generated token". The prefill's events are left out.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "Explain in two sentences why the sky is blue."


def _blocks(etdump: Path) -> list[list[tuple[str, list[float]]]]:
    """One list per method execution (ETDump event block): (event name, durations in ms)."""
    from executorch.devtools import Inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ins = Inspector(etdump_path=str(etdump))
    return [[(ev.name, [float(x) for x in ev.perf_data.raw]) for ev in block.events if ev.perf_data is not None]
            for block in ins.event_blocks]


def _per_step(blocks: list[list[tuple[str, list[float]]]], steps: int) -> dict[str, float]:
    """Microseconds per decode step for each operator / delegate call name, summed over ``blocks``."""
    acc: dict[str, float] = defaultdict(float)
    for block in blocks:
        for name, raw in block:
            if name in ("Method::execute", "Method::init", "Program::load_method"):
                continue
            acc[name] += sum(raw) * 1e3
    return {k: v / steps for k, v in acc.items()}


def profile_ours(bundle: Path, ids: list[int], steps: int, mask: str) -> tuple[dict[str, float], float]:
    import time

    import executorch.kernels.quantized  # noqa: F401
    import torch

    from firstkit.mask_spec import parse_mask_spec
    from firstkit.runtime.backends import ExecuTorchBackend

    backend = ExecuTorchBackend(bundle / "model.pte", etdump=True)
    prog, methods, n, positions = backend.program, backend.methods, backend.n_layers, backend.positions
    override = torch.tensor(parse_mask_spec(mask, n), dtype=torch.long)
    logits, bits = backend.prefill(torch.tensor([ids]), override)
    active = [i for i, b in enumerate(bits) if b]
    tok = int(logits.reshape(-1).argmax())
    wall = []
    for k in range(steps):
        pos = len(ids) + k
        t0 = time.perf_counter()
        h = methods["embed"].execute([torch.tensor([[tok]])])[0]
        for i in active:
            h = methods[f"layer_{i}"].execute([h, positions[pos:pos + 1], positions[: pos + 1]])[0]
        tok = int(methods["head"].execute([h])[0].reshape(-1).argmax())
        wall.append((time.perf_counter() - t0) * 1e6)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ours.etdp"
        prog.write_etdump_result_to_file(str(path), str(Path(d) / "dbg.bin"))
        blocks = _blocks(path)
    # one block per method execution: a decode step is embed + the running layers + head
    return _per_step(blocks[-steps * (2 + len(active)):], steps), statistics.median(wall)


def profile_stock(pte: Path, ids: list[int], steps: int) -> tuple[dict[str, float], float]:
    import time

    import torch
    from executorch.runtime import Runtime
    from stock_executorch import _load_stock_modules

    _load_stock_modules()
    prog = Runtime.get().load_program(pte, enable_etdump=True)
    fwd = prog.load_method("forward")
    logits = fwd.execute([torch.tensor([ids]), torch.arange(len(ids))])[0]
    tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
    wall = []
    for k in range(steps):
        pos = len(ids) + k
        t0 = time.perf_counter()
        logits = fwd.execute([torch.tensor([[tok]]), torch.tensor([pos])])[0]
        tok = int(logits.reshape(-1).argmax())
        wall.append((time.perf_counter() - t0) * 1e6)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "stock.etdp"
        prog.write_etdump_result_to_file(str(path), str(Path(d) / "dbg.bin"))
        blocks = _blocks(path)
    return _per_step(blocks[-steps:], steps), statistics.median(wall)


def _short(name: str) -> str:
    return name.replace("native_call_", "").replace(".out", "").replace("aten.", "")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--stock-pte", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--steps", type=click.IntRange(1), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--mask", default="all", show_default=True, help="all | auto | BITS for our bundle.")
@click.option("--top", type=click.IntRange(1), default=14, show_default=True, help="Rows per table.")
@click.option("--doc", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Append the tables here.")
def main(bundle: Path, stock_pte: Path | None, steps: int, threads: int, mask: str, top: int, doc: Path | None) -> None:
    """Per-operator time of one decode step (ETDump), ours next to the stock program."""
    import torch
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from transformers import AutoTokenizer

    _unsafe_reset_threadpool(threads)
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    sides = {"ours": profile_ours(bundle, ids, steps, mask)}
    if stock_pte is not None:
        sides["stock"] = profile_stock(stock_pte, ids, steps)
    lines = [f"prompt {len(ids)} tokens, {steps} decode steps, {threads} thread(s), our mask `{mask}`; "
             "us per generated token (ETDump; delegate calls = XNNPACK subgraphs)", ""]
    for name, (ops, wall) in sides.items():
        total = sum(ops.values())
        lines += [f"**{name}**: wall {wall:.0f} us/token (median), profiled ops {total:.0f} us/token", "",
                  "| operator | us/token | share |", "|---|---|---|"]
        for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"| {_short(k)} | {v:.1f} | {100 * v / total:.1f} % |")
        lines.append("")
    out = "\n".join(lines)
    click.echo(out)
    if doc:
        doc.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/profile_decode.py " + " ".join(sys.argv[1:])
        with doc.open("a") as fh:
            fh.write(f"\n```\n{cmd}\n```\n\n{out}\n")


if __name__ == "__main__":
    main()
