"""Python runtime for bundles: prefill decides the mask, decode calls only the layers that run."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from firstkit.mask_spec import parse_mask_spec as parse_mask  # re-exported: firstkit.runtime.parse_mask

from .backends import ExecuTorchBackend, OnnxBackend
from .bundle import BACKENDS, PTE_FILE, BundleError, manifest_sha256, one_line, read_manifest
from .bundle import load_tokenizer as read_tokenizer


@contextlib.contextmanager
def torch_single_thread():
    """PyTorch's intra-op pool at 1 thread for the duration (restored after).

    The runtime's own torch work per token is tiny (copies, an argmax), but PyTorch's OpenMP threads spin after
    each parallel region and take the cores from the ExecuTorch/onnxruntime pools that do the real work:
    measured on 2 cores, SmolLM2 8da4w, ExecuTorch at 2 threads: 77 tok/s with torch at 2 threads, 110 at 1.
    """
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def check_text(text: str, what: str = "text") -> None:
    """Refuse text that cannot be encoded as UTF-8 (lone surrogates: undecodable bytes from the command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        raw = f"byte 0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"U+{ord(ch):04X}"
        raise ValueError(f"{what} is not valid UTF-8 text ({raw} at character {e.start}); pass UTF-8 text") from None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class BundleRunner:
    """Loads a bundle (manifest + sha256 checked first) and generates with FiRST layer skipping."""

    def __init__(self, path: str | Path, backend: str = "executorch", threads: int | None = None,
                 check_hashes: bool = True, load_tokenizer: bool = True) -> None:
        if backend not in BACKENDS:
            raise BundleError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.path = Path(path)
        self.manifest = read_manifest(self.path, check_hashes=check_hashes)
        if backend not in self.manifest["backends"]:
            have = ", ".join(self.manifest["backends"])
            raise BundleError(f"{self.path}: bundle has no {backend} artifacts (it has: {have})")
        self.backend_name = backend
        self.threads = threads
        model = self.manifest["model"]
        self.n_layers: int = model["num_layers"]
        self.max_seq_len: int = self.manifest["max_seq_len"]
        self.eos_ids: list[int] = [int(e) for e in model["eos_ids"] if int(e) >= 0]
        self.protected: list[int] = list(self.manifest["routing"]["protected_layers"])
        self.vocab_size: int = model["vocab_size"]
        # only the tokenizer files the manifest lists, checked again as they are read
        self.tokenizer = read_tokenizer(self.path, self.manifest) if load_tokenizer else None
        if backend == "executorch":
            et = self.manifest["backends"]["executorch"]
            self.backend = ExecuTorchBackend(self.path / et.get("file", PTE_FILE), self.n_layers, threads)
        else:
            self.backend = OnnxBackend(self.path, self.manifest["backends"]["onnx"], self.n_layers,
                                       self.max_seq_len, threads)
        self.sha256 = manifest_sha256(self.path)

    # ------------------------------------------------------------------ tokens
    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Prompt text -> ids; ``chat``: as a user turn, in the chat template the export rendered into the
        manifest (``chat_template``: prefix + prompt + suffix), when the model has one."""
        if self.tokenizer is None:
            raise BundleError(f"{self.path}: bundle has no tokenizer; pass token ids")
        if not prompt:
            raise ValueError("empty prompt")
        check_text(prompt, "prompt")
        try:
            template = self.manifest.get("chat_template")
            if chat and template:
                text = template["prefix"] + prompt + template["suffix"]
                ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
            else:
                ids = list(self.tokenizer(prompt).input_ids)
        except Exception as e:  # noqa: BLE001 - a tokenizer file that loads but fails on text
            raise BundleError(f"{self.path}: the bundle's tokenizer failed on the prompt "
                              f"({type(e).__name__}: {one_line(e, 160)})") from None
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
        if bad:
            raise BundleError(f"{self.path}: the bundle's tokenizer produced token id {bad[0]}, outside the model's "
                              f"vocabulary ({self.vocab_size}); tokenizer/ does not belong to this model")
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ generation
    def prefill(self, ids: Sequence[int], mask: str | Sequence[int] | None = "auto"
                ) -> tuple[torch.Tensor, list[int]]:
        """Run prefill: (last-token logits [V], mask bits) for a prompt."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("empty prompt: no tokens")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (size {self.vocab_size})")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"prompt has {len(ids)} tokens, the bundle's max_seq_len is {self.max_seq_len}")
        override = torch.tensor(parse_mask(mask, self.n_layers, self.protected), dtype=torch.long)
        with torch_single_thread():
            return self.backend.prefill(torch.tensor([ids], dtype=torch.long), override)

    def generate(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
                 mask: str | Sequence[int] | None = "auto", stream: Callable[[str], None] | None = None,
                 chat: bool = True, stop_at_eos: bool = True) -> dict:
        """Greedy generation; returns the run-result dict of CONTRACTS.md ("Run result JSON")."""
        if isinstance(prompt, str):
            ids = self.encode(prompt, chat=chat)
        else:
            ids = [int(t) for t in (prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        parse_mask(mask, self.n_layers, self.protected)  # bad masks fail before any work
        t = len(ids)
        if t > self.max_seq_len:
            raise ValueError(f"prompt has {t} tokens, the bundle's max_seq_len is {self.max_seq_len}")
        if t + max(max_new_tokens - 1, 0) > self.max_seq_len:
            raise ValueError(f"prompt of {t} tokens + {max_new_tokens} new tokens needs "
                             f"{t + max_new_tokens - 1} cache positions; the bundle's max_seq_len is "
                             f"{self.max_seq_len}")
        with torch_single_thread():
            return self._generate(ids, max_new_tokens, mask, stream, stop_at_eos)

    def _generate(self, ids: list[int], max_new_tokens: int, mask, stream, stop_at_eos: bool) -> dict:
        t = len(ids)
        t0 = time.perf_counter()
        logits, bits = self.prefill(ids, mask)
        prefill_ms = (time.perf_counter() - t0) * 1000.0
        active = [i for i, b in enumerate(bits) if b]
        out: list[int] = []
        decode_ms: list[float] = []
        shown = ""
        for step in range(max_new_tokens):
            tok = int(torch.argmax(logits))
            out.append(tok)
            if stream is not None and self.tokenizer is not None:
                text = self.decode_text(out)
                if text.startswith(shown) and len(text) > len(shown):
                    stream(text[len(shown):])
                    shown = text
            if (stop_at_eos and tok in self.eos_ids) or step == max_new_tokens - 1:
                break
            s = time.perf_counter()
            logits = self.backend.decode_step(tok, t + step, active)
            decode_ms.append((time.perf_counter() - s) * 1000.0)
        per_tok = sum(decode_ms) / len(decode_ms) if decode_ms else 0.0
        return {
            "text": self.decode_text(out),
            "tokens": out,
            "prompt_tokens": t,
            "mask": "".join(str(b) for b in bits),
            "skip_ratio": (self.n_layers - len(active)) / self.n_layers,
            "prefill_ms": prefill_ms,
            "decode_ms_per_token": per_tok,
            "decode_ms": decode_ms,
            "tokens_per_s": 1000.0 / per_tok if per_tok > 0 else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "threads": self.threads,
            "backend": self.backend_name,
            "runner": "python",
            "bundle_sha256": self.sha256,
        }


def load_bundle(path: str | Path, backend: str = "executorch", threads: int | None = None,
                check_hashes: bool = True) -> BundleRunner:
    """Open a bundle for generation (validates the manifest and every file's sha256 first)."""
    return BundleRunner(path, backend=backend, threads=threads, check_hashes=check_hashes)
