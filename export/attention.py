"""Attention for the exported graphs: grouped-query attention that reads the KV cache in place.

Hugging Face's ``eager``/``sdpa`` attention expands every key/value head to the query heads
(``repeat_kv``) before the matmuls. In an exported decode step that is a copy of the whole static
cache per layer and per token, and XNNPACK does not delegate it (measured: ~27 % of a SmolLM2 layer
method's time). Here the query heads of each group are folded into the rows of one matmul against
their key/value head instead, so the cache is read where it lies and every op lowers to XNNPACK.

Registered as a Hugging Face attention implementation (:data:`ATTENTION_NAME`) and switched on for the
private copy of the base model that export traces; the layers' own forward stays untouched.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ATTENTION_NAME", "grouped_attention", "use_grouped_attention"]

ATTENTION_NAME = "firstkit_grouped"


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``query [B, H, T, D]``, ``key/value [B, Hkv, S, D]`` (or ``[Hkv, S, D]`` for batch 1: the decode cache's
    filled rows), additive ``attention_mask [B|1, 1, T, S]``.

    Returns ``(out [B, T, H, D], None)`` like the Hugging Face attention functions. Query head
    ``k * G + j`` attends with key/value head ``k`` (``G = H / Hkv``), as ``repeat_kv`` defines it.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by the export attention")
    b, h, t, d = query.shape
    dynamic = not isinstance(t, int)  # symbolic prompt length (a prefill graph)
    hkv, s = key.shape[-3], key.shape[-2]
    g = h // hkv
    if scaling is None:
        scaling = d ** -0.5
    if dynamic:  # the fold below needs query rows in memory order; at T = 1 (decode) that is free
        query = query.contiguous()
    q = query.reshape(b * hkv, g * t, d)  # rows ordered (head in group, position)
    # the cache is read where it lies: a 3-D key is already [Hkv, S, D]; batch 1 selects (a reshape of a
    # dynamic-length slice would guard on it being the whole buffer)
    if key.dim() == 3:
        k, v = key, value
    else:
        k = key[0] if b == 1 else key.reshape(b * hkv, s, d)
        v = value[0] if b == 1 else value.reshape(b * hkv, s, d)
    # K @ q^T, then transpose the small [S, G*T] result: the cache itself is never transposed or copied
    scores = torch.bmm(k, q.transpose(1, 2)).transpose(1, 2) * scaling  # [B*Hkv, G*T, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :s]
        if dynamic:  # broadcast over the group (a repeat would guard on T > 1)
            scores = (scores.reshape(b, hkv, g, t, s) + mask[:, :, None]).reshape(b * hkv, g * t, s)
        else:
            mask = mask.repeat(1, 1, g, 1) if g > 1 and t > 1 else mask  # [B|1, 1, G*T, S]
            scores = (scores.reshape(b, hkv, g * t, s) + mask).reshape(b * hkv, g * t, s)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.bmm(probs, v)  # [B*Hkv, G*T, D]
    # unflatten, not reshape: a reshape of the bmm output guards on T's strides in a dynamic graph
    return out.unflatten(1, (g, t)).reshape(b, h, t, d).transpose(1, 2).contiguous(), None


def use_grouped_attention(model: nn.Module) -> None:
    """Register :func:`grouped_attention` and make ``model`` (a transformers model) call it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, grouped_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)  # additive float masks, like "eager"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTENTION_NAME
