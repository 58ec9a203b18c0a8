"""lm-eval task configs for firstkit's offline data: local JSONL files, never a hub.

Every named ``first-eval`` task (and a user's JSONL file) becomes one lm-eval task ``firstkit_<name>``
that reads a normalised JSONL file with ``dataset_path: json`` + ``dataset_kwargs.data_files``:

* mc: fields ``query``, ``choices``, ``gold``; ``multiple_choice``; acc, acc_norm (lm-eval).
* perplexity: field ``page``; ``loglikelihood_rolling``; word / byte perplexity, bits per byte (lm-eval's
  ``wikitext`` task functions).
* generation: fields ``prompt``, ``references``; ``generate_until``; ROUGE-L (rouge-score), EM / F1 (the
  SQuAD v1.1 script as shipped in lm-eval), chrF / BLEU (lm-eval's sacreBLEU aggregations).

WikiText-2 documents are de-tokenised with lm-eval's own ``wikitext_detokenizer`` (as its ``wikitext``
task). ``python -m firstkit.evaluation.lm_eval_tasks --out DIR`` writes ``DIR/<task>.yaml`` and
``DIR/data/*.jsonl``; run them with ``lm_eval --model firstkit --tasks DIR/<task>.yaml`` (set
``HF_DATASETS_OFFLINE=1``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from firstkit.evaluation import lm_eval_model  # noqa: F401  (registers the `firstkit` lm-eval model on import)
from firstkit.evaluation.tasks import TASKS, Task, task_from_file

__all__ = ["PREFIX", "GENERATION_METRICS", "task_name", "write_jsonl", "task_config", "prepare", "write_yaml",
           "check_docs", "process_rouge", "process_squad", "process_translation", "rouge_l", "squad_em",
           "squad_f1", "doc_to_text_wikitext", "process_perplexity"]

PREFIX = "firstkit_"
_FN = "firstkit.evaluation.lm_eval_tasks."
#: stop strings and metric family per named generation task (generic files: ROUGE-L, end of sequence only)
_GENERATION = {"xsum": (["\n\n"], "rouge"), "squad": (["\n"], "squad"), "wmt22_de_en": (["\n\n"], "translation"),
               "self_instruct": ([], "rouge")}
GENERATION_METRICS = {"rouge": ["rougeL"], "squad": ["f1", "em"], "translation": ["chrf", "bleu"]}


def task_name(task: Task) -> str:
    return PREFIX + task.name


# ---------------------------------------------------------------------------------------------- metrics
_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``rouge-score`` (Porter stemmer, as lm-eval's summarisation tasks)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def squad_em(prediction: str, references: Sequence[str]) -> float:
    """SQuAD v1.1 exact match (the official normalisation, as shipped in lm-eval), max over references."""
    from lm_eval.tasks.qasper.metrics import normalize_answer

    return float(max(normalize_answer(prediction) == normalize_answer(r) for r in references))


def squad_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD v1.1 token F1 (official script, as shipped in lm-eval), max over references."""
    from lm_eval.tasks.qasper.metrics import f1_abstractive, normalize_answer

    def one(ref: str) -> float:
        p, r = normalize_answer(prediction).split(), normalize_answer(ref).split()
        if not p or not r:  # the official script: F1 = 1 iff both are empty
            return float(p == r)
        return float(f1_abstractive([prediction], [ref]))

    return max(one(r) for r in references)


