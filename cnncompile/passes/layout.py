"""Data layout: store activations channels-last (NHWC) for backends that prefer it, exactly.

Design
------
Every op keeps its ONNX meaning and the IR keeps channels-first shapes (N, C, H, W), so the shape
rules, the verifier, the reference executor and every other pass work unchanged. choose_layout
decides how tensors are *stored*, as PyTorch's channels_last memory format does: a value stored
channels-last has the logical shape [N, C, H, W] and the strides of a contiguous [N, H, W, C] array.

* ``node.annotations["layout"] = "NHWC"`` ("NWC" / "NDHWC" for 1-D / 3-D) marks a node whose
  activation inputs and outputs are stored channels-last: the spatial ops (SPATIAL_OPS:
  convolutions, pools, normalizations, Resize) and the layout-agnostic ops (AGNOSTIC_OPS:
  elementwise, FusedElementwise, Concat) that read a channels-last tensor. Weights, biases,
  statistics and lower-rank operands that broadcast keep their own storage; kernels index them by
  logical position.
* A channels-last Conv / FusedConv / ConvTranspose with a constant weight gets it permuted once, at
  compile time, into a new constant: [M, kh, kw, C/group] ("OHWI"), or [C, kh, kw, M/group]
  ("IHWO") for ConvTranspose. ``annotations["_packed_weight"]`` names that constant and
  ``annotations["_packed_weight_layout"]`` its order. W stays the node's input: it carries the
  semantics, and the reference executor reads it.
* Storage changes are explicit Transposes, so the IR shows where data moves. Into the
  channels-last region: Transpose[0,2,3,1], a copy into a contiguous N x H x W x C buffer, then
  Transpose[0,3,1,2] with ``annotations["view"] = True``, which moves nothing: it relabels that
  buffer as the logical NCHW tensor (x.permute(0,2,3,1).contiguous().permute(0,3,1,2) in
  PyTorch). Out of the region, the mirror: a view Transpose[0,2,3,1] then a copying
  Transpose[0,3,1,2]. Each pair composes to the identity, so outputs stay exactly those of the
  NCHW graph, and the reference executor runs the pairs like any Transpose.
* Boundaries appear only where storage really changes: at graph inputs and outputs and before ops
  with no channels-last form (Flatten, Reshape, Gemm, Split, ...). A tensor stored the same both
  ways (spatial size 1 after global pooling, or a single channel) needs none, so ResNet's
  GlobalAveragePool -> Flatten -> Gemm costs no conversion.
* cancel_transposes (run by choose_layout, and a pass of its own) removes Transpose pairs that
  compose to the identity and are both copies or both views, merges other consecutive pairs of
  one kind, and sinks Transposes below unary elementwise ops so that they meet their inverse. A
  model exported from TensorFlow (NHWC input, Transpose to NCHW, ..., Transpose back) thus keeps
  only views: no data moves at all.

For a backend: ``storage_orders(graph)`` gives each value's storage order (its logical axes,
outermost first) and ``check_layout(graph)`` proves that every node reads the storage it
expects. A view Transpose's output aliases its input; a copying Transpose reads any storage and
writes a contiguous result; every other node writes its output in the order storage_orders
gives (contiguous unless channels-last). Backends preferring NCHW (the reference backend) leave
this pass a no-op.
"""

from __future__ import annotations

import numpy as np

from ..errors import InternalError, UserError
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType
from ..ops.fused import ELEMENTWISE, POINTWISE_UNARY
from .manager import note, register_pass
from .pattern import fused_origins

LAYOUTS = ("NCHW", "NHWC")
#: channels-last layout names by tensor rank
CHANNELS_LAST = {3: "NWC", 4: "NHWC", 5: "NDHWC"}
#: ops with a channels-last kernel: they read (input 0, and FusedConv's residual) and write
#: channels-last tensors
SPATIAL_OPS = frozenset({
    "Conv", "FusedConv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool",
    "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "BatchNormalization",
    "InstanceNormalization", "LRN", "Resize", "Upsample"})
