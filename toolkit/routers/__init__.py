"""Trained FiRST routers shipped with firstkit (small safetensors + JSON per model and skip budget).

Layout: ``<model name>/skip<NN>/`` (routers only) and ``<model name>/skip<NN>-lora/`` (routers trained
jointly with a LoRA adapter in ``lora/``; merge it with ``firstkit.training.lora.apply_lora``).
``NN`` is the skip budget in percent of layers. See docs/training.md for how they were made.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["ROUTERS_DIR", "DEFAULT_BUDGET", "available_routers", "default_routers_path"]

ROUTERS_DIR = Path(__file__).resolve().parent
DEFAULT_BUDGET = 0.15
_NAME = re.compile(r"^skip(\d{1,2})(-lora)?$")


def available_routers(model_name: str, lora: bool = False) -> dict[float, Path]:
    """Shipped checkpoints of ``model_name``: budget (fraction) -> folder."""
    folder = ROUTERS_DIR / model_name
    out: dict[float, Path] = {}
    if not folder.is_dir():
        return out
    for d in sorted(folder.iterdir()):
        m = _NAME.match(d.name)
        if m and bool(m.group(2)) == lora and (d / "router_config.json").is_file():
            out[int(m.group(1)) / 100] = d
    return out


def default_routers_path(model_name: str = "smollm2-135m-instruct", budget: float | None = None,
                         lora: bool = False) -> Path | None:
    """Folder of the shipped routers for ``model_name`` at ``budget`` (fraction of layers skipped).

    ``budget=None`` picks the default budget (0.15) or, failing that, the smallest shipped one.
    Returns ``None`` when nothing is shipped for the model; raises ``ValueError`` when routers exist but
    none within 0.05 of ``budget``. ``lora=True`` selects the checkpoints trained with a LoRA adapter.
    """
    found = available_routers(model_name, lora)
    if not found:
        return None
    if budget is None:
        return found.get(DEFAULT_BUDGET, found[min(found)])
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"budget must be a fraction in [0, 1), got {budget}")
    best = min(found, key=lambda b: abs(b - budget))
    if abs(best - budget) > 0.05 + 1e-9:
        raise ValueError(f"no shipped routers for {model_name} near budget {budget}; "
                         f"shipped: {', '.join(f'{b:.2f}' for b in sorted(found))}")
    return found[best]


def describe(path: str | Path) -> dict:
    """The router_config.json of a shipped checkpoint."""
    return json.loads((Path(path) / "router_config.json").read_text())
