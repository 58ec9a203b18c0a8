"""Training examples for ``first-train``: (prompt ids, target ids) pairs from the train splits.

The loss is computed on the target tokens only; the routers pool over the prompt tokens only, exactly
as at inference, where they see the prompt at prefill.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from firstkit.evaluation.tasks import get_task

__all__ = ["Example", "DEFAULT_TRAIN_TASKS", "encode_pair", "build_examples", "collate"]

#: task mixture of the shipped routers (train splits only; see docs/splits.md)
DEFAULT_TRAIN_TASKS = ("xsum", "squad", "boolq", "arc_easy", "commonsense_qa", "mmlu", "copa", "wmt22_de_en",
                       "self_instruct", "wikitext2")


@dataclass
class Example:
    """One training example: prompt token ids and target token ids."""

    prompt: list[int]
    target: list[int]
    task: str = ""


def encode_pair(tokenizer, prompt: str, target: str, chat: bool, max_len: int) -> Example | None:
    """Tokenise a (prompt, target) pair; the chat template wraps the prompt when ``chat`` and available.

    Long prompts lose their beginning (left truncation), long targets their end; ``None`` if nothing of
    the target fits.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        p_ids = tokenizer(text, add_special_tokens=False).input_ids
        t_ids = tokenizer(target, add_special_tokens=False).input_ids
        eos = tokenizer.eos_token_id
        if eos is not None:
            t_ids = t_ids + [eos]
    else:
        p_ids = tokenizer(prompt).input_ids
        t_ids = tokenizer(target, add_special_tokens=False).input_ids
    t_ids = t_ids[: max(1, max_len // 2)] if len(p_ids) + len(t_ids) > max_len else t_ids
    room = max_len - len(t_ids)
    if room < 4 or not t_ids:
        return None
    if len(p_ids) > room:
        p_ids = p_ids[-room:]
    return Example(p_ids, t_ids)


def build_examples(tokenizer, tasks: Sequence[str] = DEFAULT_TRAIN_TASKS, split: str = "train",
                   per_task: int = 200, max_len: int = 128, seed: int = 0,
                   data_dir: str | Path | None = None) -> list[Example]:
    """A shuffled mixture of up to ``per_task`` examples of each task's ``split``."""
    rng = random.Random(seed)
    out: list[Example] = []
    for name in tasks:
        pairs = get_task(name).train_pairs(split, data_dir)
        rng.shuffle(pairs)
        kept = 0
        for prompt, target, chat in pairs:
            if kept >= per_task:
                break
            ex = encode_pair(tokenizer, prompt, target, chat, max_len)
            if ex is None:
                continue
            ex.task = name
            out.append(ex)
            kept += 1
    rng.shuffle(out)
    return out


def collate(batch: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, prompt_mask (prompt tokens only), labels (-100 off-target)."""
    width = max(len(e.prompt) + len(e.target) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for b, e in enumerate(batch):
        seq = e.prompt + e.target
        n, p = len(seq), len(e.prompt)
        ids[b, :n] = torch.tensor(seq)
        attn[b, :n] = 1
        prompt_mask[b, :p] = 1
        labels[b, p:n] = torch.tensor(e.target)
    return {"input_ids": ids, "attention_mask": attn, "prompt_mask": prompt_mask, "labels": labels}