#: ops that work on any storage order: their full-rank inputs and output share one
AGNOSTIC_OPS = ELEMENTWISE | {"FusedElementwise", "Concat", "Split", "Identity", "Cast"}
#: the ops a Transpose sinks below
UNARY_OPS = POINTWISE_UNARY | {"Identity"}
PACKED_OPS = ("Conv", "FusedConv", "ConvTranspose")
SPATIAL_LETTERS = {1: "W", 2: "HW", 3: "DHW"}


# ---- permutations and storage orders -------------------------------------------------------------
def to_last(rank: int) -> tuple[int, ...]:
    """The Transpose perm from channels-first to channels-last: (0, 2, 3, 1) for rank 4."""
    return (0, *range(2, rank), 1)


def to_first(rank: int) -> tuple[int, ...]:
    return (0, rank - 1, *range(1, rank - 1))


def identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def compose(first, second) -> tuple[int, ...]:
    """The perm of Transpose(first) followed by Transpose(second)."""
    return tuple(first[axis] for axis in second)


def inverse(perm) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def same_storage(shape, order, other) -> bool:
    """True when both orders lay a tensor of ``shape`` out identically in memory (axes of size 1
    do not move anything)."""
    return [a for a in order if shape[a] != 1] == [a for a in other if shape[a] != 1]


def layout_free(value: Value) -> bool:
    rank = value.type.rank
    return rank not in CHANNELS_LAST or same_storage(value.shape, identity(rank), to_last(rank))


def activation_inputs(node: Node) -> tuple[int, ...]:
    """Input positions that a channels-last ``node`` reads channels-last."""
    if node.op in SPATIAL_OPS:
        positions = (0, 3) if node.op == "FusedConv" else (0,)
        return tuple(i for i in positions if i < len(node.inputs) and node.inputs[i] is not None)
    rank = node.outputs[0].type.rank
    return tuple(i for i, v in enumerate(node.inputs) if v is not None and v.type.rank == rank)


def is_view(node: Node) -> bool:
    return node.op == "Transpose" and bool(node.annotations.get("view"))


def _orders(graph: Graph) -> dict[int, tuple[int, ...]]:
    """id(value) -> storage order. Spatial ops follow their annotation, agnostic ops their inputs,
    views permute their input's order, everything else writes contiguously."""
    orders = {id(v): identity(v.type.rank) for v in graph.inputs}
    orders.update((id(v), identity(v.type.rank)) for v in graph.constants.values())
    for node in graph.nodes:
        for out in node.outputs:
            orders[id(out)] = _output_order(node, out, orders)
    return orders


def _output_order(node: Node, out: Value, orders: dict) -> tuple[int, ...]:
    rank = out.type.rank
    if is_view(node):
        back = inverse(node.attrs["perm"])
        return tuple(back[axis] for axis in orders[id(node.inputs[0])])
    if node.op in SPATIAL_OPS:
        return to_last(rank) if node.annotations.get("layout") else identity(rank)
    if node.op in AGNOSTIC_OPS:
        for i in activation_inputs(node):
            v = node.inputs[i]
            if not same_storage(v.shape, orders[id(v)], identity(rank)):
                return orders[id(v)]
    return identity(rank)


def _expected(node: Node, position: int, orders: dict) -> tuple[int, ...] | None:
    """The storage order ``node`` needs at input ``position``; None when any will do."""
    if node.op == "Transpose":
        return None  # a view relabels any storage; a copy reads any and writes contiguously
    value = node.inputs[position]
    if position in activation_inputs(node) and (
            node.op in AGNOSTIC_OPS or node.annotations.get("layout")):
        return orders[id(node.outputs[0])]
    return identity(value.type.rank)


