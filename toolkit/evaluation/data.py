"""Loaders for the shared data sets and deterministic train / validation / test splits.

Every example gets a stable ``id``; its split is a pure function of ``(dataset, id)``:
``h = int(sha256(f"{dataset}/{id}"), 16) % 1000``; ``h < 600`` -> train, ``h < 700`` -> val,
otherwise test (60 / 10 / 30). Ids are upstream ids where they exist, else a sha1 of the example's
text, so duplicated texts always fall in the same split. See docs/splits.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "SPLITS",
    "default_data_dir",
    "split_of",
    "read_jsonl",
    "load_dataset",
    "DATASETS",
]

SPLITS = ("train", "val", "test")
_TRAIN_CUT, _VAL_CUT = 600, 700


def default_data_dir() -> Path:
    """``<repo>/../shared/data`` (the repository is the parent of ``toolkit/``)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def split_of(dataset: str, example_id: str) -> str:
    """Deterministic split ('train' | 'val' | 'test') of one example."""
    h = int(hashlib.sha256(f"{dataset}/{example_id}".encode()).hexdigest(), 16) % 1000
    if h < _TRAIN_CUT:
        return "train"
    if h < _VAL_CUT:
        return "val"
    return "test"


def _text_id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield JSON records of a JSONL file, split on '\\n' only (records may hold U+2028)."""
    text = Path(path).read_text(encoding="utf-8")
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path} (pass --data-dir)")
    return path


_LETTER_OPT = re.compile(r"^\s*([A-Z])\.\s?(.*)$")


def _parse_lettered(options: str) -> list[tuple[str, str]]:
    out = []
    for line in options.split("\n"):
        m = _LETTER_OPT.match(line)
        if m:
            out.append((m.group(1), m.group(2).strip()))
    return out


def _lettered_mc(question: str, options: str, answer: str) -> dict[str, Any]:
    opts = _parse_lettered(options)
    if not opts:
        raise ValueError(f"no lettered options in {options!r}")
    letter = answer.strip()[:1]
    letters = [k for k, _ in opts]
    if letter not in letters:
        raise ValueError(f"answer {answer!r} not among options {letters}")
    return {"query": f"Question: {question.strip()}\nAnswer:", "choices": [v for _, v in opts],
            "gold": letters.index(letter)}


def _load_arc(d: Path) -> list[dict[str, Any]]:
    out = []
    for r in read_jsonl(_need(d / "multiple_choice/arc_easy_test.jsonl")):
        q = r["query"].strip()
        out.append({"id": _text_id(q, *r["choices"]), "query": q + "\nAnswer:",
                    "choices": list(r["choices"]), "gold": int(r["gold"])})
    return out


def _load_copa(d: Path) -> list[dict[str, Any]]:
    return [{"id": _text_id(r["query"], *r["choices"]), "query": r["query"],
             "choices": list(r["choices"]), "gold": int(r["gold"])}
            for r in read_jsonl(_need(d / "multiple_choice/copa_dev.jsonl"))]


def _load_csqa(d: Path) -> list[dict[str, Any]]:
    out = []
    for r in read_jsonl(_need(d / "multiple_choice/commonsense_qa_val.jsonl")):
        ex = _lettered_mc(r["question"], r["options"], r["answer"])
        ex["id"] = _text_id(r["question"], r["options"])
        out.append(ex)
    return out


def _load_mmlu(d: Path) -> list[dict[str, Any]]:
    out = []
    for r in read_jsonl(_need(d / "multiple_choice/mmlu_test_50_per_subject.jsonl")):
        ex = _lettered_mc(r["question"], r["options"], r["answer"])
        ex["id"] = _text_id(r["question"], r["options"])
        out.append(ex)
    return out


def _load_boolq(d: Path) -> list[dict[str, Any]]:
    out = []
    for r in read_jsonl(_need(d / "qa/boolq_dev.jsonl")):
        ans = str(r["answer"]).strip().lower()
        if ans not in ("true", "false"):
            raise ValueError(f"BoolQ answer {r['answer']!r} is not True/False")
        out.append({"id": _text_id(r["question"], r["passage"]), "question": r["question"],
                    "passage": r["passage"], "title": r.get("title", ""), "answer": ans == "true"})
    return out


def _load_squad(d: Path) -> list[dict[str, Any]]:
    with zipfile.ZipFile(_need(d / "qa/squad_v1.1_dev.json.zip")) as z:
        name = next(n for n in z.namelist() if n.endswith(".json"))
        raw = json.loads(z.read(name))
    out = []
    for art in raw["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                out.append({"id": qa["id"], "context": para["context"], "question": qa["question"],
                            "answers": [a["text"] for a in qa["answers"]]})
    return out


def _load_xsum(d: Path) -> list[dict[str, Any]]:
    return [{"id": str(r["id"]), "document": r["document"], "summary": r["summary"]}
            for r in read_jsonl(_need(d / "summarization/xsum_test_1000.jsonl"))]


def _load_wmt(d: Path) -> list[dict[str, Any]]:
    base = d / "translation/wmt22"
    src = _need(base / "generaltest2022.de-en.src.de").read_text(encoding="utf-8").split("\n")
    ref = _need(base / "generaltest2022.de-en.ref.A.en").read_text(encoding="utf-8").split("\n")
    if src and src[-1] == "":
        src = src[:-1]
    if ref and ref[-1] == "":
        ref = ref[:-1]
    if len(src) != len(ref):
        raise ValueError(f"WMT22 files are not line-aligned ({len(src)} vs {len(ref)} lines)")
    return [{"id": str(i), "source": s.strip(), "reference": r.strip()}
            for i, (s, r) in enumerate(zip(src, ref, strict=True)) if s.strip() and r.strip()]


_WT_TITLE = re.compile(r"^ = ([^=].*[^=]) = $")


def _load_wikitext(d: Path) -> list[dict[str, Any]]:
    """WikiText-2 raw test, one example per article (split at top-level ' = Title = ' lines)."""
    raw = _need(d / "perplexity/wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    lines = raw.replace("\r\n", "\n").split("\n")
    arts: list[dict[str, Any]] = []
    title, buf = None, []
    for line in lines:
        m = _WT_TITLE.match(line)
        if m:
            if title is not None:
                arts.append({"id": title, "text": "\n".join(buf).strip()})
            title, buf = m.group(1).strip(), [line]
        elif title is not None:
            buf.append(line)
    if title is not None:
        arts.append({"id": title, "text": "\n".join(buf).strip()})
    return arts


def _load_self_instruct(d: Path) -> list[dict[str, Any]]:
    out = []
    for fname in ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented_instructions.jsonl"):
        for r in read_jsonl(_need(d / "instruction" / fname)):
            for k, inst in enumerate(r.get("instances", [])):
                out.append({"id": f"{r['id']}/{k}", "instruction": r["instruction"],
                            "input": inst.get("input", ""), "output": inst.get("output", "")})
    return out


def _load_chat_questions(d: Path) -> list[dict[str, Any]]:
    out = []
    for fname, tag in (("mt_bench_questions.jsonl", "mt"), ("vicuna_bench_questions.jsonl", "vicuna")):
        for r in read_jsonl(_need(d / "instruction" / fname)):
            out.append({"id": f"{tag}/{r['question_id']}", "category": r.get("category", ""),
                        "prompt": r["turns"][0]})
    return out


DATASETS = {
    "arc_easy": _load_arc,
    "copa": _load_copa,
    "commonsense_qa": _load_csqa,
    "mmlu": _load_mmlu,
    "boolq": _load_boolq,
    "squad": _load_squad,
    "xsum": _load_xsum,
    "wmt22_de_en": _load_wmt,
    "wikitext2": _load_wikitext,
    "self_instruct": _load_self_instruct,
    "chat_questions": _load_chat_questions,
}


def load_dataset(name: str, split: str | None = None, data_dir: str | Path | None = None
                 ) -> list[dict[str, Any]]:
    """Examples of one data set (optionally one split), in file order."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    exs = DATASETS[name](d)
    if split is None:
        return exs
    return [e for e in exs if split_of(name, e["id"]) == split]
