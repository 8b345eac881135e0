"""Per-op code emitters for the CPU backend: ``@emits("Relu", ...)`` registers a function
``(node, codegen) -> None`` that writes the node's code (see ``codegen.py`` for the methods).

An op with no emitter of its own runs its NumPy reference through ``emit_reference``: every model
compiles and runs from day one, and the generated source says which nodes still do.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from ...errors import InternalError
from ...ir.graph import Node
from ...ops import OPS
from .codegen import Codegen

EMITTERS: dict[str, Callable[[Node, Codegen], None]] = {}


def emits(*ops: str):
    def decorate(fn):
        for op in ops:
            if op in EMITTERS:
                raise RuntimeError(f"CPU emitter for {op} registered twice")
            EMITTERS[op] = fn
        return fn
    return decorate


def emit_node(node: Node, cg: Codegen) -> None:
    emitter = EMITTERS.get(node.op, emit_reference)
    if emitter(node, cg) is False:  # an emitter may decline a case it does not handle
        emit_reference(node, cg)


def literal(value) -> str:
    """Python source for an attribute value; arrays are not literals (use cg.constant)."""
    if isinstance(value, np.ndarray):
        raise TypeError("arrays are not literals")
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        items = ", ".join(literal(v) for v in value)
        return f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
    return repr(value)


def attrs_source(node: Node, cg: Codegen) -> str:
    parts = []
    for key, value in sorted(node.attrs.items()):
        if isinstance(value, np.ndarray):
            parts.append(f"{key}={cg.constant(value, f'{node.name}_{key}')}")
        else:
            parts.append(f"{key}={literal(value)}")
    return ", ".join(parts)


def emit_reference(node: Node, cg: Codegen) -> None:
    """The op's NumPy reference, its result bound or copied into the planned buffer."""
    op = OPS[node.op]
    if getattr(sys.modules[op.__module__], op.__name__, None) is not op:
        raise InternalError(f"CPU backend: op class {op.__name__} is not importable from "
                            f"{op.__module__}")
    ref = cg.import_name(op.__module__, op.__name__, f"ref_{op.__name__}")
    args = ", ".join(cg.arg(v) for v in node.inputs)
    attrs = attrs_source(node, cg)
    call = f"{ref}.reference({args}{', ' if args and attrs else ''}{attrs})"
    results = cg.kernel("cnncompile.backends.cpu.emitters", "results_list")
    if len(node.outputs) == 1:
        cg.assign(node.outputs[0], f"{results}({call})[0]")
    else:
        name = cg.fresh(f"{node.name}_results")
        cg.line(f"{name} = {results}({call})")
        for i, value in enumerate(node.outputs):
            cg.assign(value, f"{name}[{i}]")


def results_list(result) -> list:
    """A reference returns one array or a tuple of them (MaxPool's Indices...)."""
    return list(result) if isinstance(result, (tuple, list)) else [result]


@emits("Concat")
def emit_concat(node: Node, cg: Codegen):
    """An elided Concat copies nothing (its producers wrote their slices); otherwise copy the
    inputs that no producer wrote in place."""
    out = node.outputs[0]
    if not out.type.is_static:
        return False
    dest = cg.dest(out)
    if node.annotations.get("elided"):
        cg.line(f"# elided: every input was written into its slice of {dest}")
        return None
    concat = cg.kernel("cnncompile.passes.memory", "concat_into")
    args = ", ".join(cg.arg(v) for v in node.inputs)
    skip = sorted(node.annotations.get("elided_inputs", ()))
    cg.line(f"{concat}({dest}, [{args}], axis={node.attrs['axis']}, skip={skip!r})")
    return None


from . import op_emitters  # noqa: F401,E402  (registers the per-op emitters)
from . import conv_emitters  # noqa: F401
from . import grad_emitters  # noqa: F401
