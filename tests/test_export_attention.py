"""The export's grouped-query attention: same numbers as Hugging Face attention, no KV-cache copies."""

from __future__ import annotations

import pytest
import torch

from firstkit.export.attention import ATTENTION_NAME, grouped_attention, use_grouped_attention
from firstkit.export.graph import ExportCore, LayerMethod
from firstkit.testing import tiny_base_model


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_grouped_attention_equals_hf_attention(arch):
    model = tiny_base_model(arch, num_layers=2)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        use_grouped_attention(model)
        assert model.config._attn_implementation == ATTENTION_NAME
        got = model(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_grouped_attention_query_head_k_g_plus_j_uses_kv_head_k():
    torch.manual_seed(0)
    b, h, hkv, t, s, d = 1, 6, 2, 1, 7, 4
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    mask = torch.zeros(1, 1, t, s)
    mask[..., 5:] = torch.finfo(torch.float32).min  # positions 5, 6 are not attended
    out, _ = grouped_attention(torch.nn.Module(), q, k, v, mask, scaling=0.5)
    assert out.shape == (b, t, h, d)
    for head in range(h):
        kv = head // (h // hkv)
        w = torch.softmax((q[0, head] @ k[0, kv, :5].T) * 0.5, dim=-1)
        torch.testing.assert_close(out[0, :, head], w @ v[0, kv, :5])


def test_decode_layer_graph_has_no_cache_copies():
    """The lowered layer method reads the cache in place: no non-delegated expand/repeat copy of it."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    base = tiny_base_model("llama", num_layers=1)
    core = ExportCore(base, None, [], 0.5, max_seq_len=64).eval()
    h = torch.zeros(1, 1, base.config.hidden_size)
    with torch.no_grad():
        kv_len = torch.export.Dim("kv_len", min=1, max=64)
        ep = torch.export.export(LayerMethod(core, 0), (h, torch.tensor([3]), torch.arange(4)),
                                 dynamic_shapes=(None, None, {0: kv_len}), strict=False)
    edge = to_edge_transform_and_lower({"forward": ep}, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    outside = [str(n.target) for n in edge.exported_program("forward").graph_module.graph.nodes
               if n.op == "call_function" and "delegate" not in str(n.target)]
    assert not [o for o in outside if "expand_copy" in o or "repeat" in o], outside
    assert any("bmm" in str(n.target) for n in ep.graph.nodes)  # attention is two batched matmuls
