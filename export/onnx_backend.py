"""ONNX export: a prefill model (mask + KV out) and a decode model with one ``If`` per layer.

Both reuse the :class:`~firstkit.export.graph.ExportCore` pieces (same HF layers, rotary tables, masks,
routers). The KV cache is owned by the runtime, not the graphs: prefill returns each layer's keys/values for
the prompt (``present.{i}.key/value``, ``[1, Hkv, T, D]``), decode takes each layer's *filled* rows only
(``past_key_values.{i}.key/value``, ``[1, Hkv, P_i, D]``, ``P_i`` dynamic per layer) and returns the new
token's row (``new.{i}.key/value``, ``[1, Hkv, 1, D]``), which the runtime writes into its cache in place.
A skipped layer's ``If`` branch runs nothing; the runtime holds no cache for it and passes a 1-row stub.
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
    """Functional cache: prefill keeps the fresh K/V; decode appends the new row to the filled ``past``."""

    def __init__(self, past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None) -> None:
        self.past_k, self.past_v = past_k, past_v
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.k, self.v = key, value
        if self.past_k is None:
            return key, value
        k = torch.cat([self.past_k, key.to(self.past_k.dtype)], 2)
        return k, torch.cat([self.past_v, value.to(self.past_v.dtype)], 2)


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
            presents += [torch.where(run, kv.float(), torch.zeros_like(kv.float())) for kv in (cache.k, cache.v)]
        return (core._logits(h[:, -1, :]), torch.stack(runs).to(torch.long), *presents)


class OnnxDecode(nn.Module):
    """``(input_ids[1, 1], input_pos[1], mask[L], past...) -> (logits[1, V], new...)``; ``If`` per layer."""

    def __init__(self, core: ExportCore) -> None:
        super().__init__()
        self.core = core

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor, *past: torch.Tensor):
        core = self.core
        h = core.embed(input_ids)
        news = []
        for i in range(core.n_layers):
            def run_layer(h, pk, pv, pos, i=i):
                cache = _CollectCache(pk, pv)
                kv_positions = torch.arange(pk.shape[2] + 1, dtype=torch.long)
                out = core.layer_with_cache(i, h, pos, kv_positions, cache)
                # standard strides: the new row is a transposed view, and both branches must agree on layout
                rows = [x.float().clone(memory_format=torch.contiguous_format) for x in (cache.k, cache.v)]
                return out, *rows

            def skip_layer(h, pk, pv, pos):
                row = torch.zeros(pk.shape[0], pk.shape[1], 1, pk.shape[3], dtype=torch.float32)
                return h.clone(), row, row.clone()

            h, nk, nv = torch.cond(mask[i] > 0, run_layer, skip_layer, (h, past[2 * i], past[2 * i + 1], input_pos))
            news += [nk, nv]
        return (core.head(h), *news)


def _io_names(n: int) -> tuple[list[str], list[str], list[str], list[str]]:
    kv_in = [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    kv_out = [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
    kv_new = [f"new.{i}.{k}" for i in range(n) for k in ("key", "value")]
    return (["input_ids", "mask_override"], ["logits", "mask", *kv_out],
            ["input_ids", "input_pos", "mask", *kv_in], ["logits", *kv_new])


def quantize_int4(path: Path, block_size: int = 32) -> None:
    """int4 ``MatMulNBits`` (symmetric, block 32) on every constant-weight MatMul, If subgraphs included."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True)
    q.process()
    onnx.save_model(q.model.model, str(path))


def write_onnx(core: ExportCore, out_dir: Path, scheme: str, progress: Callable[[str], None] | None = None) -> dict:
    """Export both ONNX models of ``core`` (a float core: torchao tensor subclasses do not export to ONNX) into
    ``out_dir/onnx``; returns the manifest entry. ``scheme == "8da4w"`` maps to int4 MatMulNBits weight
    quantization applied to the ONNX files.
    """
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
        example_p = min(3, s - 1)
        past = tuple(torch.zeros(1, hkv, example_p, d) for _ in range(2 * n))
        args = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([example_p], dtype=torch.long),
                torch.ones(n, dtype=torch.long), *past)
        # every layer's filled length is its own dimension (a skipped layer gets a 1-row stub)
        dims = [{2: torch.export.Dim(f"past_{i}_{k}", min=1, max=s - 1)} for i in range(n) for k in "kv"]
        prog = torch.onnx.export(OnnxDecode(core).eval(), args, dynamo=True, input_names=din, output_names=dout,
                                 dynamic_shapes=(None, None, None, tuple(dims)), opset_version=OPSET, optimize=True,
                                 verbose=False)
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
    kv_shape = [1, hkv, "T", d]
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
                   + [{"name": x, "dtype": "float32", "shape": [1, hkv, "P", d]} for x in din[3:]],
                   "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, core.parts.vocab_size]}]
                   + [{"name": x, "dtype": "float32", "shape": [1, hkv, 1, d]} for x in dout[1:]],
                   "layer_gating": ("one ONNX If per layer on mask[i]; past = the layer's filled rows 0..pos-1 "
                                    "(a 1-row stub when skipped); new = the row to write at pos")},
        "opset": OPSET,
        "quantization": quant,
        "session_options": {"session.intra_op.allow_spinning": "0"},
        "export_timings": timings,
    }
