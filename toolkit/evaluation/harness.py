"""Evaluate systems (base, FiRST routers, LoRA, static baselines) on tasks through lm-eval.

A *system* is a model (base weights, or base + merged LoRA) and a mask choice (all layers, the routers, or
a fixed baseline). Every (system, task) pair runs as one lm-eval evaluation of the ``firstkit`` model
(``lm_eval_model.FirstLM``) on the task's local config (``lm_eval_tasks``): lm-eval builds the requests
and computes the metrics; the adapter decides the mask from each request's context and freezes it.

Baselines ``static``, ``uniform``, ``random``, ``last-k`` skip ``k = round(r * L)`` layers, where ``r`` is
the average skip ratio the ``first`` system (else ``first+lora``) measured on the same task (matched skip
ratio), or ``--skip-ratio``. Per-example results are kept, so every score gets a standard error / 95 % interval and
every difference between two systems a *paired* one (``stats``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from firstkit import policies
from firstkit.evaluation import stats
from firstkit.evaluation.masks import baseline_policy
from firstkit.evaluation.tasks import Task
from firstkit.routed_model import FirstModel, RoutingConfig
from firstkit.router import RouterStack

__all__ = ["SYSTEMS", "BUNDLE_SYSTEMS", "MATCHED", "LOWER_IS_BETTER", "System", "EvalResult", "evaluate_task",
           "run_evaluation", "build_systems", "router_compute", "forward_flops", "matched_policy", "compare",
           "load_eval_model"]

SYSTEMS = ("base", "first", "first+lora", "lora", "static", "uniform", "random", "last-k")
BUNDLE_SYSTEMS = ("bundle", "bundle-all")  # an exported bundle (--bundle): its routers' masks / all layers
#: (system, reference, label): what part of a bundle's score is quantization, what part is skipping
#: (the first reference present is used; base is always a reference already)
BUNDLE_PAIRS = (("bundle", ("first+lora", "first"), "eager"), ("bundle-all", ("lora",), "eager"),
                ("bundle", ("bundle-all",), "all_layers"), ("first+lora", ("lora",), "all_layers"))
MATCHED = ("static", "uniform", "random", "last-k")  # skip as many layers as `first` does on the task
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
MC_EXTRA_TOKENS = 64  # window room for the answer of a multiple-choice request beyond --max-prompt


@dataclass
class System:
    """A model plus a mask choice: ``auto`` (its routers decide), ``all``, or a baseline with ``skip``;
    or an exported bundle (``bundle`` = its folder, ``model`` None) with ``auto`` / ``all``."""

    name: str
    model: FirstModel | None
    mask: str = "auto"
    skip: float | int | None = None
    bundle: str | None = None


@dataclass
class EvalResult:
    """Score of one system on one task, with the per-example items behind every metric."""

    system: str
    task: str
    metric: str
    score: float
    skip_ratio: float
    n: int
    extra: dict[str, float] = field(default_factory=dict)
    layer_usage: list[float] = field(default_factory=list)
    seconds: float = 0.0
    mean_prompt_tokens: float = 0.0
    doc_ids: list[int] = field(default_factory=list)
    items: dict[str, list[Any]] = field(default_factory=dict)  # metric -> per-example items, in doc_ids order
    chance: dict[str, float] = field(default_factory=dict)
    masks: list[list[bool]] = field(default_factory=list)  # per document, in doc_ids order

    def rows(self) -> list[dict[str, Any]]:
        base = {"system": self.system, "task": self.task, "skip_ratio": round(self.skip_ratio, 6), "n": self.n}
        out = [{**base, "metric": self.metric, "score": self.score}]
        out += [{**base, "metric": k, "score": v} for k, v in self.extra.items()]
        return out

    def scores(self) -> dict[str, float]:
        return {self.metric: self.score, **self.extra}


# ---------------------------------------------------------------------------------------------- metrics
def _scaled(fn: Callable[[list[Any]], float], scale: float) -> Callable[[list[Any]], float]:
    def agg(items: list[Any]) -> float:
        return float(fn(items)) / scale

    agg.__name__ = getattr(fn, "__name__", "agg")
    return agg


def aggregation(metric: str) -> Callable[[list[Any]], float] | None:
    """lm-eval's aggregation of ``metric``'s items (None = a plain mean); chrF / BLEU rescaled to [0, 1]."""
    from lm_eval.api import metrics as m

    if metric in ("perplexity", "word_perplexity", "byte_perplexity"):
        return m.weighted_perplexity
    if metric == "bits_per_byte":
        return m.bits_per_byte
    if metric == "chrf":
        return _scaled(m.chrf, 100.0)
    if metric == "bleu":
        return _scaled(m.bleu, 100.0)
    return None


def _metric_names(task: Task) -> tuple[str, list[str]]:
    """(main metric as reported, [(report name) ...] of the extra metrics)."""
    from firstkit.evaluation.lm_eval_tasks import _GENERATION, GENERATION_METRICS

    if task.kind == "mc":
        return "accuracy", ["acc_norm"]
    if task.kind == "perplexity":
        return "perplexity", ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    names = GENERATION_METRICS[_GENERATION.get(task.name, ([], "rouge"))[1]]
    main = task.metric if task.metric in names else names[0]
    return main, [x for x in names if x != main]


# ---------------------------------------------------------------------------------------------- one evaluation
_TASK_MANAGER = None


def _task_manager():
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGER = TaskManager(include_defaults=False)  # our configs only: no index of lm-eval's 10k tasks
    return _TASK_MANAGER


def _uses_chat(task: Task, tokenizer: Any) -> bool:
    return task.kind == "generation" and task.chat and bool(getattr(tokenizer, "chat_template", None))


def evaluate_task(system: System, task: Task, config: dict[str, Any], *, limit: int | None, max_prompt: int = 384,
                  ppl_window: int = 2048, ppl_prompt: int = 64, batch_size: int = 1, seed: int = 0,
                  data_dir: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Score ``system`` on the first ``limit`` documents (None = all) of ``task`` through lm-eval."""
    from lm_eval import simple_evaluate

    from firstkit.evaluation.lm_eval_model import FirstLM

    t0 = time.time()
    if task.kind == "perplexity":
        window = ppl_window
    else:
        window = max_prompt + (task.max_new_tokens if task.kind == "generation" else MC_EXTRA_TOKENS)
    if system.bundle is not None:
        lm = FirstLM(bundle=system.bundle, mask=system.mask, rolling_prompt=ppl_prompt, max_length=window,
                     progress=progress)
    else:
        lm = FirstLM(model=system.model, mask=system.mask, skip=system.skip, seed=seed, data_dir=data_dir,
                     rolling_prompt=ppl_prompt, batch_size=batch_size, max_length=window, progress=progress)
    name = config["task"]
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for first-eval's own output (--json)
        out = simple_evaluate(model=lm, tasks=[config], limit=limit, bootstrap_iters=0, log_samples=True,
                              task_manager=_task_manager(), apply_chat_template=_uses_chat(task, lm.tokenizer),
                              verbosity="ERROR" if not progress else None)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    if not samples:
        raise ValueError(f"task {task.name}: no records to evaluate")
    doc_ids = [int(s["doc_id"]) for s in samples]
    main, extras = _metric_names(task)
    items: dict[str, list[Any]] = {}
    if task.kind == "mc":
        items["accuracy"] = [float(s["acc"]) for s in samples]
        items["acc_norm"] = [float(s["acc_norm"]) for s in samples]
        golds = [int(s["doc"]["gold"]) for s in samples]
        chance = stats.chance_level([len(s["doc"]["choices"]) for s in samples], golds)
    elif task.kind == "perplexity":
        for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            items[m] = [tuple(s[m]) for s in samples]
        items["perplexity"] = [(s["word_perplexity"][0], lm.rolling_tokens[(name, d)])
                               for s, d in zip(samples, doc_ids, strict=True)]
        chance = {}
    else:
        for m in [main, *extras]:
            items[m] = [tuple(s[m]) if isinstance(s[m], list | tuple) else float(s[m]) for s in samples]
        chance = {}
    values = {m: _aggregate(m, v) for m, v in items.items()}
    L = len(next(iter(lm.mask_log.values())))
    masks = torch.tensor([lm.mask_log[(name, d)] for d in doc_ids], dtype=torch.float64)
    prompts = [lm.prompt_log[(name, d)] for d in doc_ids]
    return EvalResult(system.name, task.name, main, values[main], float((1 - masks).sum(1).mean() / L), len(samples),
                      {m: values[m] for m in extras}, masks.mean(0).tolist(), time.time() - t0,
                      float(sum(prompts) / len(prompts)), doc_ids, items, chance,
                      [lm.mask_log[(name, d)] for d in doc_ids])


