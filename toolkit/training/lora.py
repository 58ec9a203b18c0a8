"""LoRA adapters (PEFT) on the base model's linear projections: add, save, load-and-merge.

Adapters are saved with the parameter names of the *unwrapped* base model, so they load onto a plain
transformers model as well as onto a ``FirstModel``. ``apply_lora`` merges them into the weights
(``merge``), as export needs: after it the model is a plain model with changed weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from firstkit.routed_model import FirstModel, RoutedDecoderLayer

__all__ = ["LORA_DIR", "LORA_TARGETS", "add_lora", "save_lora", "apply_lora", "merge_lora", "has_lora",
           "adapters_disabled"]

LORA_DIR = "lora"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
#: attention and MLP projections of the supported architectures (Llama/Qwen/Gemma names + Phi-3 fused ones)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                "gate_up_proj"]


@contextmanager
def unwrapped(model: FirstModel):
    """Temporarily put the original decoder layers back (names as in the plain base model)."""
    layers = model.adapter.layers(model.base)
    wrapped = list(layers)
    model.unwrap_layers()
    try:
        yield model.base
    finally:
        for i, m in enumerate(wrapped):
            layers[i] = m


@contextmanager
def adapters_disabled(model: FirstModel):
    """Run ``model`` as the plain base for the duration (LoRA layers pass through); no-op without LoRA."""
    layers = [m for m in model.base.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)  # also makes the adapter weights trainable again


def _rewrap(model: FirstModel) -> None:
    layers = model.adapter.layers(model.base)
    for i, layer in enumerate(layers):
        if not isinstance(layer, RoutedDecoderLayer):
            layers[i] = RoutedDecoderLayer(layer, i, model)


def _config(rank: int, alpha: float, dropout: float) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")


def add_lora(model: FirstModel, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Inject trainable LoRA adapters into the base model (in place); returns the LoRA parameters."""
    with unwrapped(model) as base:
        inject_adapter_in_model(_config(rank, alpha, dropout), base)
    params = [p for n, p in model.base.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError("no LoRA target module found in the base model")
    for p in params:
        p.requires_grad_(True)
    model._lora = {"r": rank, "lora_alpha": alpha}  # type: ignore[attr-defined]
    return params


def save_lora(model: FirstModel, directory: str | os.PathLike) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (float32) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = getattr(model, "_lora", None)
    if meta is None:
        raise ValueError("this model has no LoRA adapters (call add_lora first)")
    with unwrapped(model) as base:
        state = {k: v.detach().to(torch.float32).contiguous().cpu()
                 for k, v in get_peft_model_state_dict(base).items()}
    cfg = _config(meta["r"], meta["lora_alpha"], 0.0).to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    cfg["base_model_name_or_path"] = model.info.model_id
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        save_file(state, os.path.join(tmp, LORA_WEIGHTS))
        with open(os.path.join(tmp, LORA_CONFIG), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True, default=str)
        for name in (LORA_WEIGHTS, LORA_CONFIG):
            os.replace(os.path.join(tmp, name), directory / name)
    return directory


def has_lora(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` (a router checkpoint or an adapter folder) holds a LoRA adapter."""
    d = Path(directory)
    return (d / LORA_DIR / LORA_WEIGHTS).is_file() or (d / LORA_WEIGHTS).is_file()


def merge_lora(module: torch.nn.Module) -> int:
    """Merge every LoRA layer inside ``module`` into its base linear and remove the adapter; returns the count."""
    count = 0
    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):
            sub.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, sub.get_base_layer())
            count += 1
    return count


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def apply_lora(model: FirstModel, directory: str | os.PathLike) -> FirstModel:
    """Load the adapter in ``directory`` (or ``directory/lora``) and merge it into the base weights."""
    d = Path(directory)
    if (d / LORA_DIR / LORA_WEIGHTS).is_file():
        d = d / LORA_DIR
    if not (d / LORA_WEIGHTS).is_file() or not (d / LORA_CONFIG).is_file():
        raise FileNotFoundError(f"no LoRA adapter in {directory} (needs {LORA_WEIGHTS} and {LORA_CONFIG})")
    try:
        cfg = json.loads((d / LORA_CONFIG).read_text())
        config = _config(int(cfg["r"]), float(cfg["lora_alpha"]), 0.0)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{d / LORA_CONFIG}: malformed LoRA config ({type(e).__name__}: {_first_line(e)})") from None
    try:
        state = load_file(str(d / LORA_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - SafetensorError for a corrupt or truncated file
        raise ValueError(f"{d / LORA_WEIGHTS} is not a readable safetensors file ({_first_line(e)})") from None
    dtype = next(model.base.parameters()).dtype
    with unwrapped(model) as base:
        inject_adapter_in_model(config, base)
        try:
            result = set_peft_model_state_dict(base, {k: v.to(dtype) for k, v in state.items()})
        except RuntimeError as e:  # torch's "size mismatch": an adapter of another model
            raise ValueError(f"LoRA adapter in {d} does not fit this model ({_first_line(e)})") from None
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"LoRA adapter in {d} does not fit this model (unexpected keys, e.g. {missing[0]})")
        n = merge_lora(base)
    if n == 0:
        raise ValueError(f"LoRA adapter in {d} matched no module of this model")
    _rewrap(model)
    model._sha256 = None  # weights changed
    return model
