"""Frontends bring models into the IR. ONNX is the one we read."""

from .onnx_import import import_onnx, load_model

__all__ = ["import_onnx", "load_model"]