def storage_orders(graph: Graph) -> dict[str, tuple[int, ...]]:
    """{value name: storage order}: the value's logical axes from outermost to innermost in
    memory; (0, 2, 3, 1) is NCHW stored channels-last."""
    orders = _orders(graph)
    return {v.name: orders[id(v)] for v in graph.values()}


def check_layout(graph: Graph) -> None:
    """Raise InternalError unless every node reads its inputs in the storage order it expects
    and every graph output is stored contiguously."""
    orders = _orders(graph)
    for node in graph.nodes:
        for position, value in enumerate(node.inputs):
            if value is None:
                continue
            want = _expected(node, position, orders)
            if want is not None and not same_storage(value.shape, orders[id(value)], want):
                raise InternalError(
                    f"layout: {node.op} node '{node.name}' reads %{value.name} "
                    f"{list(value.shape)} stored in axis order {orders[id(value)]} at input "
                    f"{position}, but needs order {want}")
    for value in graph.outputs:
        if not same_storage(value.shape, orders[id(value)], identity(value.type.rank)):
            raise InternalError(f"layout: graph output %{value.name} {list(value.shape)} is "
                                f"stored in axis order {orders[id(value)]}, not contiguously")


def _annotate(graph: Graph) -> None:
    """Set or clear the layout annotation of agnostic ops from the storage they get."""
    orders = _orders(graph)
    for node in graph.nodes:
        if node.op not in AGNOSTIC_OPS:
            continue
        out = node.outputs[0]
        rank = out.type.rank
        if rank in CHANNELS_LAST and orders[id(out)] == to_last(rank) and not layout_free(out):
            node.annotations["layout"] = CHANNELS_LAST[rank]
        else:
            node.annotations.pop("layout", None)


# ---- choose_layout -------------------------------------------------------------------------------
def _uniform_rank(node: Node) -> int | None:
    """The rank of all of ``node``'s outputs when it has a channels-last layout, else None."""
    rank = node.outputs[0].type.rank
    if rank not in CHANNELS_LAST or any(out.type.rank != rank for out in node.outputs):
        return None
    return rank


def _reads_channels_last(user: Node, value: Value, region: set[int]) -> bool:
    """True when ``user`` is in the region and reads ``value`` only as an activation."""
    positions = [i for i, v in enumerate(user.inputs) if v is value]
    return id(user) in region and all(i in activation_inputs(user) for i in positions)


def _region(graph: Graph, stored_last: set[int]) -> set[int]:
    """ids of the nodes to store channels-last: every spatial op, every agnostic op that reads a
    channels-last tensor (so elementwise chains and residual adds stay in), and every agnostic op
    whose readers are all in the region when that costs no new conversion (an elementwise op on
    a tensor that is converted anyway, as in DenseNet's concatenated input). ``stored_last``:
    ids of values already stored channels-last (by an earlier run)."""
    region: set[int] = set()
    channels_last = set(stored_last)
    for node in graph.nodes:
        rank = _uniform_rank(node)
        if rank is None:
            continue
        if node.op in SPATIAL_OPS:
            x = node.inputs[0]
            joins = len(node.outputs) == 1 and x is not None and x.type.rank == rank
        elif node.op in AGNOSTIC_OPS:
            joins = any(id(node.inputs[i]) in channels_last for i in activation_inputs(node))
        else:
            joins = False
        if joins:
            region.add(id(node))
            channels_last.update(id(out) for out in node.outputs if not layout_free(out))
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    for node in reversed(graph.nodes):
        if id(node) in region or node.op not in AGNOSTIC_OPS or _uniform_rank(node) is None:
            continue
        readers_in = all(id(out) not in outputs and users.get(id(out)) and all(
            _reads_channels_last(user, out, region) for user in users[id(out)])
            for out in node.outputs)
        inputs_ready = all(
            layout_free(v) or id(v) in channels_last
            or any(_reads_channels_last(user, v, region) for user in users[id(v)])
            for v in (node.inputs[i] for i in activation_inputs(node)))
        if readers_in and inputs_ready:
            region.add(id(node))
            channels_last.update(id(out) for out in node.outputs if not layout_free(out))
    return region


