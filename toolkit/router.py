"""FiRST routers: one tiny MLP before every decoder layer, deciding from the prompt whether it runs.

Router ``i`` sees the hidden state entering layer ``i`` over the prompt tokens, normalises each token
(parameter-free RMS norm), averages over the real (non-padding) prompt tokens, and maps the pooled
vector to one logit: ``out(silu(proj(pooled)))``. The layer runs iff ``logit >= log(t / (1 - t))``.
The exact rule is written down in docs/CONTRACTS.md; export reproduces it in the prefill graph.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

ROUTER_WEIGHTS = "routers.safetensors"
ROUTER_CONFIG = "router_config.json"
RMS_EPS = 1e-6


class RouterCheckpointError(ValueError):
    """A router checkpoint is missing, malformed, or made for another model."""


def pool_prompt(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over prompt tokens of the RMS-normalised hidden state: [B, T, H] -> [B, H]."""
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    if attention_mask is None:
        return normed.mean(dim=1)
    weights = attention_mask.to(normed.dtype).unsqueeze(-1)
    return (normed * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def router_logit(pooled: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor, out_weight: torch.Tensor,
                 out_bias: torch.Tensor) -> torch.Tensor:
    """One layer's router on pooled states ``[..., H]``: ``out(silu(proj(pooled)))`` -> logits ``[...]``.

    :class:`LayerRouter` applies it with its own weights; the export's ``route`` graph with one layer's row of
    the stacked weights.
    """
    return F.linear(F.silu(F.linear(pooled, proj_weight, proj_bias)), out_weight, out_bias).squeeze(-1)


def routing_rule(logit: torch.Tensor | None, threshold_logit: float, protected: torch.Tensor | bool,
                 override: torch.Tensor) -> torch.Tensor:
    """The routing rule (docs/CONTRACTS.md), the one owner: eager ``FirstModel`` and every exported graph call it.

    An override (``0``/``1``) wins; otherwise the layer runs iff ``logit >= threshold_logit`` or it is
    protected; ``logit`` ``None`` (no routers): it runs. Returns bool, shaped like ``override`` (int, ``-1`` =
    the routers decide). Overrides that skip a protected layer are refused before this, where the mask spec
    is read (:func:`firstkit.mask_spec.check_protected`): a traced graph cannot raise.
    """
    if logit is None:
        run = torch.ones_like(override, dtype=torch.bool)
    else:
        run = (logit >= threshold_logit) | torch.as_tensor(protected, device=logit.device)
    # an int64 select (onnxruntime has no bool Where kernel)
    return torch.where(override >= 0, (override > 0).to(torch.long), run.to(torch.long)) > 0


class LayerRouter(nn.Module):
    """Pooled prompt state -> one logit: run the layer (>= threshold) or skip it."""

    def __init__(self, hidden_size: int, router_dim: int = 64, init_bias: float = 3.0):
        super().__init__()
        self.proj = nn.Linear(hidden_size, router_dim)
        self.out = nn.Linear(router_dim, 1)
        nn.init.normal_(self.proj.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.constant_(self.out.bias, init_bias)  # sigmoid(3) ~ 0.95: every layer runs at the start

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return router_logit(pooled, self.proj.weight, self.proj.bias, self.out.weight, self.out.bias)


class RouterStack(nn.Module):
    """The routers of one model, with ``save_pretrained``/``from_pretrained`` (safetensors + JSON).

    ``meta`` names the base model (id, sha256 of its weights), the layer count and training facts
    (budget, threshold, ...); ``from_pretrained`` refuses a checkpoint made for another model.
    """

    def __init__(self, num_layers: int, hidden_size: int, router_dim: int = 64, init_bias: float = 3.0,
                 meta: dict | None = None):
        super().__init__()
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.router_dim = router_dim
        self.routers = nn.ModuleList(
            LayerRouter(hidden_size, router_dim, init_bias) for _ in range(num_layers)
        )
        self.meta: dict = dict(meta or {})

    def __getitem__(self, index: int) -> LayerRouter:
        return self.routers[index]

    def __len__(self) -> int:
        return self.num_layers

    def logit(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Router ``index``'s logit [B] for the hidden state entering layer ``index``."""
        return self.routers[index](pool_prompt(hidden, attention_mask))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self, prompt_len: int) -> int:
        """FLOPs of all routers for one prompt: norm + pool (~3H per token) and the MLP on the pooled vector."""
        pool = 3 * self.hidden_size * prompt_len
        mlp = 2 * (self.hidden_size * self.router_dim + self.router_dim)
        return self.num_layers * (pool + mlp)

    def config_dict(self) -> dict:
        return {
            "format": "firstkit-routers",
            "format_version": 1,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "router_dim": self.router_dim,
            **self.meta,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``routers.safetensors`` + ``router_config.json`` atomically into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            save_file(state, os.path.join(tmp, ROUTER_WEIGHTS))
            with open(os.path.join(tmp, ROUTER_CONFIG), "w") as f:
                json.dump(self.config_dict(), f, indent=2, sort_keys=True)
            for name in (ROUTER_WEIGHTS, ROUTER_CONFIG):
                os.replace(os.path.join(tmp, name), directory / name)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, num_layers: int | None = None,
                        hidden_size: int | None = None, model_sha256: str | None = None) -> RouterStack:
        """Load routers; with ``num_layers``/``hidden_size``/``model_sha256`` given, refuse a mismatch."""
        directory = Path(directory)
        config_path, weights_path = directory / ROUTER_CONFIG, directory / ROUTER_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise RouterCheckpointError(
                f"{directory} is not a router checkpoint (needs {ROUTER_CONFIG} and {ROUTER_WEIGHTS})"
            )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RouterCheckpointError(f"{config_path}: invalid JSON ({e})") from e
        except OSError as e:
            raise RouterCheckpointError(f"{config_path}: cannot read it ({e.strerror or e})") from e
        if not isinstance(config, dict) or config.get("format") != "firstkit-routers":
            raise RouterCheckpointError(f"{config_path}: not a firstkit router config")
        for key in ("num_layers", "hidden_size", "router_dim"):
            v = config.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RouterCheckpointError(f"{config_path}: {key} must be a positive integer, got {v!r}")
        if num_layers is not None and config["num_layers"] != num_layers:
            raise RouterCheckpointError(
                f"routers in {directory} were made for a {config['num_layers']}-layer model, "
                f"this model has {num_layers} layers"
            )
        if hidden_size is not None and config["hidden_size"] != hidden_size:
            raise RouterCheckpointError(
                f"routers in {directory} expect hidden size {config['hidden_size']}, model has {hidden_size}"
            )
        saved_sha = config.get("base_model_sha256")
        if model_sha256 is not None and saved_sha is not None and saved_sha != model_sha256:
            raise RouterCheckpointError(
                f"routers in {directory} were trained for model {config.get('base_model', '?')} "
                f"(weights sha256 {saved_sha[:12]}...), not for this model (sha256 {model_sha256[:12]}...)"
            )
        meta = {k: v for k, v in config.items()
                if k not in {"format", "format_version", "num_layers", "hidden_size", "router_dim"}}
        _check_router_weights(weights_path, config["num_layers"], config["hidden_size"], config["router_dim"])
        stack = cls(config["num_layers"], config["hidden_size"], config["router_dim"], meta=meta)
        try:
            stack.load_state_dict(load_file(str(weights_path)))
        except Exception as e:  # noqa: BLE001 - safetensors/torch errors for a file changed after the check
            raise RouterCheckpointError(f"{weights_path}: cannot be loaded ({str(e).strip().splitlines()[0][:200]})") \
                from None
        return stack


def _check_router_weights(path: Path, num_layers: int, hidden_size: int, router_dim: int) -> None:
    """Every router tensor present with the shape router_config.json implies (read from the header only)."""
    from safetensors import safe_open

    expected = {}
    for i in range(num_layers):
        expected.update({f"routers.{i}.proj.weight": [router_dim, hidden_size], f"routers.{i}.proj.bias": [router_dim],
                         f"routers.{i}.out.weight": [1, router_dim], f"routers.{i}.out.bias": [1]})
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a corrupt or truncated file
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RouterCheckpointError(f"{path} is not a readable safetensors file ({msg})") from None
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise RouterCheckpointError(f"{path} lacks {len(missing)} router tensor(s) (e.g. {missing[0]})")
    for k, want in expected.items():
        if shapes[k] != want:
            raise RouterCheckpointError(f"{path}: {k} has shape {shapes[k]}, router_config.json implies {want} "
                                        f"(hidden size {hidden_size}, router_dim {router_dim})")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise RouterCheckpointError(f"{path} holds tensors a router stack does not have (e.g. {extra[0]})")


def threshold_logit(threshold: float) -> float:
    """Logit at which ``sigmoid(logit) == threshold``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"router threshold must be in (0, 1), got {threshold}")
    return math.log(threshold / (1.0 - threshold))
