"""``first-export`` as a short list of composable steps.

load -> quantize once (private copy) -> build method wrappers around ONE module instance -> torch.export
each -> lower all together (XNNPACK) -> write bundle into a temp dir -> verify -> atomic rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from firstkit.runtime.bundle import executorch_methods

from .graph import ExportCore
from .quantize import SCHEMES, detached_base, quantize

BACKEND_CHOICES = ("executorch", "onnx", "all")
MASK_SEMANTICS = {
    "bits": "one entry per decoder layer, layer 0 first; 1 = the layer runs, 0 = skipped",
    "mask_override": "int64[L]: -1 = router decides, 0 = skip, 1 = run",
    "router": ("layer i runs iff logit_i >= log(t/(1-t)) or i is protected; logit_i = out_i(silu(proj_i(pooled))), "
               "pooled = mean over prompt tokens of h*rsqrt(mean(h^2)+1e-6), h = hidden state entering layer i"),
    "frozen": "decided once in prefill and frozen for the whole decode; skipped layers never run and write no KV",
    "prefill": ("h = embed(tokens); for each layer i: mask[i] = route(h, [i], mask_override); if mask[i]: "
                "h = prefill_i(h); logits = head(h[:, T-1:])"),
    "decode": ("h = embed(tok); for i with mask[i]: h = layer_i(h, [pos], [0..pos]); logits = head(h); "
               "pos = index in sequence"),
}


class ExportError(RuntimeError):
    """Export or verification failed; no bundle was written."""


@dataclass
class ExportResult:
    """What ``export_bundle`` produced."""

    output: Path
    manifest: dict
    timings: dict[str, float] = field(default_factory=dict)
    verification: dict[str, dict] = field(default_factory=dict)


def resolve_routers(model_name: str, routers: str | None, budget: float | None = None) -> tuple[str | None, str]:
    """Router checkpoint to use and a one-line description of the mask policy.

    ``routers``: a path, ``"none"``, or ``None``/``"auto"`` = the shipped routers of ``model_name`` (at
    skip ``budget``, default: the shipped default budget) if any, the ``-lora`` ones when shipped (their
    adapter is merged into the base before export: better quality at the same skip ratio).
    """
    if routers not in (None, "auto"):
        if routers == "none":
            return None, "no routers: all layers run, mask_override decides"
        if not Path(routers).is_dir():
            raise ExportError(f"router checkpoint {routers} does not exist")
        return str(routers), f"routers from {routers}"
    try:
        from firstkit.routers import default_routers_path  # shipped by the training component
    except ImportError:
        default_routers_path = None
    if default_routers_path is not None:
        try:  # prefer the routers trained with a LoRA adapter (merged into the weights before export)
            path = default_routers_path(model_name, budget, lora=True) or default_routers_path(model_name, budget)
        except ValueError as e:  # routers shipped, but not at this budget
            raise ExportError(str(e)) from e
        if path is not None and Path(path).is_dir():
            return str(path), f"shipped trained routers ({Path(path).parent.name}/{Path(path).name})"
    return None, (f"no trained routers shipped for {model_name}: all layers run, mask_override decides "
                  "(untrained routers are never used)")


def load_first_model(model: str, routers: str | None):
    """Step 1: the eager router-augmented model (the reference for verification)."""
    import firstkit

    fm = firstkit.load_model(model, routers=routers)
    if routers is not None:
        from firstkit.training.lora import apply_lora, has_lora

        if has_lora(routers):  # routers trained jointly with a LoRA adapter: merge it into the base first
            apply_lora(fm, routers)
            fm.info.extra["lora_merged_from"] = str(routers)
    return fm


def build_core(first_model, scheme: str, max_seq_len: int, group_size: int = 32,
               head_bits: int = 8, prefill_chunk: int | None = None) -> tuple[ExportCore, dict]:
    """Steps 2-3: quantize a private copy once, then one ExportCore instance for every method."""
    base = detached_base(first_model)
    qinfo = quantize(base, scheme, group_size, head_bits)
    routers = None
    if first_model.routers is not None:
        import copy

        routers = [copy.deepcopy(r).float().eval() for r in first_model.routers.routers]
    core = ExportCore(base, routers, first_model.protected_layers(), first_model.routing.threshold, max_seq_len,
                      prefill_chunk=prefill_chunk)
    return core.eval(), qinfo


def _versions() -> dict:
    import executorch
    import onnx
    import onnxruntime
    import transformers

    import firstkit

    def ver(mod):
        return getattr(mod, "__version__", None)

    try:
        from importlib.metadata import version

        et = version("executorch")
    except Exception:
        et = ver(executorch)
    return {"firstkit": firstkit.__version__, "torch": torch.__version__, "executorch": et,
            "transformers": transformers.__version__, "onnx": ver(onnx), "onnxruntime": ver(onnxruntime),
            "python": platform.python_version()}


def _method_signatures(n: int, h: int, v: int, s: int, chunk: int) -> dict:
    prompt_h = {"name": "hidden", "dtype": "float32", "shape": [1, "T", h], "T": [1, s]}
    sig = {
        "embed": {"inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "T"], "T": [1, s]}],
                  "outputs": [{"name": "hidden", "dtype": "float32", "shape": [1, "T", h]}]},
        "route": {"inputs": [prompt_h, {"name": "layer", "dtype": "int64", "shape": [1]},
                             {"name": "mask_override", "dtype": "int64", "shape": [n],
                              "values": "-1 = routers decide, 0 = skip, 1 = run"}],
                  "outputs": [{"name": "run", "dtype": "int64", "shape": [1]}]},
        "head": {"inputs": [{"name": "hidden", "dtype": "float32", "shape": [1, 1, h]}],
                 "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, v]}]},
    }
    for i in range(n):
        sig[f"prefill_{i}"] = {"inputs": [{"name": "hidden", "dtype": "float32", "shape": [1, "T", h], "T": [1, chunk]},
                                          {"name": "input_pos", "dtype": "int64", "shape": ["T"],
                                           "values": "the chunk's positions, consecutive"},
                                          {"name": "kv_positions", "dtype": "int64", "shape": ["S"],
                                           "values": "0..input_pos[-1]; its length = cache rows attended"}],
                               "outputs": [{"name": "hidden", "dtype": "float32", "shape": [1, "T", h]}],
                               "writes": "cache rows input_pos of layer i"}
    for i in range(n):
        sig[f"layer_{i}"] = {"inputs": [{"name": "hidden", "dtype": "float32", "shape": [1, 1, h]},
                                        {"name": "input_pos", "dtype": "int64", "shape": [1]},
                                        {"name": "kv_positions", "dtype": "int64", "shape": ["pos+1"],
                                         "values": "0..input_pos; its length = filled cache rows read"}],
                             "outputs": [{"name": "hidden", "dtype": "float32", "shape": [1, 1, h]}]}
    return {m: sig[m] for m in executorch_methods(n)}  # the runtime's list, in call order


def _eos_bos(first_model) -> tuple[int | None, list[int]]:
    from firstkit.routed_model import eos_ids

    eos = eos_ids(None, first_model.base, first_model.tokenizer)
    bos = getattr(first_model.config, "bos_token_id", None)
    if bos is None and first_model.tokenizer is not None:
        bos = first_model.tokenizer.bos_token_id
    return (int(bos) if bos is not None else None), eos


def render_chat_template(tokenizer) -> dict | None:
    """The model's chat template rendered around one user turn: ``{"prefix", "suffix"}`` (``text = prefix + user +
    suffix``, with the generation prompt), so no runtime needs a template engine or pattern-matches templates.

    ``None`` when the tokenizer has no template; an error when the rendering depends on the message beyond
    inserting it (then fixed text around a turn cannot reproduce it).
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    parts = []
    for marker in ("\x00FIRSTKIT_USER_MESSAGE\x00", "\x00another user message, longer\x00"):
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
        if text.count(marker) != 1:
            raise ExportError("the tokenizer's chat template does not insert the user message verbatim once; "
                              "it cannot be rendered for the device runtimes")
        parts.append(tuple(text.split(marker)))
    if parts[0] != parts[1]:
        raise ExportError("the tokenizer's chat template renders differently for different messages; "
                          "it cannot be rendered as fixed text for the device runtimes")
    return {"prefix": parts[0][0], "suffix": parts[0][1]}


