"""Fusion passes (opt_level >= 2).

* fold_batchnorm: BatchNormalization and per-channel Mul/Add/Sub/Div by constants after a Conv,
  ConvTranspose or Gemm become new weights and bias (computed in float64, stored in the weight's
  dtype). A BatchNormalization after anything else becomes Mul + Add by per-channel constants,
  which fuse_elementwise then merges with its neighbours.
* fold_pad: a zero (or -inf) constant Pad of the spatial axes moves into the pads of the Conv,
  AveragePool or MaxPool that reads it.
* fuse_conv_activation: Conv + pointwise activation -> FusedConv, Gemm + activation -> FusedGemm.
* fuse_residual_add: Conv / FusedConv + Add(skip) [+ activation] -> FusedConv with residual=True.
* fuse_activation_grad: in a training graph, the gradient of BatchNorm -> activation as one
  BatchNormTrainGrad that takes dY through the activation's gradient (ActivationGrad) itself.
* fuse_elementwise: maximal trees of elementwise ops -> one FusedElementwise with a program.

Folds and fusions reuse the output Value of the node they replace, so value names stay stable.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.types import FLOAT_DTYPES
from ..ops import OPS
from ..ops.conv import extent
from ..ops.fused import ELEMENTWISE, activation_ops
from .manager import note, register_pass
from .pattern import Pat, fused_origins, rewrite

AFFINE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
BN_STATS = ("scale", "shift", "mean", "var")


def _summary(tally: Counter, verb: str) -> str:
    parts = [f"{n} {what}" for what, n in sorted(tally.items())]
    return f"{verb} " + ", ".join(parts)


# ---- fold_batchnorm ------------------------------------------------------------------------------
def _apply(graph: Graph, make_rules, pass_name: str, verb: str) -> Graph:
    """Rewrite ``graph`` with the rules make_rules(tally) returns, their functions counting
    what they do in tally, and note the count ("fused 8 Add into Conv")."""
    tally: Counter = Counter()
    rewrite(graph, make_rules(tally), created_by=pass_name)
    if tally:
        note(_summary(tally, verb))
    return graph


def _one_output(node: Node) -> bool:
    return len(node.outputs) == 1


def _bn_affine(bn: Node) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization as y = x * scale + shift (float64, the statistics' shape)."""
    gamma, beta, mean, var = (v.data.astype(np.float64) for v in bn.inputs[1:5])
    scale = gamma / np.sqrt(var + bn.attrs["epsilon"])
    return scale, beta - mean * scale


def _per_channel(data: np.ndarray, out_shape: tuple) -> np.ndarray | None:
    """``data`` as one value per channel (axis 1) of a tensor of ``out_shape``, or None when it
    does not broadcast that way (or would grow the tensor)."""
    rank = len(out_shape)
    if data.ndim > rank or rank < 2:
        return None
    aligned = (1,) * (rank - data.ndim) + data.shape
    channels = out_shape[1]
    if any(d != 1 for axis, d in enumerate(aligned) if axis != 1):
        return None
    if aligned[1] not in (1, channels):
        return None
    return np.broadcast_to(data.reshape(-1).astype(np.float64), (channels,))