def _aggregate(metric: str, items: list[Any]) -> float:
    agg = aggregation(metric)
    return float(sum(items) / len(items)) if agg is None else float(agg(list(items)))


# ---------------------------------------------------------------------------------------------- statistics
def compare(results: Sequence[EvalResult], iters: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Intervals of every score, and paired differences of every system to ``base`` and to the strongest
    matched baseline of the task (best main score among static / uniform / random / last-k). With a bundle,
    also bundle - first+lora and bundle-all - lora (``eager``: quantization, same masks policy), bundle -
    bundle-all and first+lora - lora (``all_layers``: skipping)."""
    intervals, diffs, chance, agreement = [], [], {}, []
    by_task: dict[str, dict[str, EvalResult]] = {}
    for r in results:
        by_task.setdefault(r.task, {})[r.system] = r
        if r.chance:
            chance[r.task] = r.chance
        for metric in r.items:
            iv = stats.interval(r.items[metric], aggregation(metric), iters, seed)
            intervals.append({"system": r.system, "task": r.task, "metric": metric, **iv.as_dict()})
    for task, systems in by_task.items():
        any_r = next(iter(systems.values()))
        lower = any_r.metric in LOWER_IS_BETTER
        baselines = [systems[s] for s in MATCHED if s in systems]
        best = (min if lower else max)(baselines, key=lambda r: r.score) if baselines else None
        for r in systems.values():
            refs = []
            if "base" in systems and r.system != "base":
                refs.append(("base", systems["base"]))
            if best is not None and r.system not in MATCHED and r.system != "base":
                refs.append(("best_baseline", best))
            for sys_name, candidates, label in BUNDLE_PAIRS:
                present = [c for c in candidates if c in systems]
                if sys_name == r.system and present and "bundle" in systems:
                    refs.append((label, systems[present[0]]))
            for label, ref in refs:
                if ref.doc_ids != r.doc_ids:
                    raise ValueError(f"{r.system} and {ref.system} scored different examples of {task}")
                if label == "eager":  # does the quantized program run the layers the eager model runs?
                    same = [a == b for a, b in zip(r.masks, ref.masks, strict=True)]
                    agreement.append({"system": r.system, "reference_system": ref.system, "task": task,
                                      "masks_equal": sum(same) / len(same), "n": len(same)})
                for metric in r.items:
                    d = stats.difference(r.items[metric], ref.items[metric], aggregation(metric), iters, seed)
                    diffs.append({"system": r.system, "reference": label, "reference_system": ref.system,
                                  "task": task, "metric": metric, **d.as_dict()})
    out_agree = {"mask_agreement": agreement} if agreement else {}
    return out_agree | {"intervals": intervals, "differences": diffs, "chance": chance,
            "statistics": {"confidence": stats.CONFIDENCE, "bootstrap_iters": iters, "seed": seed,
                           "means": "t interval on per-example scores (paired for differences)",
                           "corpus_metrics": "bootstrap over examples (paired for differences)"}}


# ---------------------------------------------------------------------------------------------- systems
def forward_flops(model: FirstModel, tokens: int) -> int:
    """Approximate FLOPs of a full (all layers) forward over ``tokens`` tokens: 2 x weights touched + attention."""
    cfg = model.config
    layer_params = sum(p.numel() for layer in model.base_layers() for p in layer.parameters())
    head = cfg.vocab_size * cfg.hidden_size
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    attn = 2 * 2 * model.num_layers * n_heads * head_dim * tokens * tokens // 2  # QK^T and AV, causal
    return 2 * (layer_params + head) * tokens + attn


def router_compute(model: FirstModel, prompt_tokens: float, routers: RouterStack | None = None) -> dict[str, float]:
    """Routers' FLOPs for a prompt of ``prompt_tokens`` tokens and their share of one full prefill."""
    routers = routers if routers is not None else model.routers
    if routers is None:
        return {}
    t = max(1, int(round(prompt_tokens)))
    r = routers.flops(t)
    f = forward_flops(model, t)
    return {"prompt_tokens": t, "router_params": routers.num_parameters(), "router_flops": r,
            "forward_flops": f, "router_percent_of_forward": 100.0 * r / f}


def build_systems(names: Sequence[str], base_model: FirstModel, routers: RouterStack | None,
                  lora_model: FirstModel | None, lora_routers: RouterStack | None,
                  bundle: str | None = None) -> dict[str, System]:
    """Systems by name (matched baselines get their skip later, once ``first``'s skip ratio is known)."""
    out: dict[str, System] = {}
    for name in names:
        if name not in SYSTEMS + BUNDLE_SYSTEMS:
            raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS + BUNDLE_SYSTEMS)}")
        if name in BUNDLE_SYSTEMS:
            if bundle is None:
                raise ValueError(f"system {name!r} needs --bundle DIR")
            out[name] = System(name, None, "auto" if name == "bundle" else "all", bundle=str(bundle))
        elif name == "base":
            out[name] = System(name, _with_routers(base_model, None), "all")
        elif name == "first":
            if routers is None:
                raise ValueError("system 'first' needs routers (--routers)")
            out[name] = System(name, _with_routers(base_model, routers), "auto")
        elif name == "first+lora":
            if lora_model is None or lora_routers is None:
                raise ValueError("system 'first+lora' needs a checkpoint with a LoRA adapter (--lora-routers)")
            out[name] = System(name, _with_routers(lora_model, lora_routers), "auto")
        elif name == "lora":
            if lora_model is None:
                raise ValueError("system 'lora' needs a checkpoint with a LoRA adapter (--lora-routers)")
            out[name] = System(name, _with_routers(lora_model, None), "all")
        else:
            out[name] = System(name, _with_routers(base_model, None), name)  # skip set per task
    return out


