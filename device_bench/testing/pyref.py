"""Reference greedy decoding of a bundle with ExecuTorch's Python runtime (same methods as the runner).

Used by ``first-bench`` (``tokens_match``) and the tests to check that the native runner produces the
same tokens as a Python runtime on the same ``model.pte``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch


class PythonReference:
    """Loads ``model.pte`` once; ``generate`` mirrors the native runner's greedy loop."""

    def __init__(self, bundle: str | Path, pte: str = "model.pte") -> None:
        from executorch.runtime import Runtime

        try:  # quantized bundles need these kernels registered in the Python runtime
            import executorch.kernels.quantized  # noqa: F401
        except Exception:  # noqa: BLE001
            pass
        self.program = Runtime.get().load_program(Path(bundle) / pte)
        self.n_layers = int(self.program.load_method("get_n_layers").execute([])[0])
        self.eos = [int(x) for x in self.program.load_method("get_eos_ids").execute([])]
        self._methods: dict[str, object] = {}
        self._lock = threading.Lock()

    def _m(self, name: str):
        if name not in self._methods:
            self._methods[name] = self.program.load_method(name)
        return self._methods[name]

    def generate(self, prompt: list[int], max_new_tokens: int, mask_override: list[int] | None = None,
                 stop_at_eos: bool = True) -> tuple[list[int], str]:
        """(generated token ids, mask bits)."""
        with self._lock:
            override = torch.tensor(mask_override if mask_override is not None else [-1] * self.n_layers,
                                    dtype=torch.int64)
            logits, mask = self._m("prefill").execute([torch.tensor([prompt], dtype=torch.int64), override])
            bits = [int(b) for b in mask.tolist()]
            out = [int(torch.argmax(logits.reshape(-1, logits.shape[-1])[-1]))]
            pos = len(prompt)
            eos = set(self.eos) if stop_at_eos else set()
            while len(out) < max_new_tokens and out[-1] not in eos:
                h = self._m("embed").execute([torch.tensor([[out[-1]]], dtype=torch.int64)])[0].clone()
                for i in range(self.n_layers):
                    if bits[i]:
                        h = self._m(f"layer_{i}").execute([h, torch.tensor([pos], dtype=torch.int64)])[0].clone()
                logits = self._m("head").execute([h])[0]
                out.append(int(torch.argmax(logits.reshape(-1, logits.shape[-1])[-1])))
                pos += 1
            return out, "".join(str(b) for b in bits)


def greedy_reference(bundle: str | Path, prompt: list[int], max_new_tokens: int,
                     mask_override: list[int] | None = None, stop_at_eos: bool = True) -> tuple[list[int], str]:
    """One-shot :class:`PythonReference` run."""
    return PythonReference(bundle).generate(prompt, max_new_tokens, mask_override, stop_at_eos)
