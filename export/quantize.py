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


def quantize_8da4w(base: nn.Module, group_size: int = 32) -> dict:
    """8-bit dynamic activations, 4-bit grouped weights on linears; int8 per-row embeddings (XNNPACK).

    Linears whose input size is not a multiple of ``group_size`` stay float (counted in the result).
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from firstkit.architectures import adapter_for

    untie_head(base)
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    skipped = [m for m in linears if m.in_features % group_size]
    decoder = adapter_for(base.config).decoder(base)
    decoder.embed_tokens = Int8Embedding(decoder.embed_tokens)
    quantize_(base, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                          weight_granularity=PerGroup(group_size)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m.in_features % group_size == 0)
    return {
        "scheme": "8da4w",
        "linear": f"int8 dynamic activations, int4 weights, group size {group_size} (torchao)",
        "embedding": "int8 weight-only, per row, symmetric (quantized_decomposed::embedding_byte)",
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
