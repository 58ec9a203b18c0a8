"""FiRST router training: frozen base, routers (phase 1), optionally LoRA + routers (phase 2).

Loss per batch (documented in docs/training.md)::

    g_i     = straight-through gate of layer i: forward value = hard decision (1 run / 0 skip),
              gradient = d sigmoid(logit_i)    (FirstModel.forward(..., soft_gates=True))
    p_i     = router probability of layer i (protected layers: 1)
    used    = mean over batch and routable layers of g_i          (fraction of routable layers run)
    skip    = mean over batch of (sum_i (1 - g_i)) / L             (skip ratio as reported: skipped / L)
    skip~   = mean over batch of (sum_i (1 - p_i)) / L             (expected skip ratio, smooth)
    KD      = KL(base model with all layers || routed model), per token, over every non-pad position
              (prompt and target), teacher = the frozen base without LoRA
    loss    = CE(target tokens) + distill * KD + lambda_used * used + budget_weight * (s_b - budget)^2
              with s_b = skip (budget_on="hard", the default) or skip~ (budget_on="soft")

The budget term is on the straight-through skip ratio by default (``budget_on="hard"``: value = the hard
decisions, gradient through the probabilities). ``budget_on="soft"`` puts it on the expected skip ratio
instead, which is smooth but, with router probabilities near 0.5 at the start, far above the hard skip
ratio: on SmolLM2 (loo warm start, budget 0.15) it pushed every layer on and the hard skip stayed 0.
Distillation gives every position a full-distribution target instead of the few answer tokens, which is
what keeps language-modelling quality (perplexity) while layers are skipped.

After training, the router threshold is calibrated on held-out (validation-split) prompts so that their
average skip ratio meets the budget (bisection on the threshold, stored in router_config.json).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from firstkit.routed_model import FirstModel, RoutingConfig
from firstkit.router import ROUTER_CONFIG, RouterStack
from firstkit.training.data import Example, collate
from firstkit.training.lora import LORA_DIR, add_lora, save_lora

__all__ = ["TrainConfig", "TrainResult", "train", "measure_skip", "calibrate_threshold", "init_routers",
           "training_loss", "teacher_logits", "distill_loss", "lr_factor"]

STATE_DIR = "trainer_state"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run."""

    skip_budget: float = 0.15
    steps: int = 100  # phase 1: routers only
    lora_steps: int = 0  # phase 2: LoRA + routers
    batch_size: int = 4
    lr: float = 1e-2
    lora_lr: float = 5e-4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lambda_used: float = 0.01
    budget_weight: float = 20.0
    distill: float = 1.0  # weight of the KL to the all-layers base model (0 = answer CE only)
    budget_on: str = "hard"  # "hard": straight-through skip ratio; "soft": expected skip from probabilities
    router_dim: int = 32
    init_bias: float = 1.0
    warm_start: str = "bi"  # "loo": start at the leave-one-out static mask; "bi": biases ordered by block
    #                          influence, all layers running; "none": all biases equal init_bias
    bias_spread: float = 2.0  # range of the warm-started biases
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # "cosine": 5 % linear warm-up, then cosine decay to 0, per phase
    calibrate: bool = True
    threshold: float = 0.5
    never_skip: tuple[int, ...] = (0, -1)
    seed: int = 0
    save_every: int = 25
    log_every: int = 5

    def validate(self) -> None:
        if not 0.0 <= self.skip_budget < 1.0:
            raise ValueError(f"--skip-budget must be in [0, 1), got {self.skip_budget}")
        if self.steps < 0 or self.lora_steps < 0 or self.steps + self.lora_steps == 0:
            raise ValueError("need at least one training step (--steps / --lora-steps)")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError("--threshold must be in (0, 1)")
        if self.distill < 0:
            raise ValueError(f"--distill must be >= 0, got {self.distill}")
        if self.budget_on not in ("soft", "hard"):
            raise ValueError(f"--budget-on must be 'soft' or 'hard', got {self.budget_on!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--lr-schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.warm_start not in ("loo", "bi", "none"):
            raise ValueError(f"--warm-start must be 'loo', 'bi' or 'none', got {self.warm_start!r}")


@dataclass
class TrainResult:
    """What a run produced."""

    out_dir: str
    steps_done: int
    history: list[dict] = field(default_factory=list)
    val_skip_ratio: float | None = None
    threshold: float = 0.5
    seconds: float = 0.0


@torch.no_grad()
def leave_one_out_importance(model: FirstModel, examples: Sequence[Example], batch_size: int = 8) -> list[float]:
    """Increase of the target-token cross-entropy when layer ``i`` alone is skipped (inf for protected layers)."""
    protected = set(model.protected_layers())
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    batches = [collate(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]

    def ce(mask: list[bool]) -> float:
        total, count = 0.0, 0
        for b in batches:
            b = {k: v.to(model.device) for k, v in b.items()}
            logits = model.forward(b["input_ids"], attention_mask=b["attention_mask"], mask=mask).logits.float()
            labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
        return total / max(1, count)

    full = ce([True] * model.num_layers)
    out = []
    for i in range(model.num_layers):
        if i in protected:
            out.append(math.inf)
            continue
        mask = [True] * model.num_layers
        mask[i] = False
        out.append(ce(mask) - full)
    return out


def init_routers(model: FirstModel, cfg: TrainConfig, calibration: Sequence[Sequence[int]] | None = None,
                 calibration_examples: Sequence[Example] | None = None) -> RouterStack:
    """Fresh routers (tiny output weights) with warm-started biases.

    * ``warm_start="loo"``: layers ranked by leave-one-out loss increase on ``calibration_examples``;
      the ``k = round(budget * L)`` least important start skipped (negative bias), the rest run; biases
      step by ``bias_spread / (L - 1)`` per rank, so the training starts at the static mask that meets
      the budget and the routers learn per-prompt deviations from it.
    * ``warm_start="bi"``: bias ``init_bias + bias_spread * rank_i / (L - 1)`` with ranks by block
      influence on ``calibration`` (least influential = rank 0): every layer runs at step 0 and the
      budget term flips the least useful layers first.
    * ``warm_start="none"``: every bias is ``init_bias`` (every layer runs at step 0).
    """
    from firstkit.policies import block_influence

    torch.manual_seed(cfg.seed)
    stack = RouterStack(model.num_layers, model.config.hidden_size, router_dim=cfg.router_dim,
                        init_bias=cfg.init_bias)
    step = cfg.bias_spread / max(1, model.num_layers - 1)
    if cfg.warm_start == "loo" and calibration_examples:
        saved = model.routers
        model.routers = None
        try:
            imp = leave_one_out_importance(model, calibration_examples)
        finally:
            model.routers = saved
        routable = [i for i in range(model.num_layers) if math.isfinite(imp[i])]
        order = sorted(routable, key=lambda i: imp[i])
        k = min(len(order), round(cfg.skip_budget * model.num_layers))
        with torch.no_grad():
            for rank, i in enumerate(order):
                stack.routers[i].out.bias.fill_(step * (rank - k + 0.5))
            for i in range(model.num_layers):
                if i not in routable:
                    stack.routers[i].out.bias.fill_(cfg.bias_spread)
        stack.meta["warm_start_loo_importance"] = [round(float(v), 6) if math.isfinite(v) else None for v in imp]
    elif cfg.warm_start == "bi" and calibration:
        saved = model.routers
        model.routers = None
        try:
            bi = block_influence(model, [torch.tensor(c) for c in calibration])
        finally:
            model.routers = saved
        order = sorted(range(model.num_layers), key=lambda i: bi[i])
        with torch.no_grad():
            for rank, i in enumerate(order):
                stack.routers[i].out.bias.fill_(cfg.init_bias + step * rank)
        stack.meta["warm_start_block_influence"] = [round(float(b), 6) for b in bi]
    return stack.to(model.device)


def _routable(model: FirstModel) -> torch.Tensor:
    keep = torch.ones(model.num_layers, dtype=torch.bool)
    for i in model.protected_layers():
        keep[i] = False
    return keep


@torch.no_grad()
def teacher_logits(model: FirstModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the frozen base model with every layer running and LoRA adapters switched off."""
    from firstkit.training.lora import adapters_disabled

    with adapters_disabled(model):
        out = model.forward(batch["input_ids"], attention_mask=batch["attention_mask"],
                            mask=[True] * model.num_layers)
    return out.logits.float()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over positions whose next token is not padding."""
    valid = (attention_mask[:, 1:] > 0).reshape(-1)
    s = torch.log_softmax(student[:, :-1].reshape(-1, student.shape[-1])[valid].float(), dim=-1)
    t = torch.log_softmax(teacher[:, :-1].reshape(-1, teacher.shape[-1])[valid].float(), dim=-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def training_loss(model: FirstModel, batch: dict[str, torch.Tensor], cfg: TrainConfig,
                  wrapped: torch.nn.Module | None = None,
                  teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch (see the module docstring) and its parts.

    ``wrapped``: the accelerate-prepared model (DDP under several processes) to call instead of
    ``model`` so gradients synchronise; ``model`` is the unwrapped ``FirstModel``. ``teacher``: logits of
    :func:`teacher_logits` for the batch (computed here when ``cfg.distill > 0`` and not given).
    """
    if cfg.distill > 0 and teacher is None:
        teacher = teacher_logits(model, batch)
    fwd = wrapped if wrapped is not None else model
    out = fwd(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], soft_gates=True,
              prompt_mask=batch["prompt_mask"])
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100)
    probs = out.gate_probs  # [B, L]
    hard = out.mask.to(probs.dtype)
    gates = hard + probs - probs.detach()
    keep = _routable(model).to(probs.device)
    gates = torch.where(keep[None, :], gates, torch.ones_like(gates))  # protected layers: constant 1
    used = gates[:, keep].mean()
    skip = (1.0 - gates).sum(dim=1).mean() / model.num_layers
    soft = torch.where(keep[None, :], probs, torch.ones_like(probs))
    expected_skip = (1.0 - soft).sum(dim=1).mean() / model.num_layers
    budget_skip = expected_skip if cfg.budget_on == "soft" else skip
    loss = ce + cfg.lambda_used * used + cfg.budget_weight * (budget_skip - cfg.skip_budget) ** 2
    parts = {"ce": float(ce.detach()), "skip": float(skip.detach()), "expected_skip": float(expected_skip.detach()),
             "used": float(used.detach())}
    if cfg.distill > 0:
        kd = distill_loss(out.logits, teacher, batch["attention_mask"])
        loss = loss + cfg.distill * kd
        parts["kd"] = float(kd.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


@torch.no_grad()
def measure_skip(model: FirstModel, prompts: Sequence[Sequence[int]], batch_size: int = 8,
                 threshold: float | None = None) -> tuple[float, list[float]]:
    """Average skip ratio of the routers' hard decisions on ``prompts`` and per-layer usage."""
    if not prompts:
        raise ValueError("no prompts to measure the skip ratio on")
    saved = model.routing
    if threshold is not None:
        model.routing = RoutingConfig(threshold=threshold, never_skip=saved.never_skip)
    try:
        total = 0.0
        usage = torch.zeros(model.num_layers, dtype=torch.float64)
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start:start + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            attn = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, p in enumerate(chunk):
                ids[b, :len(p)] = torch.tensor(p)
                attn[b, :len(p)] = 1
            out = model.forward(ids.to(model.device), attention_mask=attn.to(model.device), logits_to_keep=1)
            m = out.mask.cpu()
            total += float((~m).sum()) / model.num_layers
            usage += m.double().sum(0)
        return total / len(prompts), (usage / len(prompts)).tolist()
    finally:
        model.routing = saved


def calibrate_threshold(model: FirstModel, prompts: Sequence[Sequence[int]], budget: float, iters: int = 20,
                        batch_size: int = 8, start: float = 0.5) -> tuple[float, float]:
    """Bisect the router threshold so the held-out average skip ratio is closest to ``budget``.

    A higher threshold skips more. ``start`` is tried first and kept if it is within half a layer of the
    budget (e.g. the threshold of ``--init-routers``: no bisection when the routers did not change).
    Returns ``(threshold, skip_ratio_at_it)``.
    """
    lo, hi = 1e-3, 1 - 1e-3
    best_t, best_s = start, measure_skip(model, prompts, batch_size, start)[0]
    if abs(best_s - budget) < 0.5 / model.num_layers:
        return best_t, best_s
    # bisection on the logit scale
    a, b = math.log(lo / (1 - lo)), math.log(hi / (1 - hi))
    for _ in range(iters):
        mid = (a + b) / 2
        t = 1 / (1 + math.exp(-mid))
        s = measure_skip(model, prompts, batch_size, t)[0]
        if abs(s - budget) < abs(best_s - budget) or (abs(s - budget) == abs(best_s - budget)
                                                       and abs(t - 0.5) < abs(best_t - 0.5)):
            best_t, best_s = t, s
        if s < budget:
            a = mid
        else:
            b = mid
    return best_t, best_s


def _meta(model: FirstModel, cfg: TrainConfig, extra: dict) -> dict:
    return {
        "base_model": model.info.model_id,
        "base_model_source": str(model.info.source),
        "base_model_sha256": model.base_sha256(),
        "skip_budget": cfg.skip_budget,
        "threshold": cfg.threshold,
        "never_skip": list(cfg.never_skip),
        "trained_with": "first-train",
        **extra,
    }


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        write(tmp)
        old = None
        if final.exists():
            old = final.with_name(final.name + f".old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_state(out: Path, model: FirstModel, optimizer: torch.optim.Optimizer, step: int, phase: int,
                history: list[dict], cfg: TrainConfig, rng_state: dict) -> None:
    def write(d: Path) -> None:
        model.routers.save_pretrained(d / "routers")
        if phase == 2:
            save_lora(model, d / LORA_DIR)
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "phase": phase, "history": history,
                    "config": asdict(cfg), "rng": rng_state}, d / "state.pt")
    _atomic_dir(out / STATE_DIR, write)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning-rate multiplier before optimizer step ``step`` (0-based, global) under ``cfg.lr_schedule``.

    The schedule restarts with each phase; it depends on the step only, so ``--resume`` continues it.
    """
    if cfg.lr_schedule == "constant":
        return 1.0
    start, length = (0, cfg.steps) if step < cfg.steps else (cfg.steps, cfg.lora_steps)
    t = step - start
    warm = max(1, round(0.05 * length))
    if t < warm:
        return (t + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(1, length - warm)))


def train(model: FirstModel, train_examples: Sequence[Example], val_prompts: Sequence[Sequence[int]],
          out_dir: str | os.PathLike, cfg: TrainConfig, resume: bool = False, accelerator=None,
          progress: bool = True, extra_meta: dict | None = None) -> TrainResult:
    """Train routers (and optionally LoRA) on ``train_examples``; write the checkpoint to ``out_dir``.

    ``out_dir`` gets ``routers.safetensors`` + ``router_config.json`` (and ``lora/`` after phase 2;
    ``phase1/`` holds the routers-only checkpoint when phase 2 ran). ``resume=True`` continues from
    ``out_dir/trainer_state``. ``accelerator``: an ``accelerate.Accelerator`` (one is made if None).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cfg.validate()
    if not train_examples:
        raise ValueError("no training examples")
    out = Path(out_dir)
    state_path = out / STATE_DIR / "state.pt"
    if accelerator is None:
        accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    model.routing = RoutingConfig(threshold=cfg.threshold, never_skip=tuple(cfg.never_skip))
    model.protected_layers()
    for p in model.base.parameters():
        p.requires_grad_(False)
    model.base_sha256()  # identify the frozen base weights before any adapter is injected

    start_step, phase, history, rng_state = 0, 1, [], None
    saved = None
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no trainer state in {out / STATE_DIR}")
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        old = saved["config"]
        for key in ("skip_budget", "router_dim", "lora_rank"):
            if old[key] != getattr(cfg, key):
                raise ValueError(f"--resume: checkpoint has {key}={old[key]}, this run {getattr(cfg, key)}")
        model.routers = RouterStack.from_pretrained(out / STATE_DIR / "routers", num_layers=model.num_layers,
                                                    hidden_size=model.config.hidden_size,
                                                    model_sha256=model.base_sha256()).to(model.device)
        start_step, phase, history, rng_state = saved["step"], saved["phase"], saved["history"], saved["rng"]
    elif model.routers is None:
        calib = [e.prompt + e.target for e in train_examples[:16]]
        model.routers = init_routers(model, cfg, calib, list(train_examples[:32]))

    total_steps = cfg.steps + cfg.lora_steps
    rng = random.Random(cfg.seed)
    if rng_state is not None:
        rng.setstate(rng_state["py"])
        torch.set_rng_state(rng_state["torch"])
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    order: list[int] = list(rng_state.get("order", [])) if rng_state is not None else []

    def next_batch() -> dict[str, torch.Tensor]:
        # every process walks the same shuffled order (same seed) and takes its own slice of the global
        # batch: data parallel, --batch-size examples per process and step
        nonlocal order
        idx = []
        while len(idx) < cfg.batch_size * accelerator.num_processes:
            if not order:
                order = list(range(len(train_examples)))
                rng.shuffle(order)
            idx.append(order.pop())
        rank = accelerator.process_index
        b = collate([train_examples[i] for i in idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]], pad_id)
        return {k: v.to(accelerator.device) for k, v in b.items()}

    core = model  # the FirstModel; ``wrapped`` is what accelerate prepared (DDP under several processes)

    def make_optimizer(ph: int) -> torch.optim.Optimizer:
        groups = [{"params": list(core.routers.parameters()), "lr": cfg.lr}]
        if ph == 2:
            lora = [p for n, p in core.base.named_parameters() if "lora_" in n]
            groups.append({"params": lora, "lr": cfg.lora_lr})
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    def enter_phase2() -> None:
        if getattr(core, "_lora", None) is None:
            add_lora(core, cfg.lora_rank, cfg.lora_alpha)

    if phase == 2 or (start_step >= cfg.steps and cfg.lora_steps > 0):
        phase = 2
        enter_phase2()
        if resume and (out / STATE_DIR / LORA_DIR).is_dir():
            _load_lora_weights(core, out / STATE_DIR / LORA_DIR)
    core.routers.to(accelerator.device)
    optimizer = make_optimizer(phase)
    if saved is not None and saved["phase"] == phase:
        optimizer.load_state_dict(saved["optimizer"])
    wrapped, optimizer = accelerator.prepare(core, optimizer)
    core.train()

    t0 = time.time()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"first-train skip={cfg.skip_budget}",
               disable=not progress or not accelerator.is_local_main_process)
    step = start_step
    while step < total_steps:
        if step == cfg.steps and phase == 1:
            if accelerator.is_main_process:
                core.eval()
                _finish(core, out / "phase1", cfg, val_prompts, {"phase": 1, "steps": step,
                                                                 "train_examples": len(train_examples)},
                        lora=False)
                core.train()
            if accelerator.num_processes > 1:  # phase 2 runs at the threshold the main process calibrated
                from accelerate.utils import broadcast_object_list

                core.routing = broadcast_object_list([core.routing])[0]
            phase = 2
            enter_phase2()  # new (LoRA) parameters: wrap again so that DDP synchronises them too
            wrapped, optimizer = accelerator.prepare(accelerator.unwrap_model(wrapped), make_optimizer(2))
            core.train()
        batch = next_batch()
        factor = lr_factor(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
        loss, parts = training_loss(core, batch, cfg, wrapped=wrapped)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        parts.update(step=step, phase=phase, lr_factor=factor)
        history.append(parts)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            bar.set_postfix(ce=f"{parts['ce']:.3f}", kd=f"{parts.get('kd', 0.0):.3f}", skip=f"{parts['skip']:.3f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps and accelerator.is_main_process:
            _save_state(out, core, optimizer, step, phase, history, cfg,
                        {"py": rng.getstate(), "torch": torch.get_rng_state(), "order": list(order)})
    bar.close()
    core.eval()

    result = TrainResult(out_dir=str(out), steps_done=step, history=history, threshold=cfg.threshold)
    if accelerator.is_main_process:
        meta = {"phase": phase, "steps": step, "train_examples": len(train_examples),
                "processes": accelerator.num_processes,
                "final_train": history[-1] if history else None, **(extra_meta or {})}
        result.threshold, result.val_skip_ratio = _finish(core, out, cfg, val_prompts, meta, lora=phase == 2)
        (out / "train_log.json").write_text(json.dumps(history, indent=1))
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    result.seconds = time.time() - t0
    return result


def _finish(model: FirstModel, directory: Path, cfg: TrainConfig, val_prompts: Sequence[Sequence[int]],
            meta: dict, lora: bool) -> tuple[float, float | None]:
    """Calibrate the threshold on held-out prompts, then write the checkpoint; returns (threshold, skip)."""
    threshold, val_skip, usage = cfg.threshold, None, None
    if val_prompts:
        if cfg.calibrate and cfg.skip_budget > 0:
            threshold, val_skip = calibrate_threshold(model, val_prompts, cfg.skip_budget, start=cfg.threshold)
        else:
            val_skip = measure_skip(model, val_prompts, threshold=threshold)[0]
        usage = measure_skip(model, val_prompts, threshold=threshold)[1]
    model.routing = RoutingConfig(threshold=threshold, never_skip=tuple(cfg.never_skip))
    final_cfg = TrainConfig(**{**asdict(cfg), "threshold": threshold})
    meta = {**meta, "val_skip_ratio": val_skip, "val_layer_usage": usage, "val_prompts": len(val_prompts),
            "hyperparameters": {k: v for k, v in asdict(cfg).items() if k != "threshold"}}
    _write_checkpoint(model, directory, final_cfg, meta, lora=lora)
    return threshold, val_skip


def _load_lora_weights(model: FirstModel, directory: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from firstkit.training.lora import LORA_WEIGHTS, unwrapped

    state = load_file(str(directory / LORA_WEIGHTS))
    dtype = next(model.base.parameters()).dtype
    with unwrapped(model) as base:
        set_peft_model_state_dict(base, {k: v.to(dtype) for k, v in state.items()})


def _write_checkpoint(model: FirstModel, directory: Path, cfg: TrainConfig, extra: dict, lora: bool) -> None:
    """Routers (+ LoRA adapter) in ``save_pretrained`` layout, written atomically."""
    model.routers.meta = _meta(model, cfg, {**extra, "lora": lora})

    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-tmp-", dir=directory))
    try:
        model.routers.save_pretrained(tmp)
        if lora:
            save_lora(model, tmp / LORA_DIR)
        elif (directory / LORA_DIR).exists():
            shutil.rmtree(directory / LORA_DIR)  # a stale adapter must not pair with new routers
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name != LORA_DIR):  # adapter first, config last
            target = directory / entry.name
            if entry.is_dir() and target.exists():
                _atomic_dir(target, lambda d, src=entry: shutil.copytree(src, d, dirs_exist_ok=True))
            else:
                os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert (directory / ROUTER_CONFIG).is_file()
