"""The router-augmented model: FiRST layer skipping on top of any supported Hugging Face decoder LM.

How a forward pass works (read this file top to bottom):

1. ``FirstModel`` wraps every decoder layer of the base model in a ``RoutedDecoderLayer``. The base
   model's own forward (embeddings, rotary, causal/sliding masks, final norm, LM head) is untouched.
2. **Prefill** (``forward`` without a frozen mask): before layer ``i`` runs, router ``i`` looks at the
   hidden state entering it (the output of the layers that actually ran), pooled over the prompt, and
   decides per sequence whether layer ``i`` runs. Protected layers always run; an explicit
   ``mask``/``override`` replaces the router.
3. **Decode** passes the mask decided at prefill: it is frozen. A layer that no sequence in the batch
   runs is never called and never writes the KV cache; in a batch whose sequences disagree, rows that
   skip a layer keep their hidden state (``torch.where``), so each row computes exactly what it would
   compute alone.
4. ``soft_gates=True`` (training): every layer computes and ``h = h + g * (layer(h) - h)`` with a
   straight-through gate ``g``: its forward value is the hard inference decision, its gradient the
   router's sigmoid. Training and inference therefore decide identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from firstkit.architectures import ArchitectureAdapter, adapter_for
from firstkit.models import ModelInfo, model_sha256, resolve_model
from firstkit.router import RouterStack, routing_rule, threshold_logit

MaskLike = Sequence[bool] | Sequence[int] | str | torch.Tensor


@dataclass(frozen=True)
class RoutingConfig:
    """Inference-time routing rules.

    ``threshold``: router probability at or above which a layer runs. ``never_skip``: layers that always
    run (negative indices count from the end; default first and last).
    """

    threshold: float = 0.5
    never_skip: tuple[int, ...] = (0, -1)


@dataclass
class RoutedOutput:
    """Result of ``FirstModel.forward``."""

    logits: torch.Tensor
    mask: torch.Tensor  # [B, L] bool, True = layer ran
    gate_probs: torch.Tensor | None = None  # [B, L] router probabilities (None where no routers)
    cache: DynamicCache | None = None


class RoutedCache(DynamicCache):
    """A ``DynamicCache`` whose skipped layers stay empty.

    Transformers sizes attention masks from one representative layer (layer 0, or the first
    sliding/full one). When that layer was skipped it holds nothing, so we answer from the first layer
    of the same kind that did run: every running layer has seen the same positions.
    """

    def _stand_in(self, layer_idx: int) -> int:
        if layer_idx >= len(self.layers) or self.layers[layer_idx].is_initialized:
            return layer_idx
        kind = type(self.layers[layer_idx])
        for j, layer in enumerate(self.layers):
            if layer.is_initialized and type(layer) is kind:
                return j
        return layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._stand_in(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._stand_in(layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_query_offset(self._stand_in(layer_idx))

    def layer_is_empty(self, layer_idx: int) -> bool:
        layer = self.layers[layer_idx]
        return not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0


@dataclass
class _Routing:
    """What the routed layers need during one forward pass (set by ``FirstModel.forward``)."""

    decide: bool = False  # prefill: routers decide; else ``mask`` is frozen
    soft: bool = False  # training: straight-through gates
    mask: torch.Tensor | None = None  # [B, L] bool
    override: torch.Tensor | None = None  # [B, L] int: -1 router, 0 skip, 1 run
    prompt_mask: torch.Tensor | None = None  # [B, T] for pooling
    probs: list = field(default_factory=list)
    gates: list = field(default_factory=list)


class RoutedDecoderLayer(nn.Module):
    """A decoder layer behind its router: runs the wrapped layer only for sequences that need it."""

    def __init__(self, layer: nn.Module, index: int, owner: FirstModel):
        super().__init__()
        self.layer = layer
        self.index = index
        object.__setattr__(self, "_owner", owner)  # plain reference, not a submodule (no cycle)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)  # e.g. ``attention_type``

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = self._owner._routing
        if routing.soft:
            gate = self._owner._gate(self.index, hidden_states)
            out = self.layer(hidden_states, *args, **kwargs)
            return hidden_states + gate[:, None, None] * (out - hidden_states)
        run = self._owner._decide(self.index, hidden_states) if routing.decide else routing.mask[:, self.index]
        if not bool(run.any()):
            return hidden_states  # never called, no KV written
        out = self.layer(hidden_states, *args, **kwargs)
        if bool(run.all()):
            return out
        return torch.where(run[:, None, None], out, hidden_states)


class FirstModel(nn.Module):
    """A Hugging Face causal LM with a FiRST router before each decoder layer.

    Build it with ``firstkit.load_model``. ``base`` is the wrapped transformers model; its decoder
    layers are replaced in place by ``RoutedDecoderLayer`` (``unwrap_layers`` undoes it).
    """

    def __init__(self, base: PreTrainedModel, tokenizer=None, routers: RouterStack | None = None,
                 routing: RoutingConfig | None = None, info: ModelInfo | None = None):
        super().__init__()
        self.adapter: ArchitectureAdapter = adapter_for(base.config)
        self.base = base
        self.tokenizer = tokenizer
        self.info = info or ModelInfo(model_id=base.config.model_type, source="object")
        self.routing = routing or RoutingConfig()
        layers = self.adapter.layers(base)
        self.num_layers = len(layers)
        if routers is not None and len(routers) != self.num_layers:
            raise ValueError(f"{len(routers)} routers for a {self.num_layers}-layer model")
        self.routers = routers
        self._routing = _Routing()
        self._sha256: str | None = None
        for i, layer in enumerate(layers):  # a base wrapped before now belongs to this model
            layers[i] = RoutedDecoderLayer(layer.layer if isinstance(layer, RoutedDecoderLayer) else layer, i, self)
        self.protected_layers()  # validate never_skip now

    # ----------------------------------------------------------------- identity and parts
    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def base_layers(self) -> list[nn.Module]:
        """The original decoder layers (unwrapped), layer 0 first."""
        return [m.layer for m in self.adapter.layers(self.base)]

    def unwrap_layers(self) -> PreTrainedModel:
        """Put the original layers back into ``base`` (e.g. before ``save_pretrained``) and return it."""
        layers = self.adapter.layers(self.base)
        for i, m in enumerate(layers):
            if isinstance(m, RoutedDecoderLayer):
                layers[i] = m.layer
        return self.base

    def base_sha256(self) -> str:
        """sha256 of the base weights (routers excluded), computed once."""
        if self._sha256 is None:
            layers = self.adapter.layers(self.base)
            wrapped = list(layers)
            self.unwrap_layers()
            try:
                self._sha256 = model_sha256(self.base)
            finally:
                for i, m in enumerate(wrapped):
                    layers[i] = m
        return self._sha256

    def protected_layers(self) -> list[int]:
        """Indices of layers that always run, sorted."""
        out = set()
        for i in self.routing.never_skip:
            j = i + self.num_layers if i < 0 else i
            if not 0 <= j < self.num_layers:
                raise ValueError(f"never_skip index {i} out of range for {self.num_layers} layers")
            out.add(j)
        return sorted(out)

    # ----------------------------------------------------------------- masks
    def mask_tensor(self, mask: MaskLike, batch_size: int = 1) -> torch.Tensor:
        """Validate a mask (bools, 0/1 ints, a '0101' string, or a [L] / [B, L] tensor) -> BoolTensor[B, L]."""
        if isinstance(mask, str):
            if set(mask) - {"0", "1"}:
                raise ValueError(f"mask string must contain only 0 and 1, got {mask!r}")
            mask = [c == "1" for c in mask]
        t = torch.as_tensor(mask, device=self.device)
        if t.dim() == 1:
            t = t.unsqueeze(0).expand(batch_size, -1)
        if t.dim() != 2 or t.shape[1] != self.num_layers:
            raise ValueError(f"mask must have one entry per layer ({self.num_layers}), got shape {tuple(t.shape)}")
        if t.shape[0] != batch_size:
            raise ValueError(f"mask has {t.shape[0]} rows for a batch of {batch_size}")
        if t.dtype != torch.bool:
            if not torch.all((t == 0) | (t == 1)):
                raise ValueError("mask entries must be 0/1 or booleans")
            t = t.bool()
        for i in self.protected_layers():
            if not bool(t[:, i].all()):
                raise ValueError(f"mask skips protected layer {i} (protected: {self.protected_layers()})")
        return t.contiguous()

    def decide_mask(self, input_ids, attention_mask: torch.Tensor | None = None):
        """Run prefill and return the routers' mask: a list of bools (True = runs) for one prompt
        (``[T]`` or ``[1, T]``), a list of such lists for a batch of several."""
        ids = self.as_input_ids(input_ids)
        with torch.no_grad():
            out = self.forward(ids, attention_mask=attention_mask, logits_to_keep=1)
        rows = out.mask.tolist()
        return rows[0] if ids.shape[0] == 1 else rows

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                mask: MaskLike | None = None, cache: DynamicCache | None = None, soft_gates: bool = False,
                position_ids: torch.Tensor | None = None, override: torch.Tensor | None = None,
                logits_to_keep: int = 0, prompt_mask: torch.Tensor | None = None) -> RoutedOutput:
        """One pass of the base model with routing.

        ``mask`` given: frozen mask (decode, or a caller's explicit choice). ``mask`` None: the routers
        decide layer by layer (prefill); without routers every layer runs. ``override`` ([B, L] int,
        -1 = router decides) forces some decisions while the routers decide the rest. ``prompt_mask``
        ([B, T], default ``attention_mask``): the tokens the routers pool over, e.g. only the prompt of a
        prompt + answer sequence (causal attention makes that equal to deciding on the prompt alone).
        """
        ids = self.as_input_ids(input_ids)
        batch, length = ids.shape
        if length == 0:
            raise ValueError("empty prompt: input_ids has no tokens")
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if soft_gates and self.routers is None:
            raise ValueError("soft_gates=True needs routers")
        state = _Routing(prompt_mask=attention_mask if prompt_mask is None else prompt_mask.to(ids.device))
        self._claim_layers()
        if mask is not None:
            state.mask = self.mask_tensor(mask, batch)
        elif self.routers is None and override is None:
            state.mask = torch.ones(batch, self.num_layers, dtype=torch.bool, device=ids.device)
        else:
            state.decide = not soft_gates
            state.soft = soft_gates
            state.override = None if override is None else torch.as_tensor(override, device=ids.device)
            state.mask = torch.ones(batch, self.num_layers, dtype=torch.bool, device=ids.device)
        self._routing = state
        try:
            out = self.base(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=cache is not None, logits_to_keep=logits_to_keep)
        finally:
            self._routing = _Routing()
        probs = torch.stack(state.probs, dim=1) if state.probs and len(state.probs) == self.num_layers else None
        if state.soft:
            state.mask = torch.stack(state.gates, dim=1).detach() > 0.5
        return RoutedOutput(logits=out.logits, mask=state.mask, gate_probs=probs, cache=cache)

    def _claim_layers(self) -> None:
        """Point the routed layers at this model (another FirstModel may have wrapped the same base since)."""
        for layer in self.adapter.layers(self.base):
            if layer._owner is not self:
                object.__setattr__(layer, "_owner", self)

    def _router_prob_and_run(self, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        state = self._routing
        batch = hidden.shape[0]
        logit = prob = None
        if self.routers is not None:
            logit = self.routers.logit(index, hidden, state.prompt_mask)
            prob = torch.sigmoid(logit)
        protected = self.protected_layers()
        if state.override is not None:
            forced = state.override[:, index] if state.override.dim() == 2 else state.override[index].expand(batch)
            if index in protected and bool((forced == 0).any()):
                raise ValueError(f"mask skips protected layer {index} (protected: {protected})")
        else:
            forced = torch.full((batch,), -1, dtype=torch.long, device=hidden.device)
        run = routing_rule(logit, threshold_logit(self.routing.threshold), index in protected, forced.long())
        return prob, run

    def _decide(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        prob, run = self._router_prob_and_run(index, hidden)
        if prob is not None:
            self._routing.probs.append(prob)
        self._routing.mask[:, index] = run
        return run

    def _gate(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        prob, run = self._router_prob_and_run(index, hidden)
        self._routing.probs.append(prob)
        hard = run.to(prob.dtype)
        gate = hard + prob - prob.detach()  # straight-through: forward = hard, gradient = sigmoid's
        self._routing.gates.append(gate)
        return gate

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, mask: MaskLike | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                 seed: int | None = None, return_mask: bool = False):
        """Greedy or sampled generation with the mask decided at prefill (or given) frozen for decode.

        Returns token ids with the prompt included, [B, T + new] (rows that hit EOS are padded);
        with ``return_mask=True`` returns ``(ids, mask [B, L])``. Prompts may be left-padded
        (pass ``attention_mask``).
        """
        ids = self.as_input_ids(input_ids)
        if ids.shape[1] == 0:
            raise ValueError("empty prompt: input_ids has no tokens")
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        batch = ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        attention_mask = attention_mask.to(ids.device).long()
        eos = eos_ids(eos_token_id, self.base, self.tokenizer)
        pad = _pad_id(self.base, self.tokenizer, eos)
        generator = torch.Generator(device=ids.device)
        if seed is not None:
            generator.manual_seed(seed)
        elif do_sample:
            generator.seed()
        cache = RoutedCache(config=self.base.config)
        out = self.forward(ids, attention_mask=attention_mask, mask=mask, cache=cache, logits_to_keep=1)
        frozen = out.mask
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        tokens = ids
        logits = out.logits[:, -1, :]
        for _ in range(max_new_tokens):
            nxt = _pick(logits, do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if eos:
                finished |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
            if bool(finished.all()) or tokens.shape[1] - ids.shape[1] == max_new_tokens:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            positions = positions + 1
            step = self.forward(nxt[:, None], attention_mask=attention_mask, mask=frozen, cache=cache,
                                position_ids=positions, logits_to_keep=1)
            logits = step.logits[:, -1, :]
        return (tokens, frozen) if return_mask else tokens

    # ----------------------------------------------------------------- helpers
    def as_input_ids(self, input_ids) -> torch.Tensor:
        t = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(t.shape)}")
        return t

    def encode_chat(self, prompt: str) -> torch.Tensor:
        """Token ids [1, T] of ``prompt`` as a user turn (chat template when the tokenizer has one)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        if not prompt:
            raise ValueError("empty prompt")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        return ids.to(self.device)


def eos_ids(eos_token_id, base: PreTrainedModel, tokenizer) -> list[int]:
    """End-of-sequence ids: the given ones, else the generation config's, the model config's or the tokenizer's."""
    if eos_token_id is None:
        gen = getattr(base, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(base.config, "eos_token_id", None)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def _pad_id(base: PreTrainedModel, tokenizer, eos: list[int]) -> int:
    pad = getattr(base.config, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return int(pad)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def load_model(source="smollm2-135m-instruct", routers=None, *, tokenizer=None, routing: RoutingConfig | None = None,
               dtype: torch.dtype = torch.float32, check_routers: bool = True) -> FirstModel:
    """Load a router-augmented model.

    ``source``: a named default (``smollm2-135m-instruct``, ``gemma3-270m``), a Hugging Face folder, a
    ``.gguf`` file, or a loaded transformers model. ``routers``: a router checkpoint folder, a
    ``RouterStack``, or ``None`` (every layer runs unless a mask is given). A checkpoint made for another
    model is refused.
    """
    base, tok, info = resolve_model(source, tokenizer=tokenizer, dtype=dtype)
    model = FirstModel(base, tok, routing=routing, info=info)
    if routers is not None:
        if isinstance(routers, RouterStack):
            stack = routers
        else:
            stack = RouterStack.from_pretrained(
                routers, num_layers=model.num_layers, hidden_size=base.config.hidden_size,
                model_sha256=model.base_sha256() if check_routers else None)
        if len(stack) != model.num_layers:
            raise ValueError(f"{len(stack)} routers for a {model.num_layers}-layer model")
        model.routers = stack.to(model.device)
        if routing is None and "threshold" in stack.meta:
            model.routing = RoutingConfig(threshold=float(stack.meta["threshold"]),
                                          never_skip=tuple(stack.meta.get("never_skip", (0, -1))))
    return model
