"""ExecuTorch export of tiny random models (two architectures): every method equals eager."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_export_support import TINY_MAX_SEQ, TINY_PREFILL_CHUNK, load_reference, tiny_bundle

from firstkit.runtime import BundleError, load_bundle, read_manifest
from firstkit.runtime.bundle import sha256_file

ARCHS = ["llama", "gemma3_text"]


def _masks(n: int, protected: list[int]) -> list[str]:
    """all, routers (auto), and two random valid masks."""
    g = random.Random(7)
    out = ["all", "auto"]
    for _ in range(2):
        bits = ["1" if (i in protected or g.random() < 0.5) else "0" for i in range(n)]
        out.append("".join(bits))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_export_manifest_and_verification(arch):
    bundle, js = tiny_bundle(arch)
    m = read_manifest(bundle)  # schema + every sha256
    assert m["model"]["architecture"] == arch
    assert m["routing"]["policy"] == "routers"
    assert m["max_seq_len"] == TINY_MAX_SEQ
    assert m["prefill_chunk"] == TINY_PREFILL_CHUNK
    n = m["model"]["num_layers"]
    assert set(m["backends"]["executorch"]["methods"]) == {"embed", "route", *(f"prefill_{i}" for i in range(n)),
                                                         *(f"layer_{i}" for i in range(n)), "head"}
    assert "model.pte" in m["files"] and any(f.startswith("tokenizer/") for f in m["files"])
    for rel, e in m["files"].items():
        assert sha256_file(bundle / rel) == e["sha256"]
    v = js["verification"]["executorch"]
    assert v["passed"] and v["masks_match_eager"]
    assert v["greedy_tokens_equal"] == v["cases_total"] >= 9
    assert v["max_abs_logit_diff"] < 1e-4
    assert {c["mask_kind"] for c in v["cases"]} == {"all", "routers", "random"}
    # constant methods carry the metadata
    runner = load_bundle(bundle)
    assert runner.backend.constant("get_n_layers") == n
    assert runner.backend.constant("get_max_seq_len") == TINY_MAX_SEQ
    assert runner.backend.constant("get_prefill_chunk") == TINY_PREFILL_CHUNK
    assert runner.backend.constant("get_vocab_size") == m["model"]["vocab_size"]
    assert runner.backend.constant("get_bos_id") == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_equals_eager(arch):
    """prefill (logits + mask) for prompt lengths 1..max and several masks; decode steps; embed/head."""
    bundle, _ = tiny_bundle(arch)
    ref = load_reference(arch)
    runner = load_bundle(bundle)
    n = ref.num_layers
    g = torch.Generator().manual_seed(0)
    lengths = [1, 2, 5, 11, TINY_MAX_SEQ - 4, TINY_MAX_SEQ]
    router_masks = set()
    for t in lengths:
        ids = torch.randint(3, 256, (1, t), generator=g)
        for mask in _masks(n, ref.protected_layers()):
            logits, bits = runner.prefill(ids[0].tolist(), mask)
            with torch.no_grad():
                if mask == "auto":
                    out = ref.forward(ids)
                    router_masks.add("".join(str(int(b)) for b in out.mask[0]))
                else:
                    out = ref.forward(ids, mask="1" * n if mask == "all" else mask)
            assert bits == [int(b) for b in out.mask[0]], (t, mask)
            torch.testing.assert_close(logits, out.logits[0, -1], atol=1e-4, rtol=0)
            # decode 3 tokens (not past the cache end) with the frozen mask
            active = [i for i, b in enumerate(bits) if b]
            seq = ids[0].tolist()
            for step in range(min(3, TINY_MAX_SEQ - t)):
                tok = int(torch.argmax(logits))
                logits = runner.backend.decode_step(tok, t + step, active)
                seq.append(tok)
                with torch.no_grad():
                    want = ref.forward(torch.tensor([seq]), mask="".join(map(str, bits))).logits[0, -1]
                torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    assert len(router_masks) >= 2, "random routers should choose different masks for different prompts"
    # embed and head on their own
    tok = torch.tensor([[17]])
    emb = ref.adapter.embed_tokens(ref.base)(tok)
    torch.testing.assert_close(runner.backend.embed(tok), emb, atol=1e-6, rtol=0)
    h = torch.randn(1, 1, ref.config.hidden_size, generator=g)
    want = ref.base.lm_head(ref.adapter.final_norm(ref.base)(h))[0, -1]
    cap = getattr(ref.config, "final_logit_softcapping", None)
    if cap:
        want = torch.tanh(want / cap) * cap
    torch.testing.assert_close(runner.backend.head(h), want, atol=1e-5, rtol=0)


def test_prefill_calls_only_the_running_layers():
    """A skipped layer's prefill_i is never executed; the routers' decisions come from route, one per layer."""
    bundle, _ = tiny_bundle("llama")
    runner = load_bundle(bundle)
    backend = runner.backend
    n = backend.n_layers
    calls = [0] * n

    class Counting:
        def __init__(self, i: int, method) -> None:
            self.i, self.method = i, method

        def execute(self, inputs):
            calls[self.i] += 1
            return self.method.execute(inputs)

    want_logits, _ = runner.prefill([5, 9, 13, 2], "1" + "0" * (n - 2) + "1")
    backend._prefill_layers = [Counting(i, m) for i, m in enumerate(backend._prefill_layers)]
    logits, bits = runner.prefill([5, 9, 13, 2], "1" + "0" * (n - 2) + "1")
    assert bits == [1] + [0] * (n - 2) + [1] and calls == [1] + [0] * (n - 2) + [1]
    torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)
    calls[:] = [0] * n
    _, bits = runner.prefill([5, 9, 13, 2], "auto")
    assert calls == bits  # exactly the layers the routers kept


@pytest.mark.parametrize("arch", ["llama"])
def test_generate_matches_eager_and_cache_boundary(arch):
    bundle, _ = tiny_bundle(arch)
    ref = load_reference(arch)
    runner = load_bundle(bundle)
    ids = list(range(40, 40 + TINY_MAX_SEQ - 5))
    # exactly fills the cache: T + N - 1 == max_seq_len
    res = runner.generate(ids, max_new_tokens=6, mask="all", stop_at_eos=False)
    want = ref.generate(torch.tensor([ids]), max_new_tokens=6, mask="1" * ref.num_layers, eos_token_id=[-1])
    assert res["tokens"] == want[0, len(ids):].tolist()
    assert res["mask"] == "1" * ref.num_layers and res["skip_ratio"] == 0.0
    with pytest.raises(ValueError, match="max_seq_len"):
        runner.generate(ids, max_new_tokens=7)
    with pytest.raises(ValueError, match="max_seq_len"):
        runner.generate(list(range(3, 3 + TINY_MAX_SEQ + 1)), max_new_tokens=1)
    # routers' own mask, frozen for decode
    res = runner.generate(ids[:6], max_new_tokens=5, mask="auto", stop_at_eos=False)
    want, wmask = ref.generate(torch.tensor([ids[:6]]), max_new_tokens=5, eos_token_id=[-1], return_mask=True)
    assert res["mask"] == "".join(str(int(b)) for b in wmask[0])
    assert res["tokens"] == want[0, 6:].tolist()
    assert res["skip_ratio"] == res["mask"].count("0") / ref.num_layers


def test_mask_validation_errors():
    bundle, _ = tiny_bundle("llama")
    runner = load_bundle(bundle)
    n = runner.n_layers
    with pytest.raises(ValueError, match="entries"):
        runner.generate([5, 6], max_new_tokens=4, mask="1" * (n + 1))
    with pytest.raises(ValueError, match="protected"):
        runner.generate([5, 6], max_new_tokens=4, mask="0" + "1" * (n - 1))
    with pytest.raises(ValueError, match="0/1"):
        runner.generate([5, 6], max_new_tokens=4, mask="12" + "1" * (n - 2))
    with pytest.raises(BundleError, match="unknown backend"):
        load_bundle(bundle, backend="tflite")


def test_manifest_json_is_documented():
    """Every top-level manifest key appears in docs/bundle_format.md."""
    from pathlib import Path

    bundle, _ = tiny_bundle("llama")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bundle_format.md").read_text()
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key in manifest:
        assert f"`{key}`" in doc, key


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_never_reads_unfilled_cache_rows(arch):
    """Poison the cache past the filled prefix with NaN: a layer that attended over the whole static buffer
    (even under an additive mask) would return NaN; reading only rows 0..pos keeps every logit finite and equal
    to eager, at filled lengths 1, the middle and max_seq_len."""
    bundle, _ = tiny_bundle(arch)
    ref = load_reference(arch)
    runner = load_bundle(bundle)
    n = runner.n_layers
    hsz = ref.config.hidden_size
    nan = torch.full((1, 1, hsz), float("nan"))
    for pos in range(TINY_MAX_SEQ):  # every layer's cache: NaN in every row
        for i in range(n):
            runner.backend.layer(i, nan, pos)
    for t in (1, TINY_MAX_SEQ // 2, TINY_MAX_SEQ - 1):
        ids = list(range(30, 30 + t))
        logits, bits = runner.prefill(ids, "all")  # rewrites rows 0..t-1 only
        seq = ids + [int(torch.argmax(logits))]
        logits = runner.backend.decode_step(seq[-1], t, list(range(n)))  # reads rows 0..t, writes row t
        assert torch.isfinite(logits).all(), f"decode at filled length {t + 1} read an unfilled row"
        with torch.no_grad():
            want = ref.forward(torch.tensor([seq]), mask="1" * n).logits[0, -1]
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def test_lowered_layer_graph_has_no_whole_cache_copy():
    """layer_i as lowered: one in-place index_put_ per cache, no copy_ write-back, no index_put.out (which
    copies the whole buffer), the K/V slice whose length is the dynamic filled length (one copy, no batch
    select after it), and nothing but the cache handling outside XNNPACK."""
    from firstkit.export.executorch_backend import export_programs, to_edge_programs
    from firstkit.export.pipeline import build_core

    ref = load_reference("llama")
    core, _ = build_core(ref, "none", TINY_MAX_SEQ)
    progs = export_programs(core)
    et = to_edge_programs({"layer_1": progs["layer_1"]}, {}, quantized=False)
    targets = [str(node.target) for node in et.exported_program("layer_1").graph.nodes if node.op == "call_function"]
    assert sum("index_put_" in t for t in targets) == 2, targets  # K and V, in place
    assert not any("index_put.out" in t or t.endswith("copy_.default") for t in targets), targets
    assert sum("slice_copy" in t for t in targets) == 2, targets  # K and V cut to the filled rows
    assert not any("select_copy" in t for t in targets), targets  # ... and not copied a second time
    assert not any("mean" in t for t in targets), targets  # RMSNorm's mean runs inside XNNPACK
    # norm + projections + rotary | the KV write and slice | attention + MLP: two delegate calls
    assert sum("executorch_call_delegate" in t for t in targets) == 2, targets
    sizes = [node for node in et.exported_program("layer_1").graph.nodes if "sym_size" in str(node.target)]
    assert sizes, "the filled length must be read from kv_positions' size"