def process_rouge(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    pred = results[0].strip()
    return {"rougeL": max(rouge_l(pred, r) for r in doc["references"])}


def process_squad(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    pred = results[0].strip()
    return {"f1": squad_f1(pred, doc["references"]), "em": squad_em(pred, doc["references"])}


def process_translation(doc: dict[str, Any], results: list[str]) -> dict[str, tuple[str, str]]:
    """Pass-through items; lm-eval's ``chrf`` / ``bleu`` aggregations score the corpus with sacreBLEU."""
    item = (doc["references"][0], results[0].strip())
    return {"chrf": item, "bleu": item}


def doc_to_text_wikitext(doc: dict[str, Any]) -> str:
    """lm-eval's WikiText de-tokeniser (its ``wikitext`` task's ``doc_to_target``)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer(doc)


def process_perplexity(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """lm-eval's ``wikitext`` results: (log-likelihood, words / bytes of the original document)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return process_results(doc, results)


def check_docs(dataset: Any) -> Any:
    """``process_docs`` of every firstkit task: validate the records (clear errors for a user's file)."""
    cols = set(dataset.column_names)
    if {"query", "choices", "gold"} <= cols:
        for i, r in enumerate(dataset):
            if not isinstance(r["choices"], list) or len(r["choices"]) < 2:
                raise ValueError(f"record {i + 1}: 'choices' must be a list of at least 2 strings")
            if not isinstance(r["gold"], int) or not 0 <= r["gold"] < len(r["choices"]):
                raise ValueError(f"record {i + 1}: 'gold' must be a 0-based index into 'choices'")
    elif "page" in cols:
        for i, r in enumerate(dataset):
            if not isinstance(r["page"], str) or not r["page"].strip():
                raise ValueError(f"record {i + 1}: 'page' must be a non-empty string")
    elif {"prompt", "references"} <= cols:
        for i, r in enumerate(dataset):
            if not isinstance(r["references"], list) or not r["references"]:
                raise ValueError(f"record {i + 1}: 'references' must be a non-empty list of strings")
    else:
        raise ValueError("records must have query/choices/gold (mc), page (perplexity) or prompt/references "
                         f"(generation); got fields {sorted(cols)}")
    return dataset


# ---------------------------------------------------------------------------------------------- data + configs
def _docs(task: Task, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if task.kind == "mc":
        return [{"id": str(r.get("id", i)), "query": r["query"], "choices": list(r["choices"]), "gold": int(r["gold"])}
                for i, r in enumerate(records)]
    if task.kind == "perplexity":
        return [{"id": str(r.get("id", i)), "page": r["text"]} for i, r in enumerate(records)]
    return [{"id": str(r.get("id", i)), "prompt": r["prompt"], "references": list(r["references"])}
            for i, r in enumerate(records)]


def write_jsonl(docs: list[dict[str, Any]], folder: str | Path, stem: str) -> Path:
    """``folder/<stem>-<sha256[:12]>.jsonl`` (content-addressed: rewriting is a no-op, datasets' cache holds)."""
    text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = Path(folder) / f"{stem}-{digest}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path.resolve()


def task_config(task: Task, data_file: str | Path, functions: bool = True) -> dict[str, Any]:
    """The lm-eval task config (a dict, as its YAML loader returns) of ``task`` reading ``data_file``.

    ``functions=False`` leaves ``!function`` references as ``"module.function"`` strings (for YAML).
    """

    def fn(name: str) -> Any:
        return globals()[name] if functions else _FN + name

    cfg: dict[str, Any] = {
        "task": task_name(task),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "process_docs": fn("check_docs"),
        "metadata": {"version": 1.0, "firstkit_kind": task.kind, "description": task.description},
    }
    if task.kind == "mc":
        cfg |= {"output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
                "doc_to_target": "gold", "target_delimiter": " ",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
    elif task.kind == "perplexity":
        cfg |= {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                "doc_to_target": fn("doc_to_text_wikitext") if task.name == "wikitext2" else "page",
                "process_results": fn("process_perplexity"),
                "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False}
                                for m, agg in (("word_perplexity", "weighted_perplexity"),
                                               ("byte_perplexity", "weighted_perplexity"),
                                               ("bits_per_byte", "bits_per_byte"))]}
    else:
        until, family = _GENERATION.get(task.name, ([], "rouge"))
        aggregation = {"chrf": "chrf", "bleu": "bleu"}
        cfg |= {"output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "references",
                "generation_kwargs": {"until": list(until), "max_gen_toks": task.max_new_tokens, "do_sample": False},
                "process_results": fn("process_" + family),
                "metric_list": [{"metric": m, "aggregation": aggregation.get(m, "mean"), "higher_is_better": True}
                                for m in GENERATION_METRICS[family]]}
    return cfg


def prepare(task: Task, split: str | None, data_dir: str | Path | None, folder: str | Path,
            functions: bool = True) -> dict[str, Any]:
    """Write ``task``'s records of ``split`` (None = every record) as JSONL under ``folder``; its config."""
    docs = _docs(task, task.records(split, data_dir))
    if not docs:
        raise ValueError(f"task {task.name}: no records in split {split}")
    return task_config(task, write_jsonl(docs, folder, f"{task.name}_{split or 'all'}"), functions)


def cache_folder() -> Path:
    """Where ``first-eval`` keeps its normalised JSONL files (``$FIRSTKIT_CACHE/lm_eval_data``)."""
    root = Path(os.environ.get("FIRSTKIT_CACHE", Path.home() / ".cache" / "firstkit"))
    return root / "lm_eval_data"


def write_yaml(cfg: dict[str, Any], path: str | Path) -> Path:
    """Write a config from ``task_config(..., functions=False)`` as lm-eval YAML (``!function`` tags)."""
    import yaml

    fn_keys = [k for k, v in cfg.items() if isinstance(v, str) and v.startswith(_FN)]
    plain = {k: v for k, v in cfg.items() if k not in fn_keys}
    text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
    text += "".join(f"{k}: !function {cfg[k]}\n" for k in fn_keys)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _cli() -> None:
    import click

    @click.command()
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                  help="Folder for <task>.yaml and data/*.jsonl.")
    @click.option("--task", "names", default=",".join(TASKS), show_default=True, help="Comma-separated tasks.")
    @click.option("--split", type=click.Choice(["test", "val", "all"]), default="test", show_default=True)
    @click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None)
    @click.option("--task-file", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="Also a task from your own JSONL file (schema: docs/evaluation.md).")
    @click.option("--task-type", type=click.Choice(["mc", "perplexity", "generation"]), default=None)
    def main(out_dir: str, names: str, split: str, data_dir: str | None, task_file: str | None,
             task_type: str | None) -> None:
        """Write lm-eval task configs (YAML) + local JSONL data for firstkit's tasks."""
        out = Path(out_dir)
        tasks = [(TASKS[n.strip()], None if split == "all" else split) for n in names.split(",") if n.strip()]
        if task_file:
            if not task_type:
                raise click.UsageError("--task-file needs --task-type")
            tasks.append((task_from_file(task_file, task_type), None))
        for task, sp in tasks:
            cfg = prepare(task, sp, data_dir, out / "data", functions=False)
            click.echo(write_yaml(cfg, out / f"{task.name}.yaml"))

    main()


if __name__ == "__main__":  # pragma: no cover
    _cli()
