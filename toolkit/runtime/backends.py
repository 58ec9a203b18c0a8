"""Backends that execute a bundle's graphs: ExecuTorch pybindings and onnxruntime.

Both expose the same calls (CONTRACTS.md):
``prefill(ids[1, T], override[L]) -> (logits[V], mask[L])``, ``embed(token) -> h``,
``layer(i, h, pos) -> h``, ``head(h) -> logits[V]``. ``decode_step`` strings them together: the one decode
loop of the Python side (the verifier and the bench's reference runs call it too). The ExecuTorch prefill runs
the program's ``route`` method before each layer and that layer's ``prefill_i`` only if it runs, over the prompt
in chunks of at most ``get_prefill_chunk`` tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .bundle import BundleError, executorch_methods


def set_executorch_threads(threads: int) -> None:
    """Size the ExecuTorch CPU thread pool (``torch.set_num_threads`` does not reach it)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(int(threads))


class ExecuTorchBackend:
    """Runs ``model.pte`` through ``executorch.runtime`` (methods share memory arenas and KV buffers).

    ``execute`` copies every output out of the shared arenas, so results need no further copy.
    """

    name = "executorch"

    def __init__(self, pte_path: str | Path, n_layers: int | None = None, threads: int | None = None,
                 etdump: bool = False) -> None:
        import executorch.kernels.quantized  # noqa: F401  (registers quantized kernels for 8da4w)
        from executorch.runtime import Runtime

        if threads:
            set_executorch_threads(threads)
        try:
            self.program = Runtime.get().load_program(Path(pte_path), enable_etdump=etdump)
            self.n_layers = n_layers = n_layers if n_layers is not None else self.constant("get_n_layers")
            # layer_i's kv_positions input is 0..pos: a prefix view of this (its length = filled cache rows)
            self.positions = torch.arange(self.constant("get_max_seq_len"), dtype=torch.long)
            names = set(self.program.method_names)
            wanted = executorch_methods(n_layers)
            missing = [m for m in wanted + ["get_prefill_chunk"] if m not in names]
            if missing:
                raise BundleError(f"{pte_path}: program lacks methods {', '.join(missing[:5])} "
                                  "(a bundle from an older firstkit? export it again)")
            self.prefill_chunk = self.constant("get_prefill_chunk")
            self.methods = {m: self.program.load_method(m) for m in wanted}
            self._layers = [self.methods[f"layer_{i}"] for i in range(n_layers)]
            self._prefill_layers = [self.methods[f"prefill_{i}"] for i in range(n_layers)]
        except BundleError:
            raise
        except Exception as e:  # the pybindings raise RuntimeError/ValueError on a bad program
            raise BundleError(f"{pte_path}: ExecuTorch could not load the program ({e})") from e

    def constant(self, name: str):
        """Value of a constant metadata method (e.g. ``get_max_seq_len``)."""
        out = self.program.load_method(name).execute([])
        return [int(x) for x in out] if len(out) > 1 else int(out[0])

    def prefill(self, ids: torch.Tensor, override: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Route, then run, layer by layer: a skipped layer's ``prefill_i`` is never called.

        A running layer takes the prompt chunk by chunk; chunk ``[a, b)`` attends the cache rows ``0..b-1``
        (the earlier chunks' rows of that layer are already written).
        """
        h = self.methods["embed"].execute([ids])[0]
        t = h.shape[1]
        chunks = [(a, min(a + self.prefill_chunk, t)) for a in range(0, t, self.prefill_chunk)]
        route = self.methods["route"]
        mask = []
        for i, layer in enumerate(self._prefill_layers):
            run = int(route.execute([h, torch.tensor([i], dtype=torch.long), override])[0].reshape(-1)[0])
            mask.append(run)
            if run:
                outs = [layer.execute([h[:, a:b].contiguous(), self.positions[a:b], self.positions[:b]])[0]
                        for a, b in chunks]
                h = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.head(h[:, -1:, :].contiguous()), mask

    def embed(self, token: torch.Tensor) -> torch.Tensor:
        return self.methods["embed"].execute([token])[0]

    def layer(self, i: int, h: torch.Tensor, pos: int) -> torch.Tensor:
        """Layer ``i`` for the token at ``pos``; it reads the cache rows ``0..pos`` only."""
        kv_positions = self.positions[: pos + 1]
        return self.methods[f"layer_{i}"].execute([h, kv_positions[pos:], kv_positions])[0]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.methods["head"].execute([h])[0].reshape(-1)

    def decode_step(self, token: int, pos: int, active: list[int]) -> torch.Tensor:
        """Logits after feeding ``token`` at ``pos`` through the ``active`` layers only."""
        kv_positions = self.positions[: pos + 1]  # the same inputs for every layer of this token
        input_pos = kv_positions[pos:]
        h = self.embed(torch.tensor([[token]], dtype=torch.long))
        for i in active:
            h = self._layers[i].execute([h, input_pos, kv_positions])[0]
        return self.head(h)


class OnnxBackend:
    """Runs the ONNX prefill and decode models through onnxruntime; the KV cache lives here in numpy.

    The decode model has one ``If`` per layer driven by the ``mask`` input: a skipped layer's subgraph is not
    executed, and this runtime holds no cache for it. A running layer gets its filled rows ``0..pos-1`` and
    returns the new row, written here in place at ``pos``.
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
        self.kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # running layer -> (K, V) [1, Hkv, S, D]
        self._stub: np.ndarray | None = None

    def prefill(self, ids: torch.Tensor, override: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        outs = self.prefill_sess.run(None, {"input_ids": ids.numpy(), "mask_override": override.numpy()})
        logits, mask = outs[0], [int(x) for x in outs[1].tolist()]
        t = ids.shape[1]
        self.kv = {}
        for i in (i for i, b in enumerate(mask) if b):
            k, v = outs[2 + 2 * i], outs[3 + 2 * i]
            shape = (*k.shape[:2], self.max_seq_len, k.shape[3])
            self.kv[i] = (np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32))
            self.kv[i][0][:, :, :t] = k
            self.kv[i][1][:, :, :t] = v
        self._stub = np.zeros((*outs[2].shape[:2], 1, outs[2].shape[3]), dtype=np.float32)
        return torch.from_numpy(logits.copy()).reshape(-1), mask

    def decode_step(self, token: int, pos: int, active: list[int]) -> torch.Tensor:
        if self._stub is None:
            raise RuntimeError("decode before prefill")
        if any(i not in self.kv for i in active):
            raise RuntimeError("decode asks for a layer that did not run in prefill (mask changed?)")
        mask = np.zeros(self.n_layers, dtype=np.int64)
        mask[active] = 1
        feeds = {"input_ids": np.array([[token]], dtype=np.int64), "input_pos": np.array([pos], dtype=np.int64),
                 "mask": mask}
        for i in range(self.n_layers):
            k, v = (self.kv[i][0][:, :, :pos], self.kv[i][1][:, :, :pos]) if i in self.kv else (self._stub,) * 2
            feeds[f"past_key_values.{i}.key"] = np.ascontiguousarray(k)
            feeds[f"past_key_values.{i}.value"] = np.ascontiguousarray(v)
        outs = self.decode_sess.run(None, feeds)
        for i in active:
            self.kv[i][0][:, :, pos] = outs[1 + 2 * i][:, :, 0]
            self.kv[i][1][:, :, pos] = outs[2 + 2 * i][:, :, 0]
        return torch.from_numpy(outs[0]).reshape(-1)
