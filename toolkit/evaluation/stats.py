"""Uncertainty of scores and of differences between systems scored on the same examples.

Every metric is an *aggregation* (lm-eval's) of per-example *items*: a mean of per-example scores
(accuracy, ROUGE-L, F1, EM), or a corpus-level function (chrF / BLEU over (reference, prediction) pairs,
perplexity over (log-likelihood, tokens) pairs).

* means: standard error ``sd / sqrt(n)`` (lm-eval's ``mean_stderr``) and a 95 % t interval (Wilson's
  interval for 0/1 scores: accuracy, EM); a difference between two systems is the mean of the *paired*
  per-example differences, with its ``sd / sqrt(n)`` and t interval;
* corpus-level metrics: bootstrap over examples (``iters`` resamples, seeded); the standard error is
  the resamples' standard deviation, the interval their 2.5 / 97.5 percentiles; a difference resamples
  the *same* example indices for both systems (paired bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Interval", "mean_interval", "bootstrap_interval", "interval", "difference", "chance_level"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its standard error and 95 % confidence interval."""

    value: float
    stderr: float
    low: float
    high: float
    n: int
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "stderr": self.stderr, "ci_low": self.low, "ci_high": self.high, "n": self.n,
                "method": self.method}


def _t(n: int) -> float:
    if n < 2:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.5 + CONFIDENCE / 2, n - 1))


def wilson(successes: float, n: int) -> tuple[float, float]:
    """Wilson score interval of a proportion (stays in [0, 1], sensible at 0 / n and n / n)."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + CONFIDENCE / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], paired: bool = False) -> Interval:
    """Mean with ``sd / sqrt(n)``; a Wilson interval for 0/1 scores (accuracy, EM), else a t interval.

    ``paired``: ``values`` are per-example differences (always a t interval)."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        raise ValueError("no values")
    m = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    if not paired and bool(np.all((x == 0) | (x == 1))):
        lo, hi = wilson(float(x.sum()), n)
        return Interval(m, se, lo, hi, n, "wilson")
    h = _t(n) * se
    return Interval(m, se, m - h, m + h, n, "paired t" if paired else "t")


def bootstrap_interval(items: Sequence[Any], aggregate: Callable[[list[Any]], float], iters: int = 1000,
                       seed: int = 0) -> Interval:
    """``aggregate(items)`` with a bootstrap standard error and percentile interval."""
    n = len(items)
    if n == 0:
        raise ValueError("no items")
    value = float(aggregate(list(items)))
    if n < 2 or iters < 2:
        return Interval(value, math.nan, math.nan, math.nan, n, "bootstrap")
    rng = np.random.default_rng(seed)
    reps = np.array([aggregate([items[j] for j in rng.integers(0, n, n)]) for _ in range(iters)], dtype=np.float64)
    lo, hi = np.percentile(reps, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return Interval(value, float(reps.std(ddof=1)), float(lo), float(hi), n, f"bootstrap({iters})")


def interval(items: Sequence[Any], aggregate: Callable[[list[Any]], float] | None, iters: int = 1000,
             seed: int = 0) -> Interval:
    """A mean's interval when ``aggregate`` is None, else a bootstrap interval."""
    return mean_interval(items) if aggregate is None else bootstrap_interval(items, aggregate, iters, seed)


def difference(a: Sequence[Any], b: Sequence[Any], aggregate: Callable[[list[Any]], float] | None,
               iters: int = 1000, seed: int = 0) -> Interval:
    """``metric(a) - metric(b)`` over the same examples (paired): items ``a[i]`` and ``b[i]`` belong to one example."""
    if len(a) != len(b):
        raise ValueError(f"paired items differ in number ({len(a)} vs {len(b)})")
    if aggregate is None:
        return mean_interval([float(x) - float(y) for x, y in zip(a, b, strict=True)], paired=True)
    n = len(a)
    value = float(aggregate(list(a))) - float(aggregate(list(b)))
    if n < 2 or iters < 2:
        return Interval(value, math.nan, math.nan, math.nan, n, "paired bootstrap")
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(iters):
        idx = rng.integers(0, n, n)
        reps.append(aggregate([a[j] for j in idx]) - aggregate([b[j] for j in idx]))
    r = np.asarray(reps, dtype=np.float64)
    lo, hi = np.percentile(r, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return Interval(value, float(r.std(ddof=1)), float(lo), float(hi), n, f"paired bootstrap({iters})")


def chance_level(choices_per_example: Sequence[int], golds: Sequence[int]) -> dict[str, float]:
    """Accuracy of guessing: ``chance`` (uniformly at random: mean of 1/k) and ``majority`` (always the
    most frequent gold position)."""
    n = len(golds)
    if n == 0 or len(choices_per_example) != n:
        raise ValueError("need one choice count per gold label")
    counts: dict[int, int] = {}
    for g in golds:
        counts[int(g)] = counts.get(int(g), 0) + 1
    return {"chance": float(np.mean([1.0 / k for k in choices_per_example])), "majority": max(counts.values()) / n}