def _scaled_producer(graph: Graph, producer: Node, root: Node, scale: np.ndarray,
                     shift: np.ndarray) -> Node | None:
    """``producer`` with its output multiplied by ``scale`` and then ``shift`` added, both per
    output channel; None when its weight or bias is not a constant."""
    weight = producer.inputs[1]
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    if not weight.is_constant or (bias is not None and not bias.is_constant):
        return None
    dtype = weight.dtype
    if dtype not in FLOAT_DTYPES or producer.outputs[0].dtype != dtype:
        return None
    w = weight.data.astype(np.float64)
    attrs = dict(producer.attrs)
    if producer.op == "Conv":
        w = w * scale.reshape(-1, *[1] * (w.ndim - 1))
    elif producer.op == "ConvTranspose":
        # W is [C, M/group, k...]: output channel g * M/group + j reads W[group g's C rows, j]
        group = attrs["group"]
        grouped = w.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
        factor = scale.reshape(group, 1, w.shape[1], *[1] * (w.ndim - 2))
        w = (grouped * factor).reshape(w.shape)
    else:
        w = w * (scale[:, None] if attrs["transB"] else scale[None, :])
    if producer.op == "Gemm":
        c = 0.0
        if bias is not None and attrs["beta"] != 0.0:
            c = attrs["beta"] * bias.data.astype(np.float64)
        new_bias = np.asarray(c * scale + shift)
        attrs["beta"] = 1.0
    else:
        b = bias.data.astype(np.float64) if bias is not None else 0.0
        new_bias = b * scale + shift
    bias_name = bias.name if bias is not None else f"{producer.name or weight.name}.bias"
    new_w = graph.add_constant(f"{weight.name}.folded", w.astype(dtype))
    new_b = graph.add_constant(f"{bias_name}.folded", new_bias.astype(dtype))
    return Node(producer.op, [producer.inputs[0], new_w, new_b], [root.outputs[0]], attrs,
                producer.name, fused_origins(producer, root))


def _batchnorm_rules(tally: Counter) -> list:
    def fold_bn(graph, bn, producer, **stats):
        scale, shift = _bn_affine(bn)
        if scale.ndim != 1:
            return None  # per-activation statistics vary over the spatial axes too
        node = _scaled_producer(graph, producer, bn, scale, shift)
        if node is not None:
            tally[f"BatchNormalization into {producer.op}"] += 1
        return node

    def affine(kind):
        def fold(graph, root, producer, c):
            channels = _per_channel(c.data, producer.outputs[0].shape)
            if channels is None or c.dtype != producer.outputs[0].dtype:
                return None
            if kind == "Div" and np.any(channels == 0):
                return None
            scale, shift = np.ones_like(channels), np.zeros_like(channels)
            if kind == "Mul":
                scale = channels
            elif kind == "Div":
                scale = 1.0 / channels
            elif kind == "Add":
                shift = channels
            else:
                shift = -channels
            node = _scaled_producer(graph, producer, root, scale, shift)
            if node is not None:
                tally[f"{kind} into {producer.op}"] += 1
            return node
        return fold

    def split_bn(graph, bn, x, **stats):
        """A BatchNormalization with nothing to fold into: x * scale + shift."""
        scale, shift = _bn_affine(bn)
        if scale.ndim == 1:
            shape = (-1,) + (1,) * (x.type.rank - 2)
            scale, shift = scale.reshape(shape), shift.reshape(shape)
        dtype = x.dtype
        s = graph.add_constant(f"{bn.name or 'bn'}.scale", scale.astype(dtype))
        t = graph.add_constant(f"{bn.name or 'bn'}.shift", shift.astype(dtype))
        scaled = graph.new_value(f"{bn.outputs[0].name}.scaled", bn.outputs[0].type)
        tally["BatchNormalization into Mul+Add"] += 1
        return [Node("Mul", [x, s], [scaled], {}, f"{bn.name}.mul", bn.origins),
                Node("Add", [scaled, t], [bn.outputs[0]], {}, f"{bn.name}.add", bn.origins)]

    stats = [Pat.const(name=name) for name in BN_STATS]
    producer = Pat(AFFINE_PRODUCERS, name="producer")
    rules = [(Pat("BatchNormalization", producer, *stats, name="bn", where=_one_output),
              fold_bn)]
    for kind in ("Mul", "Add"):
        rules.append((Pat(kind, producer, Pat.const(name="c"), name="root", commutative=True),
                      affine(kind)))
    for kind in ("Sub", "Div"):
        rules.append((Pat(kind, producer, Pat.const(name="c"), name="root"), affine(kind)))
    rules.append((Pat("BatchNormalization", Pat(name="x"), *stats, name="bn",
                      where=_one_output), split_bn))
    return rules


@register_pass("fold_batchnorm", "fold BatchNormalization and per-channel Mul/Add by constants "
               "into the preceding Conv/ConvTranspose/Gemm; other BatchNormalization -> Mul+Add")
