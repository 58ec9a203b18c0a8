"""Task definitions: how each data set becomes prompts, targets and a metric.

Three task types (also usable with a user's own JSONL file, see docs/results_quality.md):

* ``mc`` -- multiple choice by log-likelihood: records ``{"query", "choices", "gold"}``; the model
  scores ``query + " " + choice`` and picks the choice with the highest summed log-probability of
  its tokens. Metric: accuracy.
* ``perplexity`` -- records ``{"text"}``; the text is cut into windows; metric: perplexity.
* ``generation`` -- records ``{"prompt", "references": [str, ...]}`` (or ``"reference"``); greedy
  generation; metric per task (ROUGE-L, EM/F1, chrF). Generic files use ROUGE-L.

``Task.train_pairs`` turns training-split records into (prompt, target) text pairs for
``first-train``: the loss is computed on the target tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firstkit.evaluation import metrics
from firstkit.evaluation.data import load_dataset, read_jsonl

__all__ = ["Task", "TASKS", "TASK_TYPES", "get_task", "task_from_file", "truncate_words"]

TASK_TYPES = ("mc", "perplexity", "generation")


def truncate_words(text: str, max_words: int) -> str:
    """First ``max_words`` whitespace-separated words of ``text``."""
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


@dataclass
class Task:
    """One evaluation task.

    ``records(split, data_dir)`` returns normalised records: mc -> {id, query, choices, gold};
    perplexity -> {id, text}; generation -> {id, prompt, references}.
    """

    name: str
    kind: str
    metric: str
    records_fn: Callable[[str | None, str | Path | None], list[dict[str, Any]]]
    max_new_tokens: int = 32
    chat: bool = True  # generation prompts go through the tokenizer's chat template when it has one
    description: str = ""
    extra_metrics: tuple[str, ...] = field(default_factory=tuple)

    def records(self, split: str | None = "test", data_dir: str | Path | None = None) -> list[dict[str, Any]]:
        return self.records_fn(split, data_dir)

    def train_pairs(self, split: str = "train",
                    data_dir: str | Path | None = None) -> list[tuple[str, str, bool]]:
        """(prompt, target, use_chat_template) text pairs for router training."""
        pairs = []
        for r in self.records(split, data_dir):
            if self.kind == "mc":
                pairs.append((r["query"], " " + r["choices"][r["gold"]], False))
            elif self.kind == "generation":
                pairs.append((r["prompt"], r["references"][0], self.chat))
            else:
                words = r["text"].split()
                # continuation: first 48 words as prompt, the next 64 words as target, per chunk
                for start in range(0, max(1, len(words) - 112), 112):
                    chunk = words[start : start + 112]
                    if len(chunk) < 64:
                        break
                    pairs.append((" ".join(chunk[:48]), " " + " ".join(chunk[48:]), False))
        return pairs

    def score_generation(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        """Metric(s) of a generation task; the first key is the task's main metric."""
        if self.metric == "rougeL":
            vals = [max(metrics.rouge_l(p, r) for r in refs) for p, refs in zip(predictions, references,
                                                                                  strict=True)]
            return {"rougeL": sum(vals) / max(1, len(vals))}
        if self.metric in ("f1", "em"):
            em, f1 = metrics.squad_em_f1(predictions, references)
            return {"f1": f1, "em": em} if self.metric == "f1" else {"em": em, "f1": f1}
        if self.metric == "chrf":
            return {"chrf": metrics.chrf(predictions, [r[0] for r in references])}
        raise ValueError(f"task {self.name}: unknown generation metric {self.metric!r}")


def _mc(dataset: str) -> Callable[[str | None, str | Path | None], list[dict[str, Any]]]:
    def fn(split, data_dir):
        return [{"id": r["id"], "query": r["query"], "choices": r["choices"], "gold": r["gold"]}
                for r in load_dataset(dataset, split, data_dir)]
    return fn


def _boolq(split, data_dir):
    out = []
    for r in load_dataset("boolq", split, data_dir):
        q = r["question"].strip()
        q = q[0].upper() + q[1:] if q else q
        passage = truncate_words(r["passage"], 160)
        out.append({"id": r["id"], "query": f"{passage}\nQuestion: {q}?\nAnswer:", "choices": ["no", "yes"],
                    "gold": int(r["answer"])})
    return out


def _squad(split, data_dir):
    out = []
    for r in load_dataset("squad", split, data_dir):
        ctx = truncate_words(r["context"], 160)
        prompt = (f"{ctx}\n\nAnswer the question with a short phrase copied from the text above.\n"
                  f"Question: {r['question'].strip()}")
        out.append({"id": r["id"], "prompt": prompt, "references": r["answers"]})
    return out


