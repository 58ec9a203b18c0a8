"""first-train on tiny random models: loss falls, skip ratio moves to the budget, checkpoints."""

import json
import random

import pytest
import torch

from firstkit.routed_model import FirstModel
from firstkit.router import RouterCheckpointError, RouterStack
from firstkit.testing import tiny_base_model, tiny_model
from firstkit.training.data import Example, collate
from firstkit.training.lora import apply_lora, has_lora
from firstkit.training.trainer import TrainConfig, lr_factor, measure_skip, train, training_loss


def _examples(n: int = 64, seed: int = 0) -> list[Example]:
    """A learnable toy language: the target repeats the prompt's tokens shifted by one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randrange(6, 12))]
        out.append(Example(prompt, [t + 1 for t in prompt[:6]]))
    return out


def _fresh(num_layers: int = 6) -> FirstModel:
    torch.manual_seed(0)
    return FirstModel(tiny_base_model("llama", num_layers=num_layers, seed=0), None, routers=None)


def test_collate_masks_prompt_and_labels():
    b = collate([Example([5, 6, 7], [8, 9]), Example([4], [3])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert b["prompt_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 3, -100, -100, -100]]


def test_training_lowers_loss_and_meets_budget(tmp_path):
    torch.set_num_threads(1)
    model = _fresh(6)
    data = _examples(64)
    val = [e.prompt for e in _examples(24, seed=1)]
    cfg = TrainConfig(skip_budget=0.34, steps=60, batch_size=8, lr=3e-2, budget_weight=20.0, save_every=0,
                      calibrate=False, lora_steps=0, router_dim=16, warm_start="bi", init_bias=1.0)
    # before training: every layer runs
    model.routers = None
    res = train(model, data, val, tmp_path / "ck", cfg, progress=False)
    hist = res.history
    assert hist[0]["skip"] == pytest.approx(0.0, abs=1e-6)  # routers initialised so that every layer runs
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first - 0.5  # the training loss falls (base frozen, routers learn)
    skip_end = sum(h["skip"] for h in hist[-10:]) / 10
    assert abs(skip_end - 0.34) < 0.2  # moved from 0 toward the budget
    assert res.val_skip_ratio is not None and res.val_skip_ratio > 0.0
    cfgj = json.loads((tmp_path / "ck" / "router_config.json").read_text())
    for key in ("base_model", "base_model_sha256", "num_layers", "skip_budget", "threshold", "never_skip"):
        assert key in cfgj
    assert cfgj["num_layers"] == 6 and cfgj["skip_budget"] == 0.34


def test_threshold_calibration_meets_budget_on_heldout(tmp_path):
    torch.set_num_threads(1)
    model = _fresh(6)
    cfg = TrainConfig(skip_budget=0.34, steps=6, batch_size=4, save_every=0, calibrate=True, router_dim=16)
    val = [e.prompt for e in _examples(32, seed=2)]
    res = train(model, _examples(32), val, tmp_path / "ck", cfg, progress=False)
    # 2 of 6 layers skipped = 0.333 is reachable on the held-out prompts
    assert abs(res.val_skip_ratio - 0.34) < 0.1
    loaded = RouterStack.from_pretrained(tmp_path / "ck", num_layers=6, hidden_size=64,
                                         model_sha256=model.base_sha256())
    model.routers = loaded
    skip, _ = measure_skip(model, val, threshold=loaded.meta["threshold"])
    assert skip == pytest.approx(res.val_skip_ratio)
    # starting from a threshold that already meets the budget: kept as is, one measurement only
    import firstkit.training.trainer as tr
    calls = {"n": 0}
    orig = tr.measure_skip

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)
    tr.measure_skip = counted
    try:
        t, s = tr.calibrate_threshold(model, val, res.val_skip_ratio, start=loaded.meta["threshold"])
    finally:
        tr.measure_skip = orig
    assert (t, s) == (loaded.meta["threshold"], pytest.approx(res.val_skip_ratio)) and calls["n"] == 1


def test_checkpoint_round_trip_and_mismatch_refused(tmp_path):
    model = _fresh(4)
    cfg = TrainConfig(skip_budget=0.25, steps=3, batch_size=2, save_every=0, calibrate=False, router_dim=8)
    train(model, _examples(8), [e.prompt for e in _examples(4, 3)], tmp_path / "ck", cfg, progress=False)
    stack = RouterStack.from_pretrained(tmp_path / "ck", num_layers=4, hidden_size=64,
                                        model_sha256=model.base_sha256())
    for a, b in zip(stack.state_dict().values(), model.routers.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    other = FirstModel(tiny_base_model("llama", num_layers=4, seed=7), None)
    with pytest.raises(RouterCheckpointError, match="not for this model"):
        RouterStack.from_pretrained(tmp_path / "ck", num_layers=4, hidden_size=64,
                                    model_sha256=other.base_sha256())
    with pytest.raises(RouterCheckpointError, match="layer"):
        RouterStack.from_pretrained(tmp_path / "ck", num_layers=6, hidden_size=64)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_continues_from_saved_step(tmp_path, schedule):
    torch.set_num_threads(1)
    cfg = TrainConfig(skip_budget=0.25, steps=6, batch_size=2, save_every=3, calibrate=False, router_dim=8,
                      lr_schedule=schedule)
    data = _examples(16)
    full = train(_fresh(4), data, [], tmp_path / "a", cfg, progress=False)
    # interrupted run: stop after step 3 by training only 3 steps with the same state cadence
    part_cfg = TrainConfig(**{**cfg.__dict__})
    model = _fresh(4)
    import firstkit.training.trainer as tr
    calls = {"n": 0}
    orig = tr.training_loss

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return orig(*a, **k)
    tr.training_loss = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            train(model, data, [], tmp_path / "b", part_cfg, progress=False)
    finally:
        tr.training_loss = orig
    assert (tmp_path / "b" / "trainer_state" / "state.pt").is_file()
    res = train(_fresh(4), data, [], tmp_path / "b", part_cfg, resume=True, progress=False)
    assert res.steps_done == 6 and len(res.history) == 6
    a = RouterStack.from_pretrained(tmp_path / "a")
    b = RouterStack.from_pretrained(tmp_path / "b")
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-5)
    assert [h["ce"] for h in full.history] == pytest.approx([h["ce"] for h in res.history], abs=1e-4)
    assert [h["lr_factor"] for h in full.history] == [h["lr_factor"] for h in res.history]


def test_cosine_schedule_warms_up_decays_and_restarts_per_phase():
    cfg = TrainConfig(steps=40, lora_steps=100, lr_schedule="cosine")
    f = [lr_factor(cfg, s) for s in range(140)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)  # 2 warm-up steps (5 % of 40)
    assert all(a >= b for a, b in zip(f[2:40], f[3:40], strict=False))  # then it only decays
    assert f[39] < 0.01
    assert f[40] == pytest.approx(0.2) and f[44] == pytest.approx(1.0)  # phase 2: 5 warm-up steps again
    assert f[139] < 0.001 and f[92] == pytest.approx(0.5, abs=0.02)  # half-way through the decay
    assert all(lr_factor(TrainConfig(steps=40, lora_steps=100), s) == 1.0 for s in range(140))
    with pytest.raises(ValueError, match="lr-schedule"):
        TrainConfig(lr_schedule="linear").validate()


def test_lora_phase_saves_adapter_that_merges(tmp_path):
    torch.set_num_threads(1)
    model = _fresh(4)
    cfg = TrainConfig(skip_budget=0.25, steps=2, lora_steps=4, batch_size=2, save_every=0, calibrate=False,
                      router_dim=8, lora_rank=4, lora_lr=1e-2)
    data = _examples(8)
    train(model, data, [e.prompt for e in _examples(4, 3)], tmp_path / "ck", cfg, progress=False)
    assert has_lora(tmp_path / "ck") and (tmp_path / "phase1" if False else tmp_path / "ck" / "phase1").is_dir()
    cfgj = json.loads((tmp_path / "ck" / "router_config.json").read_text())
    assert cfgj["lora"] is True
    # the trained (unmerged) model and a fresh base with the adapter merged give the same logits
    ids = torch.tensor([data[0].prompt + data[0].target])
    mask = [True] * 4
    with torch.no_grad():
        ref = model.forward(ids, mask=mask).logits
    fresh = _fresh(4)
    base_logits = fresh.forward(ids, mask=mask).logits.detach()
    apply_lora(fresh, tmp_path / "ck")
    with torch.no_grad():
        merged = fresh.forward(ids, mask=mask).logits
    assert (ref - merged).abs().max() < 1e-4, (ref - merged).abs().max()
    assert not torch.allclose(base_logits, merged, atol=1e-4)  # LoRA changed the model
    assert not any("lora_" in n for n, _ in fresh.base.named_parameters())  # merged away


def test_training_loss_parts_on_tiny_model():
    model = tiny_model("llama", num_layers=4)
    batch = collate(_examples(2), pad_id=0)
    loss, parts = training_loss(model, batch, TrainConfig(skip_budget=0.25))
    loss.backward()
    grads = [p.grad for p in model.routers.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert parts["loss"] >= parts["ce"] - 1e-6
    assert 0.0 <= parts["skip"] <= 0.5


def test_loo_warm_start_begins_at_budget_with_least_important_layers():
    from firstkit.training.trainer import init_routers, leave_one_out_importance

    torch.set_num_threads(1)
    model = _fresh(6)
    data = _examples(16)
    imp = leave_one_out_importance(model, data)
    assert imp[0] == float("inf") and imp[5] == float("inf")  # protected layers
    cfg = TrainConfig(skip_budget=0.34, router_dim=8, warm_start="loo")
    model.routers = init_routers(model, cfg, None, data)
    skip, usage = measure_skip(model, [e.prompt for e in data])
    assert skip == pytest.approx(2 / 6)  # round(0.34 * 6) = 2 layers skipped from step 0
    skipped = sorted(i for i, u in enumerate(usage) if u < 0.5)
    assert skipped == sorted(sorted(range(1, 5), key=lambda i: imp[i])[:2])


def test_distillation_teacher_is_the_all_layers_base_without_lora():
    from firstkit.training.lora import adapters_disabled, add_lora
    from firstkit.training.trainer import distill_loss, teacher_logits

    torch.manual_seed(0)
    model = _fresh(4)
    model.routers = RouterStack(4, model.config.hidden_size, router_dim=8)
    batch = collate(_examples(3), pad_id=0)
    plain = model.forward(batch["input_ids"], attention_mask=batch["attention_mask"], mask=[True] * 4).logits
    add_lora(model, rank=4)
    for n, p in model.base.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # make the adapter change the output
    with_lora = model.forward(batch["input_ids"], attention_mask=batch["attention_mask"], mask=[True] * 4).logits
    assert (with_lora - plain).abs().max() > 1e-3
    teacher = teacher_logits(model, batch)
    torch.testing.assert_close(teacher, plain.float(), atol=1e-5, rtol=1e-5)
    # adapters are back on (and trainable) after the teacher pass
    again = model.forward(batch["input_ids"], attention_mask=batch["attention_mask"], mask=[True] * 4).logits
    torch.testing.assert_close(again, with_lora)
    assert all(p.requires_grad for n, p in model.base.named_parameters() if "lora_" in n)
    with adapters_disabled(model):
        assert distill_loss(model.forward(batch["input_ids"], attention_mask=batch["attention_mask"],
                                          mask=[True] * 4).logits, teacher, batch["attention_mask"]) < 1e-6
    assert distill_loss(with_lora, teacher, batch["attention_mask"]) > 1e-3


def test_distill_and_soft_budget_parts_in_the_loss():
    model = _fresh(6)
    model.routers = RouterStack(6, model.config.hidden_size, router_dim=8, init_bias=0.0)
    batch = collate(_examples(4), pad_id=0)
    cfg = TrainConfig(skip_budget=0.3, distill=1.0, budget_on="soft")
    loss, parts = training_loss(model, batch, cfg)
    assert {"ce", "kd", "skip", "expected_skip", "used", "loss"} <= set(parts)
    # bias 0 and tiny weights: every routable layer has p ~= 0.5, so the expected skip is ~ 4 * 0.5 / 6
    assert parts["expected_skip"] == pytest.approx(4 * 0.5 / 6, abs=0.05)
    loss.backward()
    assert model.routers.routers[1].out.bias.grad is not None
    cfg_ce = TrainConfig(skip_budget=0.3, distill=0.0)
    _, parts_ce = training_loss(model, batch, cfg_ce)
    assert "kd" not in parts_ce
    with pytest.raises(ValueError, match="budget-on"):
        TrainConfig(budget_on="sometimes").validate()
