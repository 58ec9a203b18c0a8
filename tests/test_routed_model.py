"""The router-augmented model: equivalence with the base model, real skipping, frozen masks, batches."""

from __future__ import annotations

import pytest
import torch

from firstkit.routed_model import FirstModel, RoutedCache, RoutingConfig
from firstkit.router import pool_prompt
from firstkit.testing import ARCHITECTURES, tiny_base_model, tiny_model

torch.set_num_threads(1)


def _prompt(length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_layers_matches_unmodified_model(arch):
    reference = tiny_base_model(arch, seed=3)
    model = tiny_model(arch, seed=3)
    ids = _prompt(12)
    all_on = [True] * model.num_layers
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = model.forward(ids, mask=all_on).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ref_tokens = reference.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    min_new_tokens=8, pad_token_id=0)
    tokens = model.generate(ids, max_new_tokens=8, mask=all_on, eos_token_id=[])
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_without_routers_every_layer_runs(arch):
    model = tiny_model(arch, routers=False)
    assert model.decide_mask(_prompt()) == [True] * model.num_layers


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_skipped_layer_is_never_called_and_has_no_cache(arch):
    model = tiny_model(arch, num_layers=6)
    mask = [True, False, True, False, True, True]
    calls = [0] * model.num_layers
    handles = [layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(model.base_layers())]
    try:
        ids = _prompt(9)
        cache = RoutedCache(config=model.base.config)
        model.forward(ids, mask=mask, cache=cache)
        model.forward(torch.tensor([[5]]), mask=mask, cache=cache, position_ids=torch.tensor([[9]]),
                      attention_mask=torch.ones(1, 10, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    assert calls == [2 if m else 0 for m in mask]
    for i, runs in enumerate(mask):
        assert cache.layer_is_empty(i) is (not runs)
        if runs:
            assert cache.layers[i].get_seq_length() == 10  # positions seen (sliding layers keep a window)
    assert cache.get_seq_length() == 10


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_decode_equals_full_recompute(arch):
    model = tiny_model(arch, num_layers=6)
    mask = [True, True, False, True, False, True]
    ids = _prompt(7, seed=1)
    tokens = model.generate(ids, max_new_tokens=12, mask=mask, eos_token_id=[])  # crosses gemma's window (8)
    with torch.no_grad():
        full = model.forward(tokens[:, :-1], mask=mask).logits
    greedy = full[0, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(greedy, tokens[0, ids.shape[1]:])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_router_mask_is_decided_at_prefill_and_frozen(arch):
    model = tiny_model(arch, num_layers=6, seed=5)
    ids = _prompt(8, seed=2)
    decided = model.decide_mask(ids)
    tokens, frozen = model.generate(ids, max_new_tokens=6, eos_token_id=[], return_mask=True)
    assert frozen[0].tolist() == decided
    # decoding with the same mask given explicitly gives the same tokens
    assert torch.equal(model.generate(ids, max_new_tokens=6, mask=decided, eos_token_id=[]), tokens)


def test_router_sees_hidden_state_of_layers_that_ran():
    """Re-derive the routers' decisions by hand, layer by layer, from the layers that actually ran."""
    model = tiny_model("llama", num_layers=6, seed=11)
    ids = _prompt(10, seed=4)
    decided = model.decide_mask(ids)
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k, i=i: inputs.append((i, a[0] if a else k["hidden_states"])),
                                             with_kwargs=True) for i, layer in enumerate(model.base_layers())]
    try:
        model.forward(ids, mask=decided)
    finally:
        for h in hooks:
            h.remove()
    ran = [i for i, run in enumerate(decided) if run]
    assert [i for i, _ in inputs] == ran
    for i, hidden in inputs:
        if i in model.protected_layers():
            continue
        logit = model.routers[i](pool_prompt(hidden))
        assert bool(logit >= 0) is decided[i]
    assert not all(decided), "this seed should skip at least one layer"


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_batch_with_different_masks_equals_each_prompt_alone(arch):
    model = tiny_model(arch, num_layers=6)
    prompts = [_prompt(5, seed=7)[0], _prompt(9, seed=8)[0]]
    masks = [[True, False, True, True, False, True], [True, True, False, True, True, True]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    attn = torch.zeros(2, width, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding
        ids[b, width - len(p):] = p
        attn[b, width - len(p):] = 1
    batch = model.generate(ids, attention_mask=attn, mask=torch.tensor(masks), max_new_tokens=7, eos_token_id=[])
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], mask=masks[b], max_new_tokens=7, eos_token_id=[])
        assert torch.equal(batch[b, width:], alone[0, len(p):])


def test_batched_routing_equals_each_prompt_alone():
    model = tiny_model("qwen2", num_layers=6, seed=2)
    prompts = [_prompt(6, seed=s)[0] for s in range(4)]
    alone_masks = [model.decide_mask(p) for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        attn[b, width - len(p):] = 1
    assert model.decide_mask(ids, attention_mask=attn) == alone_masks
    batch = model.generate(ids, attention_mask=attn, max_new_tokens=5, eos_token_id=[])
    for b, p in enumerate(prompts):
        assert torch.equal(batch[b, width:], model.generate(p, max_new_tokens=5, eos_token_id=[])[0, len(p):])


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model("llama")
    ids = _prompt(6)
    a = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=5, seed=123, eos_token_id=[])
    b = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=5, seed=123, eos_token_id=[])
    c = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=5, seed=124, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every sampled token is among the top 5 of its step
    mask = model.decide_mask(ids)
    with torch.no_grad():
        logits = model.forward(a[:, :-1], mask=mask).logits[0, ids.shape[1] - 1:]
    top5 = logits.topk(5, dim=-1).indices
    assert all(int(t) in top5[i].tolist() for i, t in enumerate(a[0, ids.shape[1]:]))


