"""Reference greedy decoding of a bundle with ExecuTorch's Python runtime (same methods as the runner).

Used by ``first-bench`` (``tokens_match``) and the tests to check that the native runner produces the
same tokens as a Python runtime on the same ``model.pte``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch


class PythonReference:
    """Loads ``model.pte`` once; ``generate`` runs the Python runtime's decode loop (``ExecuTorchBackend``)."""

    def __init__(self, bundle: str | Path, pte: str = "model.pte") -> None:
        from firstkit.runtime.backends import ExecuTorchBackend

        self.backend = ExecuTorchBackend(Path(bundle) / pte)
        self.n_layers = self.backend.n_layers
        eos = self.backend.constant("get_eos_ids")
        self.eos = eos if isinstance(eos, list) else [eos]
        self._lock = threading.Lock()

    def generate(self, prompt: list[int], max_new_tokens: int, mask_override: list[int] | None = None,
                 stop_at_eos: bool = True) -> tuple[list[int], str]:
        """(generated token ids, mask bits)."""
        with self._lock:
            override = torch.tensor(mask_override if mask_override is not None else [-1] * self.n_layers,
                                    dtype=torch.int64)
            logits, bits = self.backend.prefill(torch.tensor([prompt], dtype=torch.int64), override)
            active = [i for i, b in enumerate(bits) if b]
            out = [int(torch.argmax(logits))]
            pos = len(prompt)
            eos = set(self.eos) if stop_at_eos else set()
            while len(out) < max_new_tokens and out[-1] not in eos:
                out.append(int(torch.argmax(self.backend.decode_step(out[-1], pos, active))))
                pos += 1
            return out, "".join(str(b) for b in bits)


def greedy_reference(bundle: str | Path, prompt: list[int], max_new_tokens: int,
                     mask_override: list[int] | None = None, stop_at_eos: bool = True) -> tuple[list[int], str]:
    """One-shot :class:`PythonReference` run."""
    return PythonReference(bundle).generate(prompt, max_new_tokens, mask_override, stop_at_eos)
