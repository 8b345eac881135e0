"""The IR: values, nodes and graphs.

The graph is a list of nodes in a valid execution order (SSA: every value is defined once, by a graph
input, a constant or one node's output, before it is used). Printing it gives one line per node; see
``printer.py``. Passes transform a Graph into a Graph; ``verifier.py`` checks the invariants between them.
"""

from __future__ import annotations

import copy
import itertools
from typing import Iterable, Iterator

import numpy as np

from .types import TensorType


class Value:
    """An SSA value: a graph input, a constant (weights) or a node output."""

    __slots__ = ("name", "type", "data", "producer")

    def __init__(self, name: str, type: TensorType, data: np.ndarray | None = None,
                 producer: "Node | None" = None):
        self.name = name
        self.type = type
        self.data = data            # set for constants only
        self.producer = producer    # the node that computes it; None for inputs and constants

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation. ``origins`` names the ONNX nodes it stands for (several after a fusion);
    ``created_by`` names the pass that made it (None for nodes imported from ONNX)."""

    __slots__ = ("op", "inputs", "outputs", "attrs", "name", "origins", "created_by", "domain",
                 "annotations")

    def __init__(self, op: str, inputs: list[Value | None], outputs: list[Value],
                 attrs: dict | None = None, name: str = "", origins: Iterable[str] = (),
                 created_by: str | None = None, domain: str = "",
                 annotations: dict | None = None):
        self.op = op
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.attrs = dict(attrs or {})
        self.name = name
        self.origins = tuple(origins) or ((name,) if name else ())
        self.created_by = created_by
        self.domain = domain
        # Non-semantic notes from passes (a conv's chosen algorithm and why, a layout...). Unlike
        # attrs they never change what the node computes, so shape rules never see them.
        self.annotations = dict(annotations or {})
        for out in self.outputs:
            out.producer = self

    def __repr__(self) -> str:
        from .printer import format_node
        return format_node(self)


class Graph:
    def __init__(self, name: str = "graph", opset: int = 0):
        self.name = name
        self.opset = opset
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self.nodes: list[Node] = []
        # Facts that travel with the graph: the target and its preferred layout (set by compile),
        # results of analyses such as "memory_plan". Values are referred to by name, never by object.
        self.meta: dict = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    # ---- building -----------------------------------------------------------------------------
    def unique_name(self, hint: str) -> str:
        hint = hint or "v"
        name = hint
        while name in self._names:
            name = f"{hint}.{next(self._counter)}"
        self._names.add(name)
        return name

    def add_input(self, name: str, type: TensorType) -> Value:
        value = Value(self.unique_name(name), type)
        self.inputs.append(value)
        return value

    def add_constant(self, name: str, data: np.ndarray) -> Value:
        data = np.asarray(data)
        value = Value(self.unique_name(name), TensorType.of(data), data=data)
        self.constants[value.name] = value
        return value

    def new_value(self, name: str, type: TensorType) -> Value:
        return Value(self.unique_name(name), type)

    def add_node(self, node: Node, index: int | None = None) -> Node:
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    # ---- queries ------------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for node in self.nodes:
            yield from node.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(name)

    def users(self) -> dict[int, list[Node]]:
        """id(value) -> nodes that read it, in execution order."""
        result: dict[int, list[Node]] = {}
        for node in self.nodes:
            for v in node.inputs:
                if v is not None:
                    result.setdefault(id(v), []).append(node)
        return result

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items()))

    def num_parameters(self) -> int:
        return sum(v.type.size for v in self.constants.values())

    # ---- editing ------------------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        for node in self.nodes:
            node.inputs = [new if v is old else v for v in node.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_unused(self) -> int:
        """Dead-code elimination: drop nodes whose outputs nobody reads, and unread constants."""
        live = {id(v) for v in self.outputs}
        kept: list[Node] = []
        for node in reversed(self.nodes):
            if any(id(o) in live for o in node.outputs):
                kept.append(node)
                live.update(id(v) for v in node.inputs if v is not None)
        removed = len(self.nodes) - len(kept)
        self.nodes = kept[::-1]
        # a node may name constants in its annotations (a weight packed for a backend's layout)
        named = {v for node in kept for v in node.annotations.values() if isinstance(v, str)}
        self.constants = {k: v for k, v in self.constants.items() if id(v) in live or k in named}
        return removed

    def copy(self) -> "Graph":
        """A structural copy: new Values and Nodes, shared constant arrays (never mutated).

        Written out rather than with copy.deepcopy, whose recursion follows producer links and
        overflows the stack on deep networks."""
        new = Graph(self.name, self.opset)
        new._names = set(self._names)
        new._counter = itertools.count(next(copy.copy(self._counter)))
        mapping: dict[int, Value] = {}

        def clone(v: Value) -> Value:
            c = Value(v.name, v.type, v.data)
            mapping[id(v)] = c
            return c

        new.inputs = [clone(v) for v in self.inputs]
        new.constants = {k: clone(v) for k, v in self.constants.items()}
        for node in self.nodes:
            inputs = [mapping[id(v)] if v is not None else None for v in node.inputs]
            outputs = [clone(v) for v in node.outputs]
            new.nodes.append(Node(node.op, inputs, outputs, copy.deepcopy(node.attrs), node.name,
                                  node.origins, node.created_by, node.domain,
                                  copy.deepcopy(node.annotations)))
        new.outputs = [mapping[id(v)] for v in self.outputs]
        # meta refers to values by name only, so a shallow copy stays true.
        new.meta = dict(self.meta)
        return new

    # ---- views --------------------------------------------------------------------------------
    def __str__(self) -> str:
        from .printer import format_graph
        return format_graph(self)

    def __repr__(self) -> str:
        return (f"<Graph {self.name!r}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, "
                f"{len(self.constants)} constants>")

    def to_networkx(self):
        from .views import to_networkx
        return to_networkx(self)

    def to_dot(self) -> str:
        from .views import to_dot
        return to_dot(self)

    def verify(self) -> "Graph":
        from .verifier import verify
        verify(self)
        return self
