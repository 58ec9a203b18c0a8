"""Evaluate systems (base, FiRST routers, LoRA, static baselines) on tasks at matched skip ratios.

A *system* is a model (base weights, or base + merged LoRA) and a mask policy (all layers, the routers,
or a fixed set of skipped layers). For every example the mask is chosen from the prompt (prefill) and
frozen for the rest: the continuation / choices / generated tokens.

Baselines ``static``, ``uniform``, ``random``, ``last-k`` skip ``k = round(r * L)`` layers, where ``r`` is
the average skip ratio the ``first`` system measured on the same task (matched skip ratio).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from firstkit import policies
from firstkit.evaluation import metrics
from firstkit.evaluation.tasks import Task
from firstkit.routed_model import FirstModel, RoutingConfig
from firstkit.router import RouterStack

__all__ = ["SYSTEMS", "MATCHED", "System", "EvalResult", "evaluate_task", "run_evaluation", "build_systems",
           "router_compute", "forward_flops"]

SYSTEMS = ("base", "first", "first+lora", "lora", "static", "uniform", "random", "last-k")
MATCHED = ("static", "uniform", "random", "last-k")  # skip as many layers as `first` does on the task

MaskFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None]


@dataclass
class System:
    """A model plus a mask policy. ``policy`` None = the model's routers decide at prefill."""

    name: str
    model: FirstModel
    policy: policies.MaskPolicy | None

    def mask(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """BoolTensor[B, L] for prompt ``ids`` (routers or fixed policy)."""
        if self.policy is None:
            if self.model.routers is None:
                return torch.ones(ids.shape[0], self.model.num_layers, dtype=torch.bool)
            with torch.no_grad():
                return self.model.forward(ids, attention_mask=attention_mask, logits_to_keep=1).mask.cpu()
        return self.policy.mask(self.model, ids, attention_mask).cpu()


@dataclass
class EvalResult:
    """Score of one system on one task."""

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

    def rows(self) -> list[dict[str, Any]]:
        base = {"system": self.system, "task": self.task, "skip_ratio": round(self.skip_ratio, 6), "n": self.n}
        out = [{**base, "metric": self.metric, "score": self.score}]
        out += [{**base, "metric": k, "score": v} for k, v in self.extra.items()]
        return out


def _tok(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def _prompt_ids(model: FirstModel, text: str, chat: bool, max_prompt: int) -> list[int]:
    tok = model.tokenizer
    if chat and getattr(tok, "chat_template", None):
        s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = _tok(tok, s, special=False)
    else:
        ids = _tok(tok, text)
    return ids[-max_prompt:]


@torch.no_grad()
def _scored_forward(system: System, ids: torch.Tensor, attn: torch.Tensor, prompt_len: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``ids`` [B, T] (rows share their first ``prompt_len`` tokens) under the mask decided on
    those prompt tokens; returns ``(logits float, mask [L] of row 0)``.

    With routers this is one pass: the routers pool over the prompt positions only, which (causal
    attention) equals deciding on a prompt-only prefill and then scoring with the frozen mask.
    """
    model = system.model
    ids, attn = ids.to(model.device), attn.to(model.device)
    if system.policy is None and model.routers is not None:
        prompt_mask = torch.zeros_like(attn)
        prompt_mask[:, :prompt_len] = 1
        out = model.forward(ids, attention_mask=attn, prompt_mask=prompt_mask)
        return out.logits.float(), out.mask[0].cpu()
    mask = system.mask(ids[:1, :prompt_len])[0]
    return model.forward(ids, attention_mask=attn, mask=mask.to(model.device)).logits.float(), mask


@torch.no_grad()
def _eval_mc(system: System, task: Task, records: list[dict], max_prompt: int, bar) -> tuple[list, list, list]:
    tok = system.model.tokenizer
    preds, masks, plens = [], [], []
    for r in records:
        q = _tok(tok, r["query"])[-max_prompt:]
        conts = [_tok(tok, " " + c, special=False) or [tok.eos_token_id or 0] for c in r["choices"]]
        width = len(q) + max(len(c) for c in conts)
        ids = torch.zeros(len(conts), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, c in enumerate(conts):
            ids[b, : len(q) + len(c)] = torch.tensor(q + c)
            attn[b, : len(q) + len(c)] = 1
        logits, mask = _scored_forward(system, ids, attn, len(q))
        logp = torch.log_softmax(logits, dim=-1)
        scores = []
        for b, c in enumerate(conts):
            pos = torch.arange(len(q) - 1, len(q) - 1 + len(c))
            scores.append(float(logp[b, pos, torch.tensor(c)].sum()))
        preds.append(int(max(range(len(scores)), key=scores.__getitem__)))
        masks.append(mask)
        plens.append(len(q))
        bar.update(1)
    return preds, masks, plens


@torch.no_grad()
def _eval_generation(system: System, task: Task, records: list[dict], max_prompt: int, bar) -> tuple[list, list, list]:
    model, tok = system.model, system.model.tokenizer
    outs, masks, plens = [], [], []
    for r in records:
        p = _prompt_ids(model, r["prompt"], task.chat, max_prompt)
        ids = torch.tensor([p], device=model.device)
        mask = None if system.policy is None else system.mask(ids)[0].to(model.device)
        gen, used = model.generate(ids, max_new_tokens=task.max_new_tokens, mask=mask, return_mask=True)
        text = tok.decode(gen[0, len(p):].tolist(), skip_special_tokens=True).strip()
        outs.append(text.split("\n")[0].strip() if task.name == "squad" else text)
        masks.append(used[0].cpu())
        plens.append(len(p))
        bar.update(1)
    return outs, masks, plens


def perplexity_windows(model: FirstModel, records: list[dict], limit: int, window: int) -> list[list[int]]:
    """Token windows of ``window`` tokens cut from the concatenated texts (at most ``limit``)."""
    tok = model.tokenizer
    out: list[list[int]] = []
    buf: list[int] = []
    for r in records:
        buf += _tok(tok, "\n\n" + r["text"], special=False)
        while len(buf) >= window and len(out) < limit:
            out.append(buf[:window])
            buf = buf[window:]
        if len(out) >= limit:
            break
    if not out and buf:
        out.append(buf)
    return out


@torch.no_grad()
def _eval_perplexity(system: System, windows: list[list[int]], prefix: int, bar) -> tuple[float, int, list, list]:
    model = system.model
    nll, count, masks = 0.0, 0, []
    for w in windows:
        ids = torch.tensor([w], device=model.device)
        pre = max(1, min(prefix, len(w) - 1))
        logits, mask = _scored_forward(system, ids, torch.ones_like(ids), pre)
        logp = torch.log_softmax(logits[0, pre - 1 : -1], dim=-1)
        target = ids[0, pre:]
        nll -= float(logp.gather(-1, target[:, None]).sum())
        count += int(target.numel())
        masks.append(mask)
        bar.update(1)
    return nll, count, masks, [prefix] * len(windows)


def evaluate_task(system: System, task: Task, records: list[dict], *, limit: int, max_prompt: int = 384,
                  ppl_window: int = 256, ppl_prefix: int = 64, progress: bool = True) -> EvalResult:
    """Score ``system`` on the first ``limit`` records (or windows) of ``task``."""
    t0 = time.time()
    L = system.model.num_layers
    if task.kind == "perplexity":
        windows = perplexity_windows(system.model, records, limit, ppl_window)
        bar = tqdm(total=len(windows), desc=f"{system.name}/{task.name}", disable=not progress, leave=False)
        nll, count, masks, plens = _eval_perplexity(system, windows, ppl_prefix, bar)
        score, extra, n = metrics.perplexity(nll, count), {}, len(windows)
    else:
        recs = records[:limit]
        if not recs:
            raise ValueError(f"task {task.name}: no records to evaluate")
        bar = tqdm(total=len(recs), desc=f"{system.name}/{task.name}", disable=not progress, leave=False)
        if task.kind == "mc":
            preds, masks, plens = _eval_mc(system, task, recs, max_prompt, bar)
            score, extra = metrics.accuracy(preds, [r["gold"] for r in recs]), {}
        else:
            outs, masks, plens = _eval_generation(system, task, recs, max_prompt, bar)
            scored = task.score_generation(outs, [r["references"] for r in recs])
            score = scored.pop(task.metric)
            extra = scored
        n = len(recs)
    bar.close()
    m = torch.stack([torch.as_tensor(x, dtype=torch.bool).reshape(-1) for x in masks]).double()
    skip = float((1 - m).sum(1).mean() / L)
    return EvalResult(system.name, task.name, task.metric, float(score), skip, n, extra, m.mean(0).tolist(),
                      time.time() - t0, float(sum(plens) / max(1, len(plens))))


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
                  lora_model: FirstModel | None, lora_routers: RouterStack | None) -> dict[str, System]:
    """Systems by name (matched baselines get their policy later, once ``first``'s skip ratio is known)."""
    out: dict[str, System] = {}
    for name in names:
        if name not in SYSTEMS:
            raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
        if name == "base":
            out[name] = System(name, _with_routers(base_model, None), policies.AllLayers())
        elif name == "first":
            if routers is None:
                raise ValueError("system 'first' needs routers (--routers)")
            out[name] = System(name, _with_routers(base_model, routers), None)
        elif name == "first+lora":
            if lora_model is None or lora_routers is None:
                raise ValueError("system 'first+lora' needs a checkpoint with a LoRA adapter (--lora-routers)")
            out[name] = System(name, _with_routers(lora_model, lora_routers), None)
        elif name == "lora":
            if lora_model is None:
                raise ValueError("system 'lora' needs a checkpoint with a LoRA adapter (--lora-routers)")
            out[name] = System(name, _with_routers(lora_model, None), policies.AllLayers())
        else:
            out[name] = System(name, _with_routers(base_model, None), None)  # policy set per task
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


_BI_CACHE: dict[int, list[float]] = {}


def matched_policy(name: str, model: FirstModel, skip_ratio: float, calibration: Sequence[torch.Tensor],
                   seed: int = 0) -> policies.MaskPolicy:
    """Baseline skipping ``round(skip_ratio * L)`` layers (capped at the skippable count).

    ``static`` skips the ``k`` skippable layers of lowest block influence on ``calibration``.
    """
    k = min(round(skip_ratio * model.num_layers), len(policies.skippable_layers(model)))
    if name == "static":
        key = id(model.base)
        if key not in _BI_CACHE:
            _BI_CACHE[key] = policies.block_influence(model, calibration)
        bi = _BI_CACHE[key]
        return policies.StaticPolicy(sorted(policies.skippable_layers(model), key=lambda i: bi[i])[:k], "static")
    return policies.make_policy(name, model, num_skip=k, seed=seed)


def run_evaluation(systems: dict[str, System], tasks: Sequence[Task], records: dict[str, list[dict]], *,
                   limit: int, calibration: Sequence[torch.Tensor], skip_ratio: float | None = None,
                   seed: int = 0, progress: bool = True, **kw) -> list[EvalResult]:
    """Evaluate every system on every task; matched baselines follow ``first``'s per-task skip ratio."""
    results: list[EvalResult] = []
    order = [s for s in SYSTEMS if s in systems]
    for task in tasks:
        first_skip = skip_ratio
        for name in order:
            system = systems[name]
            if name in MATCHED:
                if first_skip is None:
                    raise ValueError(f"system {name!r} needs the 'first' system or --skip-ratio to match")
                system = System(name, system.model, matched_policy(name, system.model, first_skip,
                                                                   calibration, seed))
            res = evaluate_task(system, task, records[task.name], limit=limit, progress=progress, **kw)
            if name == "first" and skip_ratio is None:
                first_skip = res.skip_ratio
            results.append(res)
    return results


def mean_or_nan(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def load_eval_model(source: str, routers_dir: str | Path | None, lora_dir: str | Path | None,
                    need_lora: bool) -> tuple[FirstModel, RouterStack | None, FirstModel | None, RouterStack | None]:
    """The base model, its routers, and (when needed) a copy with the LoRA adapter merged plus its routers."""
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
    return model, routers, lora_model, lora_routers
