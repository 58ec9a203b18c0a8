"""ExecuTorch lowering: torch.export every method, lower to XNNPACK together, emit one ``.pte``.

Steps (each a function, composable like ExecuTorch's ``extension/llm/export``):
``export_programs`` -> ``to_edge_programs`` (XNNPACK rewrites, then lowering) -> ``to_pte_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.export import Dim, ExportedProgram

from .graph import EmbedMethod, ExportCore, HeadMethod, LayerMethod, PrefillLayerMethod, RouteMethod


def export_programs(core: ExportCore, progress: Callable[[str], None] | None = None
                    ) -> dict[str, ExportedProgram]:
    """``torch.export`` every method of ``core`` (same instance, so buffer names match)."""
    core.eval()
    n = core.n_layers
    hsz = core.parts.hidden_size
    progs: dict[str, ExportedProgram] = {}
    t_dim = Dim("T", min=1, max=core.max_seq_len)
    chunk_dim = Dim("chunk", min=1, max=core.prefill_chunk)  # prompt tokens per prefill_i call
    kv_dim = Dim("kv_len", min=1, max=core.max_seq_len)  # filled cache rows a layer attends: 0..last position
    example_t = min(4, core.max_seq_len)
    with torch.no_grad():
        # whole-prompt graphs: embed and route take [1, T, ...] (T = 1 for embed in decode)
        prompt_h = torch.zeros(1, example_t, hsz, dtype=torch.float32)
        if progress:
            progress("embed")
        progs["embed"] = torch.export.export(EmbedMethod(core), (torch.zeros(1, example_t, dtype=torch.long),),
                                             dynamic_shapes=({1: t_dim},), strict=False)
        if progress:
            progress("route")
        progs["route"] = torch.export.export(
            RouteMethod(core), (prompt_h, torch.zeros(1, dtype=torch.long), torch.full((n,), -1, dtype=torch.long)),
            dynamic_shapes=({1: t_dim}, None, None), strict=False)
        # prefill_i: a chunk of c tokens after `start` earlier ones (example start > 0: nothing specializes on 0)
        c = min(4, core.prefill_chunk)
        start = min(2, core.max_seq_len - c)
        chunk = (torch.zeros(1, c, hsz), torch.arange(start, start + c), torch.arange(start + c))
        for i in range(n):
            if progress:
                progress(f"prefill_{i}")
            progs[f"prefill_{i}"] = torch.export.export(PrefillLayerMethod(core, i), chunk,
                                                        dynamic_shapes=({1: chunk_dim}, {0: chunk_dim}, {0: kv_dim}),
                                                        strict=False)
        h = torch.zeros(1, 1, hsz, dtype=torch.float32)
        example_pos = min(3, core.max_seq_len - 1)
        pos = torch.tensor([example_pos], dtype=torch.long)
        kv_positions = torch.arange(example_pos + 1, dtype=torch.long)
        for i in range(n):
            if progress:
                progress(f"layer_{i}")
            progs[f"layer_{i}"] = torch.export.export(LayerMethod(core, i), (h, pos, kv_positions),
                                                      dynamic_shapes=(None, None, {0: kv_dim}), strict=False)
        if progress:
            progress("head")
        progs["head"] = torch.export.export(HeadMethod(core), (h,), strict=False)
    return progs


def constant_methods(core: ExportCore, bos_id: int | None, eos_ids: list[int]) -> dict[str, object]:
    """Metadata methods carried in the ``.pte``."""
    return {
        "get_max_seq_len": int(core.max_seq_len),
        "get_prefill_chunk": int(core.prefill_chunk),
        "get_n_layers": int(core.n_layers),
        "get_vocab_size": int(core.parts.vocab_size),
        "get_bos_id": int(bos_id if bos_id is not None else -1),
        "get_eos_ids": [int(e) for e in eos_ids] or [-1],
    }


def to_edge_programs(programs: dict[str, ExportedProgram], constants: dict[str, object], quantized: bool):
    """Lower all programs to XNNPACK in one call; the ``ExecutorchProgramManager`` (``.buffer`` = the ``.pte``)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes import MemoryPlanningPass

    from .xnnpack_rewrites import rewrite_for_xnnpack

    if quantized:
        import executorch.kernels.quantized  # noqa: F401  (out variants of the quantized ops)

    rewrite_for_xnnpack(programs)  # same values, fewer ops left outside the delegate
    edge = to_edge_transform_and_lower(
        programs,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=constants or None,
    )
    return edge.to_executorch(
        ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
            do_quant_fusion_and_const_prop=quantized,
            # KV writes as one in-place index_put_ (not index_put.out + a copy_ of the whole cache)
            run_reinplace_pass=True,
        )
    )


def to_pte_bytes(programs: dict[str, ExportedProgram], constants: dict[str, object],
                 quantized: bool) -> bytes:
    """Lower all programs to XNNPACK in one call and serialize the multi-method program."""
    return to_edge_programs(programs, constants, quantized).buffer
