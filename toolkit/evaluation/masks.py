"""Fixed-mask baselines for evaluation: parse a ``mask=`` / ``skip=`` choice into a policy.

``static`` (ShortGPT block influence) is calibrated on windows of the WikiText-2 *train* split (4 x 128
tokens; never an evaluation example); ``uniform``, ``random`` (seeded) and ``last-k`` need no data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from firstkit import policies
from firstkit.routed_model import FirstModel

__all__ = ["BASELINES", "MASK_CHOICES", "calibration_windows", "skip_count", "baseline_policy", "fixed_mask"]

BASELINES = ("static", "uniform", "random", "last-k")
MASK_CHOICES = ("auto", "all", *BASELINES)  # or a string of 0/1 bits, one per layer

_BI_CACHE: dict[int, list[float]] = {}


def _tok(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def calibration_windows(model: FirstModel, data_dir: str | Path | None = None, count: int = 4,
                        window: int = 128) -> list[torch.Tensor]:
    """Token windows for block influence: ``count`` x ``window`` tokens of WikiText-2's train split."""
    from firstkit.evaluation.tasks import TASKS

    try:
        recs = TASKS["wikitext2"].records("train", data_dir)
    except FileNotFoundError:
        recs = []
    out: list[list[int]] = []
    buf: list[int] = []
    for r in recs:
        buf += _tok(model.tokenizer, "\n\n" + r["text"])
        while len(buf) >= window and len(out) < count:
            out.append(buf[:window])
            buf = buf[window:]
        if len(out) >= count:
            break
    if not out:  # no data: a neutral calibration text
        out = [_tok(model.tokenizer, "The quick brown fox jumps over the lazy dog. " * 8)]
    return [torch.tensor(w) for w in out]


def skip_count(model: FirstModel, skip: float | int) -> int:
    """Layers to skip: ``skip`` < 1 is a ratio of all layers (rounded), >= 1 a count; capped at the skippable."""
    if isinstance(skip, bool) or not isinstance(skip, int | float) or skip < 0:
        raise ValueError(f"skip must be a ratio in [0, 1) or a layer count, got {skip!r}")
    k = round(skip * model.num_layers) if skip < 1 else int(skip)
    if skip >= 1 and skip != int(skip):
        raise ValueError(f"skip >= 1 must be a whole number of layers, got {skip}")
    return min(k, len(policies.skippable_layers(model)))


def baseline_policy(name: str, model: FirstModel, skip: float | int, calibration: Sequence[torch.Tensor] | None = None,
                    seed: int = 0, data_dir: str | Path | None = None) -> policies.StaticPolicy:
    """``static`` | ``uniform`` | ``random`` | ``last-k`` skipping ``skip_count(model, skip)`` layers.

    ``static`` ranks layers by block influence on ``calibration`` (default ``calibration_windows``), once
    per base model."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    k = skip_count(model, skip)
    if name == "static":
        key = id(model.base)
        if key not in _BI_CACHE:
            _BI_CACHE[key] = policies.block_influence(model, calibration or calibration_windows(model, data_dir))
        bi = _BI_CACHE[key]
        return policies.StaticPolicy(sorted(policies.skippable_layers(model), key=lambda i: bi[i])[:k], "static")
    pol = policies.make_policy(name, model, num_skip=k, seed=seed)
    assert isinstance(pol, policies.StaticPolicy)
    return pol


def fixed_mask(model: FirstModel, mask: str, skip: float | int | None = None, seed: int = 0,
               data_dir: str | Path | None = None) -> torch.Tensor | None:
    """BoolTensor[L] for a fixed ``mask`` choice (``all``, a baseline, or 0/1 bits); None for ``auto``."""
    if mask == "auto":
        return None
    if mask == "all":
        return torch.ones(model.num_layers, dtype=torch.bool)
    if mask in BASELINES:
        if skip is None:
            raise ValueError(f"mask={mask} needs skip= (a ratio in [0, 1) or a number of layers)")
        pol = baseline_policy(mask, model, skip, None, seed, data_dir)
        return pol.mask(model, torch.tensor([[0]]))[0].cpu()
    if set(mask) <= {"0", "1"} and mask:
        return model.mask_tensor(mask)[0].cpu()
    raise ValueError(f"mask must be one of {', '.join(MASK_CHOICES)} or a string of 0/1 bits "
                     f"(one per layer, {model.num_layers} here), got {mask!r}")
