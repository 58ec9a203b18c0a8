"""Backends that execute a bundle's graphs: ExecuTorch pybindings and onnxruntime.

Both expose the same four calls (CONTRACTS.md):
``prefill(ids[1, T], override[L]) -> (logits[V], mask[L])``, ``embed(token) -> h``,
``layer(i, h, pos) -> h``, ``head(h) -> logits[V]``. ``decode_step`` strings them together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .bundle import BundleError


def set_executorch_threads(threads: int) -> None:
    """Size the ExecuTorch CPU thread pool (``torch.set_num_threads`` does not reach it)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(int(threads))


class ExecuTorchBackend:
    """Runs ``model.pte`` through ``executorch.runtime`` (methods share memory arenas and KV buffers)."""

    name = "executorch"

    def __init__(self, pte_path: str | Path, n_layers: int, threads: int | None = None) -> None:
        import executorch.kernels.quantized  # noqa: F401  (registers quantized kernels for 8da4w)
        from executorch.runtime import Runtime

        if threads:
            set_executorch_threads(threads)
        self.n_layers = n_layers
        try:
            self.program = Runtime.get().load_program(Path(pte_path))
            names = set(self.program.method_names)
            wanted = ["prefill", "embed", "head", *(f"layer_{i}" for i in range(n_layers))]
            missing = [m for m in wanted if m not in names]
            if missing:
                raise BundleError(f"{pte_path}: program lacks methods {', '.join(missing[:5])}")
            self.methods = {m: self.program.load_method(m) for m in wanted}
        except BundleError:
            raise
        except Exception as e:  # the pybindings raise RuntimeError/ValueError on a bad program
            raise BundleError(f"{pte_path}: ExecuTorch could not load the program ({e})") from e

    def constant(self, name: str):
        """Value of a constant metadata method (e.g. ``get_max_seq_len``)."""
        out = self.program.load_method(name).execute([])
        return [int(x) for x in out] if len(out) > 1 else int(out[0])

    def prefill(self, ids: torch.Tensor, override: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        logits, mask = self.methods["prefill"].execute([ids, override])
        return logits.clone().reshape(-1), [int(x) for x in mask.tolist()]

    def embed(self, token: torch.Tensor) -> torch.Tensor:
        return self.methods["embed"].execute([token])[0].clone()

    def layer(self, i: int, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.methods[f"layer_{i}"].execute([h, pos])[0].clone()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.methods["head"].execute([h])[0].clone().reshape(-1)

    def decode_step(self, token: int, pos: int, active: list[int]) -> torch.Tensor:
        """Logits after feeding ``token`` at ``pos`` through the ``active`` layers only."""
        h = self.embed(torch.tensor([[token]], dtype=torch.long))
        p = torch.tensor([pos], dtype=torch.long)
        for i in active:
            h = self.layer(i, h, p)
        return self.head(h)


class OnnxBackend:
    """Runs the ONNX prefill and decode models through onnxruntime; the KV cache lives here in numpy.

    The decode model has one ``If`` per layer driven by the ``mask`` input: a skipped layer's
    subgraph is not executed and its cache is passed through untouched.
    """

    name = "onnx"

    def __init__(self, root: str | Path, onnx_manifest: dict, n_layers: int, max_seq_len: int,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.n_layers = n_layers
        self.max_seq_len = max_seq_len
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        root = Path(root)
        try:
            self.prefill_sess = ort.InferenceSession(str(root / onnx_manifest["prefill"]["file"]), opts,
                                                     providers=["CPUExecutionProvider"])
            self.decode_sess = ort.InferenceSession(str(root / onnx_manifest["decode"]["file"]), opts,
                                                    providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BundleError(f"{root}: onnxruntime could not load the ONNX models ({e})") from e
        self.kv: list[np.ndarray] | None = None
        self.mask: np.ndarray | None = None

    def prefill(self, ids: torch.Tensor, override: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        outs = self.prefill_sess.run(None, {"input_ids": ids.numpy(), "mask_override": override.numpy()})
        logits, mask = outs[0], outs[1]
        self.kv = [np.ascontiguousarray(x) for x in outs[2:]]
        self.mask = mask.astype(np.int64)
        return torch.from_numpy(logits.copy()).reshape(-1), [int(x) for x in mask.tolist()]

    def decode_step(self, token: int, pos: int, active: list[int]) -> torch.Tensor:
        if self.kv is None:
            raise RuntimeError("decode before prefill")
        mask = np.zeros(self.n_layers, dtype=np.int64)
        mask[active] = 1
        feeds = {"input_ids": np.array([[token]], dtype=np.int64), "input_pos": np.array([pos], dtype=np.int64),
                 "mask": mask}
        for i in range(self.n_layers):
            feeds[f"past_key_values.{i}.key"] = self.kv[2 * i]
            feeds[f"past_key_values.{i}.value"] = self.kv[2 * i + 1]
        outs = self.decode_sess.run(None, feeds)
        self.kv = outs[1:]
        return torch.from_numpy(outs[0]).reshape(-1)
