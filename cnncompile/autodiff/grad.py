"""Reverse-mode differentiation on the IR: the backward pass is more nodes of the same graph.

    joint = cnncompile.grad(graph, loss="loss", wrt=["conv1.weight", "conv1.bias"])

``grad`` copies the forward graph, turns the ``wrt`` constants into graph inputs (so that new
weights need no recompiling), and walks the forward nodes in reverse from the loss. Each node's op
class holds its rule, a staticmethod ``gradient(g, node, grads)``: ``grads`` has one gradient Value
(or None) per output of ``node``; the rule returns one per input (None where nothing flows), built
with the GradBuilder ``g``. Gradients of a value read by several nodes are added up. The result is
an ordinary graph whose outputs are the loss and one ``grad:<name>`` per wrt name: it verifies, goes
through the pass pipeline and runs on any backend. docs/AUTODIFF.md has the details.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import CnnCompileError, InternalError, ModelError
from ..ir.graph import Graph, Node, Value
from ..ir.types import FLOAT_DTYPES, TensorType
from ..ops import OPS
from ..ops.base import fill_defaults
from ..ops.fused import CONV_ATTRS, GEMM_ATTRS

CREATED_BY = "autodiff"
GRAD_PREFIX = "grad:"


class GradBuilder:
    """What a gradient rule builds with. New nodes go to the end of the joint graph in the order
    the rules make them; the reverse walk makes that a valid execution order."""

    def __init__(self, graph: Graph, needed: set[int]):
        self.graph = graph
        self._needed = needed
        #: the forward node whose rule is running: new nodes take its name and origins
        self.node: Node | None = None

    # ---- what rules call -------------------------------------------------------------------------
    def op(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None,
           outputs: int = 1) -> Value | list[Value]:
        """Append an ``op`` node reading ``inputs``; returns its output (a list if outputs > 1).
        Attributes left out get the op's defaults; the output types come from its shape rule."""
        cls = OPS.get(op)
        if cls is None:
            raise InternalError(f"{self._where()} uses the unknown op '{op}'")
        attrs = fill_defaults(cls, dict(attrs or {}))
        try:
            types = cls.infer(*[v.type if v is not None else None for v in inputs], **attrs)
        except CnnCompileError as exc:
            raise InternalError(f"{self._where()} built an invalid {op}: {exc}") from exc
        types = [types] if isinstance(types, TensorType) else list(types)
        if len(types) < outputs:
            raise InternalError(f"{self._where()} asked {op} for {outputs} outputs; it has "
                                f"{len(types)}")
        label = self._label()
        values = [self.graph.new_value(f"{label}.{op}", t) for t in types[:outputs]]
        self.graph.add_node(Node(op, list(inputs), values, attrs, name=f"{label}.grad",
                                 origins=self.node.origins if self.node else (),
                                 created_by=CREATED_BY))
        return values[0] if outputs == 1 else values

    def constant(self, array, hint: str = "c") -> Value:
        return self.graph.add_constant(f"{self._label()}.{hint}", np.asarray(array))

    @staticmethod
    def input_value(node: Node, i: int) -> Value | None:
        return node.inputs[i] if i < len(node.inputs) else None

    @staticmethod
    def output_value(node: Node, i: int) -> Value | None:
        return node.outputs[i] if i < len(node.outputs) else None

    def needs(self, node: Node, i: int) -> bool:
        """Whether input ``i`` of ``node`` wants a gradient: it is a float value on a path from a
        wrt value to the loss. Rules may skip the work for the others."""
        value = self.input_value(node, i)
        return value is not None and id(value) in self._needed

    # ---- small compositions that many rules share ------------------------------------------------
    def sum_to(self, grad: Value, like: Value) -> Value:
        """``grad`` summed over the axes along which ``like`` was broadcast."""
        if tuple(grad.shape) == tuple(like.shape):
            return grad
        return self.op("SumTo", [grad], {"shape": list(like.shape)})

    def reshape(self, value: Value, shape) -> Value:
        if tuple(value.shape) == tuple(shape):
            return value
        return self.op("Reshape", [value], {"shape": list(shape), "allowzero": 1})

    def broadcast_to(self, value: Value, shape) -> Value:
        if tuple(value.shape) == tuple(shape):
            return value
        return self.op("Expand", [value], {"shape": list(shape)})

    def scale(self, value: Value, factor: float) -> Value:
        if factor == 1.0:
            return value
        return self.op("Mul", [value, self.constant(np.asarray(factor, value.dtype), "scale")])

    def zeros(self, t: TensorType) -> Value:
        return self.op("ConstantOfShape", [], {"shape": list(t.shape),
                                               "value": np.zeros(1, t.dtype)})

    # ---- the walk's own bookkeeping --------------------------------------------------------------
    def accumulate(self, grads: dict[int, Value], value: Value, grad: Value) -> None:
        previous = grads.get(id(value))
        if previous is None:
            grads[id(value)] = grad
            return
        out = self.graph.new_value(f"{GRAD_PREFIX}{value.name}.sum", value.type)
        self.graph.add_node(Node("Add", [previous, grad], [out], {},
                                 name=f"{GRAD_PREFIX}{value.name}.accumulate",
                                 origins=self.node.origins if self.node else (),
                                 created_by=CREATED_BY))
        grads[id(value)] = out

    def _label(self) -> str:
        node = self.node
        return (node.name or node.outputs[0].name) if node is not None else "grad"

    def _where(self) -> str:
        node = self.node
        if node is None:
            return "the gradient builder"
        return f"the gradient rule of {node.op} (node '{node.name}')"