def fold_batchnorm(graph: Graph) -> Graph:
    return _apply(graph, _batchnorm_rules, "fold_batchnorm", "folded")


# ---- fold_pad ------------------------------------------------------------------------------------
def _spatial_pads(pad: Node) -> list[int] | None:
    """The Pad's pads for the spatial axes (begins, then ends), if it pads only those, by >= 0."""
    pads = pad.attrs["pads"]
    rank = len(pads) // 2
    if pad.attrs["mode"] != "constant" or rank < 3 or min(pads) < 0:
        return None
    if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return None
    return pads[2:rank] + pads[rank + 2:]


def _lowest(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).min) if dtype.kind == "f" else int(np.iinfo(dtype).min)


def _every_window_sees_input(sizes, attrs: dict, pads: list[int]) -> bool:
    """True when no pooling window lies wholly in the padding."""
    rank = len(sizes)
    for i, (n, k, s, d) in enumerate(zip(sizes, attrs["kernel_shape"], attrs["strides"],
                                         attrs["dilations"])):
        out = (n + pads[i] + pads[i + rank] - extent(k, d)) // s + 1
        taps = np.arange(out)[:, None] * s - pads[i] + np.arange(k)[None, :] * d
        if not np.all(((taps >= 0) & (taps < n)).any(axis=1)):
            return False
    return True


def _pad_rules(tally: Counter) -> list:
    def fold(graph, root, pad, **operands):
        extra = _spatial_pads(pad)
        if extra is None:
            return None
        attrs = dict(root.attrs)
        value = pad.attrs["value"]
        x = pad.inputs[0]
        combined = [a + b for a, b in zip(attrs["pads"], extra)]
        if root.op == "Conv" and value != 0:
            return None
        if root.op == "AveragePool":
            # zeros the pool counts: only where its own pads are counted too, or absent
            if value != 0 or attrs["ceil_mode"]:
                return None
            if not attrs["count_include_pad"] and any(attrs["pads"]):
                return None
            attrs["count_include_pad"] = 1
        if root.op == "MaxPool":
            for indices in root.outputs[1:]:
                if graph.users().get(id(indices)) or any(v is indices for v in graph.outputs):
                    return None  # indices count positions of the padded tensor
            if attrs["ceil_mode"] or value > _lowest(x.dtype):
                return None
            # MaxPool pads with -inf: another fill only agrees where real elements win
            if value != -np.inf and not _every_window_sees_input(x.shape[2:], attrs, combined):
                return None
        attrs["pads"] = combined
        tally[f"Pad into {root.op}"] += 1
        inputs = [x] + root.inputs[1:]
        return Node(root.op, inputs, list(root.outputs), attrs, root.name,
                    fused_origins(pad, root))

    pad = Pat("Pad", name="pad")
    return [(Pat("Conv", pad, Pat(name="w"), name="root"), fold),
            (Pat("Conv", pad, Pat(name="w"), Pat(name="b"), name="root"), fold),
            (Pat(("AveragePool", "MaxPool"), pad, name="root"), fold)]


@register_pass("fold_pad", "fold a constant spatial Pad into the pads of the following Conv, "
               "AveragePool or MaxPool")
def fold_pad(graph: Graph) -> Graph:
    return _apply(graph, _pad_rules, "fold_pad", "folded")


# ---- fuse_conv_activation ------------------------------------------------------------------------
def _conv_epilogue(conv: Node) -> dict:
    """FusedConv attributes for a Conv or FusedConv node, epilogue empty where the node has none."""
    attrs = {"activation": "", "activation_attrs": {}, "residual": False,
             "post_activation": "", "post_activation_attrs": {}}
    attrs.update(conv.attrs)
    return attrs


