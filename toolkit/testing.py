"""Tiny random models for tests and examples (no download, built from a transformers config)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from firstkit.routed_model import FirstModel, RoutingConfig
from firstkit.router import RouterStack

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3_text", "phi3")


def tiny_config(arch: str = "llama", num_layers: int = 4, hidden_size: int = 64, vocab_size: int = 256):
    """A small config of ``arch`` (2 KV heads of 4 query heads, so GQA paths are exercised)."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden_size // 4)
    if arch == "phi3":
        return Phi3Config(**common)
    if arch == "gemma3_text":
        # alternate sliding and full attention with a short window so both mask kinds are exercised
        return Gemma3TextConfig(**common, head_dim=hidden_size // 4, sliding_window=8,
                                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                             for i in range(num_layers)])
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")


def tiny_base_model(arch: str = "llama", num_layers: int = 4, seed: int = 0, **kwargs):
    """A random transformers causal LM of ``arch`` in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers, **kwargs), dtype=torch.float32)
    return model.eval()


def tiny_model(arch: str = "llama", num_layers: int = 4, seed: int = 0, routers: bool = True,
               routing: RoutingConfig | None = None, router_bias_spread: float = 2.0, **kwargs) -> FirstModel:
    """A ``FirstModel`` over a random base; random routers whose decisions differ between prompts."""
    base = tiny_base_model(arch, num_layers, seed, **kwargs)
    stack = None
    if routers:
        torch.manual_seed(seed + 1)
        stack = RouterStack(num_layers, base.config.hidden_size, router_dim=16, init_bias=0.0)
        with torch.no_grad():
            for r in stack.routers:
                r.out.weight.normal_(std=router_bias_spread)
    return FirstModel(base, None, routers=stack, routing=routing)
