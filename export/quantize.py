"""Quantization step: done once on a private copy of the base model, before any method is exported."""

from __future__ import annotations

import copy

import torch
from torch import nn

SCHEMES = ("none", "8da4w")


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


def quantize_8da4w(base: nn.Module, group_size: int = 32) -> dict:
    """8-bit dynamic activations, 4-bit grouped weights on linears; int8 per-row embeddings (XNNPACK).

    Linears whose input size is not a multiple of ``group_size`` stay float (counted in the result).
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    untie_head(base)
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    skipped = [m for m in linears if m.in_features % group_size]
    quantize_(base, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    quantize_(base, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                          weight_granularity=PerGroup(group_size)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m.in_features % group_size == 0)
    return {
        "scheme": "8da4w",
        "linear": f"int8 dynamic activations, int4 weights, group size {group_size} (torchao)",
        "embedding": "int8 weight-only, per row",
        "linears_quantized": len(linears) - len(skipped),
        "linears_float": len(skipped),
        "routers": "float32 (not quantized)",
    }


def quantize(base: nn.Module, scheme: str, group_size: int = 32) -> dict:
    """Apply ``scheme`` in place; return a description for the manifest."""
    if scheme == "none":
        return {"scheme": "none", "dtype": "float32"}
    if scheme == "8da4w":
        return quantize_8da4w(base, group_size)
    raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(SCHEMES)}")
