"""The compiled module users hold: checks inputs, runs the backend, names the outputs."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import InputError
from ..ir.graph import Graph


class Module:
    def __init__(self, graph: Graph, executor, target: str):
        self.graph = graph
        self.target = target
        self.executor = executor
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self.pass_records: list = []

    @property
    def source(self) -> str | None:
        """The generated Python module (CPU backend); None for the reference interpreter."""
        return getattr(self.executor, "source", None)

    def __repr__(self) -> str:
        ins = ", ".join(f"{v.name}: {v.type}" for v in self.graph.inputs)
        outs = ", ".join(f"{v.name}: {v.type}" for v in self.graph.outputs)
        return (f"<cnncompile.Module {self.graph.name!r} target={self.target} "
                f"({ins}) -> ({outs})>")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise InputError("Module.run takes a dict {input name: array}; use mod(x, ...) for "
                             "positional arrays")
        unknown = [k for k in feeds if k not in self.input_names]
        missing = [k for k in self.input_names if k not in feeds]
        if unknown or missing:
            parts = []
            if missing:
                parts.append("missing input(s) " + ", ".join(repr(m) for m in missing))
            if unknown:
                parts.append("unknown input(s) " + ", ".join(repr(u) for u in unknown))
            raise InputError("; ".join(parts) + ". The model's inputs are: " + self._signature())
        arrays = [self._check(v, feeds[v.name]) for v in self.graph.inputs]
        outputs = self.executor.run(arrays)
        return dict(zip(self.output_names, outputs))

    def __call__(self, *arrays):
        if len(arrays) != len(self.input_names):
            raise InputError(f"the model takes {len(self.input_names)} input(s) "
                             f"({self._signature()}), got {len(arrays)}")
        out = self.run(dict(zip(self.input_names, arrays)))
        values = [out[name] for name in self.output_names]
        return values[0] if len(values) == 1 else tuple(values)

    def _signature(self) -> str:
        return ", ".join(f"{v.name}: {v.type}" for v in self.graph.inputs) or "none"

    def _check(self, value, array) -> np.ndarray:
        array = np.asarray(array)
        want = value.type
        if array.dtype != want.dtype:
            raise InputError(f"input '{value.name}' has dtype {array.dtype}, expected "
                             f"{want.dtype} (shape {list(want.shape)}); convert it with "
                             f"x.astype(np.{want.dtype.name})")
        if tuple(array.shape) != tuple(want.shape):
            raise InputError(f"input '{value.name}' has shape {list(array.shape)}, expected "
                             f"{list(want.shape)}; the module was compiled for that shape "
                             f"(recompile with input_shapes={{'{value.name}': "
                             f"{tuple(array.shape)}}} to change it)")
        return array
