"""Canonical forms: one spelling per computation, so that later passes match one pattern.

Exporters write the same activation in many ways (PyTorch's GELU is five nodes, TF's another five);
this pass turns each known spelling into the single op that means it:

    MatMul(A, B) + bias        -> Gemm(A, B, bias)        (A 2-D, B a constant)
    Gemm(A, B) + bias          -> Gemm(A, B, bias)
    Sum(a, b) / Sum(a)         -> Add(a, b) / a
    Clip(x, 0, 6) / Clip(x, 0) -> Relu6(x) / Relu(x)
    x * Sigmoid(x)             -> Silu(x)
    x * HardSigmoid(x)         -> HardSwish(x)            (alpha 1/6, beta 1/2; also x*Relu6(x+3)/6)
    0.5 * x * (1 + erf(x / sqrt(2)))                        -> Gelu(x)
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))   -> Gelu(x, approximate="tanh")
    x * Tanh(Softplus(x))      -> Mish(x)

Constants in these formulas match within RTOL, or their dtype's epsilon if that is larger (exported
graphs carry them rounded to float32 or to a few digits); Clip's bounds must match exactly, since
they change results wherever they bind.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import CnnCompileError
from ..ir.graph import Graph, Node, Value
from ..ir.types import FLOAT_DTYPES
from ..ops import OPS
from .cleanup import merge_values
from .manager import note, register_pass
from .pattern import Pat, fused_origins, rewrite

RTOL = 1e-4


# ---- pattern building blocks ---------------------------------------------------------------------
def _near(value: Value, target: float) -> bool:
    data = value.data
    if data.size != 1 or data.dtype == np.bool_:
        return False
    actual = float(np.asarray(data).reshape(()).astype(np.float64))
    # A float16 constant cannot be nearer than its own rounding (0.044715 is off by 5e-4).
    rtol = max(RTOL, float(np.finfo(data.dtype).eps)) if data.dtype in FLOAT_DTYPES else RTOL
    return abs(actual - target) <= rtol * abs(target)


def const(target: float) -> Pat:
    """A one-element constant close to ``target``."""
    return Pat.const(where=lambda value: _near(value, target))


def mul(a: Pat, b: Pat, name: str | None = None) -> Pat:
    return Pat("Mul", a, b, commutative=True, name=name)


def add(a: Pat, b: Pat, name: str | None = None) -> Pat:
    return Pat("Add", a, b, commutative=True, name=name)


X = Pat(name="x")


def _three_way_products(factor: Pat) -> list[Pat]:
    """0.5 * x * factor in each association exporters write it."""
    half = const(0.5)
    return [mul(mul(X, factor), half, name="root"),
            mul(mul(X, half), factor, name="root"),
            mul(X, mul(factor, half), name="root")]


def _covered(root: Node, x: Value) -> list[Node]:
    """The nodes of a match whose only non-constant leaf is ``x``, producers first."""
    order: list[Node] = []
    seen: set[int] = set()

    def visit(node: Node) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for value in node.inputs:
            if value is not None and value is not x and value.producer is not None:
                visit(value.producer)
        order.append(node)

    visit(root)
    return order


def _accepts(op: str, types, attrs: dict) -> bool:
    try:
        OPS[op].infer(*types, **attrs)
    except CnnCompileError:
        return False
    return True


def unary(op: str, **attrs) -> Callable:
    """A rule function replacing the match rooted at ``root`` by ``op(x)``."""
    def fn(graph: Graph, x: Value, root: Node, **_) -> Node | None:
        out = root.outputs[0]
        # Constants of shape [1, 1, 1] could have broadcast x to a higher rank.
        if out.type != x.type or not _accepts(op, [x.type], attrs):
            return None
        return Node(op, [x], [out], dict(attrs), name=root.name,
                    origins=fused_origins(*_covered(root, x)))
    return fn


# ---- linear algebra ------------------------------------------------------------------------------
def _gemm(inputs: list[Value], attrs: dict, root: Node, name: str,
          nodes: list[Node]) -> Node | None:
    out = root.outputs[0]
    try:
        want = OPS["Gemm"].infer(*[v.type for v in inputs], **attrs)
    except CnnCompileError:
        return None
    # The Add must not have broadcast the product to another shape (a bias of rank 3, say).
    if want != out.type:
        return None
    return Node("Gemm", inputs, [out], attrs, name=name, origins=fused_origins(*nodes))


def matmul_add(graph: Graph, a: Value, b: Value, bias: Value, mm: Node, root: Node):
    if a.type.rank != 2 or b.type.rank != 2:
        return None
    attrs = {"alpha": 1.0, "beta": 1.0, "transA": False, "transB": False}
    return _gemm([a, b, bias], attrs, root, mm.name, [mm, root])


def gemm_add(graph: Graph, a: Value, b: Value, bias: Value, gemm: Node, root: Node):
    return _gemm([a, b, bias], dict(gemm.attrs, beta=1.0), root, gemm.name, [gemm, root])


# ---- the table -----------------------------------------------------------------------------------
def _clip_bounds(low, high) -> Callable[[Node], bool]:
    return lambda node: node.attrs.get("min") == low and node.attrs.get("max") == high


def _sum_of(count: int) -> Callable[[Node], bool]:
    return lambda node: len(node.inputs) == count


def sum_to_add(graph: Graph, root: Node):
    return Node("Add", list(root.inputs), [root.outputs[0]], name=root.name, origins=root.origins)


def sum_to_identity(graph: Graph, root: Node):
    # Bypassed after the rewrite (unless it names a graph output fed by a graph input).
    return Node("Identity", list(root.inputs), [root.outputs[0]], name=root.name,
                origins=root.origins)


def _is_relu6(node: Node) -> bool:
    return node.op == "Relu6" or (node.attrs.get("min") == 0 and node.attrs.get("max") == 6)


def _hardswish_rules() -> list[Pat]:
    hard_sigmoid = Pat("HardSigmoid", X, where=lambda node: (
        abs(node.attrs["alpha"] - 1 / 6) <= RTOL / 6 and abs(node.attrs["beta"] - 0.5) <= RTOL / 2))
    # PyTorch before opset 14 exports hardswish as x * Clip(x + 3, 0, 6) / 6; the Clip has become
    # Relu6 by the time the Div is reached (nodes are visited in order).
    clipped = Pat(("Clip", "Relu6"), add(X, const(3.0)), where=_is_relu6)
    return [mul(X, hard_sigmoid, name="root"),
            Pat("Div", mul(X, clipped), const(6.0), name="root"),
            mul(mul(X, clipped), const(1 / 6), name="root")]


def _gelu_erf_rules() -> list[Pat]:
    scaled = [Pat("Div", X, const(math.sqrt(2.0))), mul(X, const(math.sqrt(0.5)))]
    return [form for s in scaled for form in _three_way_products(add(Pat("Erf", s), const(1.0)))]


def _gelu_tanh_rules() -> list[Pat]:
    beta, kappa = math.sqrt(2.0 / math.pi), 0.044715
    cubes = [Pat("Pow", X, const(3.0)), mul(mul(X, X), X)]
    inners = [mul(const(beta), add(X, mul(const(kappa), cube))) for cube in cubes]
    # Megatron's bias_gelu: sqrt(2/pi) * x * (1 + 0.044715 * x * x)
    inners.append(mul(mul(const(beta), X), add(const(1.0), mul(mul(const(kappa), X), X))))
    return [form for inner in inners
            for form in _three_way_products(add(Pat("Tanh", inner), const(1.0)))]


def _table() -> list[tuple[str, Pat, Callable]]:
    """(label for the summary, pattern, rule function)."""
    any_value = Pat(name="a")
    weight = Pat.const(name="b")
    bias = Pat(name="bias")
    rules = [
        ("MatMul+Add -> Gemm",
         add(Pat("MatMul", any_value, weight, name="mm"), bias, name="root"), matmul_add),
        ("Gemm+Add -> Gemm",
         add(Pat("Gemm", any_value, Pat(name="b"), name="gemm"), Pat.const(name="bias"),
             name="root"), gemm_add),
        ("Sum -> Add", Pat("Sum", name="root", where=_sum_of(2)), sum_to_add),
        ("Sum of one removed", Pat("Sum", name="root", where=_sum_of(1)), sum_to_identity),
        ("Clip(0,6) -> Relu6", Pat("Clip", X, name="root", where=_clip_bounds(0, 6)),
         unary("Relu6")),
        ("Clip(0) -> Relu", Pat("Clip", X, name="root", where=_clip_bounds(0, None)),
         unary("Relu")),
        ("x*Sigmoid(x) -> Silu", mul(X, Pat("Sigmoid", X), name="root"), unary("Silu")),
        ("Mish", mul(X, Pat("Tanh", Pat("Softplus", X)), name="root"), unary("Mish")),
    ]
    rules += [("HardSwish", pat, unary("HardSwish")) for pat in _hardswish_rules()]
    rules += [("Gelu(erf)", pat, unary("Gelu", approximate="none")) for pat in _gelu_erf_rules()]
    rules += [("Gelu(tanh)", pat, unary("Gelu", approximate="tanh"))
              for pat in _gelu_tanh_rules()]
    return rules


RULES = _table()


def _counted(fn: Callable, label: str, counts: dict[str, int]) -> Callable:
    def counted(graph, **captures):
        result = fn(graph, **captures)
        if result is not None:
            counts[label] = counts.get(label, 0) + 1
        return result
    return counted


@register_pass("canonicalize", "one form per computation: MatMul+Add -> Gemm, Sum -> Add, "
               "Clip(0,6) -> Relu6, x*Sigmoid(x) -> Silu, HardSwish, GELU and Mish patterns")
def canonicalize(graph: Graph) -> Graph:
    counts: dict[str, int] = {}
    rules = [(pat, _counted(fn, label, counts)) for label, pat, fn in RULES]
    rewrite(graph, rules, created_by="canonicalize")
    kept = []
    for node in graph.nodes:
        bypass = node.op == "Identity" and node.created_by == "canonicalize"
        if not (bypass and merge_values(graph, node.inputs[0], node.outputs[0])):
            kept.append(node)
    graph.nodes = kept
    if counts:
        note("rewrote " + ", ".join(f"{n} {label}" for label, n in counts.items()))
    return graph
