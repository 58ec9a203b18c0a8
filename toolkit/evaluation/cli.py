"""``first-eval``: quality of FiRST routers against the base model and skipping baselines."""

from __future__ import annotations

import json
import os
import sys
import time

import click

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SYSTEMS = "base,first,static,uniform,random,last-k"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_source", default=DEFAULT_MODEL, show_default=True,
              help="Named model, Hugging Face folder or .gguf file.")
@click.option("--routers", "routers_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Router checkpoint for 'first' (default model: its shipped routers).")
@click.option("--lora-routers", "lora_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Checkpoint with routers + lora/ adapter for 'first+lora' and 'lora' "
                   "(default: --routers if it holds lora/, else the shipped -lora routers).")
@click.option("--budget", type=float, default=None,
              help="Pick the shipped routers nearest this skip budget (default model, no --routers).")
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="An exported bundle (first-export) for the systems 'bundle' (its routers) and 'bundle-all'.")
@click.option("--task", "task_names", multiple=True, help="Named task (repeatable, or comma-separated).")
@click.option("--task-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Your own JSONL task file (see docs/results_quality.md for the schema).")
@click.option("--task-type", type=click.Choice(["mc", "perplexity", "generation"]), default=None,
              help="Type of --task-file.")
@click.option("--systems", default=DEFAULT_SYSTEMS, show_default=True,
              help="Comma-separated: base, first, first+lora, lora, static, uniform, random, last-k; "
                   "bundle, bundle-all (with --bundle).")
@click.option("--limit", default="10", show_default=True,
              help="Documents per task, or 'all' (the whole split; perplexity: whole articles).")
@click.option("--split", type=click.Choice(["test", "val", "all"]), default="test", show_default=True,
              help="'all': every example of the data file (e.g. the whole WikiText-2 test set; parts of it "
                   "may have trained the routers, see docs/evaluation.md).")
@click.option("--skip-ratio", type=float, default=None,
              help="Skip ratio for static/uniform/random/last-k when 'first' is not evaluated.")
@click.option("--ppl-window", type=int, default=2048, show_default=True,
              help="Perplexity: lm-eval rolling window (tokens) over each whole article.")
@click.option("--ppl-prompt", type=int, default=64, show_default=True,
              help="Perplexity: the first tokens of an article that the routers see (mask frozen for the article).")
@click.option("--max-prompt", type=int, default=384, show_default=True,
              help="Max prompt tokens (left-truncated, as lm-eval truncates to its window).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--bootstrap", "bootstrap_iters", type=int, default=1000, show_default=True,
              help="Bootstrap resamples for corpus-level metrics (chrF, BLEU, perplexity) and their differences.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random baseline and the bootstrap.")
