"""firstkit.export: FiRST prefill + per-layer decode graphs to ExecuTorch (.pte) and ONNX, verified bundles."""

from .pipeline import ExportError, ExportResult, export_bundle

__all__ = ["ExportError", "ExportResult", "export_bundle"]