def build_manifest(first_model, core: ExportCore, qinfo: dict, policy: str, routers_path: str | None,
                   model_name: str) -> dict:
    """Manifest without ``files``/``backends`` (filled in when the artifacts exist)."""
    from firstkit.architectures import adapter_for

    bos, eos = _eos_bos(first_model)
    cfg = first_model.config
    routing = {
        "policy": "routers" if first_model.routers is not None else "none",
        "description": policy,
        "threshold": first_model.routing.threshold,
        "threshold_logit": core.threshold_logit,
        "never_skip": list(first_model.routing.never_skip),
        "protected_layers": first_model.protected_layers(),
        "routers_path": routers_path,
    }
    lora = getattr(getattr(first_model, "info", None), "extra", {}).get("lora_merged_from")
    if lora:
        routing["lora_merged_from"] = lora
    if first_model.routers is not None:
        routing["router_dim"] = first_model.routers.router_dim
        routing["router_meta"] = first_model.routers.meta
    info = getattr(first_model, "info", None)
    return {
        "format": "firstkit-bundle",
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "id": getattr(info, "model_id", None) or model_name,
            "source": model_name,
            "sha256": first_model.base_sha256(),
            "architecture": adapter_for(cfg).model_type,
            "num_layers": core.n_layers,
            "hidden_size": core.parts.hidden_size,
            "vocab_size": core.parts.vocab_size,
            "num_kv_heads": core.parts.num_kv_heads,
            "head_dim": core.parts.head_dim,
            "bos_id": bos,
            "eos_ids": eos,
        },
        "routing": routing,
        "mask_semantics": MASK_SEMANTICS,
        "max_seq_len": core.max_seq_len,
        "prefill_chunk": core.prefill_chunk,
        "chat_template": render_chat_template(first_model.tokenizer),
        "quantization": qinfo,
        "backends": {},
        "versions": _versions(),
        "files": {},
    }