@click.option("--threads", type=int, default=None)
@click.option("--device", default="cpu", show_default=True, help="torch device of the eager models (e.g. cuda).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write results.json, results.md and PNG plots here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(model_source: str, routers_dir: str | None, lora_dir: str | None, budget: float | None,
         bundle_dir: str | None, task_names: tuple[str, ...], task_file: str | None, task_type: str | None,
         systems: str, limit: str, split: str, skip_ratio: float | None, ppl_window: int, ppl_prompt: int,
         max_prompt: int, batch_size: int, bootstrap_iters: int, data_dir: str | None, seed: int,
         threads: int | None, device: str, out_dir: str | None, as_json: bool, quiet: bool) -> None:
    """Evaluate systems on tasks at matched average skip ratio; JSON, Markdown table and plots."""
    from firstkit.evaluation.harness import BUNDLE_SYSTEMS, SYSTEMS
    from firstkit.evaluation.tasks import TASKS, task_from_file

    names = [s.strip() for s in systems.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEMS + BUNDLE_SYSTEMS]
    if bad or not names:
        raise click.UsageError(f"unknown system(s) {', '.join(bad) or '(none)'}; choose from "
                               f"{', '.join(SYSTEMS + BUNDLE_SYSTEMS)}")
    if set(names) & set(BUNDLE_SYSTEMS) and not bundle_dir:
        raise click.UsageError("systems bundle / bundle-all need --bundle DIR")
    wanted = [t.strip() for n in task_names for t in n.split(",") if t.strip()]
    if bool(wanted) == bool(task_file):
        raise click.UsageError("give --task NAME ... or --task-file F --task-type T (exactly one of them)")
    if task_file and not task_type:
        raise click.UsageError("--task-file needs --task-type mc|perplexity|generation")
    n_limit = _parse_limit(limit)
    unknown = [t for t in wanted if t not in TASKS]
    if unknown:
        raise click.UsageError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if skip_ratio is not None and not 0 <= skip_ratio < 1:
        raise click.UsageError("--skip-ratio must be in [0, 1)")
    if min(ppl_window, ppl_prompt, max_prompt, batch_size) < 1 or bootstrap_iters < 0:
        raise click.UsageError("--ppl-window, --ppl-prompt, --max-prompt, --batch-size must be >= 1, --bootstrap >= 0")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval reads local JSONL only: never a hub

    import torch

    from firstkit.evaluation import harness
    from firstkit.routers import default_routers_path
    from firstkit.training.lora import has_lora

    if threads:
        torch.set_num_threads(threads)
    try:
        tasks = [task_from_file(task_file, task_type)] if task_file else [TASKS[t] for t in wanted]
        if routers_dir is None and model_source == DEFAULT_MODEL and ({"first", "first+lora"} & set(names)):
            shipped = default_routers_path(DEFAULT_MODEL, budget)
            routers_dir = str(shipped) if shipped else None
        need_lora = bool({"first+lora", "lora"} & set(names))
        if need_lora and lora_dir is None:
            if routers_dir and has_lora(routers_dir):
                lora_dir = routers_dir
            elif model_source == DEFAULT_MODEL:
                shipped = default_routers_path(DEFAULT_MODEL, budget, lora=True)
                lora_dir = str(shipped) if shipped else None
        if "first" in names and routers_dir is None:
            raise click.UsageError("system 'first' needs --routers (no shipped routers for this model)")
        from firstkit.evaluation.lm_eval_tasks import cache_folder, prepare

        folder = cache_folder()
        configs = {t.name: prepare(t, None if (task_file or split == "all") else split, data_dir, folder)
                   for t in tasks}
        t0 = time.time()
        model, routers, lora_model, lora_routers = harness.load_eval_model(model_source, routers_dir, lora_dir,
                                                                           need_lora, device)
        if model.tokenizer is None:
            raise click.ClickException(f"model {model_source} has no tokenizer")
        systems_map = harness.build_systems(names, model, routers, lora_model, lora_routers, bundle_dir)
        results = harness.run_evaluation(systems_map, tasks, configs, limit=n_limit, skip_ratio=skip_ratio, seed=seed,
                                         progress=not quiet, max_prompt=max_prompt, ppl_window=ppl_window,
                                         ppl_prompt=ppl_prompt, batch_size=batch_size, data_dir=data_dir)
        statistics = harness.compare(results, bootstrap_iters, seed)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
    report = _report(model, routers, model_source, routers_dir, lora_dir, tasks, results, n_limit, split,
                     time.time() - t0, bundle_dir) | statistics
    if out_dir:
        from firstkit.evaluation.report import write_report

        written = write_report(report, out_dir)
        if not as_json:
            click.echo("wrote " + ", ".join(str(p) for p in written))
    if as_json:
        click.echo(json.dumps(report))
    elif not out_dir:
        from firstkit.evaluation.report import markdown_table

        click.echo(markdown_table(report))


def _parse_limit(limit: str) -> int | None:
    """``--limit``: a positive number of documents, or ``all`` (None)."""
    if str(limit).strip().lower() == "all":
        return None
    try:
        n = int(limit)
    except ValueError:
        raise click.UsageError("--limit must be a positive integer or 'all'") from None
    if n < 1:
        raise click.UsageError("--limit must be >= 1 (or 'all')")
    return n


def _report(model, routers, source, routers_dir, lora_dir, tasks, results, limit, split, seconds,
            bundle_dir=None) -> dict:
    from firstkit.evaluation.harness import router_compute

    rows = [row for r in results for row in r.rows()]
    usage: dict[str, dict[str, list[float]]] = {}
    skip_by_task: dict[str, dict[str, float]] = {}
    for r in results:
        usage.setdefault(r.system, {})[r.task] = [round(u, 4) for u in r.layer_usage]
        skip_by_task.setdefault(r.system, {})[r.task] = round(r.skip_ratio, 4)
    prompt_tokens = [r.mean_prompt_tokens for r in results if r.system == "first"] or \
        [r.mean_prompt_tokens for r in results if r.system == "first+lora"] or [128.0]
    mean_prompt = sum(prompt_tokens) / len(prompt_tokens)
    return {
        "model": getattr(model.info, "model_id", str(source)),
        "model_source": str(source),
        "routers": str(routers_dir) if routers_dir else None,
        "lora_routers": str(lora_dir) if lora_dir else None,
        "bundle": str(bundle_dir) if bundle_dir else None,
        "num_layers": model.num_layers,
        "split": split,
        "limit": limit,
        "results": rows,
        "main_metric": {t.name: t.metric for t in tasks},
        "skip_by_task": skip_by_task,
        "layer_usage": usage,
        "router_compute": router_compute(model, mean_prompt, routers),
        "seconds": {r.system + "/" + r.task: round(r.seconds, 1) for r in results} | {"total": round(seconds, 1)},
        "harness": {"lm_eval": _version("lm_eval"), "model": "firstkit (firstkit.evaluation.lm_eval_model.FirstLM)",
                    "tasks": {t.name: "firstkit_" + t.name for t in tasks}},
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
