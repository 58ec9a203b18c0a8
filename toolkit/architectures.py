"""Per-architecture adapters: where a Hugging Face decoder-only LM keeps the parts firstkit touches.

firstkit never re-implements a model. It wraps the model's own decoder layers (routing, eager) and
calls the model's own modules (export). An adapter only says where those modules live and what is
special about an architecture (e.g. Gemma 3's sliding-window layers with their own rotary embedding).
Adding an architecture = adding one entry to ``ADAPTERS`` (see docs/contributing.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no firstkit adapter."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where the decoder stack of one model family lives, and its quirks."""

    model_type: str
    #: ``True`` when the rotary module takes the layer type (Gemma 3: local vs global RoPE).
    rotary_per_layer_type: bool = False
    #: ``True`` when attention has q/k RMS norms (Qwen3, Gemma 3): informational, used by export docs.
    qk_norm: bool = False

    # The families below all follow the ``<Arch>ForCausalLM.model.{embed_tokens,layers,norm,rotary_emb}``
    # layout; an architecture that does not would override these accessors.
    def decoder(self, model: PreTrainedModel) -> nn.Module:
        return model.model

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return self.decoder(model).layers

    def embed_tokens(self, model: PreTrainedModel) -> nn.Module:
        return self.decoder(model).embed_tokens

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return self.decoder(model).norm

    def lm_head(self, model: PreTrainedModel) -> nn.Module:
        return model.lm_head

    def layer_type(self, config: PretrainedConfig, index: int) -> str:
        """``"full_attention"`` or ``"sliding_attention"`` for decoder layer ``index``."""
        types = getattr(config, "layer_types", None)
        return types[index] if types else "full_attention"

    def rotary(self, model: PreTrainedModel, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
        """(cos, sin) position embeddings for ``layer_type`` at ``position_ids``."""
        rotary = self.decoder(model).rotary_emb
        if self.rotary_per_layer_type:
            return rotary(hidden, position_ids, layer_type)
        return rotary(hidden, position_ids)

    def sliding_window(self, config: PretrainedConfig) -> int | None:
        """Keys a ``sliding_attention`` layer sees (the query's own included); ``None`` without sliding layers."""
        return getattr(config, "sliding_window", None)

    def final_logit_softcap(self, config: PretrainedConfig) -> float | None:
        """``c`` of the final logit soft-capping ``tanh(logits / c) * c`` (Gemma), ``None`` without."""
        return getattr(config, "final_logit_softcapping", None)

    def head_dim(self, config: PretrainedConfig) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


ADAPTERS: dict[str, ArchitectureAdapter] = {
    "llama": ArchitectureAdapter("llama"),
    "mistral": ArchitectureAdapter("mistral"),
    "qwen2": ArchitectureAdapter("qwen2"),
    "qwen3": ArchitectureAdapter("qwen3", qk_norm=True),
    "phi3": ArchitectureAdapter("phi3"),
    "gemma3_text": ArchitectureAdapter("gemma3_text", rotary_per_layer_type=True, qk_norm=True),
}


def adapter_for(config: PretrainedConfig) -> ArchitectureAdapter:
    """The adapter for ``config.model_type``, or a clear error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    hint = ""
    if model_type == "gemma3":
        hint = " (multimodal Gemma 3: load its text model, model_type 'gemma3_text')"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}{hint}; firstkit supports: {', '.join(sorted(ADAPTERS))}"
    )
