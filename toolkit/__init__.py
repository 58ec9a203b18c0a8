"""firstkit: FiRST layer skipping for on-device LLMs.

>>> import firstkit
>>> model = firstkit.load_model("smollm2-135m-instruct")          # every layer runs
>>> ids = model.encode_chat("What is the capital of France?")
>>> model.decide_mask(ids)                                         # routers' choice (all True here)
>>> out = model.generate(ids, max_new_tokens=16)                   # prompt + new tokens

Where things live: ``models`` (offline model resolver), ``architectures`` (per-architecture adapters),
``router`` (the routers), ``routed_model`` (the router-augmented model: where a mask is decided and
consumed in eager PyTorch), ``policies`` (baseline mask policies), ``firstkit.export`` (graphs for
ExecuTorch/ONNX), ``firstkit.runtime`` (runs exported bundles), ``firstkit.device_bench`` (devices).
"""

from firstkit.models import DEFAULT_MODEL, NAMED_MODELS, ModelLoadError, ModelNotFoundError, resolve_model
from firstkit.policies import MaskPolicy, make_policy
from firstkit.routed_model import FirstModel, RoutedCache, RoutedOutput, RoutingConfig, load_model
from firstkit.router import RouterCheckpointError, RouterStack

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "NAMED_MODELS",
    "FirstModel",
    "MaskPolicy",
    "ModelLoadError",
    "ModelNotFoundError",
    "RoutedCache",
    "RoutedOutput",
    "RouterCheckpointError",
    "RouterStack",
    "RoutingConfig",
    "load_model",
    "make_policy",
    "resolve_model",
]
