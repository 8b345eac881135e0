"""cnncompile: a compiler for convolutional neural networks.

    mod = cnncompile.compile("model.onnx", input_shapes={"input": (1, 3, 224, 224)})
    out = mod.run({"input": x})
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from . import errors
from .errors import CnnCompileError
from .frontend import import_onnx, load_model
from .ir import Graph, Node, TensorType, Value
from .runtime import Module
from .inspect import inspect  # the function; it hides the submodule of the same name

__version__ = "0.1.0"


def compile(model, target: str = "reference", input_shapes: Mapping[str, tuple] | None = None,
            opt_level: int = 2, constant_inputs: Mapping[str, np.ndarray] | None = None,
            disabled_passes: Sequence[str] = (), passes: Sequence[str] | None = None,
            verify_each: bool = False) -> Module:
    """Compile an ONNX model (path, bytes or ModelProto) into a runnable Module.

    input_shapes    fixes dynamic dimensions: {"input": (1, 3, 224, 224)}
    target          "reference" (NumPy interpreter) or "cpu" (the reference until the Numba backend
                    lands); "cuda" comes later
    opt_level       0 none, 1 cleanup, 2 cleanup + fusion + lowering + memory plan (default), 3 also
                    autotuning; ``cnncompile.passes.PIPELINES`` lists them
    constant_inputs binds graph inputs to fixed arrays at compile time (their values become constants)
    disabled_passes pass names to leave out of the pipeline
    passes          a custom pipeline (list of pass names) instead of opt_level's
    verify_each     verify the IR after every pass (slower; on in tests)
    """
    from .backends import get_backend
    from .passes import run_pipeline

    backend = get_backend(target)
    graph = import_onnx(model, input_shapes=input_shapes, constant_inputs=constant_inputs)
    meta = {"target": target, "layout": getattr(backend, "preferred_layout", "NCHW")}
    graph, manager = run_pipeline(graph, opt_level, disabled_passes, passes, verify_each, meta=meta)
    module = Module(graph, backend(graph), target)
    module.pass_records = manager.records
    return module


__all__ = ["compile", "inspect", "import_onnx", "load_model", "Module", "Graph", "Node", "Value",
           "TensorType", "errors", "CnnCompileError", "__version__"]