def test_generation_stops_at_eos():
    model = tiny_model("llama")
    ids = _prompt(6)
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    first_new = int(free[0, ids.shape[1]])
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=first_new)
    assert stopped.shape[1] == ids.shape[1] + 1


def test_override_forces_decisions_and_routers_decide_the_rest():
    model = tiny_model("llama", num_layers=6, seed=11)
    ids = _prompt(10, seed=4)
    decided = model.decide_mask(ids)
    override = torch.tensor([-1, 1 - int(decided[1]), -1, -1, -1, -1])
    out = model.forward(ids, override=override)
    assert out.mask[0, 1].item() == (not decided[1])


def test_threshold_changes_how_many_layers_run():
    ids = _prompt(10)
    counts = [sum(tiny_model("llama", num_layers=8, seed=1, routing=RoutingConfig(threshold=t)).decide_mask(ids))
              for t in (1e-9, 0.5, 1 - 1e-9)]
    assert counts[0] == 8 and counts[2] == 2  # everything runs / only the protected first and last layers
    assert counts[0] >= counts[1] >= counts[2]


def test_soft_gates_forward_equals_hard_and_trains_routers():
    model = tiny_model("llama", num_layers=6, seed=11)
    ids = _prompt(10, seed=4)
    hard = model.forward(ids)
    soft = model.forward(ids, soft_gates=True)
    torch.testing.assert_close(soft.logits, hard.logits, rtol=0, atol=1e-5)
    assert torch.equal(soft.mask, hard.mask)
    soft.gate_probs.sum().backward()
    grads = [r.out.bias.grad for r in model.routers.routers]
    assert all(g is not None for g in grads) and any(float(g.abs()) > 0 for g in grads)


@pytest.mark.parametrize("bad, message", [
    ([True, True, True], "one entry per layer"),
    ("110", "one entry per layer"),
    ([False, True, True, True], "protected layer 0"),
    ([True, True, True, False], "protected layer 3"),
    ("11x1", "only 0 and 1"),
    ([2, 1, 1, 1], "0/1"),
])
def test_bad_masks_are_refused(bad, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        model.generate(_prompt(), mask=bad, max_new_tokens=2)


def test_empty_prompt_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty prompt"):
        model.decide_mask([])


def test_never_skip_policy_is_configurable():
    model = tiny_model("llama", num_layers=6, routing=RoutingConfig(never_skip=(0, 1, -2, -1)))
    assert model.protected_layers() == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="protected layer 1"):
        model.mask_tensor([1, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="out of range"):
        FirstModel(tiny_base_model("llama"), routing=RoutingConfig(never_skip=(7,)))


def test_prompt_mask_pools_over_the_prompt_only():
    """Deciding on prompt + answer with ``prompt_mask`` = deciding on the prompt alone (causal attention)."""
    model = tiny_model("llama", num_layers=8, seed=11)
    prompt, answer = _prompt(9, seed=4), _prompt(6, seed=5)
    full = torch.cat([prompt, answer], dim=1)
    prompt_mask = torch.zeros_like(full)
    prompt_mask[:, :9] = 1
    with torch.no_grad():
        out = model.forward(full, prompt_mask=prompt_mask)
        unpooled = model.forward(full)
    assert out.mask[0].tolist() == model.decide_mask(prompt)
    assert unpooled.mask[0].tolist() != out.mask[0].tolist(), "pooling the answer too should change something"
