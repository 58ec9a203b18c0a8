"""Python runtime for firstkit bundles (ExecuTorch pybindings or onnxruntime).

>>> from firstkit.runtime import load_bundle
>>> runner = load_bundle("bundles/smollm2-135m-instruct-none")
>>> runner.generate("What is the capital of France?", max_new_tokens=16)["text"]
"""

from .bundle import BundleError, read_manifest
from .runner import BundleRunner, load_bundle, parse_mask

__all__ = ["BundleError", "BundleRunner", "load_bundle", "parse_mask", "read_manifest"]
