"""The reference backend: interpret the IR node by node with each op's NumPy reference.

It is the semantics every other backend is tested against, so it also checks every result against the
shape rule: a mismatch is a bug in an op module and is reported as one.
"""

from __future__ import annotations

import numpy as np

from ..errors import CnnCompileError, InternalError, UserError
from ..ir.graph import Graph
from ..ir.types import TensorType
from ..ops import OPS


def last_uses(graph: Graph) -> dict[int, list]:
    """node index -> values whose last reader is that node (and that are not graph outputs)."""
    last: dict[int, int] = {}
    keep = {id(v) for v in graph.outputs}
    by_id = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None and not v.is_constant and id(v) not in keep:
                last[id(v)] = i
                by_id[id(v)] = v
    result: dict[int, list] = {}
    for vid, i in last.items():
        result.setdefault(i, []).append(by_id[vid])
    return result


class ReferenceExecutor:
    name = "reference"
    preferred_layout = "NCHW"

    def __init__(self, graph: Graph):
        self.graph = graph
        self._free_after = last_uses(graph)
        for node in graph.nodes:
            if node.op not in OPS:
                raise InternalError(f"reference backend: no reference implementation for op "
                                    f"'{node.op}' (node '{node.name}')")

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        env: dict[int, np.ndarray] = {}
        for value, array in zip(self.graph.inputs, inputs):
            env[id(value)] = array
        for value in self.graph.constants.values():
            env[id(value)] = value.data
        for i, node in enumerate(self.graph.nodes):
            args = [env[id(v)] if v is not None else None for v in node.inputs]
            results = run_node(node, args)
            for value, array in zip(node.outputs, results):
                env[id(value)] = array
            for value in self._free_after.get(i, ()):
                del env[id(value)]  # freed at last use, as a compiled backend would
        return [env[id(v)] for v in self.graph.outputs]


def run_node(node, args: list) -> list[np.ndarray]:
    op = OPS[node.op]
    try:
        result = op.reference(*args, **node.attrs)
    except CnnCompileError as exc:
        if isinstance(exc, UserError):
            exc.args = (f"{node.op} node '{node.name}': {exc}",) + tuple(exc.args[1:])
        raise
    except Exception as exc:
        shapes = ", ".join("none" if a is None else str(TensorType.of(np.asarray(a))) for a in args)
        raise InternalError(f"{node.op} node '{node.name}': reference implementation failed "
                            f"({exc!r}); inputs: {shapes}") from exc
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    for value, array in zip(node.outputs, results):
        check_result(node, value, array)
    return [np.asarray(r) for r in results]


def check_result(node, value, array) -> None:
    array = np.asarray(array)
    want = value.type
    ok = array.dtype == want.dtype and array.ndim == want.rank and all(
        isinstance(d, str) or d == a for d, a in zip(want.shape, array.shape))
    if not ok:
        raise InternalError(f"{node.op} node '{node.name}': the reference produced "
                            f"{TensorType.of(array)} for %{value.name}, but the shape rule said "
                            f"{want}. The op module disagrees with itself.")
