"""Build a tiny multi-method ExecuTorch bundle with the method signatures of docs/CONTRACTS.md.

Used to develop and test the native runner independently of ``first-export``: a small random
decoder (single-head attention with a KV cache per layer, MLP, RMS norms, FiRST routers) exported
as ``prefill``, ``embed``, ``layer_{i}``, ``head`` and the constant methods, sharing the KV-cache
buffers (``share_mutable_buffers=True``), XNNPACK-lowered.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from firstkit.hashing import sha256_file


def _rms(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Layer(nn.Module):
    """One decoder layer with its own KV cache (batch 1, one head)."""

    def __init__(self, hidden: int, max_seq_len: int) -> None:
        super().__init__()
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.up = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down = nn.Linear(2 * hidden, hidden, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, max_seq_len, hidden))
        self.register_buffer("v_cache", torch.zeros(1, max_seq_len, hidden))
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """h: [1, T, H]; pos: int64[T] positions of the T tokens."""
        x = _rms(h)
        q, k, v = self.q(x), self.k(x), self.v(x)
        self.k_cache.index_copy_(1, pos, k)
        self.v_cache.index_copy_(1, pos, v)
        scores = torch.matmul(q, self.k_cache.transpose(1, 2)) * self.scale  # [1, T, S]
        key_pos = torch.arange(self.k_cache.shape[1], dtype=torch.int64)
        allowed = key_pos.unsqueeze(0) <= pos.unsqueeze(1)  # [T, S]
        scores = scores.masked_fill(~allowed.unsqueeze(0), float("-inf"))
        attn = torch.matmul(torch.softmax(scores, dim=-1), self.v_cache)
        h = h + self.o(attn)
        return h + self.down(torch.nn.functional.silu(self.up(_rms(h))))


class ToyDecoder(nn.Module):
    """Random tiny decoder with FiRST routers (protected first and last layer)."""

    def __init__(self, num_layers: int = 4, hidden: int = 32, vocab: int = 97, max_seq_len: int = 64,
                 rank: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_layers, self.hidden, self.vocab, self.max_seq_len = num_layers, hidden, vocab, max_seq_len
        self.emb = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([_Layer(hidden, max_seq_len) for _ in range(num_layers)])
        self.proj = nn.ModuleList([nn.Linear(hidden, rank) for _ in range(num_layers)])
        self.out = nn.ModuleList([nn.Linear(rank, 1) for _ in range(num_layers)])
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            # Alternate router biases so "auto" skips some layers deterministically.
            for i, o in enumerate(self.out):
                o.bias.fill_(4.0 if i % 2 == 0 else -4.0)
        self.protected = {0, num_layers - 1}

    def prefill(self, tokens: torch.Tensor, mask_override: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens int64[1, T], mask_override int64[L] -> (logits [1, V], mask int64[L])."""
        h = self.emb(tokens)
        pos = torch.arange(tokens.shape[1], dtype=torch.int64)
        bits = []
        for i, layer in enumerate(self.layers):
            pooled = _rms(h).mean(dim=1)
            logit = self.out[i](torch.nn.functional.silu(self.proj[i](pooled)))[0, 0]
            run = logit >= 0
            if i in self.protected:
                run = torch.ones_like(run)
            ov = mask_override[i]
            run = torch.where(ov >= 0, ov == 1, run)
            h = torch.where(run, layer(h, pos), h)
            bits.append(run.to(torch.int64))
        logits = self.lm_head(_rms(h[:, -1, :]))
        return logits, torch.stack(bits)

    def embed(self, token: torch.Tensor) -> torch.Tensor:
        return self.emb(token)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms(hidden[:, -1, :]))


class _Prefill(nn.Module):
    def __init__(self, model: ToyDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, mask_override: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.prefill(tokens, mask_override)


class _Embed(nn.Module):
    def __init__(self, model: ToyDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return self.model.embed(token)


class _LayerMethod(nn.Module):
    def __init__(self, model: ToyDecoder, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, hidden: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model.layers[self.index](hidden, input_pos)


class _Head(nn.Module):
    def __init__(self, model: ToyDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden)


def build_toy_bundle(out_dir: str | os.PathLike, num_layers: int = 4, hidden: int = 32, vocab: int = 97,
                     max_seq_len: int = 64, seed: int = 0, eos_id: int = 96, xnnpack: bool = True) -> Path:
    """Export the toy decoder as a bundle directory (written atomically) and return its path."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from torch.export import Dim, export

    torch.manual_seed(seed)
    model = ToyDecoder(num_layers, hidden, vocab, max_seq_len, seed=seed).eval()
    t = Dim("T", min=1, max=max_seq_len)
    progs = {}
    with torch.no_grad():
        progs["prefill"] = export(
            _Prefill(model),
            (torch.zeros(1, 3, dtype=torch.int64), torch.full((num_layers,), -1, dtype=torch.int64)),
            dynamic_shapes=({1: t}, None), strict=False)
        progs["embed"] = export(_Embed(model), (torch.zeros(1, 1, dtype=torch.int64),), strict=False)
        for i in range(num_layers):
            progs[f"layer_{i}"] = export(_LayerMethod(model, i),
                                         (torch.zeros(1, 1, hidden), torch.zeros(1, dtype=torch.int64)),
                                         strict=False)
        progs["head"] = export(_Head(model), (torch.zeros(1, 1, hidden),), strict=False)
    partitioner = None
    if xnnpack:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        partitioner = {k: [XnnpackPartitioner()] for k in progs}
    constants = {"get_max_seq_len": max_seq_len, "get_n_layers": num_layers, "get_vocab_size": vocab,
                 "get_bos_id": 1, "get_eos_ids": [eos_id]}
    edge = to_edge_transform_and_lower(progs, partitioner=partitioner, constant_methods=constants,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    et = edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
        emit_mutable_buffer_names=True))
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-toy-", dir=out.parent))
    try:
        with open(tmp / "model.pte", "wb") as f:
            et.write_to_file(f)
        manifest = {  # a complete manifest of docs/bundle_format.md (first-bench validates it like first-run)
            "format": "firstkit-bundle",
            "format_version": 1,
            "model": {"id": "toy", "sha256": "0" * 64, "architecture": "toy", "num_layers": num_layers,
                      "hidden_size": hidden, "vocab_size": vocab, "bos_id": 1, "eos_ids": [eos_id]},
            "quantization": {"scheme": "none", "dtype": "float32"},
            "mask_semantics": "one int64 per layer, 1 = the layer runs (docs/CONTRACTS.md)",
            "versions": {"firstkit": "toy"},
            "routing": {"policy": "routers", "threshold": 0.5, "never_skip": [0, -1],
                        "protected_layers": [0, num_layers - 1]},
            "max_seq_len": max_seq_len,
            "backends": {"executorch": {"file": "model.pte", "methods": list(progs)}},
            "files": {"model.pte": {"sha256": sha256_file(tmp / "model.pte"),
                                    "size": (tmp / "model.pte").stat().st_size}},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
