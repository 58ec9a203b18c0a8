"""Quantization step: done once on a private copy of the base model, before any method is exported."""

from __future__ import annotations

import copy

import torch
from torch import nn

#: ``8da4w``: smallest (about 18 % of the fp32 .pte for SmolLM2-135M), 4-bit decoder weights with HQQ scales,
#: WikiText-2 perplexity +32 % vs fp32 on SmolLM2-135M with the 8-bit head (+53 % with a 4-bit head);
#: ``8da8w``: about 25 % of fp32, perplexity +1.3 %. Measured: docs/results_export.md (session 4 table).
SCHEMES = ("none", "8da4w", "8da8w")
#: LM-head weight precision for ``8da4w``: 8 (default, quality) or 4 (as the stock ExecuTorch recipe).
HEAD_BITS = (4, 8)


def detached_base(first_model) -> nn.Module:
    """A deep copy of ``first_model.base`` with the original (unwrapped) decoder layers.

    The FirstModel keeps working: its routed wrappers are put back after the copy.
    """
    adapter = first_model.adapter
    layers = adapter.layers(first_model.base)
    wrapped = list(layers)
    first_model.unwrap_layers()
    try:
        base = copy.deepcopy(first_model.base)
    finally:
        for i, m in enumerate(wrapped):
            layers[i] = m
    return base.eval()


def untie_head(base: nn.Module) -> None:
    """Give the LM head its own weight when it shares the embedding's (they quantize differently)."""
    from firstkit.architectures import adapter_for

    adapter = adapter_for(base.config)
    head, emb = adapter.lm_head(base), adapter.embed_tokens(base)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False


class Int8Embedding(nn.Module):
    """int8 per-row symmetric embedding through ``quantized_decomposed::embedding_byte`` (ExecuTorch kernel).

    Keeps a model's embedding scale (Gemma multiplies embeddings by ``embed_scale``).
    """

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines the op)

        w = emb.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.float32))
        scale = getattr(emb, "embed_scale", None)
        self.embed_scale = float(scale) if scale is not None else None
        self.num_embeddings, self.embedding_dim = w.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized_decomposed.embedding_byte.dtype(
            self.weight, self.scales, None, -128, 127, ids, dtype=torch.float32)
        return out * self.embed_scale if self.embed_scale is not None else out


def _dynamic_config(bits: int, group_size: int):
    """torchao config for int8 dynamic (per-token) activations and ``bits``-bit symmetric weights.

    4 bits: per group of ``group_size`` input channels (XNNPACK qd8-f32-qb4w), scales chosen by HQQ (scale
    only, so still symmetric: same kernel, SmolLM2-135M perplexity 55.9 -> 51.2 vs min/max scales); 8 bits: per
    output channel (XNNPACK qd8-f32-qc8w).
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    if bits == 4:
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
            intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY)
    if bits == 8:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    raise ValueError(f"unsupported weight bits {bits}")


def quantize_dynamic(base: nn.Module, linear_bits: int, group_size: int = 32, head_bits: int = 8) -> dict:
    """int8 dynamic activations on every linear; int8 per-row embedding; all weight formats XNNPACK kernels.

    Decoder linears get ``linear_bits``-bit weights; a 4-bit linear whose input size is not a multiple of
    ``group_size`` gets 8-bit per-channel weights instead. The LM head (untied first) gets ``head_bits``:
    8 by default, because a 4-bit head alone costs SmolLM2-135M another ~16 % perplexity (46.3 vs 39.9,
    docs/results_export.md).
    """
    from torchao.quantization import quantize_

    from firstkit.architectures import adapter_for

    untie_head(base)
    adapter = adapter_for(base.config)
    head = adapter.lm_head(base)
    decoder = adapter.decoder(base)
    decoder.embed_tokens = Int8Embedding(decoder.embed_tokens)

    def bits_of(m: nn.Linear, bits: int) -> int:
        return 8 if bits == 4 and m.in_features % group_size else bits

    linears = {fqn: m for fqn, m in base.named_modules() if isinstance(m, nn.Linear)}
    plan = {fqn: bits_of(m, head_bits if m is head else linear_bits) for fqn, m in linears.items()}
    for bits in sorted(set(plan.values())):
        quantize_(base, _dynamic_config(bits, group_size),
                  filter_fn=lambda m, fqn, b=bits: isinstance(m, nn.Linear) and plan.get(fqn) == b)
    dec = [b for fqn, b in plan.items() if linears[fqn] is not head]
    desc = {4: f"int4 weights, symmetric, group size {group_size}, HQQ scales",
            8: "int8 weights, symmetric, per output channel"}
    return {
        "scheme": f"8da{linear_bits}w",
        "linear": f"int8 dynamic activations (per token), {desc[linear_bits]} (torchao, XNNPACK)",
        "lm_head": f"untied; int8 dynamic activations, {desc[bits_of(head, head_bits)]}",
        "embedding": "int8 weight-only, per row, symmetric (quantized_decomposed::embedding_byte)",
        "group_size": group_size if linear_bits == 4 or head_bits == 4 else None,
        "linears_quantized": len(plan),
        "linears_int4": sum(b == 4 for b in dec),
        "linears_int8": sum(b == 8 for b in dec),
        "linears_float": 0,
        "routers": "float32 (not quantized)",
    }


def quantize_8da4w(base: nn.Module, group_size: int = 32, head_bits: int = 8) -> dict:
    """8-bit dynamic activations, 4-bit grouped weights on decoder linears, int8 head and embedding."""
    return quantize_dynamic(base, 4, group_size, head_bits)


def quantize_8da8w(base: nn.Module) -> dict:
    """8-bit dynamic activations, 8-bit per-channel weights on every linear (head included), int8 embedding."""
    return quantize_dynamic(base, 8, head_bits=8)


def quantize(base: nn.Module, scheme: str, group_size: int = 32, head_bits: int = 8) -> dict:
    """Apply ``scheme`` in place; return a description for the manifest (``head_bits``: 8da4w's LM head)."""
    if head_bits not in HEAD_BITS:
        raise ValueError(f"head bits must be one of {HEAD_BITS}, got {head_bits}")
    if scheme == "none":
        return {"scheme": "none", "dtype": "float32"}
    if scheme == "8da4w":
        return quantize_8da4w(base, group_size, head_bits)
    if scheme == "8da8w":
        return quantize_8da8w(base)
    raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(SCHEMES)}")
