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

import logging

# torchao (pulled in by transformers) warns at import about its CUDA-only kernels and torch about pytree
# enum registration: noise on a CPU machine that every CLI would otherwise print.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from firstkit.models import DEFAULT_MODEL, NAMED_MODELS, ModelLoadError, ModelNotFoundError, resolve_model  # noqa: E402
from firstkit.policies import MaskPolicy, make_policy  # noqa: E402
from firstkit.routed_model import FirstModel, RoutedCache, RoutedOutput, RoutingConfig, load_model  # noqa: E402
from firstkit.router import RouterCheckpointError, RouterStack  # noqa: E402

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
