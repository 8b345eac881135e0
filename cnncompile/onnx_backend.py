"""cnncompile as an ``onnx.backend.base.Backend``, so that onnx's backend test suite can run it.

    rep = cnncompile.onnx_backend.prepare(model)        # nothing is compiled yet
    outputs = rep.run([x])                               # compiles for x's shape, then runs

cnncompile compiles for static shapes, so ``prepare`` only keeps the model: each ``run`` compiles
for the shapes of the arrays it is given (and caches the module). Inputs that must be compile-time
constants (a Reshape's shape fed as a graph input, say) are bound to the values given to that run.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper
from onnx.backend.base import Backend, BackendRep, Device, DeviceType

from . import compile as cnn_compile
from .errors import InputError, NotConstantError
from .frontend import load_model


class CnnCompileRep(BackendRep):
    """A prepared model: compiles on first use for each distinct input signature."""

    def __init__(self, model: onnx.ModelProto, target: str = "reference", opt_level: int = 2):
        self.model = model
        self.target = target
        self.opt_level = opt_level
        initializers = {init.name for init in model.graph.initializer}
        self.input_names = [vi.name for vi in model.graph.input if vi.name not in initializers]
        self.output_names = [vi.name for vi in model.graph.output]
        # Inputs found to need binding (NotConstantError) hold for every shape: remember them so
        # that later signatures compile in one go.
        self.bound_inputs: set[str] = set()
        self.modules: dict[tuple, Any] = {}

    def run(self, inputs: Any, **kwargs: Any) -> tuple:
        feeds = self._feeds(inputs)
        module = self._module_for(feeds)
        given = {name: array for name, array in feeds.items() if name in module.input_names}
        results = module.run(given)
        return tuple(np.asarray(results[name]) for name in module.output_names)

    def _feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        if isinstance(inputs, Mapping):
            unknown = [k for k in inputs if k not in self.input_names]
            if unknown:
                raise InputError(f"unknown input(s) {', '.join(map(repr, unknown))}; the model's "
                                 f"inputs are: {', '.join(self.input_names) or 'none'}")
            return {name: np.asarray(value) for name, value in inputs.items()}
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        inputs = list(inputs)
        if len(inputs) > len(self.input_names):
            raise InputError(f"the model takes {len(self.input_names)} input(s) "
                             f"({', '.join(self.input_names) or 'none'}), got {len(inputs)}")
        return {name: np.asarray(value) for name, value in zip(self.input_names, inputs)}

    def _key(self, feeds: dict[str, np.ndarray]) -> tuple:
        parts = []
        for name in sorted(feeds):
            array = feeds[name]
            value = array.tobytes() if name in self.bound_inputs else None
            parts.append((name, array.shape, array.dtype.str, value))
        return tuple(parts)

    def _module_for(self, feeds: dict[str, np.ndarray]):
        key = self._key(feeds)
        module = self.modules.get(key)
        if module is not None:
            return module
        while True:
            shapes = {n: a.shape for n, a in feeds.items() if n not in self.bound_inputs}
            constants = {n: a for n, a in feeds.items() if n in self.bound_inputs}
            try:
                module = cnn_compile(self.model, target=self.target, input_shapes=shapes,
                                     opt_level=self.opt_level, constant_inputs=constants)
                break
            except NotConstantError as exc:
                missing = [n for n in exc.graph_inputs if n not in self.bound_inputs]
                if not missing or any(n not in feeds for n in missing):
                    raise
                self.bound_inputs.update(missing)
        self.modules[self._key(feeds)] = module
        return module


class CnnCompileBackend(Backend):
    """onnx.backend.base.Backend over cnncompile; ``target`` picks the cnncompile target.

    Other keyword arguments (onnx's runner passes per-test options) are accepted and ignored.
    """

    @classmethod
    def prepare(cls, model: Any, device: str = "CPU", target: str = "reference",
                opt_level: int = 2, **kwargs: Any) -> CnnCompileRep:
        if not cls.supports_device(device):
            raise InputError(f"cnncompile's onnx backend runs on CPU, not {device!r}")
        return CnnCompileRep(load_model(model), target=target, opt_level=opt_level)

    @classmethod
    def run_model(cls, model: Any, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Sequence[tuple] | None = None, **kwargs: Any) -> tuple:
        """Run one node: wrap it in a model whose graph inputs are the node's inputs."""
        names = [name for name in node.input if name]
        if isinstance(inputs, Mapping):
            arrays = [np.asarray(inputs[name]) for name in names]
        else:
            arrays = [np.asarray(value) for value in inputs]
        opset = kwargs.pop("opset_version", onnx.defs.onnx_opset_version())
        in_vis = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                                list(a.shape))
                  for name, a in zip(names, arrays)]
        out_vis = []
        for pos, name in enumerate(node.output):
            if outputs_info is not None and pos < len(outputs_info):
                dtype, shape = outputs_info[pos]
                out_vis.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape)))
            else:
                out_vis.append(helper.make_empty_tensor_value_info(name))
        graph = helper.make_graph([node], f"{node.op_type}_node", in_vis, out_vis)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return cls.prepare(model, device, **kwargs).run(arrays)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        try:
            return Device(device).type == DeviceType.CPU
        except AttributeError:
            return False


prepare = CnnCompileBackend.prepare
run_model = CnnCompileBackend.run_model
run_node = CnnCompileBackend.run_node
supports_device = CnnCompileBackend.supports_device

__all__ = ["CnnCompileBackend", "CnnCompileRep", "prepare", "run_model", "run_node",
           "supports_device"]