def grad(graph: Graph, loss: str, wrt: Sequence[str], extra_outputs: Sequence[str] = ()) -> Graph:
    """The joint forward + backward graph of d(loss)/d(each wrt name).

    loss           name of a float value with one element (a 0-d or 1-element tensor)
    wrt            names of graph inputs or constants (weights); constants become graph inputs
    extra_outputs  names of forward values to keep as outputs too (say, the logits)

    Outputs: the loss, then ``grad:<name>`` per wrt name, then the extra outputs. Fused ops
    (FusedConv, FusedGemm, FusedElementwise) are expanded back into their parts first.
    """
    wrt = [wrt] if isinstance(wrt, str) else list(wrt)
    joint = graph.copy()
    # A backend's choices (packed weights, algorithms, layouts) may name constants that become
    # inputs here; annotations never change what a node computes, so the pipeline redoes them.
    for node in joint.nodes:
        node.annotations = {}
    joint.meta.pop("memory_plan", None)
    decompose_fused(joint)
    by_name = {v.name: v for v in joint.values()}
    loss_value = _loss_value(by_name, loss)
    params = [_as_input(joint, by_name, name) for name in wrt]
    repeated = sorted({name for name in wrt if wrt.count(name) > 1})
    if repeated:
        raise ModelError(f"grad: wrt names {', '.join(repeated)} more than once")

    forward = list(joint.nodes)
    builder = GradBuilder(joint, _needs_gradient(forward, params, loss_value))
    grads: dict[int, Value] = {}
    if id(loss_value) in builder._needed:
        seed = np.ones(loss_value.shape, loss_value.dtype)
        grads[id(loss_value)] = joint.add_constant(f"{GRAD_PREFIX}{loss}.seed", seed)
    for node in reversed(forward):
        out_grads = [grads.get(id(v)) for v in node.outputs]
        if all(gv is None for gv in out_grads):
            continue
        builder.node = node
        rule = getattr(OPS.get(node.op), "gradient", None)
        if rule is None:
            raise ModelError(f"no gradient rule for {node.op} (node '{node.name}'); see "
                             "docs/AUTODIFF.md for the ops that have one and how to add one")
        in_grads = list(rule(builder, node, out_grads))
        if len(in_grads) != len(node.inputs):
            raise InternalError(f"{builder._where()} returned {len(in_grads)} gradients for "
                                f"{len(node.inputs)} inputs")
        for i, (value, gv) in enumerate(zip(node.inputs, in_grads)):
            if gv is None or not builder.needs(node, i):
                continue
            if gv.type != value.type:
                raise InternalError(f"{builder._where()} gives input {i} (%{value.name}: "
                                    f"{value.type}) a gradient of type {gv.type}")
            builder.accumulate(grads, value, gv)

    builder.node = None
    outputs = [loss_value]
    for name, param in zip(wrt, params):
        gv = grads.get(id(param))
        outputs.append(_name_output(joint, builder, gv if gv is not None else
                                    builder.zeros(param.type), name, outputs))
    outputs += [_lookup(by_name, name, "extra_outputs") for name in extra_outputs]
    joint.outputs = outputs
    joint.remove_unused()
    joint.meta["autodiff"] = {"loss": loss, "wrt": wrt,
                              "gradients": [GRAD_PREFIX + name for name in wrt]}
    return joint.verify()


# ---- helpers of grad -----------------------------------------------------------------------------
def _lookup(by_name: dict, name: str, what: str) -> Value:
    value = by_name.get(name)
    if value is None:
        known = ", ".join(list(by_name)[:12])
        raise ModelError(f"grad: {what} names '{name}', which is not a value of the graph "
                         f"(values include: {known}, ...)")
    return value


def _loss_value(by_name: dict, loss: str) -> Value:
    value = _lookup(by_name, loss, "loss")
    t = value.type
    if t.dtype not in FLOAT_DTYPES or not t.is_static or t.size != 1:
        raise ModelError(f"grad: the loss '{loss}' must be a float scalar or 1-element tensor, "
                         f"got {t}")
    return value


