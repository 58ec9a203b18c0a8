"""Reference greedy decoding of a bundle with ExecuTorch's Python runtime (same methods as the runner).

Used by tests to check that the native runner produces the same tokens; ``first-run``
(firstkit.runtime) is the user-facing Python runtime and is preferred when installed.
"""

from __future__ import annotations

from pathlib import Path

import torch


def greedy_reference(bundle: str | Path, prompt: list[int], max_new_tokens: int,
                     mask_override: list[int] | None = None, stop_at_eos: bool = True) -> tuple[list[int], str]:
    """Return (generated token ids, mask bits) for a greedy run of the bundle's model.pte."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(bundle) / "model.pte")
    n_layers = int(program.load_method("get_n_layers").execute([])[0])
    eos = [int(x) for x in program.load_method("get_eos_ids").execute([])] if stop_at_eos else []
    override = torch.tensor(mask_override if mask_override is not None else [-1] * n_layers, dtype=torch.int64)
    logits, mask = program.load_method("prefill").execute([torch.tensor([prompt], dtype=torch.int64), override])
    bits = [int(b) for b in mask.tolist()]
    layers = {i: program.load_method(f"layer_{i}") for i in range(n_layers) if bits[i]}
    embed, head = program.load_method("embed"), program.load_method("head")
    out = [int(torch.argmax(logits[0]))]
    pos = len(prompt)
    while len(out) < max_new_tokens and out[-1] not in eos:
        h = embed.execute([torch.tensor([[out[-1]]], dtype=torch.int64)])[0].clone()
        for i in sorted(layers):
            h = layers[i].execute([h, torch.tensor([pos], dtype=torch.int64)])[0].clone()
        logits = head.execute([h])[0]
        out.append(int(torch.argmax(logits[0])))
        pos += 1
    return out, "".join(str(b) for b in bits)
