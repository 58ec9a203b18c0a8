"""Summaries of ExecuTorch ETDump traces recorded by the native runner (``--profile``).

The runner wraps every method call in an ETDump event named ``method:<name>``; the summary adds
those up per method (embed, route, each prefill_i and layer_i, head) and lists the slowest operators / delegate
calls, using ``executorch.devtools.Inspector``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict


def summarize_etdump(path: str, top_ops: int = 8) -> dict:
    """{"methods": [{method, calls, total_ms, mean_ms, share}], "operators": [...], "total_ms"}."""
    from executorch.devtools import Inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ins = Inspector(etdump_path=path)
    methods: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, list[float]] = defaultdict(list)
    for block in ins.event_blocks:
        for ev in block.events:
            if ev.perf_data is None:
                continue
            raw = [float(x) for x in ev.perf_data.raw]  # milliseconds
            if ev.name.startswith("method:"):
                methods[ev.name[len("method:"):]].extend(raw)
            elif ev.name not in ("Method::execute", "Method::init", "Program::load_method", "OPERATOR_CALL"):
                ops[ev.name].extend(raw)
    total = sum(sum(v) for v in methods.values())

    def order(name: str) -> tuple:
        kind, _, idx = name.rpartition("_")
        if kind in ("prefill", "layer") and idx.isdigit():
            return (2 if kind == "prefill" else 3, int(idx))
        return ({"embed": 0, "route": 1}.get(name, 4), 0)

    rows = [{"method": m, "calls": len(v), "total_ms": sum(v), "mean_ms": sum(v) / len(v),
             "share": (sum(v) / total if total else 0.0)}
            for m, v in sorted(methods.items(), key=lambda kv: order(kv[0]))]
    op_rows = sorted(({"op": k, "calls": len(v), "total_ms": sum(v)} for k, v in ops.items()),
                     key=lambda r: -r["total_ms"])[:top_ops]
    return {"methods": rows, "operators": op_rows, "total_ms": total}


def format_profile(summary: dict, title: str) -> str:
    """Plain-text table of a profile summary."""
    lines = [f"profile {title}: time per method (ETDump, all profiled calls)",
             f"  {'method':<12} {'calls':>6} {'total ms':>10} {'mean ms':>9} {'share':>6}"]
    decode_layers = [r for r in summary["methods"] if r["method"].startswith("layer_")]
    for r in summary["methods"]:
        lines.append(f"  {r['method']:<12} {r['calls']:>6} {r['total_ms']:>10.3f} {r['mean_ms']:>9.4f} "
                     f"{100 * r['share']:>5.1f}%")
    prefill_layers = [r for r in summary["methods"] if r["method"].startswith("prefill_")]
    if prefill_layers:
        lines.append(f"  prefill layers together: {sum(r['total_ms'] for r in prefill_layers):.3f} ms "
                     f"({len(prefill_layers)} running layers)")
    if decode_layers:
        lt = sum(r["total_ms"] for r in decode_layers)
        lines.append(f"  decode layers together: {lt:.3f} ms ({len(decode_layers)} running layers)")
    if summary["operators"]:
        lines.append("  slowest operators / delegate calls: " + ", ".join(
            f"{o['op']} {o['total_ms']:.2f} ms" for o in summary["operators"][:5]))
    return "\n".join(lines)
