"""Graph rewrites that let XNNPACK take ops it would otherwise leave to ExecuTorch's portable kernels.

Every op XNNPACK does not take runs outside the delegate and splits the graph around it: one more delegate
call per token at run time, and one more partition to lower at export time (each costs the whole XNNPACK pass
pipeline). Each rewrite here computes the same values with ops the partitioner accepts.
"""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram

__all__ = ["pooled_last_dim_means", "rewrite_for_xnnpack"]

_MEAN = torch.ops.aten.mean.dim
_VIEW = torch.ops.aten.view.default


def pooled_last_dim_means(ep: ExportedProgram) -> int:
    """``x.mean(-1, keepdim=True)`` (RMSNorm's variance) as a mean over the last two dims of ``[N, 1, 1, H]``.

    XNNPACK lowers ``mean.dim`` only as global average pooling of a 4-D tensor over dims (2, 3); the norm's
    mean over the hidden size of ``[B, T, H]`` stays a portable op between two delegates otherwise. The
    leading dims fold into ``N`` (at most one of them dynamic). Rewrites ``ep`` in place; returns the count.
    """
    gm = ep.graph_module
    graph = gm.graph
    vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    fake_mode = detect_fake_mode(vals)
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != _MEAN or node.kwargs.get("dtype") is not None:
            continue
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() < 2 or not val.dtype.is_floating_point:
            continue
        rank = val.dim()
        dims = [int(d) % rank for d in node.args[1]]
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        lead = list(val.shape[:-1])
        dynamic = [i for i, s in enumerate(lead) if not isinstance(s, int)]
        if dims != [rank - 1] or not keepdim or not isinstance(val.shape[-1], int) or len(dynamic) > 1:
            continue
        hidden = int(val.shape[-1])
        out_shape = [-1 if i in dynamic else int(s) for i, s in enumerate(lead)] + [1]
        try:  # a view needs the leading dims to fold without a copy (not so for e.g. q/k norms of [B, H, T, D])
            if not bool(val.is_contiguous()):
                continue
            with fake_mode:
                metas = [val.view(-1, 1, 1, hidden)]
                metas.append(metas[0].mean([2, 3], True))
                metas.append(metas[1].view(out_shape))
        except (RuntimeError, ValueError):  # symbolic strides that cannot be decided
            continue
        with graph.inserting_before(node):
            as_4d = graph.call_function(_VIEW, (x, [-1, 1, 1, hidden]))
            pooled = graph.call_function(_MEAN, (as_4d, [2, 3], True))
            out = graph.call_function(_VIEW, (pooled, out_shape))
        for new, meta in zip((as_4d, pooled, out), metas, strict=True):
            new.meta["val"] = meta
            new.meta["stack_trace"] = node.meta.get("stack_trace")
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def rewrite_for_xnnpack(programs: dict[str, ExportedProgram]) -> dict[str, int]:
    """Apply every rewrite to every program (in place); rewrites per method."""
    return {name: pooled_last_dim_means(ep) for name, ep in programs.items()}
