"""Shared builders for the export/runtime tests: tiny models saved as real folders, exported once per arch.

The bundles are produced through the real ``first-export`` CLI (click runner) from a saved Hugging Face
folder + router checkpoint, and cached for the whole test session.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from click.testing import CliRunner

TINY_LAYERS = {"llama": 4, "gemma3_text": 2}
#: protected layers per arch (saved in the router checkpoint's meta, which load_model honours)
TINY_NEVER_SKIP = {"llama": [0, -1], "gemma3_text": [0]}
TINY_MAX_SEQ = 24
_ROOT = Path(tempfile.mkdtemp(prefix="firstkit-export-tests-"))


def byte_tokenizer():
    """A real byte-level BPE tokenizer with 256 tokens (ids = bytes), no merges: fits vocab_size 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    table = {b: c for b, c in _byte_table().items() if c in alphabet}
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=table[1], eos_token=table[2], pad_token=table[0])


def _byte_table() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenization emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@functools.cache
def tiny_folders(arch: str) -> tuple[Path, Path]:
    """(model folder with tokenizer, router checkpoint folder) for a tiny random ``arch`` model."""
    from firstkit.testing import tiny_model

    fm = tiny_model(arch, num_layers=TINY_LAYERS[arch], seed=3)
    model_dir = _ROOT / f"{arch}-model"
    router_dir = _ROOT / f"{arch}-routers"
    base = fm.unwrap_layers()
    base.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    fm.routers.meta.update({"threshold": 0.5, "never_skip": TINY_NEVER_SKIP[arch]})
    fm.routers.save_pretrained(router_dir)
    return model_dir, router_dir


def load_reference(arch: str):
    """The eager FirstModel the bundle must reproduce (loaded like first-export loads it)."""
    import firstkit

    model_dir, router_dir = tiny_folders(arch)
    return firstkit.load_model(str(model_dir), routers=str(router_dir))


@functools.cache
def tiny_bundle(arch: str) -> tuple[Path, dict]:
    """Export the tiny model through ``first-export --json``; returns (bundle dir, CLI JSON)."""
    from firstkit.export.cli import main

    torch.set_num_threads(1)
    model_dir, router_dir = tiny_folders(arch)
    out = _ROOT / f"{arch}-bundle"
    res = CliRunner().invoke(main, ["--model", str(model_dir), "--routers", str(router_dir), "--max-seq-len",
                                    str(TINY_MAX_SEQ), "--output", str(out), "--backend", "all", "--json"])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout.strip().splitlines()[-1])


def copy_bundle(arch: str, dest: Path) -> Path:
    """A private copy of the cached bundle (for tests that damage it)."""
    src, _ = tiny_bundle(arch)
    shutil.copytree(src, dest)
    return dest