def _activation_rules(tally: Counter) -> list:
    def fuse(graph, act, producer):
        if act.outputs[0].type != producer.outputs[0].type:
            return None
        fused = "FusedConv" if producer.op == "Conv" else "FusedGemm"
        attrs = _conv_epilogue(producer) if fused == "FusedConv" else dict(producer.attrs)
        attrs.update(activation=act.op, activation_attrs=dict(act.attrs))
        tally[f"{producer.op}+{act.op}"] += 1
        return Node(fused, list(producer.inputs), [act.outputs[0]], attrs, producer.name,
                    fused_origins(producer, act))

    return [(Pat(activation_ops(), Pat(("Conv", "Gemm"), name="producer"), name="act"), fuse)]


@register_pass("fuse_conv_activation", "Conv + pointwise activation -> FusedConv; Gemm + "
               "activation -> FusedGemm")
def fuse_conv_activation(graph: Graph) -> Graph:
    return _apply(graph, _activation_rules, "fuse_conv_activation", "fused")


# ---- fuse_residual_add ---------------------------------------------------------------------------
def _residual_candidate(value: Value, skip: Value, add: Node, users, outputs) -> bool:
    """Whether ``value``'s producer can take add(value, skip) into its epilogue."""
    conv = value.producer
    if conv is None or conv.op not in ("Conv", "FusedConv") or len(conv.outputs) != 1:
        return False
    if conv.op == "FusedConv" and (conv.attrs["residual"] or conv.attrs["post_activation"]):
        return False
    if id(value) in outputs or users.get(id(value)) != [add]:
        return False
    # R is added as it is: no broadcasting either way
    return skip.type == value.type == add.outputs[0].type


def _residual_rules(tally: Counter) -> list:
    def fuse_add(graph, add, a, b):
        users = graph.users()
        outputs = {id(v) for v in graph.outputs}
        choices = [(v, r) for v, r in ((a, b), (b, a))
                   if _residual_candidate(v, r, add, users, outputs)]
        if not choices:
            return None
        # Both operands may be convs (a ResNet downsample branch): take the later one, which
        # moves least when the fused node takes the Add's place.
        position = {id(node): i for i, node in enumerate(graph.nodes)}
        value, skip = max(choices, key=lambda choice: position[id(choice[0].producer)])
        conv = value.producer
        inputs = list(conv.inputs) + [None] * (3 - len(conv.inputs)) + [skip]
        attrs = _conv_epilogue(conv)
        attrs["residual"] = True
        tally["Add into " + conv.op] += 1
        return Node("FusedConv", inputs, [add.outputs[0]], attrs, conv.name,
                    fused_origins(conv, add))

    def fuse_post(graph, act, conv):
        if act.outputs[0].type != conv.outputs[0].type:
            return None
        attrs = dict(conv.attrs)
        attrs.update(post_activation=act.op, post_activation_attrs=dict(act.attrs))
        tally[f"{act.op} after the residual add"] += 1
        return Node("FusedConv", list(conv.inputs), [act.outputs[0]], attrs, conv.name,
                    fused_origins(conv, act))

    def open_post(node: Node) -> bool:
        return node.attrs["residual"] and not node.attrs["post_activation"]

    return [(Pat("Add", Pat(name="a"), Pat(name="b"), name="add"), fuse_add),
            (Pat(activation_ops(), Pat("FusedConv", name="conv", where=open_post), name="act"),
             fuse_post)]


@register_pass("fuse_residual_add", "Conv/FusedConv + Add(skip) [+ activation] -> FusedConv "
               "with residual=True")
def fuse_residual_add(graph: Graph) -> Graph:
    return _apply(graph, _residual_rules, "fuse_residual_add", "fused")


