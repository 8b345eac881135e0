"""Cleanup passes (opt_level >= 1): remove no-op nodes, fold constants, CSE, DCE.

Graph outputs keep their names through every pass here: the compiled module names its results
after them. Where a bypass or merge would put another value in a graph output's place, the
surviving producer takes over the output's Value instead (see ``merge_values``).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..backends.reference import run_node
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType
from ..ops import OPS
from .manager import note, register_pass
from .pattern import fused_origins


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


# ---- shared editing helpers ----------------------------------------------------------------------
def merge_values(graph: Graph, keep: Value, drop: Value) -> bool:
    """Make every reader of ``drop`` read ``keep`` (the same tensor), so that ``drop``'s producer
    becomes dead. If ``drop`` is a graph output, ``keep``'s producer takes over ``drop``'s Value
    so the output's name survives; that is impossible when ``keep`` is a graph input, a constant
    or a graph output itself, and then nothing changes and the result is False."""
    if keep is drop:
        return False
    outputs = {id(v) for v in graph.outputs}
    if id(drop) not in outputs:
        graph.replace_all_uses(drop, keep)
        return True
    producer = keep.producer
    if producer is None or id(keep) in outputs or keep.type != drop.type:
        return False
    # drop is read only after its old producer, which comes after keep's: defining it at keep's
    # producer keeps the order valid.
    old_producer = drop.producer
    producer.outputs = [drop if v is keep else v for v in producer.outputs]
    drop.producer = producer
    for node in graph.nodes:
        if node is not old_producer:
            node.inputs = [drop if v is keep else v for v in node.inputs]
    return True


def _is_unused(value: Value, users: dict, outputs: set) -> bool:
    return id(value) not in outputs and not users.get(id(value))


# ---- remove_identity -----------------------------------------------------------------------------
# Shape ops that are no-ops when the output type equals the data input's type.
_SAME_TYPE_NOOPS = ("Reshape", "Flatten", "Expand", "Squeeze", "Unsqueeze")


def _noop_source(node: Node, users: dict, outputs: set) -> Value | None:
    """The input a no-op node passes through unchanged, or None when the node does real work."""
    data = node.inputs[0] if node.inputs else None
    if data is None:
        return None
    if node.op == "Identity":
        return data
    if node.op == "Dropout":
        # Inference Dropout passes its input through; its mask must be unread for a bypass.
        if all(_is_unused(v, users, outputs) for v in node.outputs[1:]):
            return data
        return None
    if len(node.outputs) != 1 or node.outputs[0].type != data.type:
        return None
    if node.op == "Cast":
        return data
    if node.op in _SAME_TYPE_NOOPS and all(v is None or v.is_constant for v in node.inputs[1:]):
        return data
    return None


@register_pass("remove_identity", "bypass Identity, inference Dropout and no-op Cast/Reshape/"
               "Flatten/Expand/Squeeze/Unsqueeze")
def remove_identity(graph: Graph) -> Graph:
    counts: dict[str, int] = {}
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    kept: list[Node] = []
    for node in graph.nodes:
        source = _noop_source(node, users, outputs)
        if source is not None and merge_values(graph, source, node.outputs[0]):
            counts[node.op] = counts.get(node.op, 0) + 1
            # A bypass gives the source new readers (a Dropout mask may be one).
            users = graph.users()
            outputs = {id(v) for v in graph.outputs}
            continue
        kept.append(node)
    graph.nodes = kept
    if counts:
        note("removed " + ", ".join(f"{n} {op}" for op, n in sorted(counts.items())))
    return graph


def drop_unused_constants(graph: Graph) -> None:
    """Forget constants nobody reads (unlike remove_unused, dead nodes are left alone)."""
    used = {id(v) for node in graph.nodes for v in node.inputs if v is not None}
    used.update(id(v) for v in graph.outputs)
    # as in Graph.remove_unused: annotations may name constants (weights packed for a backend)
    named = {v for node in graph.nodes for v in node.annotations.values() if isinstance(v, str)}
    graph.constants = {k: v for k, v in graph.constants.items() if id(v) in used or k in named}


# ---- fold_constants ------------------------------------------------------------------------------
def _fold(node: Node) -> list[np.ndarray] | None:
    """The node's results if they can be computed at compile time, else None."""
    op = OPS.get(node.op)
    if op is None or not op.foldable:
        return None
    if all(v is None or v.is_constant for v in node.inputs):
        args = [v.data if v is not None else None for v in node.inputs]
        # run_node checks each result against the shape rule, as the executor would.
        return run_node(node, args)
    static_value = getattr(op, "value_from_types", None)
    if static_value is None or len(node.outputs) != 1:
        return None
    value = static_value(*[v.type if v is not None else None for v in node.inputs], **node.attrs)
    if value is None or TensorType.of(np.asarray(value)) != node.outputs[0].type:
        return None
    return [np.asarray(value)]


