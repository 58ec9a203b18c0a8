"""Harness internals: matched baselines, router compute, report tables (the adapter: test_lm_eval_adapter)."""

import torch

from firstkit import policies
from firstkit.evaluation.harness import matched_policy, router_compute
from firstkit.testing import tiny_model


def test_matched_policies_skip_k_layers_and_router_compute():
    model = tiny_model("llama", num_layers=8, seed=1)
    calib = [torch.randint(3, 250, (16,))]
    for name in ("static", "uniform", "random", "last-k"):
        pol = matched_policy(name, model, 0.26, calib)
        m = pol.mask(model, torch.tensor([[5, 6, 7]]))
        assert int((~m).sum()) == round(0.26 * 8)  # 2 layers
        assert bool(m[0, 0]) and bool(m[0, -1])  # protected layers run
    assert isinstance(matched_policy("uniform", model, 0.26, calib), policies.StaticPolicy)
    rc = router_compute(model, 100)
    assert rc["router_flops"] == model.routers.flops(100)
    assert 0 < rc["router_percent_of_forward"] < 100


def _rep(systems_scores, lab_usage=None):
    rows = [{"system": s, "task": t, "metric": m, "score": v, "skip_ratio": k, "n": 10}
            for (s, t, m, v, k) in systems_scores]
    return {"model": "m", "results": rows, "main_metric": {"copa": "accuracy", "wikitext2": "perplexity"},
            "layer_usage": lab_usage or {}, "skip_by_task": {}}


def test_markdown_table_relative_to_base_and_merge(tmp_path):
    from firstkit.evaluation.report import markdown_table, merge_reports, plot_quality_vs_skip

    a = _rep([("base", "copa", "accuracy", 0.8, 0.0), ("first", "copa", "accuracy", 0.6, 0.15),
              ("base", "wikitext2", "perplexity", 20.0, 0.0), ("first", "wikitext2", "perplexity", 22.0, 0.1)])
    md = markdown_table(a)
    assert "| copa (accuracy, n=10) | 0.800 / 0% | 0.600 (75%) / 15% |" in md
    assert "22.00 (+10%) / 10%" in md
    b = _rep([("base", "copa", "accuracy", 0.8, 0.0), ("first", "copa", "accuracy", 0.5, 0.25)],
             {"first": {"copa": [1.0, 0.5]}})
    m = merge_reports([a, b], ["15", "25"])
    systems = [r["system"] for r in m["results"] if r["task"] == "copa"]
    assert systems.count("base") == 1 and "first@15" in systems and "first@25" in systems
    assert m["layer_usage"] == {"first@25": {"copa": [1.0, 0.5]}}
    assert plot_quality_vs_skip([a, b], tmp_path / "q.png").stat().st_size > 1000
    # an empty label keeps the names: two runs of the same routers (e.g. mc + generation) become one table
    g = _rep([("base", "xsum", "rougeL", 0.2, 0.0), ("first", "xsum", "rougeL", 0.1, 0.13)])
    m = merge_reports([a, g], ["", ""])
    assert sorted((r["system"], r["task"]) for r in m["results"]) == [
        ("base", "copa"), ("base", "wikitext2"), ("base", "xsum"),
        ("first", "copa"), ("first", "wikitext2"), ("first", "xsum")]