# ---- fuse_activation_grad -------------------------------------------------------------------------
def _activation_grad_rules(tally: Counter) -> list:
    def fuse(graph, bn, act, dy, v, **stats):
        if bn.attrs.get("activation"):
            return None
        inputs = [dy] + list(bn.inputs[1:]) + [None] * (7 - len(bn.inputs)) + [v]
        attrs = dict(bn.attrs, activation=act.attrs["activation"],
                     activation_attrs=act.attrs.get("activation_attrs"),
                     at=act.attrs.get("at", "X"))
        tally[f"{act.attrs['activation']} gradient into BatchNormTrainGrad"] += 1
        return Node("BatchNormTrainGrad", inputs, list(bn.outputs), attrs, bn.name,
                    fused_origins(act, bn))

    act = Pat("ActivationGrad", Pat(name="dy"), Pat(name="v"), name="act")
    stats = [Pat(name=name) for name in ("x", "scale", "mean", "var")]
    with_grads = stats + [Pat(name="dmean"), Pat(name="dvar")]
    return [(Pat("BatchNormTrainGrad", act, *stats, name="bn"), fuse),
            (Pat("BatchNormTrainGrad", act, *with_grads, name="bn"), fuse)]


@register_pass("fuse_activation_grad", "ActivationGrad -> BatchNormTrainGrad (a training graph's "
               "BatchNorm + activation) -> one BatchNormTrainGrad that takes dY through the "
               "activation's gradient")
def fuse_activation_grad(graph: Graph) -> Graph:
    return _apply(graph, _activation_grad_rules, "fuse_activation_grad", "fused")


# ---- fuse_elementwise ----------------------------------------------------------------------------
def _is_elementwise(node: Node) -> bool:
    return node.op in ELEMENTWISE and node.op in OPS and len(node.outputs) == 1


def _elementwise_groups(graph: Graph) -> list[list[Node]]:
    """Maximal trees of elementwise nodes whose interior values have one reader, each listed in
    execution order (its last node is the root)."""
    readers: dict[int, set[int]] = {}
    for node in graph.nodes:
        for v in node.inputs:
            if v is not None:
                readers.setdefault(id(v), set()).add(id(node))
    outputs = {id(v) for v in graph.outputs}
    position = {id(node): i for i, node in enumerate(graph.nodes)}
    taken: set[int] = set()
    groups = []
    # Consumers first: a root is an elementwise node that no elementwise consumer can absorb.
    for root in reversed(graph.nodes):
        if id(root) in taken or not _is_elementwise(root):
            continue
        taken.add(id(root))
        members, frontier = [root], [root]
        while frontier:
            for v in frontier.pop().inputs:
                producer = v.producer if v is not None else None
                if producer is None or id(producer) in taken or not _is_elementwise(producer):
                    continue
                if id(v) in outputs or len(readers[id(v)]) != 1:
                    continue
                taken.add(id(producer))
                members.append(producer)
                frontier.append(producer)
        if len(members) >= 2:
            groups.append(sorted(members, key=lambda node: position[id(node)]))
    return groups


def _fuse_group(members: list[Node]) -> Node:
    step_of = {id(node.outputs[0]): f"t{i}" for i, node in enumerate(members)}
    inputs: list[Value] = []
    refs: dict[int, str] = {}
    program = []
    for node in members:
        operands = []
        for v in node.inputs:
            if id(v) in step_of:
                operands.append(step_of[id(v)])
                continue
            if id(v) not in refs:
                refs[id(v)] = f"in{len(inputs)}"
                inputs.append(v)
            operands.append(refs[id(v)])
        program.append([node.op, operands, dict(node.attrs)])
    root = members[-1]
    return Node("FusedElementwise", inputs, [root.outputs[0]], {"program": program}, root.name,
                fused_origins(*members), created_by="fuse_elementwise")


@register_pass("fuse_elementwise", "maximal trees of elementwise ops (single-reader interior "
               "values) -> one FusedElementwise node")
def fuse_elementwise(graph: Graph) -> Graph:
    groups = _elementwise_groups(graph)
    if not groups:
        return graph
    fused = {id(group[-1]): _fuse_group(group) for group in groups}
    absorbed = {id(node) for group in groups for node in group[:-1]}
    # Nothing outside a group reads its interior values, so the fused node can take the root's
    # place: every input it reads is defined before that.
    graph.nodes = [fused.get(id(node), node) for node in graph.nodes if id(node) not in absorbed]
    ops = sum(len(group) for group in groups)
    note(f"fused {ops} elementwise ops into {len(groups)} FusedElementwise")
    return graph
