"""Shipped routers for the default model: layout, metadata, default_routers_path."""

import json

import pytest

from firstkit.routers import available_routers, default_routers_path
from firstkit.training.lora import has_lora

MODEL = "smollm2-135m-instruct"


def test_two_budgets_shipped_with_complete_metadata():
    found = available_routers(MODEL)
    assert {0.15, 0.25} <= set(found)
    for budget, path in found.items():
        cfg = json.loads((path / "router_config.json").read_text())
        assert cfg["format"] == "firstkit-routers" and cfg["num_layers"] == 30 and cfg["hidden_size"] == 576
        assert cfg["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and len(cfg["base_model_sha256"]) == 64
        assert cfg["skip_budget"] == budget and 0 < cfg["threshold"] < 1 and cfg["never_skip"] == [0, -1]
        # the held-out skip ratio measured at training time meets the budget within one layer
        assert abs(cfg["val_skip_ratio"] - budget) <= 1 / 30
        assert (path / "routers.safetensors").stat().st_size < 5_000_000
    lora = available_routers(MODEL, lora=True)
    assert set(lora) == set(found) and all(has_lora(p) for p in lora.values())


def test_default_routers_path_selection():
    assert default_routers_path(MODEL).name == "skip15"
    assert default_routers_path(MODEL, 0.25).name == "skip25"
    assert default_routers_path(MODEL, 0.22).name == "skip25"
    assert default_routers_path(MODEL, 0.15, lora=True).name == "skip15-lora"
    assert default_routers_path("no-such-model") is None
    with pytest.raises(ValueError, match="near budget"):
        default_routers_path(MODEL, 0.6)


@pytest.mark.slow
@pytest.mark.realmodel
def test_shipped_routers_load_on_the_default_model_and_meet_budget():
    from firstkit.routed_model import load_model
    from firstkit.training.data import build_examples
    from firstkit.training.trainer import measure_skip

    model = load_model(MODEL, routers=default_routers_path(MODEL, 0.15))
    val = [e.prompt for e in build_examples(model.tokenizer, ("copa", "arc_easy", "boolq"), "val", 8, 96, 1)]
    skip, _ = measure_skip(model, val)
    assert 0.05 < skip < 0.3