@register_pass("fold_constants", "evaluate nodes whose inputs are all constants at compile time")
def fold_constants(graph: Graph) -> Graph:
    counts: dict[str, int] = {}
    kept: list[Node] = []
    for node in graph.nodes:
        results = _fold(node)
        if results is None:
            kept.append(node)
            continue
        # The output Values become the constants, so readers and graph outputs keep their names.
        for value, array in zip(node.outputs, results):
            value.data = array
            value.producer = None
            graph.constants[value.name] = value
        counts[node.op] = counts.get(node.op, 0) + 1
    graph.nodes = kept
    if counts:
        drop_unused_constants(graph)
        note("folded " + ", ".join(f"{n} {op}" for op, n in sorted(counts.items())))
    return graph


# ---- eliminate_common_subexpressions -------------------------------------------------------------
def _freeze(value):
    """A hashable stand-in for an attribute value (lists, dicts and arrays included)."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, np.generic):
        return _freeze(value.item())
    if isinstance(value, float) and value != value:
        return ("nan",)  # NaN != NaN, but two NaN attributes mean the same thing
    return (type(value).__name__, value)


def _raw(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _merge_constants(graph: Graph) -> int:
    by_type: dict[tuple, list[Value]] = {}
    for value in graph.constants.values():
        by_type.setdefault((value.data.dtype.str, value.data.shape), []).append(value)
    merged = 0
    for group in by_type.values():
        if len(group) < 2:
            continue  # most weights have a shape of their own: no need to hash them
        seen: dict[bytes, Value] = {}
        for value in group:
            digest = hashlib.blake2b(_raw(value.data), digest_size=16).digest()
            first = seen.setdefault(digest, value)
            same = first is not value and np.array_equal(_raw(first.data), _raw(value.data))
            if same and merge_values(graph, first, value):
                merged += 1
    return merged


def _merge_nodes(graph: Graph) -> int:
    """One forward sweep; readers of a merged node read the first one, so chains merge too."""
    seen: dict[tuple, Node] = {}
    kept: list[Node] = []
    merged = 0
    for node in graph.nodes:
        op = OPS.get(node.op)
        if op is None or not op.foldable:
            kept.append(node)  # unknown or impure: two calls need not give the same result
            continue
        key = (node.op, node.domain, len(node.outputs),
               tuple(id(v) if v is not None else None for v in node.inputs),
               _freeze(node.attrs))
        first = seen.setdefault(key, node)
        if first is not node and _merge_node(graph, first, node):
            merged += 1
            continue
        kept.append(node)
    graph.nodes = kept
    return merged


def _merge_node(graph: Graph, first: Node, node: Node) -> bool:
    """Send ``node``'s readers to ``first``; False (and nothing changed) when a graph output's
    name could not be kept."""
    outputs = {id(v) for v in graph.outputs}
    named = [v for v in node.outputs if id(v) in outputs]
    if named and (len(named) > 1 or any(id(v) in outputs for v in first.outputs)):
        return False
    for keep, drop in zip(list(first.outputs), list(node.outputs)):
        merge_values(graph, keep, drop)
    first.origins = fused_origins(first, node)
    return True


@register_pass("eliminate_common_subexpressions",
               "merge identical constants, then nodes with the same op, inputs and attributes")
def eliminate_common_subexpressions(graph: Graph) -> Graph:
    merged_constants = _merge_constants(graph)
    merged_nodes = 0
    # A merge that renames a graph output changes the keys of nodes already seen: sweep again.
    for _ in range(10):
        merged = _merge_nodes(graph)
        merged_nodes += merged
        if not merged:
            break
    if merged_constants:
        drop_unused_constants(graph)
    parts = []
    if merged_constants:
        parts.append(f"merged {_plural(merged_constants, 'duplicate constant')}")
    if merged_nodes:
        parts.append(f"merged {_plural(merged_nodes, 'duplicate node')}")
    if parts:
        note("; ".join(parts))
    return graph


@register_pass("eliminate_dead_code", "drop nodes whose outputs nobody reads, and unread constants")
def eliminate_dead_code(graph: Graph) -> Graph:
    removed = graph.remove_unused()
    if removed:
        note(f"removed {removed} dead node{'s' if removed != 1 else ''}")
    return graph
