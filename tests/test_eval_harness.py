"""Harness internals: one-pass routed scoring equals decide-then-score; matched baselines; compute."""

import torch

from firstkit import policies
from firstkit.evaluation.harness import System, _scored_forward, matched_policy, router_compute
from firstkit.testing import tiny_model


def test_one_pass_scoring_equals_prompt_prefill_decision():
    torch.set_num_threads(1)
    model = tiny_model("llama", num_layers=6, seed=3)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(6):
        prompt = torch.randint(3, 250, (1, 9), generator=gen)
        conts = torch.randint(3, 250, (3, 4), generator=gen)
        ids = torch.cat([prompt.expand(3, -1), conts], dim=1)
        logits, mask = _scored_forward(System("first", model, None), ids, torch.ones_like(ids), 9)
        decided = model.decide_mask(prompt[0])
        assert mask.tolist() == decided  # routers saw only the prompt
        ref = model.forward(ids, mask=decided).logits
        assert torch.allclose(logits, ref, atol=1e-5)
        seen.add(tuple(decided))
    assert len(seen) > 1  # the random routers really decide per prompt


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