def _as_input(joint: Graph, by_name: dict, name: str) -> Value:
    """The wrt value, made a graph input if it was a constant."""
    value = _lookup(by_name, name, "wrt")
    if value.producer is not None:
        raise ModelError(f"grad: wrt names '{name}', computed by {value.producer.op} node "
                         f"'{value.producer.name}'; name graph inputs or constants (weights)")
    if value.dtype not in FLOAT_DTYPES:
        raise ModelError(f"grad: wrt '{name}' is {value.type}; only float values have gradients")
    if value.name in joint.constants:
        del joint.constants[value.name]
        value.data = None
        joint.inputs.append(value)
    return value


def _needs_gradient(nodes: list[Node], params: list[Value], loss: Value) -> set[int]:
    """ids of the float values on a path from a wrt value to the loss."""
    depends = {id(v) for v in params}
    for node in nodes:
        if any(v is not None and id(v) in depends for v in node.inputs):
            depends.update(id(v) for v in node.outputs if v.dtype in FLOAT_DTYPES)
    reaches = {id(loss)}
    for node in reversed(nodes):
        if any(id(v) in reaches for v in node.outputs):
            reaches.update(id(v) for v in node.inputs if v is not None)
    return depends & reaches


def _name_output(joint: Graph, builder: GradBuilder, value: Value, name: str,
                 taken: list[Value]) -> Value:
    """``value`` under the name grad:<name>; through an Identity if it is a forward value or
    already an output (an output's Value has one name)."""
    wanted = GRAD_PREFIX + name
    producer = value.producer
    if producer is None or producer.created_by != CREATED_BY or any(v is value for v in taken):
        out = joint.new_value(wanted, value.type)
        joint.add_node(Node("Identity", [value], [out], {}, name=wanted, created_by=CREATED_BY))
        return out
    if value.name != wanted:
        value.name = joint.unique_name(wanted)
    return value


# ---- fused ops are differentiated as their parts -------------------------------------------------
def decompose_fused(graph: Graph) -> int:
    """Expand FusedConv, FusedGemm and FusedElementwise into the ops they stand for, in place;
    returns how many. Their parts' rules need intermediate values (the conv output before the
    activation) that a fused node never materialises."""
    nodes: list[Node] = []
    count = 0
    for node in graph.nodes:
        expand = _EXPANSIONS.get(node.op)
        if expand is None:
            nodes.append(node)
            continue
        nodes.extend(_chain(graph, node, expand(node)))
        count += 1
    graph.nodes = nodes
    return count


def _conv_stages(node: Node) -> list:
    attrs = node.attrs
    x, w, b = (list(node.inputs) + [None] * 4)[:3]
    stages = [("Conv", [x, w] + ([b] if b is not None else []),
               {k: attrs[k] for k in CONV_ATTRS})]
    if attrs["activation"]:
        stages.append((attrs["activation"], ["t0"], attrs["activation_attrs"]))
    if attrs["residual"]:
        stages.append(("Add", [f"t{len(stages) - 1}", node.inputs[3]], {}))
    if attrs["post_activation"]:
        stages.append((attrs["post_activation"], [f"t{len(stages) - 1}"],
                       attrs["post_activation_attrs"]))
    return stages


def _gemm_stages(node: Node) -> list:
    stages = [("Gemm", list(node.inputs), {k: node.attrs[k] for k in GEMM_ATTRS})]
    if node.attrs["activation"]:
        stages.append((node.attrs["activation"], ["t0"], node.attrs["activation_attrs"]))
    return stages


def _elementwise_stages(node: Node) -> list:
    return [(op, [node.inputs[int(str(r)[2:])] if str(r).startswith("in") else str(r)
                  for r in refs], attrs) for op, refs, attrs in node.attrs["program"]]


_EXPANSIONS = {"FusedConv": _conv_stages, "FusedGemm": _gemm_stages,
               "FusedElementwise": _elementwise_stages}


def _chain(graph: Graph, node: Node, stages: list) -> list[Node]:
    """Nodes for ``stages`` [(op, inputs, attrs)]: an input "t<k>" is stage k's result; the last
    stage writes the fused node's own output Value, so readers and outputs stay as they were."""
    results: list[Value] = []
    nodes = []
    for index, (op, refs, attrs) in enumerate(stages):
        inputs = [results[int(r[1:])] if isinstance(r, str) else r for r in refs]
        attrs = dict(attrs or {})
        if index == len(stages) - 1:
            out = node.outputs[0]
        else:
            t = OPS[op].infer(*[v.type if v is not None else None for v in inputs], **attrs)
            t = t if isinstance(t, TensorType) else t[0]
            out = graph.new_value(f"{node.outputs[0].name}.{op}", t)
        nodes.append(Node(op, inputs, [out], attrs, name=f"{node.name}.{op}",
                          origins=node.origins, created_by=CREATED_BY))
        results.append(out)
    return nodes