def _xsum(split, data_dir):
    out = []
    for r in load_dataset("xsum", split, data_dir):
        doc = truncate_words(r["document"], 160)
        out.append({"id": r["id"], "prompt": f"Summarize the following article in one sentence.\n\n{doc}",
                    "references": [r["summary"]]})
    return out


def _wmt(split, data_dir):
    out = []
    for r in load_dataset("wmt22_de_en", split, data_dir):
        if len(r["source"].split()) > 60:
            continue
        prompt = f"Translate the following German text to English.\n\n{r['source']}"
        out.append({"id": r["id"], "prompt": prompt, "references": [r["reference"]]})
    return out


def _self_instruct(split, data_dir):
    out = []
    for r in load_dataset("self_instruct", split, data_dir):
        prompt = r["instruction"].strip()
        if r["input"].strip():
            prompt += "\n\n" + truncate_words(r["input"].strip(), 120)
        if not r["output"].strip():
            continue
        out.append({"id": r["id"], "prompt": prompt, "references": [r["output"].strip()]})
    return out


def _wikitext(split, data_dir):
    return [{"id": r["id"], "text": r["text"]} for r in load_dataset("wikitext2", split, data_dir)]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("wikitext2", "perplexity", "perplexity", _wikitext, description="WikiText-2 perplexity"),
        Task("xsum", "generation", "rougeL", _xsum, max_new_tokens=40, description="XSum summarization"),
        Task("squad", "generation", "f1", _squad, max_new_tokens=16, description="SQuAD v1.1 extractive QA",
             extra_metrics=("em",)),
        Task("boolq", "mc", "accuracy", _boolq, description="BoolQ yes/no QA"),
        Task("arc_easy", "mc", "accuracy", _mc("arc_easy"), description="ARC-Easy"),
        Task("commonsense_qa", "mc", "accuracy", _mc("commonsense_qa"), description="CommonsenseQA"),
        Task("mmlu", "mc", "accuracy", _mc("mmlu"), description="MMLU (50 per subject)"),
        Task("copa", "mc", "accuracy", _mc("copa"), description="COPA"),
        Task("wmt22_de_en", "generation", "chrf", _wmt, max_new_tokens=48,
             description="WMT22 de-en translation"),
        Task("self_instruct", "generation", "rougeL", _self_instruct, max_new_tokens=48,
             description="Self-instruct instructions (ROUGE-L vs the human output)"),
    ]
}


def get_task(name: str) -> Task:
    """A named task; KeyError with the known names otherwise."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def _validate_record(kind: str, r: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(r, dict):
        raise ValueError(f"{where}: record is not a JSON object")
    if kind == "mc":
        for k in ("query", "choices", "gold"):
            if k not in r:
                raise ValueError(f"{where}: mc record lacks {k!r} (schema: query, choices, gold)")
        if not isinstance(r["choices"], list) or len(r["choices"]) < 2:
            raise ValueError(f"{where}: 'choices' must be a list of at least 2 strings")
        if not isinstance(r["gold"], int) or not 0 <= r["gold"] < len(r["choices"]):
            raise ValueError(f"{where}: 'gold' must be a 0-based index into 'choices'")
        return {"query": str(r["query"]), "choices": [str(c) for c in r["choices"]], "gold": r["gold"]}
    if kind == "perplexity":
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise ValueError(f"{where}: perplexity record needs a non-empty 'text'")
        return {"text": r["text"]}
    if not isinstance(r.get("prompt"), str):
        raise ValueError(f"{where}: generation record needs 'prompt' (and 'references' or 'reference')")
    refs = r.get("references", r.get("reference"))
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not refs:
        raise ValueError(f"{where}: generation record needs 'references' (list) or 'reference' (str)")
    return {"prompt": r["prompt"], "references": [str(x) for x in refs]}


def task_from_file(path: str | Path, kind: str, name: str | None = None, max_new_tokens: int = 32) -> Task:
    """A task from a user's JSONL file (every record is used: no split)."""
    if kind not in TASK_TYPES:
        raise ValueError(f"unknown task type {kind!r}; use one of {', '.join(TASK_TYPES)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    recs = []
    for i, r in enumerate(read_jsonl(path)):
        rec = _validate_record(kind, r, f"{path} record {i + 1}")
        rec["id"] = str(r.get("id", i)) if isinstance(r, dict) else str(i)
        recs.append(rec)
    if not recs:
        raise ValueError(f"task file {path} has no records")
    metric = {"mc": "accuracy", "perplexity": "perplexity", "generation": "rougeL"}[kind]
    return Task(name or path.stem, kind, metric, lambda split, data_dir: list(recs),
                max_new_tokens=max_new_tokens, description=f"user task file {path.name}")
