"""cnncompile: a compiler for convolutional neural networks.

    mod = cnncompile.compile("model.onnx", input_shapes={"input": (1, 3, 224, 224)})
    out = mod.run({"input": x})
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from . import errors
from .errors import CnnCompileError
from .frontend import import_onnx, load_model
from .ir import Graph, Node, TensorType, Value
from .runtime import Module

__version__ = "0.1.0"


def compile(model, target: str = "reference", input_shapes: Mapping[str, tuple] | None = None,
            opt_level: int = 2, constant_inputs: Mapping[str, np.ndarray] | None = None) -> Module:
    """Compile an ONNX model (path, bytes or ModelProto) into a runnable Module.

    input_shapes    fixes dynamic dimensions: {"input": (1, 3, 224, 224)}
    target          "reference" (NumPy interpreter) or "cpu" (the reference until the Numba backend
                    lands); "cuda" comes later
    opt_level       0-3; the optimization passes arrive with the pass-pipeline work
    constant_inputs binds graph inputs to fixed arrays at compile time (their values become constants)
    """
    from .backends import get_backend
    from .passes import run_pipeline

    backend = get_backend(target)
    if opt_level not in (0, 1, 2, 3):
        raise errors.UserError(f"opt_level must be 0, 1, 2 or 3, not {opt_level!r}")
    graph = import_onnx(model, input_shapes=input_shapes, constant_inputs=constant_inputs)
    graph = run_pipeline(graph, opt_level)
    return Module(graph, backend(graph), target)


__all__ = ["compile", "import_onnx", "load_model", "Module", "Graph", "Node", "Value",
           "TensorType", "errors", "CnnCompileError", "__version__"]
