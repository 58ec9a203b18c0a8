"""Export-side graph: one module instance with a static KV cache, exposed as several methods.

The same :class:`ExportCore` instance backs every exported method so the KV-cache buffers have the same fully
qualified names in every method and ExecuTorch can share them (``share_mutable_buffers=True``). The ExecuTorch
program's methods (docs/bundle_format.md):

* ``embed(tokens [1, T])``, ``head(hidden [1, 1, H])``;
* ``route(hidden [1, T, H], layer [1], mask_override [L]) -> run [1]``: the routing rule for any layer, from the
  prompt's hidden state entering it (the routers' weights are stacked per layer);
* ``prefill_i(hidden [1, T, H], input_pos [T], kv_positions [S])``: layer ``i`` over a chunk of at most
  ``prefill_chunk`` prompt tokens at ``input_pos``, attending the rows ``kv_positions`` (``0..input_pos[-1]``);
  called, chunk after chunk, only when ``route`` says the layer runs;
* ``layer_i(hidden [1, 1, H], input_pos, kv_positions)``: layer ``i`` for one decode token.

The decoder layers are the Hugging Face modules themselves, called with

* rotary embeddings from the model's own rotary module, tabulated once for every cache position at
  construction (a decode step looks its row up instead of recomputing cos/sin in every layer),
* an explicit additive attention mask built from the positions (prefill; sliding-window layers in decode),
* a duck-typed cache object whose ``update`` writes into the registered buffers.

Prefill is chunked so that no graph is planned for a whole-context prompt: XNNPACK sizes (and touches) its
workspace for a graph's largest shapes, and a prefill graph planned for ``T = max_seq_len`` held ~150 MB of
attention scores for a one-token prompt (SmolLM2, 2,048 positions).

A decode step reads only the filled part of the cache: ``layer_i`` takes ``kv_positions`` (``0..pos``, int64),
whose *length* is the number of filled rows, and attends over ``cache[:, :, :len]`` instead of the whole
static buffer under a mask. The new row is written with one in-place ``index_put_`` (the ExecuTorch lowering
runs the re-inplace pass), so no layer copies or writes back its whole cache.

Routing semantics follow docs/CONTRACTS.md exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from firstkit.router import pool_prompt, router_logit, routing_rule

from .attention import use_grouped_attention

NEG_INF = torch.finfo(torch.float32).min
DEFAULT_PREFILL_CHUNK = 128  # prompt tokens per prefill_i call (see the module docstring)


@dataclass(frozen=True)
class ModelParts:
    """The pieces of a Hugging Face causal LM that the export calls directly."""

    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary: Callable[[torch.Tensor, torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]]
    layer_types: tuple[str, ...]
    sliding_window: int | None
    final_logit_softcapping: float | None
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


def model_parts(base: nn.Module) -> ModelParts:
    """Embeddings, decoder layers, final norm, head, rotary and the architecture's quirks, all from its adapter.

    Decoder layers wrapped by ``FirstModel`` (``RoutedDecoderLayer``) are unwrapped: export calls the
    original Hugging Face layers and does the routing itself.
    """
    from firstkit.architectures import adapter_for
    from firstkit.routed_model import RoutedDecoderLayer

    cfg = base.config
    adapter = adapter_for(cfg)
    layers = [m.layer if isinstance(m, RoutedDecoderLayer) else m for m in adapter.layers(base)]
    n = len(layers)
    return ModelParts(
        embed_tokens=adapter.embed_tokens(base),
        layers=nn.ModuleList(layers),
        norm=adapter.final_norm(base),
        lm_head=adapter.lm_head(base),
        rotary=functools.partial(adapter.rotary, base),
        layer_types=tuple(adapter.layer_type(cfg, i) for i in range(n)),
        sliding_window=adapter.sliding_window(cfg),
        final_logit_softcapping=adapter.final_logit_softcap(cfg),
        num_kv_heads=int(adapter.num_kv_heads(cfg)),
        head_dim=int(adapter.head_dim(cfg)),
        hidden_size=int(cfg.hidden_size),
        vocab_size=int(cfg.vocab_size),
    )


class _StaticCache:
    """Duck-typed HF cache: writes the new keys/values into registered buffers.

    The new rows are written at ``input_pos``, then attention sees the first ``kv_len`` rows (the filled ones),
    returned as ``[Hkv, kv_len, D]`` (see :func:`~firstkit.export.attention.grouped_attention`).
    """

    def __init__(self, core: ExportCore, input_pos: torch.Tensor, kv_len: int | torch.SymInt) -> None:
        self.core = core
        self.input_pos = input_pos
        self.kv_len = kv_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        kb = self.core.get_buffer(f"k_cache_{layer_idx}")  # [Hkv, S + 1, D]: batch 1, no batch dimension
        vb = self.core.get_buffer(f"v_cache_{layer_idx}")
        key = key.to(kb.dtype)
        value = value.to(vb.dtype)
        k_rows = key.view(key.shape[1:])  # [1, Hkv, T, D] -> [Hkv, T, D] (lowered as a view, no copy)
        v_rows = value.view(value.shape[1:])
        kb.index_copy_(1, self.input_pos, k_rows)
        vb.index_copy_(1, self.input_pos, v_rows)
        # the filled rows, [Hkv, n, D]: one copy of n rows per head (a 3-D buffer needs no batch select after)
        return kb[:, : self.kv_len], vb[:, : self.kv_len]


class ExportCore(nn.Module):
    """Router-augmented decoder with a static KV cache, callable per method.

    Args:
        base: Hugging Face causal LM (possibly quantized in place already).
        routers: per-layer router modules (``routers[i](pooled) -> logit``) or ``None``.
        protected: layer indices that always run.
        threshold: router threshold ``t``; a layer runs iff ``logit >= log(t / (1 - t))``.
        max_seq_len: static cache length.
        prefill_chunk: most prompt tokens one ``prefill_i`` call takes (default ``min(128, max_seq_len)``).
        grouped_attention: switch ``base`` to :func:`~firstkit.export.attention.grouped_attention`
            (reads the KV cache without ``repeat_kv`` copies; same numbers as HF attention).
    """

    def __init__(self, base: nn.Module, routers: list[nn.Module] | None, protected: list[int],
                 threshold: float, max_seq_len: int, cache_dtype: torch.dtype = torch.float32,
                 grouped_attention: bool = True, prefill_chunk: int | None = None) -> None:
        super().__init__()
        if grouped_attention:
            use_grouped_attention(base)
        self.base = base
        self.parts = model_parts(base)
        self.n_layers = len(self.parts.layers)
        self.router_list = nn.ModuleList(routers) if routers is not None else None
        if self.router_list is not None and len(self.router_list) != self.n_layers:
            raise ValueError(f"{len(self.router_list)} routers for {self.n_layers} layers")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold_logit = math.log(threshold / (1.0 - threshold))
        prot = torch.zeros(self.n_layers, dtype=torch.bool)
        for i in protected:
            prot[i % self.n_layers] = True
        self.register_buffer("protected", prot, persistent=False)
        if self.router_list is not None:  # stacked per layer for the single ``route`` graph
            for name, part in (("w1", "proj.weight"), ("b1", "proj.bias"), ("w2", "out.weight"), ("b2", "out.bias")):
                stacked = torch.stack([r.get_parameter(part).float() for r in self.router_list])
                self.register_buffer(f"router_{name}", stacked, persistent=False)
        self.max_seq_len = int(max_seq_len)
        self.prefill_chunk = min(int(prefill_chunk or DEFAULT_PREFILL_CHUNK), self.max_seq_len)
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        # one spare row: the filled prefix ``[:n]`` (n <= max_seq_len) is then never the whole buffer, which
        # torch.export would otherwise specialize on (the slice's contiguity differs at n == rows)
        shape = (self.parts.num_kv_heads, self.max_seq_len + 1, self.parts.head_dim)
        for i in range(self.n_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=cache_dtype), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=cache_dtype), persistent=False)
        # cos/sin for every cache position, per layer type: a decode step looks its row up (one index_select)
        positions = torch.arange(self.max_seq_len, dtype=torch.long)[None]
        probe = torch.zeros(1, 1, self.parts.hidden_size)
        with torch.no_grad():
            for lt in sorted(set(self.parts.layer_types)):
                cos, sin = self.parts.rotary(probe, positions, lt)
                self.register_buffer(f"rope_cos_{lt}", cos[0].float().contiguous(), persistent=False)
                self.register_buffer(f"rope_sin_{lt}", sin[0].float().contiguous(), persistent=False)

    # ---- pieces -------------------------------------------------------------------------
    def _attn_mask(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, layer_type: str,
                   causal: bool = True) -> torch.Tensor | None:
        """Additive mask ``[1, 1, Tq, Tkv]`` from query and key positions (int64), or ``None`` if all is visible.

        ``causal``: hide keys after the query (prefill); decode passes ``False``, its keys are ``0..pos``.
        A sliding-window layer also hides keys ``window`` or more positions older than the query.
        """
        window = self.parts.sliding_window if layer_type == "sliding_attention" else None
        allowed = (kv_pos[None, :] <= q_pos[:, None]) if causal else None
        if window:
            recent = kv_pos[None, :] > q_pos[:, None] - window
            allowed = recent if allowed is None else allowed & recent
        if allowed is None:
            return None
        zero = torch.zeros((), dtype=torch.float32)
        neg = torch.full((), NEG_INF, dtype=torch.float32)
        return torch.where(allowed, zero, neg)[None, None]

    def _call_layer(self, i: int, h: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor,
                    cache: _StaticCache, rope) -> torch.Tensor:
        out = self.parts.layers[i](
            h,
            attention_mask=attn_mask,
            position_ids=position_ids,
            position_embeddings=rope,
            cache=cache,
            use_cache=True,
        )
        return out[0] if isinstance(out, tuple) else out

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        logits = self.parts.lm_head(self.parts.norm(h_last))
        cap = self.parts.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _rule(self, logit: torch.Tensor | None, protected: torch.Tensor, override: torch.Tensor) -> torch.Tensor:
        """:func:`firstkit.router.routing_rule` at this export's threshold (bool, shaped like ``override``)."""
        return routing_rule(logit, self.threshold_logit, protected, override)

    def decide(self, i: int, h: torch.Tensor, mask_override: torch.Tensor) -> torch.Tensor:
        """Bool scalar: does layer ``i`` run, given the hidden state entering it."""
        logit = None
        if self.router_list is not None:
            logit = self.router_list[i](pool_prompt(h.to(torch.float32))).reshape(())
        return self._rule(logit, self.protected[i], mask_override[i])

    def route(self, h: torch.Tensor, layer: torch.Tensor, mask_override: torch.Tensor) -> torch.Tensor:
        """:meth:`decide` with the layer as a tensor (int64 ``[1]``): one graph serves every layer.

        The routers' weights are stacked per layer and the layer's row is gathered, so the exported ``route``
        method computes exactly what ``router_list[i]`` computes. Returns int64 ``[1]`` (1 = run).
        """
        logit = None
        if self.router_list is not None:
            row = [self.get_buffer(f"router_{n}").index_select(0, layer)[0] for n in ("w1", "b1", "w2", "b2")]
            logit = router_logit(pool_prompt(h.to(torch.float32)), *row)  # [1]
        return self._rule(logit, self.protected.index_select(0, layer),
                          mask_override.index_select(0, layer)).to(torch.long)

    def prompt_context(self, h: torch.Tensor, t: int):
        """Positions, per-layer-type attention masks and rotary embeddings for a prompt of ``t`` tokens."""
        pos = torch.arange(t, dtype=torch.long, device=h.device)
        masks = {lt: self._attn_mask(pos, pos, lt) for lt in set(self.parts.layer_types)}
        ropes = {lt: self.rope_at(pos, lt) for lt in set(self.parts.layer_types)}
        return pos, masks, ropes

    def rope_at(self, input_pos: torch.Tensor, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``[1, Tq, D]`` for query positions ``input_pos`` (int64 [Tq]) from the tables."""
        cos = self.get_buffer(f"rope_cos_{layer_type}").index_select(0, input_pos)[None]
        sin = self.get_buffer(f"rope_sin_{layer_type}").index_select(0, input_pos)[None]
        return cos, sin

    def layer_with_cache(self, i: int, h: torch.Tensor, input_pos: torch.Tensor, kv_positions: torch.Tensor,
                         cache, causal: bool = False) -> torch.Tensor:
        """Layer ``i`` for the tokens at ``input_pos`` attending the rows ``kv_positions`` (= ``0..input_pos[-1]``).

        ``causal``: several query tokens (a prefill chunk), each hides the keys after it.
        """
        lt = self.parts.layer_types[i]
        rope = self.rope_at(input_pos, lt)
        attn_mask = self._attn_mask(input_pos, kv_positions, lt, causal=causal)
        return self._call_layer(i, h, input_pos[None], attn_mask, cache, rope)

    # ---- methods ------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [1, T] -> hidden [1, T, H] (T = 1 in decode)."""
        return self.parts.embed_tokens(tokens).float()

    def prefill_layer(self, i: int, h: torch.Tensor, input_pos: torch.Tensor,
                      kv_positions: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` over a prompt chunk ``h [1, T, H]`` at ``input_pos`` (int64 [T], consecutive); writes those
        cache rows and attends, causally, the rows ``kv_positions`` (``0..input_pos[-1]``: earlier chunks + this one).

        Called only for the layers the prompt's routing runs: a skipped layer costs nothing in prefill either,
        and its cache rows are never written (nor read: the mask holds for the whole decode).
        """
        cache = _StaticCache(self, input_pos=input_pos, kv_len=kv_positions.shape[0])
        return self.layer_with_cache(i, h, input_pos, kv_positions, cache, causal=True)

    def layer(self, i: int, h: torch.Tensor, input_pos: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
        """One decoder layer for one token at ``input_pos`` (int64 [1]); ``kv_positions`` = ``0..pos`` (int64).

        Only the ``len(kv_positions)`` filled cache rows are read (the length is a dynamic dimension).
        """
        cache = _StaticCache(self, input_pos=input_pos, kv_len=kv_positions.shape[0])
        return self.layer_with_cache(i, h, input_pos, kv_positions, cache)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [1, 1, H] -> logits [1, V]."""
        return self._logits(h[:, -1, :])

    def reset_cache(self) -> None:
        """Zero every KV buffer (eager use only)."""
        for i in range(self.n_layers):
            self.get_buffer(f"k_cache_{i}").zero_()
            self.get_buffer(f"v_cache_{i}").zero_()


class EmbedMethod(nn.Module):
    """``embed(tokens) -> hidden``."""

    def __init__(self, core: ExportCore) -> None:
        super().__init__()
        self.core = core

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.core.embed(tokens)


class RouteMethod(nn.Module):
    """``route(hidden, layer, mask_override) -> run``."""

    def __init__(self, core: ExportCore) -> None:
        super().__init__()
        self.core = core

    def forward(self, h: torch.Tensor, layer: torch.Tensor, mask_override: torch.Tensor) -> torch.Tensor:
        return self.core.route(h, layer, mask_override)


class PrefillLayerMethod(nn.Module):
    """``prefill_i(hidden, input_pos, kv_positions) -> hidden`` over one prompt chunk."""

    def __init__(self, core: ExportCore, index: int) -> None:
        super().__init__()
        self.core = core
        self.index = index

    def forward(self, h: torch.Tensor, input_pos: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
        return self.core.prefill_layer(self.index, h, input_pos, kv_positions)


class LayerMethod(nn.Module):
    """``layer_i(hidden, input_pos, kv_positions) -> hidden``."""

    def __init__(self, core: ExportCore, index: int) -> None:
        super().__init__()
        self.core = core
        self.index = index

    def forward(self, h: torch.Tensor, input_pos: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
        return self.core.layer(self.index, h, input_pos, kv_positions)


class HeadMethod(nn.Module):
    """``head(hidden) -> logits``."""

    def __init__(self, core: ExportCore) -> None:
        super().__init__()
        self.core = core

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.core.head(h)