def _transpose(name: str, x: Value, out: Value, perm, node: Node, view: bool) -> Node:
    annotations = {"view": True} if view else {}
    return Node("Transpose", [x], [out], {"perm": list(perm)}, name, node.origins,
                "choose_layout", annotations=annotations)


def _permuted(graph: Graph, value: Value, perm, suffix: str) -> Value:
    shape = tuple(value.shape[axis] for axis in perm)
    return graph.new_value(f"{value.name}.{suffix}", value.type.with_shape(shape))


def _convert(graph: Graph, region: set[int], stored_last: set[int]) -> tuple[int, int]:
    """Insert the boundary Transposes; returns (entries, exits)."""
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    produced = {id(out) for node in graph.nodes if id(node) in region for out in node.outputs}
    produced |= stored_last
    entered: dict[int, Value] = {}   # NCHW value -> its channels-last copy
    renamed: dict[int, Value] = {}   # region output that is also needed NCHW -> channels-last one
    nodes: list[Node] = []
    for node in graph.nodes:
        if id(node) not in region:
            nodes.append(node)
            continue
        for i in activation_inputs(node):
            value = node.inputs[i]
            if id(value) in renamed:
                node.inputs[i] = renamed[id(value)]
            elif id(value) not in produced and not layout_free(value):
                if id(value) not in entered:
                    rank = value.type.rank
                    suffix = CHANNELS_LAST[rank].lower()
                    buffer = _permuted(graph, value, to_last(rank), suffix)
                    view = graph.new_value(f"{value.name}.cl", value.type)
                    nodes.append(_transpose(f"{value.name}.to_{suffix}", value, buffer,
                                            to_last(rank), node, view=False))
                    nodes.append(_transpose(f"{value.name}.as_cl", buffer, view,
                                            to_first(rank), node, view=True))
                    entered[id(value)] = view
                node.inputs[i] = entered[id(value)]
        nodes.append(node)
        for index, out in enumerate(node.outputs):
            needs_nchw = id(out) in outputs or any(
                value is out and not is_view(user)
                and (id(user) not in region or i not in activation_inputs(user))
                for user in users.get(id(out), ()) for i, value in enumerate(user.inputs))
            if not needs_nchw or layout_free(out):
                continue
            rank = out.type.rank
            suffix = CHANNELS_LAST[rank].lower()
            stored = graph.new_value(f"{out.name}.cl", out.type)
            node.outputs[index] = stored
            stored.producer = node
            renamed[id(out)] = stored
            buffer = _permuted(graph, out, to_last(rank), suffix)
            nodes.append(_transpose(f"{out.name}.as_{suffix}", stored, buffer, to_last(rank),
                                    node, view=True))
            nodes.append(_transpose(f"{out.name}.to_nchw", buffer, out, to_first(rank), node,
                                    view=False))
    graph.nodes = nodes
    return len(entered), len(renamed)


def _pack_weights(graph: Graph, region: set[int]) -> int:
    """Channels-last copies of the constant weights of channels-last convolutions."""
    packed: dict[int, Value] = {}
    for node in graph.nodes:
        if id(node) not in region or node.op not in PACKED_OPS:
            continue
        w = node.inputs[1]
        if w is None or not w.is_constant or node.annotations.get("_packed_weight") in (
                graph.constants):
            continue
        rank = w.type.rank
        first, last = ("I", "O") if node.op == "ConvTranspose" else ("O", "I")
        order = first + SPATIAL_LETTERS[rank - 2] + last
        if id(w) not in packed:
            data = np.ascontiguousarray(w.data.transpose(to_last(rank)))
            packed[id(w)] = graph.add_constant(f"{w.name}.{order.lower()}", data)
        node.annotations["_packed_weight"] = packed[id(w)].name
        node.annotations["_packed_weight_layout"] = order
    return len(packed)


