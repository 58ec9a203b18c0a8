"""ONNX export: a prefill model (mask + KV out) and a decode model with one ``If`` per layer.

Both reuse the :class:`~firstkit.export.graph.ExportCore` pieces (same HF layers, rotary, masks,
routers); the KV cache is explicit graph inputs/outputs with the standard names
``past_key_values.{i}.key/value`` and ``present.{i}.key/value`` (static length ``max_seq_len``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .graph import ExportCore

PREFILL_FILE = "onnx/prefill.onnx"
DECODE_FILE = "onnx/decode.onnx"
OPSET = 18


class _CollectCache:
    """Functional cache: prefill keeps the fresh K/V; decode returns ``past`` with ``input_pos`` written."""

    def __init__(self, past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None,
                 input_pos: torch.Tensor | None = None) -> None:
        self.past_k, self.past_v, self.input_pos = past_k, past_v, input_pos
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.past_k is None:
            self.k, self.v = key, value
            return key, value
        self.k = self.past_k.index_copy(2, self.input_pos, key.to(self.past_k.dtype))
        self.v = self.past_v.index_copy(2, self.input_pos, value.to(self.past_v.dtype))
        return self.k, self.v


class OnnxPrefill(nn.Module):
    """``(input_ids[1, T], mask_override[L]) -> (logits[1, V], mask[L], present.{i}.key, present.{i}.value...)``."""

    def __init__(self, core: ExportCore) -> None:
        super().__init__()
        self.core = core

    def forward(self, input_ids: torch.Tensor, mask_override: torch.Tensor):
        core = self.core
        h = core.parts.embed_tokens(input_ids)
        t = input_ids.shape[1]
        pos, masks, ropes = core.prompt_context(h, t)
        runs, presents = [], []
        for i in range(core.n_layers):
            lt = core.parts.layer_types[i]
            run = core.decide(i, h, mask_override)
            runs.append(run)
            cache = _CollectCache()
            new_h = core._call_layer(i, h, pos[None], masks[lt], cache, ropes[lt])
            h = torch.where(run, new_h, h)
            pad = core.max_seq_len - t
            for kv in (cache.k, cache.v):
                full = torch.nn.functional.pad(kv.float(), (0, 0, 0, pad))
                presents.append(torch.where(run, full, torch.zeros_like(full)))
        return (core._logits(h[:, -1, :]), torch.stack(runs).to(torch.long), *presents)


class OnnxDecode(nn.Module):
    """``(input_ids[1, 1], input_pos[1], mask[L], past...) -> (logits[1, V], present...)``; ``If`` per layer."""

    def __init__(self, core: ExportCore) -> None:
        super().__init__()
        self.core = core

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor, *past: torch.Tensor):
        core = self.core
        h = core.embed(input_ids)
        presents = []
        for i in range(core.n_layers):
            def run_layer(h, pk, pv, pos, i=i):
                cache = _CollectCache(pk, pv, pos)
                out = core.layer_with_cache(i, h, pos, cache)
                return out, cache.k, cache.v

            def skip_layer(h, pk, pv, pos):
                return h.clone(), pk.clone(), pv.clone()

            h, nk, nv = torch.cond(mask[i] > 0, run_layer, skip_layer, (h, past[2 * i], past[2 * i + 1], input_pos))
            presents += [nk, nv]
        return (core.head(h), *presents)


def _io_names(n: int) -> tuple[list[str], list[str], list[str], list[str]]:
    kv_in = [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    kv_out = [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
    return (["input_ids", "mask_override"], ["logits", "mask", *kv_out],
            ["input_ids", "input_pos", "mask", *kv_in], ["logits", *kv_out])


def quantize_int4(path: Path, block_size: int = 32) -> None:
    """int4 ``MatMulNBits`` (symmetric, block 32) on every constant-weight MatMul, If subgraphs included."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True)
    q.process()
    onnx.save_model(q.model.model, str(path))


def write_onnx(first_model, core: ExportCore, out_dir: Path, scheme: str,
               progress: Callable[[str], None] | None = None) -> dict:
    """Export both ONNX models of ``core`` into ``out_dir/onnx``; returns the manifest entry.

    ONNX always exports the float graph (torchao tensor subclasses do not export to ONNX);
    ``scheme == "8da4w"`` maps to int4 MatMulNBits weight quantization applied to the ONNX files.
    """
    if scheme != "none":
        from .pipeline import build_core

        core, _ = build_core(first_model, "none", core.max_seq_len)
    n, s = core.n_layers, core.max_seq_len
    hkv, d = core.parts.num_kv_heads, core.parts.head_dim
    pin, pout, din, dout = _io_names(n)
    timings = {}
    (out_dir / PREFILL_FILE).parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if progress:
            progress("onnx prefill")
        t0 = time.perf_counter()
        t_dim = torch.export.Dim("T", min=1, max=s)
        ids = torch.zeros(1, min(4, s), dtype=torch.long)
        ov = torch.full((n,), -1, dtype=torch.long)
        prog = torch.onnx.export(OnnxPrefill(core).eval(), (ids, ov), dynamo=True, input_names=pin, output_names=pout,
                                 dynamic_shapes=({1: t_dim}, None), opset_version=OPSET, optimize=True,
                                 verbose=False)
        prog.save(str(out_dir / PREFILL_FILE))
        timings["prefill_s"] = time.perf_counter() - t0
        if progress:
            progress("onnx decode")
        t0 = time.perf_counter()
        past = tuple(torch.zeros(1, hkv, s, d) for _ in range(2 * n))
        args = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                torch.ones(n, dtype=torch.long), *past)
        prog = torch.onnx.export(OnnxDecode(core).eval(), args, dynamo=True, input_names=din, output_names=dout,
                                 opset_version=OPSET, optimize=True, verbose=False)
        prog.save(str(out_dir / DECODE_FILE))
        timings["decode_s"] = time.perf_counter() - t0
    quant = {"scheme": "none", "dtype": "float32"}
    if scheme == "8da4w":
        if progress:
            progress("onnx int4 MatMulNBits")
        for f in (PREFILL_FILE, DECODE_FILE):
            quantize_int4(out_dir / f)
        quant = {"scheme": "int4-matmulnbits", "block_size": 32, "symmetric": True,
                 "note": "float activations; embeddings and non-MatMul ops stay float32"}
    kv_shape = [1, hkv, s, d]
    return {
        "prefill": {"file": PREFILL_FILE,
                    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, "T"]},
                               {"name": "mask_override", "dtype": "int64", "shape": [n]}],
                    "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, core.parts.vocab_size]},
                                {"name": "mask", "dtype": "int64", "shape": [n]}]
                    + [{"name": x, "dtype": "float32", "shape": kv_shape} for x in pout[2:]]},
        "decode": {"file": DECODE_FILE,
                   "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, 1]},
                              {"name": "input_pos", "dtype": "int64", "shape": [1]},
                              {"name": "mask", "dtype": "int64", "shape": [n]}]
                   + [{"name": x, "dtype": "float32", "shape": kv_shape} for x in din[3:]],
                   "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, core.parts.vocab_size]}]
                   + [{"name": x, "dtype": "float32", "shape": kv_shape} for x in dout[1:]],
                   "layer_gating": "one ONNX If per layer on mask[i] (skipped branch passes the cache through)"},
        "opset": OPSET,
        "quantization": quant,
        "session_options": {"session.intra_op.allow_spinning": "0"},
        "export_timings": timings,
    }