def _with_routers(model: FirstModel, routers: RouterStack | None) -> FirstModel:
    """A view of ``model`` with other routers: a shallow copy sharing the base weights."""
    view = copy.copy(model)
    object.__setattr__(view, "_modules", dict(model._modules))
    view.routers = routers
    if routers is not None and "threshold" in routers.meta:
        view.routing = RoutingConfig(threshold=float(routers.meta["threshold"]),
                                     never_skip=tuple(routers.meta.get("never_skip", model.routing.never_skip)))
    return view


def matched_policy(name: str, model: FirstModel, skip_ratio: float, calibration: Sequence[torch.Tensor],
                   seed: int = 0) -> policies.MaskPolicy:
    """Baseline skipping ``round(skip_ratio * L)`` layers (capped at the skippable count).

    ``static`` skips the ``k`` skippable layers of lowest block influence on ``calibration``.
    """
    k = min(round(skip_ratio * model.num_layers), len(policies.skippable_layers(model)))
    return baseline_policy(name, model, k, calibration, seed)


def run_evaluation(systems: dict[str, System], tasks: Sequence[Task], configs: dict[str, dict[str, Any]], *,
                   limit: int | None, skip_ratio: float | None = None, seed: int = 0, progress: bool = True,
                   **kw: Any) -> list[EvalResult]:
    """Evaluate every system on every task; matched baselines follow the per-task skip ratio of ``first``
    (or of ``first+lora`` when ``first`` is not evaluated), unless ``skip_ratio`` is given."""
    results: list[EvalResult] = []
    order = [s for s in (*SYSTEMS, *BUNDLE_SYSTEMS) if s in systems]
    leader = "first" if "first" in systems else "first+lora"
    if skip_ratio is None and leader not in systems and any(s in MATCHED for s in systems):
        raise ValueError("matched baselines need the 'first' or 'first+lora' system, or --skip-ratio")
    for task in tasks:
        first_skip = skip_ratio
        for name in order:
            system = systems[name]
            if name in MATCHED:
                if first_skip is None:
                    raise ValueError(f"system {name!r} needs the 'first' or 'first+lora' system or --skip-ratio")
                k = min(round(first_skip * system.model.num_layers), len(policies.skippable_layers(system.model)))
                system = System(name, system.model, name, k)
            res = evaluate_task(system, task, configs[task.name], limit=limit, seed=seed, progress=progress, **kw)
            if name == leader and skip_ratio is None:
                first_skip = res.skip_ratio
            results.append(res)
    return results


