"""Markdown table and PNG plots of ``first-eval`` results.

``python -m firstkit.evaluation.report A.json B.json --out DIR`` merges result files (e.g. one per
router budget: systems are then suffixed with the file's label) into one table and plot set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "differences_table", "plot_quality_vs_skip", "plot_layer_usage", "write_report",
           "merge_reports"]

_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def _main_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    main = report.get("main_metric", {})
    return [r for r in report["results"] if main.get(r["task"], r["metric"]) == r["metric"]]


def _index(report: dict[str, Any], key: str) -> dict[tuple, dict[str, Any]]:
    out = {}
    for d in report.get(key) or []:
        k = (d["system"], d["task"], d["metric"]) if key == "intervals" else \
            (d["system"], d["reference"], d["task"], d["metric"])
        out[k] = d
    return out


def _fmt(metric: str, x: float) -> str:
    return f"{x:.2f}" if metric in _LOWER_IS_BETTER else f"{x:.3f}"


def markdown_table(report: dict[str, Any]) -> str:
    """Tasks x systems: ``score ±half-width of the 95 % interval (percent of base) / skip %``; the task label
    carries n and, for accuracy, the chance level. Differences to base and to the strongest baseline follow."""
    rows = _main_rows(report)
    systems = list(dict.fromkeys(r["system"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cell = {(r["task"], r["system"]): r for r in rows}
    intervals = _index(report, "intervals")
    chance = report.get("chance") or {}
    head = "| task (metric, n) | " + " | ".join(systems) + " |"
    sep = "|---|" + "---|" * len(systems)
    lines = [head, sep]
    for t in tasks:
        any_row = next(cell[(t, s)] for s in systems if (t, s) in cell)
        metric = any_row["metric"]
        base = cell.get((t, "base"))
        out = []
        for s in systems:
            r = cell.get((t, s))
            if r is None:
                out.append("")
                continue
            txt = _fmt(metric, r["score"])
            iv = intervals.get((s, t, metric))
            if iv is not None and iv["ci_high"] == iv["ci_high"]:  # not nan
                txt += f" ±{_fmt(metric, (iv['ci_high'] - iv['ci_low']) / 2)}"
            if base is not None and s != "base" and base["score"]:
                if metric in _LOWER_IS_BETTER:
                    rel = 100.0 * (r["score"] / base["score"] - 1)
                    txt += f" ({rel:+.0f}%)"
                else:
                    txt += f" ({100.0 * r['score'] / base['score']:.0f}%)"
            txt += f" / {100 * r['skip_ratio']:.0f}%"
            out.append(txt)
        label = f"{t} ({metric}, n={any_row['n']}"
        if t in chance:
            label += f", chance {chance[t]['chance']:.2f}"
        lines.append(f"| {label}) | " + " | ".join(out) + " |")
    lines.append("")
    lines.append("Cells: score" + (" ±half-width of its 95 % interval" if intervals else "")
                 + " (percent of base quality, or perplexity change) / average skip ratio."
                 + (" Chance: accuracy of a uniform random guess." if chance else ""))
    diffs = differences_table(report)
    return "\n".join(lines) + "\n" + ("\n" + diffs if diffs else "")


def differences_table(report: dict[str, Any]) -> str:
    """Main-metric differences (system - reference) with 95 % intervals; ``*`` where the interval excludes 0."""
    main = report.get("main_metric", {})
    diffs = [d for d in report.get("differences") or [] if main.get(d["task"], d["metric"]) == d["metric"]]
    if not diffs:
        return ""
    by = _index({"differences": diffs}, "differences")
    keys = list(dict.fromkeys((d["task"], d["system"]) for d in diffs))

    def cell(d: dict[str, Any] | None, named: bool) -> str:
        if d is None:
            return ""
        m = d["metric"]
        sig = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
        txt = f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{sig}"
        if m in _LOWER_IS_BETTER:
            txt = f"{d['value']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]{sig}"
        return f"{d['reference_system']}: {txt}" if named else txt

    others = [d for d in diffs if d["reference"] not in ("base", "best_baseline")]
    head = "| task (metric) | system | - base [95 % CI] | - strongest baseline [95 % CI] |"
    lines = [head + (" - eager / - all layers [95 % CI] |" if others else ""), "|---|---|---|---|" + ("---|" if others
                                                                                                      else "")]
    for t, s in keys:
        m = main.get(t, next(d["metric"] for d in diffs if d["task"] == t))
        row = (f"| {t} ({m}) | {s} | {cell(by.get((s, 'base', t, m)), False)} | "
               f"{cell(by.get((s, 'best_baseline', t, m)), True)} |")
        if others:
            row += " " + "; ".join(cell(d, True) for d in others if d["task"] == t and d["system"] == s
                                   and d["metric"] == m) + " |"
        lines.append(row)
    lines.append("")
    lines.append("Differences over the same examples (paired); * = the 95 % interval excludes 0. Perplexity: lower "
                 "is better, so a negative difference is an improvement."
                 + (" eager: the bundle against the eager float model with the same weights and mask policy "
                    "(= quantization); all layers: the same model with and without skipping (= skipping)."
                    if others else ""))
    return "\n".join(lines) + "\n"


def plot_quality_vs_skip(reports: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per task: score vs average skip ratio for every system (and every report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for rep in reports for r in _main_rows(rep)]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        raise ValueError("no results to plot")
    cols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    markers = {"base": "*", "first": "o", "first+lora": "D", "lora": "P", "static": "s", "uniform": "^",
               "random": "x", "last-k": "v"}
    colors = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, t in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        for r in (r for r in rows if r["task"] == t):
            family = r["system"].split("@")[0]
            color = colors.setdefault(family, palette[len(colors) % len(palette)])
            ax.scatter(100 * r["skip_ratio"], r["score"], marker=markers.get(family, "o"), color=color,
                       label=family, s=60 if family in ("first", "first+lora") else 35)
        # connect each family's points across budgets (Pareto view)
        for family in {r["system"].split("@")[0] for r in rows if r["task"] == t}:
            pts = sorted((100 * r["skip_ratio"], r["score"]) for r in rows
                         if r["task"] == t and r["system"].split("@")[0] == family)
            if len(pts) > 1:
                ax.plot(*zip(*pts, strict=True), color=colors[family], alpha=0.5, lw=1)
        metric = next(r["metric"] for r in rows if r["task"] == t)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("layers skipped (%)")
        ax.set_ylabel(metric + (" (lower is better)" if metric in _LOWER_IS_BETTER else ""))
        if metric in _LOWER_IS_BETTER:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for k in range(len(tasks), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(8, len(labels)),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_usage(report: dict[str, Any], path: str | Path, system: str = "first") -> Path:
    """Heatmap: tasks x layers, fraction of prompts for which ``system`` runs each layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    usage = report.get("layer_usage", {}).get(system, {})
    if not usage:
        raise ValueError(f"no layer usage recorded for system {system!r}")
    tasks = list(usage)
    data = np.array([usage[t] for t in tasks])
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * data.shape[1] + 2), 0.42 * len(tasks) + 1.6))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xticks(range(data.shape[1]), [str(i) for i in range(data.shape[1])], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"{system}: fraction of prompts running each layer", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path,
                 extra_reports: Sequence[dict[str, Any]] = ()) -> list[Path]:
    """results.json, results.md, quality_vs_skip.png and layer_usage.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "results.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(p)
    written.append(p)
    md = out / "results.md"
    md.write_text(markdown_table(report) + _compute_lines(report))
    written.append(md)
    written.append(plot_quality_vs_skip([report, *extra_reports], out / "quality_vs_skip.png"))
    for system in ("first", "first+lora"):
        if report.get("layer_usage", {}).get(system):
            name = "layer_usage.png" if system == "first" else "layer_usage_first_lora.png"
            written.append(plot_layer_usage(report, out / name, system))
    return written


def _compute_lines(report: dict[str, Any]) -> str:
    rc = report.get("router_compute") or {}
    lines = []
    if rc:
        lines.append(f"\nRouter compute: {rc['router_params']} parameters, {rc['router_flops']:,} FLOPs for a "
                     f"{rc['prompt_tokens']}-token prompt = {rc['router_percent_of_forward']:.3f}% of one full "
                     f"prefill ({rc['forward_flops']:,} FLOPs).")
    skips = report.get("skip_by_task", {})
    if skips:
        lines.append("\nAverage skip ratio per task: " + ", ".join(
            f"{s}: " + ", ".join(f"{t} {100 * v:.1f}%" for t, v in d.items()) for s, d in skips.items()))
    return "\n".join(lines) + "\n"


def merge_reports(reports: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """One report from several; systems other than base get ``@label`` appended (nothing for label "").

    Files may share a label (e.g. multiple-choice and generation runs of the same routers): their rows
    are concatenated. ``base`` rows are kept once per (task, metric).
    """

    def name(system: str, lab: str) -> str:
        return system if system == "base" or not lab else f"{system}@{lab}"

    merged: dict[str, Any] = {"model": reports[0]["model"], "results": [], "layer_usage": {},
                              "main_metric": {}, "skip_by_task": {}, "intervals": [], "differences": [],
                              "chance": {}}
    seen_shared = set()
    seen_iv = set()
    for rep, lab in zip(reports, labels, strict=True):
        merged["main_metric"].update(rep.get("main_metric", {}))
        for r in rep["results"]:
            shared = r["system"] == "base"
            if shared:
                key = (r["system"], r["task"], r["metric"])
                if key in seen_shared:
                    continue
                seen_shared.add(key)
            merged["results"].append({**r, "system": name(r["system"], lab)})
        merged["chance"].update(rep.get("chance") or {})
        for iv in rep.get("intervals") or []:
            key = (iv["system"], iv["task"], iv["metric"])
            if iv["system"] != "base" or key not in seen_iv:
                merged["intervals"].append({**iv, "system": name(iv["system"], lab)})
            seen_iv.add(key)
        for d in rep.get("differences") or []:
            merged["differences"].append({**d, "system": name(d["system"], lab),
                                          "reference_system": name(d["reference_system"], lab)})
        for s, d in rep.get("layer_usage", {}).items():
            merged["layer_usage"].setdefault(name(s, lab), {}).update(d)
        for s, d in rep.get("skip_by_task", {}).items():
            merged["skip_by_task"].setdefault(name(s, lab), {}).update(d)
    return merged


def _cli() -> None:
    import click

    @click.command()
    @click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
    @click.option("--labels", default=None,
                  help="Comma-separated labels, one per file (default: file stems); an empty label adds no suffix.")
    @click.option("--systems", default=None, help="Keep only these (merged) system names, comma-separated.")
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
    def main(files: tuple[str, ...], labels: str | None, systems: str | None, out_dir: str) -> None:
        """Merge first-eval result files into one Markdown table and plot set."""
        reps = [json.loads(Path(f).read_text()) for f in files]
        labs = labels.split(",") if labels else [Path(f).parent.name or Path(f).stem for f in files]
        if len(labs) != len(reps):
            raise click.UsageError("--labels needs one label per file")
        merged = merge_reports(reps, labs)
        if systems:
            keep = [s.strip() for s in systems.split(",")]
            merged["results"] = [r for r in merged["results"] if r["system"] in keep]
            for key in ("layer_usage", "skip_by_task"):
                merged[key] = {s: d for s, d in merged[key].items() if s in keep}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "merged.json").write_text(json.dumps(merged, indent=1))
        (out / "merged.md").write_text(markdown_table(merged))
        plot_quality_vs_skip(reps if len(reps) > 1 else [merged], out / "quality_vs_skip.png")
        for s in merged["layer_usage"]:
            if s.startswith("first"):
                plot_layer_usage(merged, out / f"layer_usage_{s.replace('@', '_').replace('+', '_')}.png", s)
        click.echo(f"wrote {out}")

    main()


if __name__ == "__main__":  # pragma: no cover
    _cli()