@register_pass("choose_layout",
               "store activations channels-last when the target prefers NHWC: annotate spatial "
               "ops, pack weights, insert and cancel boundary Transposes")
def choose_layout(graph: Graph) -> Graph:
    layout = graph.meta.get("layout", "NCHW")
    if layout not in LAYOUTS:
        raise UserError(f"choose_layout: graph.meta['layout'] = {layout!r} is not one of "
                        f"{', '.join(LAYOUTS)}")
    if layout == "NCHW":
        return graph
    orders = _orders(graph)
    stored_last = {id(v) for v in graph.values() if v.type.rank in CHANNELS_LAST
                   and not layout_free(v) and orders[id(v)] == to_last(v.type.rank)}
    region = _region(graph, stored_last)
    before = {id(node): node.annotations.get("layout") for node in graph.nodes}
    for node in graph.nodes:
        if id(node) in region and node.op in SPATIAL_OPS:
            node.annotations["layout"] = CHANNELS_LAST[node.outputs[0].type.rank]
    entries, exits = _convert(graph, region, stored_last)
    weights = _pack_weights(graph, region)
    removed, merged, sunk = cancel_transposes(graph, created_by="choose_layout")
    _annotate(graph)
    check_layout(graph)
    fresh = sum(1 for node in graph.nodes
                if node.annotations.get("layout") and before.get(id(node)) is None)
    if not (fresh or entries or exits or weights or removed or sunk):
        return graph
    views = sum(1 for node in graph.nodes if is_view(node))
    copies = sum(1 for node in graph.nodes if node.op == "Transpose") - views
    parts = [f"{fresh} nodes to {layout}", f"{weights} weights packed",
             f"boundaries: {entries} in, {exits} out"]
    if removed or sunk:
        parts.append(_cancel_summary(removed, merged, sunk))
    parts.append(f"{copies} copying + {views} view Transposes left")
    note("; ".join(parts))
    return graph


# ---- transpose cancellation ----------------------------------------------------------------------
def _bypass(graph: Graph, dead: Node, value: Value, outputs: set[int]) -> bool:
    """Drop ``dead``, whose output equals ``value``; readers of its output read ``value``. A
    graph output keeps its name: ``value``'s producer writes it instead."""
    old = dead.outputs[0]
    if id(old) in outputs:
        producer = value.producer
        if producer is None or id(value) in outputs:
            return False  # a graph input or another output: the names must both stay
        graph.nodes.remove(dead)
        producer.outputs[producer.outputs.index(value)] = old
        old.producer = producer
        graph.replace_all_uses(value, old)
        return True
    graph.nodes.remove(dead)
    graph.replace_all_uses(old, value)
    return True


def _fold_pair(graph: Graph, second: Node, users, outputs, orders, created_by) -> str:
    """Transpose of a Transpose of one kind: removed, merged or left ('' when left)."""
    first = second.inputs[0].producer
    if first is None or first.op != "Transpose" or is_view(first) != is_view(second):
        return ""
    x = first.inputs[0]
    perm = compose(first.attrs["perm"], second.attrs["perm"])
    if perm == identity(len(perm)):
        # two copies leave a contiguous tensor: only the same as x if x was contiguous
        if not is_view(second) and not same_storage(x.shape, orders[id(x)], perm):
            return ""
        return "removed" if _bypass(graph, second, x, outputs) else ""
    if len(users.get(id(first.outputs[0]), ())) != 1 or id(first.outputs[0]) in outputs:
        return ""
    merged = Node("Transpose", [x], [second.outputs[0]], {"perm": list(perm)}, second.name,
                  fused_origins(first, second), created_by,
                  annotations=dict(second.annotations))
    graph.nodes[graph.nodes.index(second)] = merged
    graph.nodes.remove(first)
    return "merged"