def mean_or_nan(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def load_eval_model(source: str, routers_dir: str | Path | None, lora_dir: str | Path | None,
                    need_lora: bool, device: str = "cpu"
                    ) -> tuple[FirstModel, RouterStack | None, FirstModel | None, RouterStack | None]:
    """The base model, its routers, and (when needed) a copy with the LoRA adapter merged plus its routers,
    all on ``device``."""
    from firstkit.routed_model import load_model
    from firstkit.training.lora import apply_lora, has_lora

    model = load_model(source)
    sha = model.base_sha256()
    L, H = model.num_layers, model.config.hidden_size
    routers = RouterStack.from_pretrained(routers_dir, num_layers=L, hidden_size=H, model_sha256=sha) \
        if routers_dir is not None else None
    lora_model = lora_routers = None
    if need_lora:
        if lora_dir is None or not has_lora(lora_dir):
            raise ValueError("LoRA systems need a checkpoint with a lora/ adapter (--lora-routers)")
        lora_routers = RouterStack.from_pretrained(lora_dir, num_layers=L, hidden_size=H, model_sha256=sha)
        lora_model = copy.deepcopy(model)
        lora_model.routers = None
        apply_lora(lora_model, lora_dir)
    if device != "cpu":
        model, lora_model = model.to(device), lora_model.to(device) if lora_model is not None else None
        routers = routers.to(device) if routers is not None else None
        lora_routers = lora_routers.to(device) if lora_routers is not None else None
    return model, routers, lora_model, lora_routers
