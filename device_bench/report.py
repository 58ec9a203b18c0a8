"""Summaries of bench records: per-configuration statistics, the llama-bench-style table, PNG plots."""

from __future__ import annotations

import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from .store import config_key


def _stats(xs: list[float]) -> tuple[float, float]:
    """(median, sample standard deviation); sd is 0 for a single value."""
    if not xs:
        return float("nan"), float("nan")
    return statistics.median(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(records: list[dict]) -> list[dict]:
    """One row per configuration: medians and spreads of the runs, speedup vs the ``all`` mask."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[config_key(r)].append(r)
    rows = []
    for _key, recs in groups.items():
        first = recs[0]
        res = [r["result"] for r in recs]
        prefill_ms = [float(x["prefill_ms"]) for x in res]
        prefill_tps = [1000.0 * float(x["prompt_tokens"]) / float(x["prefill_ms"]) for x in res if x["prefill_ms"] > 0]
        decode_tps = [float(x["tokens_per_s"]) for x in res if x.get("decode_ms")]
        rss = [float(x.get("peak_rss_mb") or 0.0) for x in res]
        pm, ps = _stats(prefill_ms)
        ptm, pts = _stats(prefill_tps)
        dm, ds = _stats(decode_tps)
        matches = [r.get("tokens_match") for r in recs]
        token_sets = {tuple(x["tokens"]) for x in res}
        if any(m is False for m in matches) or len(token_sets) > 1:
            match = False
        elif matches and all(m is True for m in matches):
            match = True
        else:
            match = None
        masks = sorted({x["mask"] for x in res})
        rows.append({
            "device": first["device"], "device_model": first.get("device_model", ""), "target": first.get("target"),
            "emulated": bool(first.get("emulated")), "bundle_sha256": first["bundle_sha256"],
            "mask_spec": first["mask_spec"], "mask": masks[0] if len(masks) == 1 else ",".join(masks),
            "skip_ratio": float(res[0]["skip_ratio"]), "prompt_len": first["prompt_len"],
            "prompt_tokens": int(res[0]["prompt_tokens"]), "threads": first["threads"],
            "max_new_tokens": first["max_new_tokens"], "generated": statistics.median(len(x["tokens"]) for x in res),
            "runs": len(recs), "prefill_ms": pm, "prefill_ms_sd": ps, "prefill_tokens_per_s": ptm,
            "prefill_tokens_per_s_sd": pts, "decode_tokens_per_s": dm, "decode_tokens_per_s_sd": ds,
            "decode_ms_per_token": (1000.0 / dm) if dm and dm == dm and dm > 0 else float("nan"),
            "peak_rss_mb": max(rss) if rss else 0.0, "tokens_match": match,
        })
    base = {(r["device"], r["bundle_sha256"], r["target"], r["prompt_len"], r["threads"], r["max_new_tokens"]):
            r for r in rows if r["mask_spec"] == "all"}
    for r in rows:
        b = base.get((r["device"], r["bundle_sha256"], r["target"], r["prompt_len"], r["threads"], r["max_new_tokens"]))
        ok = b is not None and b["decode_tokens_per_s"] > 0 and b["prefill_ms"] > 0
        r["speedup_vs_all"] = r["decode_tokens_per_s"] / b["decode_tokens_per_s"] if ok else None
        r["prefill_speedup_vs_all"] = b["prefill_ms"] / r["prefill_ms"] if ok and r["prefill_ms"] > 0 else None
    order = {"all": 0, "auto": 1}
    rows.sort(key=lambda r: (r["device"], r["target"] or "", r["prompt_len"], r["threads"],
                             order.get(r["mask_spec"], 2), r["mask_spec"]))
    return rows


# Settings a row of the table shows itself: not repeated as a column of the invocation's settings.
_ROW_SETTINGS = {"device", "target", "bundle_sha256", "mask", "masks", "threads", "prompt_lengths", "max_new_tokens",
                 "runs"}


def _row_columns(settings: dict[str, object]) -> list[tuple[str, object, bool]]:
    """(header, row -> cell, right-aligned) for every column: settings first, then results (as llama-bench)."""
    const = [(k, (lambda r, v=v: str(v)), isinstance(v, int | float) and not isinstance(v, bool))
             for k, v in settings.items() if k not in _ROW_SETTINGS]

    def sp(r: dict) -> str:
        return "-" if r["speedup_vs_all"] is None else f"{r['speedup_vs_all']:.2f}x"

    return [
        ("device", lambda r: r["device"] + (" (qemu)" if r["emulated"] else ""), False),
        ("target", lambda r: r["target"] or "", False),
        *const,
        ("mask", lambda r: r["mask_spec"] if r["mask_spec"] in ("auto", "all") else "bits", False),
        ("threads", lambda r: str(r["threads"]), True),
        ("pp", lambda r: str(r["prompt_tokens"]), True),
        ("tg", lambda r: str(int(r["generated"])), True),
        ("runs", lambda r: str(r["runs"]), True),
        ("layers run", lambda r: f"{r['mask'].count('1')}/{len(r['mask'])} {r['mask']}", False),
        ("skip", lambda r: f"{r['skip_ratio']:.2f}", True),
        ("prefill t/s", lambda r: f"{r['prefill_tokens_per_s']:.1f} ± {r['prefill_tokens_per_s_sd']:.1f}", True),
        ("decode t/s", lambda r: f"{r['decode_tokens_per_s']:.2f} ± {r['decode_tokens_per_s_sd']:.2f}", True),
        ("speedup", sp, True),
        ("peak MB", lambda r: f"{r['peak_rss_mb']:.0f}", True),
        ("tokens match", lambda r: {True: "yes", False: "NO", None: "n/a"}[r["tokens_match"]], True),
    ]


def format_table(rows: list[dict], settings: dict[str, object] | None = None, notes: list[str] | None = None) -> str:
    """Markdown table in the spirit of llama-bench: one row per configuration with every setting in it (median ± sd
    over the measured runs). ``settings``: the invocation's settings that are the same on every row (e.g. bundle,
    warmup); each becomes a column unless a row shows it already (device, target, mask, threads, pp, tg, runs).
    ``notes``: lines printed under the table."""
    cols = _row_columns(settings or {})
    head = [h for h, _, _ in cols]
    table = [[cell(r) for _, cell, _ in cols] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for t in table:
        lines.append("| " + " | ".join(c.rjust(w) if right else c.ljust(w)
                                        for c, w, (_, _, right) in zip(t, widths, cols, strict=True)) + " |")
    if any(r["emulated"] for r in rows):
        lines.append("note: rows marked (qemu) ran under qemu-user emulation: their timings are NOT real "
                     "device timings (correctness only).")
    lines.append("pp = prompt tokens, tg = generated tokens; prefill t/s = pp / prefill time; decode t/s excludes "
                 "the first token (it comes from prefill); speedup = decode t/s / decode t/s of mask 'all'.")
    lines += notes or []
    return "\n".join(lines)


def _save_fig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_plots(rows: list[dict], out_prefix: str | os.PathLike) -> list[Path]:
    """``<prefix>_decode.png`` (decode tok/s per mask and device) and ``<prefix>_prefill.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return []
    prefix = Path(out_prefix)
    written = []
    groups = sorted({(r["device"], r["target"], r["threads"], r["prompt_len"]) for r in rows})
    specs = []
    for r in rows:
        if r["mask_spec"] not in specs:
            specs.append(r["mask_spec"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * len(specs)), 4))
    width = 0.8 / max(1, len(specs))
    for j, spec in enumerate(specs):
        xs, ys, es = [], [], []
        for i, g in enumerate(groups):
            for r in rows:
                if (r["device"], r["target"], r["threads"], r["prompt_len"]) == g and r["mask_spec"] == spec:
                    xs.append(i + j * width)
                    ys.append(r["decode_tokens_per_s"])
                    es.append(r["decode_tokens_per_s_sd"])
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=f"mask {spec}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{d}{' (qemu)' if any(r['emulated'] for r in rows if r['device'] == d) else ''}\n"
                        f"{t}, {th} thr, pp {pp}" for d, t, th, pp in groups], fontsize=8)
    ax.set_ylabel("decode tokens/s (median ± sd)")
    ax.set_title("FiRST layer skipping: decode throughput")
    ax.legend(fontsize=8)
    p = prefix.with_name(prefix.name + "_decode.png")
    _save_fig(fig, p)
    plt.close(fig)
    written.append(p)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["device"], r["target"], r["threads"], r["mask_spec"]) for r in rows}):
        pts = sorted((r["prompt_tokens"], r["prefill_tokens_per_s"]) for r in rows
                     if (r["device"], r["target"], r["threads"], r["mask_spec"]) == key)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                label=f"{key[0]} {key[2]} thr mask {key[3]}")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill tokens/s (median)")
    ax.set_title("Prefill throughput")
    ax.legend(fontsize=7)
    p = prefix.with_name(prefix.name + "_prefill.png")
    _save_fig(fig, p)
    plt.close(fig)
    written.append(p)
    return written