def _identity_transpose(graph: Graph, node: Node, outputs, orders) -> bool:
    x = node.inputs[0]
    perm = tuple(node.attrs["perm"])
    if perm != identity(len(perm)):
        return False
    if not is_view(node) and not same_storage(x.shape, orders[id(x)], perm):
        return False  # a copy that makes x contiguous
    return _bypass(graph, node, x, outputs)


def _meets_transpose(node: Node, users, outputs) -> bool:
    """True when ``node``'s result flows through single-reader unary ops into a Transpose of
    the same kind, so that sinking it lets the two fold."""
    value = node.outputs[0]
    while id(value) not in outputs and len(users.get(id(value), ())) == 1:
        reader = users[id(value)][0]
        if reader.op == "Transpose":
            return is_view(reader) == is_view(node)
        if reader.op not in UNARY_OPS or len(reader.inputs) != 1 or len(reader.outputs) != 1:
            return False
        value = reader.outputs[0]
    return False


def _sink(graph: Graph, node: Node, users, outputs, created_by) -> bool:
    """Transpose -> unary op  =>  unary op -> Transpose, when a Transpose to fold with waits
    further down."""
    if not _meets_transpose(node, users, outputs):
        return False
    unary = users[id(node.outputs[0])][0]
    if unary.op == "Transpose":
        return False
    x = node.inputs[0]
    result = unary.outputs[0]
    moved = graph.new_value(f"{result.name}.pre", TensorType(result.dtype, x.shape))
    new_unary = Node(unary.op, [x], [moved], dict(unary.attrs), unary.name, unary.origins,
                     created_by, unary.domain, dict(unary.annotations))
    new_transpose = Node("Transpose", [moved], [result], dict(node.attrs), node.name,
                         node.origins, created_by, annotations=dict(node.annotations))
    index = graph.nodes.index(unary)
    graph.nodes[index:index + 1] = [new_unary, new_transpose]
    graph.nodes.remove(node)
    return True


def cancel_transposes(graph: Graph, created_by: str = "cancel_transposes") -> tuple[int, int, int]:
    """Fold Transposes until nothing changes; returns (Transposes removed, pairs merged,
    Transposes sunk below unary ops).

    Only pairs of one kind (both copies or both views) cancel or merge: a copy next to a view
    changes the storage, which is what a layout boundary is for."""
    before = sum(1 for node in graph.nodes if node.op == "Transpose")
    merged = sunk = 0
    changed = True
    while changed:
        users = graph.users()
        outputs = {id(v) for v in graph.outputs}
        orders = _orders(graph)
        changed = False
        for node in graph.nodes:
            if node.op != "Transpose":
                continue
            if _identity_transpose(graph, node, outputs, orders):
                changed = True
            else:
                kind = _fold_pair(graph, node, users, outputs, orders, created_by)
                merged += kind == "merged"
                if kind:
                    changed = True
                elif _sink(graph, node, users, outputs, created_by):
                    sunk += 1
                    changed = True
            if changed:
                graph.remove_unused()
                break
    after = sum(1 for node in graph.nodes if node.op == "Transpose")
    return before - after, merged, sunk


def _cancel_summary(removed: int, merged: int, sunk: int) -> str:
    parts = []
    if removed:
        parts.append(f"removed {removed} Transposes" + (f" ({merged} by merging)" if merged
                                                        else ""))
    if sunk:
        parts.append(f"sank {sunk} below unary ops")
    return ", ".join(parts)


@register_pass("cancel_transposes",
               "remove Transpose pairs that compose to the identity, merge consecutive ones and "
               "sink Transposes below unary elementwise ops")
def cancel_transposes_pass(graph: Graph) -> Graph:
    removed, merged, sunk = cancel_transposes(graph)
    if removed or merged or sunk:
        _annotate(graph)
        note(_cancel_summary(removed, merged, sunk))
    return graph
