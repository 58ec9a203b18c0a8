"""``first-train``: train FiRST routers (and optionally LoRA) for a model under a skip budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

DEFAULT_MODEL = "smollm2-135m-instruct"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_source", default=DEFAULT_MODEL, show_default=True,
              help="Named model, Hugging Face folder or .gguf file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (routers.safetensors + router_config.json [+ lora/ + phase1/]).")
@click.option("--skip-budget", type=float, required=True, help="Target fraction of layers skipped, e.g. 0.15.")
@click.option("--steps", type=int, default=100, show_default=True, help="Phase 1 steps (routers only).")
@click.option("--lora-steps", type=int, default=0, show_default=True,
              help="Phase 2 steps (LoRA + routers); 0 = no LoRA.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-len", type=int, default=96, show_default=True, help="Max tokens per example.")
@click.option("--tasks", default=None, help="Comma-separated training tasks (default: the full mixture).")
@click.option("--per-task", type=int, default=200, show_default=True, help="Train examples per task.")
@click.option("--val-prompts", type=click.IntRange(0), default=60, show_default=True,
              help="Held-out (val split) prompts for the skip ratio and threshold calibration (>= 1 unless "
                   "--no-calibrate).")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Data folder (default <repo>/../shared/data).")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Router learning rate.")
@click.option("--lora-lr", type=float, default=5e-4, show_default=True)
@click.option("--lora-rank", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="Per phase: constant, or 5 % linear warm-up then cosine decay to 0.")
@click.option("--lambda-used", type=float, default=0.01, show_default=True,
              help="Weight of the mean fraction of layers used (FiRST penalty).")
@click.option("--budget-weight", type=float, default=20.0, show_default=True,
              help="Weight of (skip ratio - budget)^2.")
@click.option("--distill", type=float, default=1.0, show_default=True,
              help="Weight of the KL to the all-layers base model on every position (0 = answer CE only).")
@click.option("--budget-on", type=click.Choice(["hard", "soft"]), default="hard", show_default=True,
              help="Budget term on the expected (soft) or straight-through (hard) skip ratio.")
@click.option("--router-dim", type=int, default=32, show_default=True)
@click.option("--init-bias", type=float, default=0.3, show_default=True,
              help="Initial router logit (> 0: every layer runs at step 0).")
@click.option("--init-routers", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start from this router checkpoint (e.g. a phase-1 run) instead of fresh routers.")
@click.option("--warm-start", type=click.Choice(["loo", "bi", "none"]), default="bi", show_default=True,
              help="Initial router biases: leave-one-out static mask at the budget (loo), all running and "
                   "ordered by block influence (bi), or all equal (none).")
@click.option("--bias-spread", type=float, default=2.0, show_default=True,
              help="bi warm start: bias range above --init-bias.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Calibrate the threshold on held-out prompts to meet the budget.")
@click.option("--save-every", type=int, default=25, show_default=True, help="Trainer-state interval (steps).")
@click.option("--resume", is_flag=True, help="Continue from OUT/trainer_state.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(model_source: str, out_dir: str, skip_budget: float, steps: int, lora_steps: int, batch_size: int,
         max_len: int, tasks: str | None, per_task: int, val_prompts: int, data_dir: str | None, lr: float,
         lora_lr: float, lora_rank: int, lora_alpha: float, lr_schedule: str, lambda_used: float,
         budget_weight: float, distill: float, budget_on: str,
         router_dim: int,
         init_bias: float, init_routers: str | None, warm_start: str, bias_spread: float, calibrate: bool,
         save_every: int, resume: bool,
         seed: int, threads: int | None,
         as_json: bool, quiet: bool) -> None:
    """Train FiRST routers with the base model frozen; LoRA optional (phase 2).

    Data: train splits of the shared data sets (docs/splits.md); the skip ratio is measured on
    validation-split prompts. Never trains on test splits.
    """
    import torch

    from firstkit.training.data import DEFAULT_TRAIN_TASKS, build_examples
    from firstkit.training.trainer import TrainConfig, train

    if max_len < 16:
        raise click.UsageError("--max-len must be >= 16")
    if val_prompts == 0 and calibrate:
        raise click.UsageError("--val-prompts 0 leaves no held-out prompts to calibrate the threshold on (it would "
                               "silently stay 0.5, missing --skip-budget); give --val-prompts >= 1, or "
                               "--no-calibrate to keep the threshold")
    if val_prompts == 0:
        click.echo("warning: --val-prompts 0: the skip ratio on held-out prompts is not measured", err=True)
    cfg = TrainConfig(skip_budget=skip_budget, steps=steps, lora_steps=lora_steps, batch_size=batch_size, lr=lr,
                      lora_lr=lora_lr, lora_rank=lora_rank, lora_alpha=lora_alpha,
                      lr_schedule=lr_schedule, lambda_used=lambda_used, budget_weight=budget_weight,
                      distill=distill, budget_on=budget_on,
                      router_dim=router_dim, init_bias=init_bias, warm_start=warm_start,
                      bias_spread=bias_spread, calibrate=calibrate, seed=seed,
                      save_every=save_every)
    try:
        cfg.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    task_list = tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks else DEFAULT_TRAIN_TASKS
    from firstkit.evaluation.tasks import TASKS
    unknown = [t for t in task_list if t not in TASKS]
    if unknown:
        raise click.UsageError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    if not resume and (out / "router_config.json").exists():
        raise click.UsageError(f"{out} already holds a checkpoint; choose another --out or pass --resume")
    try:
        from firstkit.routed_model import load_model

        model = load_model(model_source, routers=init_routers)
        if init_routers:  # continue with the checkpoint's calibrated threshold, so training sees its masks
            if "threshold" not in model.routers.meta:
                raise ValueError(f"--init-routers {init_routers}: router_config.json has no threshold")
            cfg.threshold = model.routing.threshold
        if model.tokenizer is None:
            raise click.ClickException(f"model {model_source} has no tokenizer")
        examples = build_examples(model.tokenizer, task_list, "train", per_task, max_len, seed, data_dir)
        per_val = max(1, -(-val_prompts // len(task_list)))
        val = [e.prompt for e in build_examples(model.tokenizer, task_list, "val", per_val, max_len, seed + 1,
                                                data_dir)][:val_prompts] if val_prompts else []
        if calibrate and not val:
            raise ValueError(f"no held-out (val split) prompts for {', '.join(task_list)}: the threshold cannot be "
                             "calibrated; check --data-dir, or pass --no-calibrate")
        res = train(model, examples, val, out, cfg, resume=resume, progress=not quiet,
                    extra_meta={"train_tasks": list(task_list), "max_len": max_len})
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise click.ClickException(str(e)) from None
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch` only the main process reports
        return
    summary = {"out": str(out), "steps": res.steps_done, "threshold": res.threshold,
               "val_skip_ratio": res.val_skip_ratio, "skip_budget": skip_budget, "seconds": round(res.seconds, 1),
               "final": res.history[-1] if res.history else None, "lora": lora_steps > 0}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"wrote {out}: {res.steps_done} steps, threshold {res.threshold:.4f}, "
                   f"held-out skip ratio {res.val_skip_ratio} (budget {skip_budget})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
