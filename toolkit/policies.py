"""Mask policies behind one interface: who decides which layers run.

Every policy answers ``mask(model, input_ids, attention_mask) -> BoolTensor[B, L]`` (True = runs) and
respects the model's protected layers. Static policies skip ``num_skip`` layers (or a ``ratio`` of all
layers, rounded) chosen once; the router policy decides per prompt.

- ``all``: every layer runs (the base model).
- ``random``: a seeded random set of skippable layers.
- ``static`` (ShortGPT, block influence): skip the layers whose output changes their input least,
  ``BI_i = 1 - cos(h_in, h_out)`` averaged over calibration tokens.
- ``uniform`` (unified layer skipping): skipped layers spread evenly over the skippable ones.
- ``last-k`` (early exit): skip the last ``k`` skippable layers.
- ``routers``: the FiRST routers decide at prefill.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from firstkit.routed_model import FirstModel


class MaskPolicy:
    """Base class: ``mask(model, input_ids, attention_mask=None) -> BoolTensor[B, L]``."""

    name = "policy"

    def mask(self, model: FirstModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
             ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def _num_skip(model: FirstModel, num_skip: int | None, ratio: float | None) -> int:
    if (num_skip is None) == (ratio is None):
        raise ValueError("give exactly one of num_skip or ratio")
    if num_skip is None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"skip ratio must be in [0, 1], got {ratio}")
        num_skip = round(ratio * model.num_layers)
    skippable = model.num_layers - len(model.protected_layers())
    if not 0 <= num_skip <= skippable:
        raise ValueError(f"cannot skip {num_skip} layers: {skippable} of {model.num_layers} are skippable")
    return num_skip


def skippable_layers(model: FirstModel) -> list[int]:
    protected = set(model.protected_layers())
    return [i for i in range(model.num_layers) if i not in protected]


def mask_from_skipped(model: FirstModel, skipped: Iterable[int], batch: int = 1) -> torch.Tensor:
    row = torch.ones(model.num_layers, dtype=torch.bool, device=model.device)
    for i in skipped:
        row[i] = False
    return model.mask_tensor(row, batch)


class StaticPolicy(MaskPolicy):
    """A fixed set of skipped layers, the same for every prompt."""

    def __init__(self, skipped: Sequence[int], name: str = "static"):
        self.skipped = sorted(set(int(i) for i in skipped))
        self.name = name

    def mask(self, model, input_ids, attention_mask=None):
        return mask_from_skipped(model, self.skipped, model.as_input_ids(input_ids).shape[0])


class AllLayers(StaticPolicy):
    def __init__(self):
        super().__init__([], name="all")


def random_policy(model: FirstModel, num_skip: int | None = None, ratio: float | None = None,
                  seed: int = 0) -> StaticPolicy:
    k = _num_skip(model, num_skip, ratio)
    candidates = skippable_layers(model)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
    return StaticPolicy([candidates[i] for i in order[:k]], name="random")


def uniform_policy(model: FirstModel, num_skip: int | None = None, ratio: float | None = None) -> StaticPolicy:
    k = _num_skip(model, num_skip, ratio)
    candidates = skippable_layers(model)
    if k == 0:
        return StaticPolicy([], name="uniform")
    # evenly spaced picks over the skippable layers, centred in each stride
    picks = [candidates[int((j + 0.5) * len(candidates) / k)] for j in range(k)]
    return StaticPolicy(picks, name="uniform")


def last_k_policy(model: FirstModel, num_skip: int | None = None, ratio: float | None = None) -> StaticPolicy:
    k = _num_skip(model, num_skip, ratio)
    candidates = skippable_layers(model)
    return StaticPolicy(candidates[len(candidates) - k:] if k else [], name="last-k")


@torch.no_grad()
def block_influence(model: FirstModel, calibration: Sequence[torch.Tensor]) -> list[float]:
    """ShortGPT block influence per layer: mean over tokens of ``1 - cos(h_in, h_out)`` (all layers run)."""
    scores = torch.zeros(model.num_layers, dtype=torch.float64)
    count = 0
    hooks = []
    layers = model.base_layers()

    def make_hook(i):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            scores[i] += (1 - cos).sum().double()
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(make_hook(i), with_kwargs=True))
    try:
        for ids in calibration:
            ids = torch.as_tensor(ids).reshape(1, -1)
            model.forward(ids, mask=[True] * model.num_layers)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return (scores / max(count, 1)).tolist()


def static_policy(model: FirstModel, calibration: Sequence[torch.Tensor], num_skip: int | None = None,
                  ratio: float | None = None) -> StaticPolicy:
    """Skip the ``num_skip`` skippable layers with the lowest block influence on ``calibration``."""
    k = _num_skip(model, num_skip, ratio)
    bi = block_influence(model, calibration)
    ranked = sorted(skippable_layers(model), key=lambda i: bi[i])
    return StaticPolicy(ranked[:k], name="static")


class RouterPolicy(MaskPolicy):
    """The FiRST routers decide per prompt at prefill."""

    name = "routers"

    def mask(self, model, input_ids, attention_mask=None):
        if model.routers is None:
            raise ValueError("the router policy needs a model with routers")
        with torch.no_grad():
            return model.forward(input_ids, attention_mask=attention_mask, logits_to_keep=1).mask


def make_policy(name: str, model: FirstModel, *, num_skip: int | None = None, ratio: float | None = None,
                seed: int = 0, calibration: Sequence[torch.Tensor] | None = None) -> MaskPolicy:
    """Build a policy by name: all, random, static, uniform, last-k, routers."""
    if name == "all":
        return AllLayers()
    if name == "routers":
        return RouterPolicy()
    if name == "random":
        return random_policy(model, num_skip, ratio, seed)
    if name == "uniform":
        return uniform_policy(model, num_skip, ratio)
    if name == "last-k":
        return last_k_policy(model, num_skip, ratio)
    if name == "static":
        if calibration is None:
            raise ValueError("the static (block influence) policy needs calibration token ids")
        return static_policy(model, calibration, num_skip, ratio)
    raise ValueError(f"unknown mask policy {name!r}; choose from all, random, static, uniform, last-k, routers")
