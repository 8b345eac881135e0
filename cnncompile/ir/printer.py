"""Text form of the IR: one line per node, stable and diffable.

    %conv1_out: f32[1,64,56,56] = Conv(%x, %w1) {group=1, pads=[1,1,1,1], strides=[1,1]}  # from 'conv1'
"""

from __future__ import annotations

import re

import numpy as np

from .types import TensorType

_PLAIN = re.compile(r"^[A-Za-z0-9_.:/\-]+$")


def value_ref(value) -> str:
    if value is None:
        return "_"
    name = value.name
    return f"%{name}" if _PLAIN.match(name) else f"%{name!r}"


def format_attr(value) -> str:
    if isinstance(value, np.ndarray):
        if value.size <= 8:
            return f"{TensorType.of(value)}{format_attr(value.tolist())}"
        return f"<{TensorType.of(value)}>"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_attr(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, (np.floating, np.integer)):
        return repr(value.item())
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, np.dtype):
        return repr(value.name)
    return repr(value)


def format_attrs(attrs: dict) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in sorted(attrs.items())) + "}"


def format_node(node) -> str:
    outs = ", ".join(f"{value_ref(v)}: {v.type}" for v in node.outputs)
    args = ", ".join(value_ref(v) for v in node.inputs)
    op = node.op if not node.domain else f"{node.domain}.{node.op}"
    line = f"{outs} = {op}({args}){format_attrs(node.attrs)}"
    notes = []
    if node.origins:
        notes.append("from " + ", ".join(repr(o) for o in node.origins))
    if node.created_by:
        notes.append(f"by {node.created_by}")
    for key, value in sorted(node.annotations.items()):
        if not key.startswith("_"):
            notes.append(f"{key}={format_attr(value)}")
    if notes:
        line += "  # " + "; ".join(notes)
    return line


def format_constant(value) -> str:
    line = f"const {value_ref(value)}: {value.type}"
    if value.data is not None and value.data.size <= 8:
        line += f" = {format_attr(value.data.tolist())}"
    return line


def graph_lines(graph, constants: bool = True) -> list[tuple[object, str]]:
    """(object, text) per printed line; the verifier uses the objects to point at a node."""
    lines: list[tuple[object, str]] = [(None, f"graph {graph.name!r} (opset {graph.opset}) {{")]
    for v in graph.inputs:
        lines.append((v, f"  input {value_ref(v)}: {v.type}"))
    if constants:
        for v in graph.constants.values():
            lines.append((v, "  " + format_constant(v)))
    elif graph.constants:
        n = sum(v.type.size for v in graph.constants.values())
        lines.append((None, f"  # {len(graph.constants)} constants, {n} elements"))
    for node in graph.nodes:
        lines.append((node, "  " + format_node(node)))
    lines.append((None, "  return " + ", ".join(value_ref(v) for v in graph.outputs)))
    lines.append((None, "}"))
    return lines


def format_graph(graph, constants: bool = True) -> str:
    return "\n".join(text for _, text in graph_lines(graph, constants))