def write_executorch(core: ExportCore, manifest: dict, out_dir: Path, quantized: bool,
                     progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Export + lower every method and write ``model.pte``; returns step timings."""
    from firstkit.runtime.bundle import PTE_FILE

    from .executorch_backend import constant_methods, export_programs, to_pte_bytes

    t0 = time.perf_counter()
    programs = export_programs(core, progress)
    t1 = time.perf_counter()
    if progress:
        progress("lower to XNNPACK + emit .pte")
    bos = manifest["model"]["bos_id"]
    buf = to_pte_bytes(programs, constant_methods(core, bos, manifest["model"]["eos_ids"]), quantized)
    t2 = time.perf_counter()
    (out_dir / PTE_FILE).write_bytes(buf)
    m = manifest["model"]
    manifest["backends"]["executorch"] = {
        "file": PTE_FILE,
        "delegate": "XNNPACK",
        "methods": _method_signatures(m["num_layers"], m["hidden_size"], m["vocab_size"], manifest["max_seq_len"],
                                      core.prefill_chunk),
        "constant_methods": constant_methods(core, bos, m["eos_ids"]),
        "shared_mutable_buffers": [f"core.{k}_cache_{i}" for i in range(m["num_layers"]) for k in "kv"],
        "runtime_requirements": ["share memory arenas between methods (Python executorch.runtime does; C++ "
                                 "Module(..., share_memory_arenas=true), or one HierarchicalAllocator per "
                                 "method over the same lazily mapped buffers as first_runner)",
                                 "copy outputs before the next execute (outputs may alias shared arenas)",
                                 f"quantized kernels registered ({manifest['quantization']['scheme']})"
                                 if quantized else "portable+XNNPACK"],
    }
    return {"torch_export_s": t1 - t0, "lower_s": t2 - t1}


def check_output(output: Path) -> None:
    """Refuse an ``--output`` that first-export may not replace; a new path or an empty folder is fine.

    An existing folder is replaced only when it is a firstkit bundle: a valid manifest, and nothing in it but
    ``manifest.json`` and the files that manifest lists (no other file, folder or symbolic link).
    """
    from firstkit.runtime.bundle import MANIFEST, BundleError, read_manifest

    def refuse(why: str) -> ExportError:
        return ExportError(f"{output} exists and is not a firstkit bundle ({why}); refusing to overwrite it")

    if output.is_symlink():
        raise refuse("it is a symbolic link")
    if not output.exists():
        return
    if not output.is_dir():
        raise refuse("it is not a folder")
    if not any(output.iterdir()):
        return  # an empty folder
    try:
        listed = set(read_manifest(output, check_hashes=False)["files"])
    except BundleError as e:
        raise refuse(str(e).removeprefix(f"{output}: ").removeprefix(f"{output / MANIFEST}: ")) from None
    parents = {p.as_posix() for rel in listed for p in Path(rel).parents}
    for dirpath, dirs, files in os.walk(output):
        for name in [*dirs, *files]:
            full = Path(dirpath) / name
            rel = full.relative_to(output).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise refuse(f"{rel} is a symbolic link")
            if stat.S_ISDIR(st.st_mode):
                if rel not in parents:
                    raise refuse(f"folder {rel}/ holds no file of the bundle")
            elif rel != MANIFEST and rel not in listed:
                raise refuse(f"{rel} is not one of its files")


def _lock_dir(path: Path) -> int | None:
    """An exclusive ``flock`` on folder ``path`` (fd to close later), or None when another process holds one."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def clean_stale_temps(output: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` folders an interrupted export of ``output`` left (SIGKILL, power
    loss). A live export holds a lock on its folders, so only abandoned ones are removed; an abandoned
    ``.old-*`` (the previous bundle, moved aside for a replace that never finished) goes back to ``output``
    when nothing is there. Returns what was removed."""
    removed: list[Path] = []
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for cand in sorted(parent.glob(f".{output.name}.{kind}-*")):
            if cand.is_symlink() or not cand.is_dir():
                continue
            fd = _lock_dir(cand)
            if fd is None:
                continue  # a live first-export is writing it
            try:
                if kind == "old" and not output.exists() and not output.is_symlink():
                    os.replace(cand, output)  # the bundle that was being replaced: give it back
                    if log:
                        log(f"restored {output} from an interrupted replace")
                    continue
                shutil.rmtree(cand, ignore_errors=True)
                removed.append(cand)
                if log:
                    log(f"removed {cand.name} (left by an interrupted export)")
            finally:
                os.close(fd)
    return removed


def _atomic_publish(tmp: Path, dest: Path) -> None:
    """Move the finished bundle into place; an existing bundle (or empty folder) at ``dest`` is replaced."""
    check_output(dest)  # again: the folder may have changed while the export ran
    if dest.exists() and any(dest.iterdir()):
        fd = _lock_dir(dest)
        if fd is None:
            raise ExportError(f"another first-export is replacing {dest}; try again when it is done")
        try:
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except OSError:
                os.replace(old, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)
    else:
        os.replace(tmp, dest)  # new path, or onto an empty folder (fails if a file appeared in it meanwhile)


def export_bundle(model: str, routers: str | None, backend: str, scheme: str, max_seq_len: int, output: Path,
                  verify: bool = True, threads: int | None = None, verify_tokens: int = 8, atol: float = 1e-3,
                  progress: Callable[[str], None] | None = None, first_model=None,
                  budget: float | None = None, head_bits: int = 8, prefill_chunk: int | None = None) -> ExportResult:
    """Run every step; on any failure nothing is left at ``output``."""
    if backend not in BACKEND_CHOICES:
        raise ExportError(f"unknown backend {backend!r}; choose from {', '.join(BACKEND_CHOICES)}")
    if scheme not in SCHEMES:
        raise ExportError(f"unknown quantization {scheme!r}; choose from {', '.join(SCHEMES)}")
    if scheme not in ("none", "8da4w") and backend in ("onnx", "all"):
        raise ExportError(f"--quantize {scheme} is ExecuTorch only (ONNX has none and 8da4w = int4 MatMulNBits)")
    if head_bits != 8 and scheme != "8da4w":
        raise ExportError(f"--head-bits {head_bits} applies to --quantize 8da4w only (got {scheme})")
    if max_seq_len < 2:
        raise ExportError("--max-seq-len must be >= 2")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ExportError("--prefill-chunk must be >= 1")
    output = Path(output)
    check_output(output)
    clean_stale_temps(output, progress)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if first_model is None:
        routers_path, policy = resolve_routers(model, routers, budget)
        if progress:
            progress(f"load {model}")
        first_model = load_first_model(model, routers_path)
    else:
        routers_path = None
        policy = "routers of the given model" if first_model.routers is not None else \
            "no routers: all layers run, mask_override decides"
    timings["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if progress:
        progress(f"quantize ({scheme})")
    core, qinfo = build_core(first_model, scheme, max_seq_len, head_bits=head_bits, prefill_chunk=prefill_chunk)
    timings["quantize_s"] = time.perf_counter() - t
    manifest = build_manifest(first_model, core, qinfo, policy, routers_path, model)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    tmp_lock = _lock_dir(tmp)  # held until the end: a concurrent export does not take it for stale
    try:
        if backend in ("executorch", "all"):
            timings.update({f"executorch_{k}": v for k, v in
                            write_executorch(core, manifest, tmp, scheme != "none", progress).items()})
        if backend in ("onnx", "all"):
            from .onnx_backend import write_onnx

            t = time.perf_counter()
            # ONNX exports the float graph (quantized by onnxruntime afterwards), not the torchao-quantized one
            onnx_core = core if scheme == "none" else build_core(first_model, "none", max_seq_len,
                                                                 prefill_chunk=prefill_chunk)[0]
            manifest["backends"]["onnx"] = write_onnx(onnx_core, tmp, scheme, progress)
            timings["onnx_export_s"] = time.perf_counter() - t
        if first_model.tokenizer is not None:
            first_model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        from firstkit.runtime.bundle import file_table, validate_manifest

        manifest["files"] = file_table(tmp)
        validate_manifest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        verification: dict[str, dict] = {}
        if verify:
            from firstkit.runtime.runner import BundleRunner

            from .verify import verify_bundle

            for b in manifest["backends"]:
                if progress:
                    progress(f"verify {b}")
                t = time.perf_counter()
                runner = BundleRunner(tmp, backend=b, threads=threads, load_tokenizer=False)
                # the eager quantized model is what the .pte holds (ONNX quantizes its own float graph)
                qref = core.base if scheme != "none" and b == "executorch" else None
                verification[b] = verify_bundle(runner, first_model, scheme != "none", verify_tokens, atol,
                                                quantized_reference=qref)
                del runner
                timings[f"verify_{b}_s"] = time.perf_counter() - t
            manifest["verification"] = {b: {k: v for k, v in r.items() if k != "cases"}
                                        for b, r in verification.items()}
            manifest["export"] = {"timings": dict(timings)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            failed = [b for b, r in verification.items() if not r["passed"]]
            if failed:
                detail = "; ".join(f"{b}: max |logit diff| {verification[b]['max_abs_logit_diff']:.2e}, "
                                   f"greedy equal {verification[b]['greedy_tokens_equal']}/"
                                   f"{verification[b]['cases_total']}, masks match "
                                   f"{verification[b]['masks_match_eager']}" for b in failed)
                raise ExportError(f"verification failed ({detail}); no bundle written")
        else:
            manifest["verification"] = None
            manifest["export"] = {"timings": dict(timings)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _atomic_publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if tmp_lock is not None:
            with contextlib.suppress(OSError):
                os.close(tmp_lock)
    return ExportResult(output=output, manifest=manifest, timings=timings, verification=verification)
