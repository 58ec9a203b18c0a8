"""Metrics, splits and task definitions on hand-made examples with known answers."""

import json
import math

import pytest

from firstkit.evaluation import metrics
from firstkit.evaluation.data import load_dataset, read_jsonl, split_of
from firstkit.evaluation.tasks import TASKS, task_from_file


def test_rouge_l_known_values():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" (5 of 6 each)
    assert metrics.rouge_l("the cat sat on the mat", "The cat is on the mat.") == pytest.approx(5 / 6)
    assert metrics.rouge_l("a b c", "a b c") == 1.0
    assert metrics.rouge_l("x y", "a b") == 0.0
    # LCS 2 of pred 2, ref 4 -> P=1, R=0.5 -> F=2/3
    assert metrics.rouge_l("police said", "police officers said today") == pytest.approx(2 / 3)
    assert metrics.rouge_l("", "anything") == 0.0


def test_squad_em_f1_known_values():
    assert metrics.exact_match("The Denver Broncos!", ["Denver Broncos"]) == 1.0
    assert metrics.exact_match("Broncos", ["Denver Broncos"]) == 0.0
    assert metrics.token_f1("Denver", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert metrics.token_f1("Denver", ["Carolina", "Denver Broncos"]) == pytest.approx(2 / 3)
    em, f1 = metrics.squad_em_f1(["Denver Broncos", "Paris"], [["Denver Broncos"], ["London"]])
    assert em == 0.5 and f1 == 0.5


def test_accuracy_and_perplexity():
    assert metrics.accuracy([0, 1, 2, 3], [0, 1, 0, 0]) == 0.5
    assert metrics.perplexity(4 * math.log(10.0), 4) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)
    with pytest.raises(ValueError):
        metrics.accuracy([1], [1, 2])


def test_chrf_known_values():
    assert metrics.chrf(["the same text"], ["the same text"]) == pytest.approx(1.0)
    assert metrics.chrf(["xyz"], ["abc"]) == 0.0
    # hyp "ab" vs ref "abc", orders 1..2: P = (1 + 1)/2, R = (2/3 + 1/2)/2 = 7/12, F2 = 5PR/(4P+R) = 35/55
    assert metrics.chrf(["ab"], ["abc"], char_order=2) == pytest.approx(35 / 55)
    # whitespace is ignored by chrF
    assert metrics.chrf(["a b c"], ["abc"]) == pytest.approx(1.0)


def test_splits_are_deterministic_and_disjoint():
    assert split_of("copa", "abc") == split_of("copa", "abc")
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(3000):
        counts[split_of("x", str(i))] += 1
    assert 0.55 < counts["train"] / 3000 < 0.65 and 0.25 < counts["test"] / 3000 < 0.35
    train = {e["id"] for e in load_dataset("copa", "train")}
    test = {e["id"] for e in load_dataset("copa", "test")}
    val = {e["id"] for e in load_dataset("copa", "val")}
    assert train and test and not (train & test) and not (train & val) and not (val & test)
    assert len(train | test | val) == len(load_dataset("copa"))


def test_jsonl_split_on_newline_only(tmp_path):
    p = tmp_path / "x.jsonl"
    recs = json.dumps({"text": "a\u2028b"}) + "\n\n" + json.dumps({"text": "c"}) + "\n"
    p.write_text(recs, encoding="utf-8")
    assert [r["text"] for r in read_jsonl(p)] == ["a\u2028b", "c"]


def test_every_named_task_loads_test_records():
    for name, task in TASKS.items():
        recs = task.records("test")
        assert recs, name
        r = recs[0]
        if task.kind == "mc":
            assert 0 <= r["gold"] < len(r["choices"])
        elif task.kind == "generation":
            assert r["prompt"] and r["references"]
        else:
            assert r["text"]
    # training pairs never come from test examples
    test_ids = {r["id"] for r in TASKS["copa"].records("test")}
    train_q = {p for p, _, _ in TASKS["copa"].train_pairs("train")}
    assert not {r["query"] for r in TASKS["copa"].records("test") if r["id"] in test_ids} & train_q


def test_task_file_validation(tmp_path):
    good = tmp_path / "mc.jsonl"
    good.write_text(json.dumps({"query": "2+2=", "choices": ["3", "4"], "gold": 1}) + "\n")
    t = task_from_file(good, "mc")
    assert t.kind == "mc" and t.records()[0]["gold"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "2+2=", "choices": ["3", "4"], "gold": 5}) + "\n")
    with pytest.raises(ValueError, match="gold"):
        task_from_file(bad, "mc")
    with pytest.raises(ValueError, match="task type"):
        task_from_file(good, "nope")
