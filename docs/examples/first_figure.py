"""Draw docs/img/how_first_works.png: the prefill graph deciding the mask, and the per-layer decode graphs.

    python docs/examples/first_figure.py [--out docs/img/how_first_works.png] [--mask 11011101]

Schematic (no model is loaded): the mask is an example; every runtime computes it as docs/CONTRACTS.md says.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

RUN, SKIP, ROUTER, OTHER, KV = "#37474f", "#eceff1", "#ff7043", "#90a4ae", "#26a69a"


def draw(mask: str, out: Path) -> None:
    """Render the figure for ``mask`` (bits, layer 0 first) to ``out`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    n = len(mask)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.62 * n + 2.6), gridspec_kw={"width_ratios": [1.05, 1]})
    top = n + 1.2

    def box(ax, x, y, w, h, color, text, fc_text="white", ls="-", fs=9):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", fc=color,
                                    ec="#263238", lw=1, ls=ls))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", color=fc_text, fontsize=fs)

    def arrow(ax, x0, y0, x1, y1, color="#263238", ls="-"):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10, color=color, lw=1,
                                     ls=ls))

    # Panel A: prefill over the whole prompt, routers decide, mask frozen.
    a.set_title("prefill(tokens[1, T], mask_override[L])  — once per prompt", fontsize=11, loc="left")
    box(a, 1.0, 0.0, 3.2, 0.6, OTHER, "embed(prompt tokens)")
    for i, bit in enumerate(mask):
        y = 1.0 + i
        runs = bit == "1"
        a.add_patch(plt.Circle((0.45, y + 0.3), 0.22, color=ROUTER))
        a.text(0.45, y + 0.3, "R", ha="center", va="center", color="white", fontsize=8, weight="bold")
        a.text(-0.05, y + 0.3, f"{i}", ha="right", va="center", fontsize=8)
        box(a, 1.0, y, 3.2, 0.6, RUN if runs else SKIP, f"layer {i}" + ("" if runs else "  (skipped)"),
            fc_text="white" if runs else "#78909c", ls="-" if runs else "--")
        if runs:
            box(a, 4.5, y + 0.08, 1.1, 0.44, KV, "KV[0:T]", fs=7)
        arrow(a, 0.67, y + 0.3, 1.0, y + 0.3, ROUTER)
        a.text(6.0, y + 0.3, bit, ha="center", va="center", fontsize=10, family="monospace",
               color=RUN if runs else "#b0bec5", weight="bold")
    box(a, 1.0, top - 0.2, 3.2, 0.6, OTHER, "norm + LM head → first token")
    a.text(6.0, top + 0.1, "mask", ha="center", va="center", fontsize=9)
    a.text(0.1, -0.9, "R: pooled = mean_t(rms(h_t)); logit = out(silu(proj(pooled)));\n"
           "runs iff logit ≥ log(t/(1−t)) or protected (first, last) — decided once, frozen for decode",
           fontsize=8, va="top")
    a.set_xlim(-0.6, 6.6)
    a.set_ylim(-1.8, top + 0.8)
    a.axis("off")

    # Panel B: one decode step = embed, only the running layer_i methods, head.
    b.set_title("decode, per token at position p (mask frozen)", fontsize=11, loc="left")
    box(b, 1.0, 0.0, 3.0, 0.6, OTHER, "embed(token[1,1])")
    prev = 0.6
    for i, bit in enumerate(mask):
        y = 1.0 + i
        if bit == "1":
            box(b, 1.0, y, 3.0, 0.6, RUN, f"layer_{i}(h, [p])")
            box(b, 4.3, y + 0.08, 1.3, 0.44, KV, "KV[p] write", fs=7)
            arrow(b, 2.5, prev, 2.5, y)
            prev = y + 0.6
        else:
            b.text(2.7, y + 0.3, f"layer_{i} not called, no KV", ha="left", va="center", fontsize=8,
                   color="#90a4ae", style="italic")
    box(b, 1.0, top - 0.2, 3.0, 0.6, OTHER, "head(h) → next token")
    arrow(b, 2.5, prev, 2.5, top - 0.2)
    skipped = mask.count("0")
    b.text(0.2, -0.9, f"{n} layer methods in the .pte; this prompt calls {n - skipped} per token "
           f"({skipped}/{n} skipped).\nSkipped layers hold no KV cache; positions still advance.",
           fontsize=8, va="top")
    b.set_xlim(0, 6.2)
    b.set_ylim(-1.8, top + 0.8)
    b.axis("off")

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(__file__).resolve().parents[1] / "img" / "how_first_works.png", show_default=True)
@click.option("--mask", default="11011101", show_default=True, help="Example mask, one 0/1 per layer.")
def main(out: Path, mask: str) -> None:
    """Draw the prefill-mask / decode-graphs figure."""
    if not mask or set(mask) - {"0", "1"} or mask[0] != "1" or mask[-1] != "1":
        raise click.BadParameter("a 0/1 string whose first and last layers run", param_hint="--mask")
    draw(mask, out)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
