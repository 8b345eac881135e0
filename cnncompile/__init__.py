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
from .autodiff import optim  # noqa: E402  (cnncompile.optim.SGD, Adam)
from .autodiff.training import compile_training  # noqa: E402
from .autodiff.grad import grad  # noqa: E402  (cnncompile.grad: the backward graph)

__version__ = "0.1.0"


def compile(model, target: str = "reference", input_shapes: Mapping[str, tuple] | None = None,
            opt_level: int = 2, constant_inputs: Mapping[str, np.ndarray] | None = None,
            disabled_passes: Sequence[str] = (), passes: Sequence[str] | None = None,
            verify_each: bool = False, tune: bool = False) -> Module:
    """Compile an ONNX model (path, bytes or ModelProto) into a runnable Module.

    input_shapes    fixes dynamic dimensions: {"input": (1, 3, 224, 224)}
    target          "reference" (NumPy interpreter) or "cpu" (generated Python + Numba kernels over
                    one memory arena); "cuda" comes later
    opt_level       0 none, 1 cleanup, 2 cleanup + fusion + lowering + memory plan (default), 3 also
                    autotuning; ``cnncompile.passes.PIPELINES`` lists them
    constant_inputs binds graph inputs to fixed arrays at compile time (their values become constants)
    disabled_passes pass names to leave out of the pipeline
    passes          a custom pipeline (list of pass names) instead of opt_level's
    verify_each     verify the IR after every pass (slower; on in tests)
    tune            also run the autotune pass (as opt_level 3 does): time each conv's algorithms
                    on its real shape, decisions cached in ~/.cache/cnncompile/tuning.json
    """
    from .backends import get_backend
    from .passes import run_pipeline

    backend = get_backend(target)
    if tune:
        from .passes import pipeline
        names = list(passes) if passes is not None else pipeline(opt_level, disabled_passes)
        passes = names if "autotune" in names else names + ["autotune"]
    graph = import_onnx(model, input_shapes=input_shapes, constant_inputs=constant_inputs)
    meta = {"target": target, "layout": getattr(backend, "preferred_layout", "NCHW")}
    graph, manager = run_pipeline(graph, opt_level, disabled_passes, passes, verify_each, meta=meta)
    module = Module(graph, backend(graph), target)
    module.pass_records = manager.records
    return module


from .runtime.artifact import load, save  # noqa: E402  (needs __version__)

__all__ = ["compile", "load", "save", "inspect", "import_onnx", "load_model", "Module", "Graph",
           "Node", "Value", "TensorType", "errors", "CnnCompileError", "__version__"]
__all__ += ["compile_training", "optim", "grad"]
