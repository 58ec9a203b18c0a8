"""Adding an architecture is one adapter: a toy family whose decoder lives elsewhere, routed and exported."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from firstkit.architectures import ADAPTERS, ArchitectureAdapter, adapter_for
from firstkit.export.graph import ExportCore
from firstkit.routed_model import FirstModel
from firstkit.router import RouterStack


class ToyConfig(LlamaConfig):
    model_type = "firstkit_toy"


class ToyForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    """A Llama whose decoder stack is ``self.transformer`` (not ``self.model``): the default accessors miss it."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.transformer = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep: int = 0, **kwargs):
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **kwargs)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)


class ToyAdapter(ArchitectureAdapter):
    """The documented one-file change (docs/contributing.md): say where the decoder lives."""

    def decoder(self, model):
        return model.transformer


@pytest.fixture
def toy_model():
    ADAPTERS["firstkit_toy"] = ToyAdapter("firstkit_toy")
    try:
        cfg = ToyConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        base = ToyForCausalLM(cfg).eval()
        stack = RouterStack(3, 32, router_dim=8, init_bias=0.0)
        with torch.no_grad():
            for r in stack.routers:
                r.out.weight.normal_(std=2.0)
        plain = copy.deepcopy(base)  # FirstModel wraps base's layers in place
        yield FirstModel(base, None, routers=stack), plain
    finally:
        ADAPTERS.pop("firstkit_toy", None)


def test_unknown_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="unsupported architecture 'firstkit_toy'"):
        adapter_for(ToyConfig())


@torch.no_grad()
def test_toy_architecture_routes_and_exports(toy_model):
    fm, plain = toy_model
    assert isinstance(fm.adapter, ToyAdapter)
    ids = torch.tensor([[5, 9, 13, 2, 7, 30]])
    # routed eager with every layer == the plain model
    torch.testing.assert_close(fm.forward(ids, mask="111").logits, plain(input_ids=ids).logits)
    # the export graph, run eagerly (prefill in chunks of 4, then one decode step), equals eager routing
    core = ExportCore(plain, [copy.deepcopy(r) for r in fm.routers.routers],
                      fm.protected_layers(), fm.routing.threshold, max_seq_len=16, prefill_chunk=4).eval()
    for mask in ("111", "101"):
        core.reset_cache()
        override = torch.tensor([int(b) for b in mask])
        h = core.embed(ids)
        for i in range(3):
            assert bool(core.route(h, torch.tensor([i]), override)) == (mask[i] == "1")
            if mask[i] == "1":
                h = torch.cat([core.prefill_layer(i, h[:, a:a + 4], torch.arange(a, min(a + 4, 6)),
                                                  torch.arange(min(a + 4, 6))) for a in (0, 4)], dim=1)
        want = fm.forward(ids, mask=mask).logits[0, -1]
        torch.testing.assert_close(core.head(h[:, -1:]), want[None], atol=1e-5, rtol=0)
        nxt = torch.tensor([[11]])
        h = core.embed(nxt)
        for i in (i for i in range(3) if mask[i] == "1"):
            h = core.layer(i, h, torch.tensor([6]), torch.arange(7))
        want = fm.forward(torch.cat([ids, nxt], 1), mask=mask).logits[0, -1]
        torch.testing.assert_close(core.head(h), want[None], atol=1e-5, rtol=0)
