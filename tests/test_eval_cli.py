"""first-train / first-eval CLIs end to end on a tiny random model saved as a Hugging Face folder."""

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import byte_tokenizer

from firstkit.evaluation.cli import main as eval_main
from firstkit.evaluation.harness import SYSTEMS
from firstkit.testing import tiny_base_model
from firstkit.training.cli import main as train_main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinymodel")
    base = tiny_base_model("llama", num_layers=6, seed=0, vocab_size=260)
    base.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "skip"
    r = CliRunner().invoke(train_main, ["--model", str(tiny_dir), "--out", str(out), "--skip-budget", "0.34",
                                        "--steps", "4", "--lora-steps", "2", "--batch-size", "2",
                                        "--tasks", "copa,boolq", "--per-task", "6", "--val-prompts", "6",
                                        "--max-len", "64", "--lora-rank", "2", "--threads", "1", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["lora"] is True
    return out


def _check_schema(report, systems, tasks):
    assert isinstance(report["model"], str)
    rows = report["results"]
    for row in rows:
        assert set(row) == {"system", "task", "metric", "score", "skip_ratio", "n"}
        assert row["system"] in SYSTEMS
        assert isinstance(row["score"], float) and 0.0 <= row["skip_ratio"] <= 1.0 and row["n"] > 0
    assert {(r["system"], r["task"]) for r in rows} == {(s, t) for s in systems for t in tasks}


def test_train_cli_writes_checkpoint(trained):
    cfg = json.loads((trained / "router_config.json").read_text())
    assert cfg["skip_budget"] == 0.34 and cfg["num_layers"] == 6 and cfg["lora"] is True
    assert (trained / "lora" / "adapter_model.safetensors").is_file()
    assert (trained / "phase1" / "router_config.json").is_file()
    assert not (trained / "trainer_state").exists()


def test_train_cli_heals_with_lora_from_init_routers_frozen(tiny_dir, tmp_path, trained):
    """--init-routers + --steps 0 --lr 0: LoRA trained under the given routers' own masks; routers unchanged."""
    from safetensors.torch import load_file

    start = trained / "phase1"
    out = tmp_path / "heal"
    r = CliRunner().invoke(train_main, ["--model", str(tiny_dir), "--out", str(out), "--skip-budget", "0.34",
                                        "--init-routers", str(start), "--steps", "0", "--lora-steps", "2",
                                        "--lr", "0", "--no-calibrate", "--batch-size", "2", "--tasks", "copa",
                                        "--per-task", "4", "--val-prompts", "4", "--max-len", "64",
                                        "--lora-rank", "2", "--threads", "1", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    before, after = load_file(str(start / "routers.safetensors")), load_file(str(out / "routers.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    cfg = json.loads((out / "router_config.json").read_text())
    assert cfg["threshold"] == json.loads((start / "router_config.json").read_text())["threshold"]
    assert cfg["lora"] is True and (out / "lora" / "adapter_model.safetensors").is_file()


def test_train_cli_under_accelerate_launch_two_processes(tiny_dir, tmp_path):
    """`accelerate launch` (2 CPU processes, gloo DDP) runs first-train unchanged; the main process writes.

    ``--cpu`` makes accelerate start a single process; ``--multi_gpu`` with ACCELERATE_USE_CPU=1 starts two
    processes that accelerate joins as MULTI_CPU (gloo), the same code path as DDP over GPUs.
    """
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "firstkit.training.cli",
           "--model", str(tiny_dir), "--out", str(out), "--skip-budget", "0.34", "--steps", "4", "--lora-steps",
           "2", "--batch-size", "2", "--tasks", "copa,boolq", "--per-task", "6", "--val-prompts", "6",
           "--max-len", "64", "--lora-rank", "2", "--threads", "1", "--quiet", "--json"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["steps"] == 6 and summaries[0]["lora"] is True
    cfg = json.loads((out / "router_config.json").read_text())
    assert cfg["processes"] == 2  # data parallel: each process trained on its own slice of every batch
    assert cfg["num_layers"] == 6 and cfg["lora"] is True and len(json.loads((out / "train_log.json").read_text())) == 6
    assert (out / "lora" / "adapter_model.safetensors").is_file() and not (out / "trainer_state").exists()


def test_train_cli_rejects_bad_input(tiny_dir, tmp_path, trained):
    r = CliRunner().invoke(train_main, ["--model", str(tiny_dir), "--out", str(tmp_path / "x"),
                                        "--skip-budget", "1.5"])
    assert r.exit_code != 0 and "skip-budget" in r.output
    r = CliRunner().invoke(train_main, ["--model", str(tiny_dir), "--out", str(trained), "--skip-budget", "0.2"])
    assert r.exit_code != 0 and "already holds a checkpoint" in r.output
    r = CliRunner().invoke(train_main, ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "y"),
                                        "--skip-budget", "0.2", "--tasks", "copa"])
    assert r.exit_code != 0 and "unknown model" in r.output


def test_eval_cli_json_schema_all_systems(tiny_dir, trained, tmp_path):
    torch.set_num_threads(1)
    systems = list(SYSTEMS)
    r = CliRunner().invoke(eval_main, ["--model", str(tiny_dir), "--routers", str(trained / "phase1"),
                                       "--lora-routers", str(trained), "--task", "copa,squad,wikitext2",
                                       "--systems", ",".join(systems), "--limit", "2", "--ppl-window", "64",
                                       "--json", "--quiet", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    _check_schema(report, systems, ["copa", "squad", "wikitext2"])
    rows = {(x["system"], x["task"], x["metric"]): x for x in report["results"]}
    assert rows[("base", "copa", "accuracy")]["skip_ratio"] == 0.0
    assert rows[("lora", "copa", "accuracy")]["skip_ratio"] == 0.0
    assert ("first", "squad", "em") in rows  # secondary metric reported as its own row
    assert rows[("base", "wikitext2", "perplexity")]["score"] > 1.0
    # matched baselines skip as many layers as `first` did on the task (rounded to whole layers)
    for t in ("copa", "squad", "wikitext2"):
        k = round(rows[("first", t, rows[("first", t, "accuracy")]["metric"] if t == "copa" else
                        ("f1" if t == "squad" else "perplexity"))]["skip_ratio"] * 6)
        for s in ("static", "uniform", "random", "last-k"):
            m = "accuracy" if t == "copa" else ("f1" if t == "squad" else "perplexity")
            assert rows[(s, t, m)]["skip_ratio"] == pytest.approx(k / 6)
    assert report["router_compute"]["router_percent_of_forward"] > 0
    for name in ("results.json", "results.md", "quality_vs_skip.png", "layer_usage.png"):
        assert (tmp_path / "ev" / name).is_file()
    md = (tmp_path / "ev" / "results.md").read_text()
    assert "| copa (accuracy, n=2, chance 0.50) |" in md and "strongest baseline" in md
    # statistics beside the unchanged rows: an interval for every row, paired differences, chance
    ivs = {(x["system"], x["task"], x["metric"]) for x in report["intervals"]}
    assert ivs == set(rows)
    for x in report["intervals"]:
        assert {"value", "stderr", "ci_low", "ci_high", "n", "method"} <= set(x)
    diffs = {(d["system"], d["reference"], d["task"], d["metric"]) for d in report["differences"]}
    for s, t, m in rows:
        if s != "base":
            assert (s, "base", t, m) in diffs
        if s in ("first", "first+lora", "lora"):
            assert (s, "best_baseline", t, m) in diffs
    assert report["chance"]["copa"]["chance"] == 0.5 and report["harness"]["lm_eval"] == "0.4.13"


def test_eval_cli_task_file_and_errors(tiny_dir, trained, tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps({"query": f"{i} plus one is", "choices": [str(i + 1), str(i + 5)],
                                       "gold": 0}) for i in range(3)) + "\n")
    r = CliRunner().invoke(eval_main, ["--model", str(tiny_dir), "--routers", str(trained), "--task-file", str(f),
                                       "--task-type", "mc", "--systems", "base,first,uniform", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    _check_schema(report, ["base", "first", "uniform"], ["mine"])
    assert all(x["n"] == 3 for x in report["results"])
    # bad input: one-line errors, non-zero exit
    bad = CliRunner().invoke(eval_main, ["--model", str(tiny_dir), "--task", "nope"])
    assert bad.exit_code != 0 and "unknown task" in bad.output
    bad = CliRunner().invoke(eval_main, ["--model", str(tiny_dir), "--task", "copa", "--systems", "base,foo"])
    assert bad.exit_code != 0 and "unknown system" in bad.output
    bad = CliRunner().invoke(eval_main, ["--model", str(tiny_dir), "--task-file", str(f)])
    assert bad.exit_code != 0 and "--task-type" in bad.output
    other = tmp_path / "other"
    tiny_base_model("llama", num_layers=6, seed=5, vocab_size=260).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    bad = CliRunner().invoke(eval_main, ["--model", str(other), "--routers", str(trained), "--task", "copa",
                                         "--systems", "first", "--limit", "1"])
    assert bad.exit_code != 0 and "not for this model" in bad.output
