"""IR invariants, checked between passes.

A failure is a compiler bug (VerificationError, an InternalError); the message prints the IR around the
offending node with a marker, the way JAX's check_jaxpr does.
"""

from __future__ import annotations

from ..errors import CnnCompileError, VerificationError
from ..ir.types import TensorType
from .printer import graph_lines

CONTEXT_LINES = 3


def verify(graph, check_types: bool = True) -> None:
    defined: set[int] = set()
    names: dict[str, object] = {}

    def define(value, owner) -> None:
        if id(value) in defined:
            fail(graph, owner, f"value %{value.name} is defined twice (SSA)")
        if value.name in names:
            fail(graph, owner, f"two values share the name %{value.name}")
        defined.add(id(value))
        names[value.name] = value

    for value in graph.inputs:
        if value.is_constant:
            fail(graph, value, f"graph input %{value.name} carries constant data")
        define(value, value)
    for key, value in graph.constants.items():
        if not value.is_constant or key != value.name:
            fail(graph, value, f"constant %{value.name} has no data or is filed under '{key}'")
        if TensorType.of(value.data) != value.type:
            fail(graph, value, f"constant %{value.name} is typed {value.type} but holds "
                               f"{TensorType.of(value.data)}")
        define(value, value)

    for node in graph.nodes:
        for pos, value in enumerate(node.inputs):
            if value is not None and id(value) not in defined:
                fail(graph, node, f"input {pos} %{value.name} is used before it is defined "
                                  "(dangling value or nodes out of topological order)")
        for value in node.outputs:
            if value.producer is not node:
                fail(graph, node, f"output %{value.name} does not point back to its node")
            define(value, node)
        if check_types:
            _check_node_types(graph, node)

    for value in graph.outputs:
        if id(value) not in defined:
            fail(graph, None, f"graph output %{value.name} is never defined")


def _check_node_types(graph, node) -> None:
    from ..ops import OPS
    op = OPS.get(node.op)
    if op is None:
        return  # fused/backend-specific ops check their own types
    try:
        expected = op.infer(*[v.type if v is not None else None for v in node.inputs],
                            **node.attrs)
    except CnnCompileError as exc:
        fail(graph, node, f"the shape rule of {node.op} rejects this node: {exc}")
    if isinstance(expected, TensorType):
        expected = [expected]
    for value, want in zip(node.outputs, expected):
        if value.type != want:
            fail(graph, node, f"output %{value.name} is typed {value.type}, but {node.op}'s rule "
                              f"gives {want}")


def fail(graph, culprit, message: str):
    raise VerificationError(f"IR verification failed: {message}\n{excerpt(graph, culprit)}")


def excerpt(graph, culprit, context: int = CONTEXT_LINES) -> str:
    lines = graph_lines(graph, constants=True)
    index = next((i for i, (obj, _) in enumerate(lines) if obj is culprit and obj is not None),
                 None)
    if index is None:
        chosen = lines[-2 * context:]
        return "\n".join("     " + text for _, text in chosen)
    lo, hi = max(0, index - context), min(len(lines), index + context + 1)
    out = []
    for i in range(lo, hi):
        out.append((" --> " if i == index else "     ") + lines[i][1])
    return "\n".join(out)
