"""Rewrites as tables of (pattern, function), in the manner of tinygrad's PatternMatcher.

    RULES = [
        (Pat("Relu", Pat("Conv", name="conv"), name="relu"), fuse_conv_relu),
        ...
    ]
    changed = rewrite(graph, RULES, created_by="fuse_conv_activation")

A pattern matches a node by op (one name or a tuple), an optional ``where`` predicate and patterns
for its inputs. Leaves: ``Pat(name="x")`` matches any value, ``Pat.const(name="w")`` a constant.
Interior (non-root) nodes must have a single user and must not be graph outputs, so that replacing
the root never duplicates work. A rule's function receives the graph and the captures by name
(nodes for op patterns, values for leaves) and returns the replacement nodes, or None when it does
not apply after all. The last replacement node stands for the root: its outputs replace the root's
(reusing the root's output Values keeps names stable).
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..ir.graph import Graph, Node, Value


class Pat:
    def __init__(self, op: str | tuple[str, ...] | None = None, *inputs: "Pat",
                 name: str | None = None, where: Callable[[Node], bool] | None = None,
                 commutative: bool = False, constant: bool = False):
        self.ops = (op,) if isinstance(op, str) else op
        self.inputs = inputs
        self.name = name
        self.where = where
        self.commutative = commutative
        self.constant = constant
        self.value_where: Callable[[Value], bool] | None = None

    @staticmethod
    def const(name: str | None = None, where: Callable[[Value], bool] | None = None) -> "Pat":
        pat = Pat(name=name, constant=True)
        pat.value_where = where
        return pat

    def __repr__(self) -> str:
        if self.ops is None:
            return f"${self.name or '_'}"
        args = ", ".join(map(repr, self.inputs))
        return f"{'|'.join(self.ops)}({args})"


def match(pat: Pat, node: Node, users: dict[int, list[Node]], outputs: set[int]) -> dict | None:
    """Captures if ``pat`` matches with ``node`` as its root, else None."""
    captures: dict = {}
    if _match_node(pat, node, users, outputs, captures):
        return captures
    return None


def _match_node(pat: Pat, node: Node, users, outputs, captures) -> bool:
    if pat.ops is None or node.op not in pat.ops:
        return False
    if pat.where is not None and not pat.where(node):
        return False
    if pat.inputs:
        orders = [list(pat.inputs)]
        if pat.commutative and len(pat.inputs) == 2:
            orders.append(list(reversed(pat.inputs)))
        for order in orders:
            trial = dict(captures)
            if len(order) == len(node.inputs) and all(
                    _match_value(p, v, users, outputs, trial) for p, v in zip(order, node.inputs)):
                captures.clear()
                captures.update(trial)
                break
        else:
            return False
    if pat.name:
        captures[pat.name] = node
    return True


def _match_value(pat: Pat, value: Value | None, users, outputs, captures) -> bool:
    if value is None:
        return False
    if pat.ops is None:
        if pat.constant:
            if not value.is_constant:
                return False
            if pat.value_where is not None and not pat.value_where(value):
                return False
        if pat.name:
            if pat.name in captures and captures[pat.name] is not value:
                return False  # the same name twice must be the same value (x * Sigmoid(x))
            captures[pat.name] = value
        return True
    producer = value.producer
    if producer is None or len(producer.outputs) != 1:
        return False
    if id(value) in outputs or len(users.get(id(value), ())) != 1:
        return False
    return _match_node(pat, producer, users, outputs, captures)


Rule = tuple[Pat, Callable[..., Sequence[Node] | Node | None]]


def rewrite(graph: Graph, rules: Sequence[Rule], created_by: str, max_rounds: int = 100) -> int:
    """Apply the rules until none matches; returns how many rewrites happened. Replaced interior
    nodes become dead and are removed at the end."""
    total = 0
    for _ in range(max_rounds):
        changed = _rewrite_round(graph, rules, created_by)
        total += changed
        if not changed:
            break
    if total:
        graph.remove_unused()
    return total


def _rewrite_round(graph: Graph, rules, created_by: str) -> int:
    changed = 0
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    index = 0
    while index < len(graph.nodes):
        node = graph.nodes[index]
        for pat, fn in rules:
            captures = match(pat, node, users, outputs)
            if captures is None:
                continue
            result = fn(graph, **captures)
            if result is None:
                continue
            new_nodes = [result] if isinstance(result, Node) else list(result)
            _splice(graph, index, node, new_nodes, created_by)
            changed += 1
            users = graph.users()
            index += len(new_nodes) - 1
            break
        index += 1
    return changed


def _splice(graph: Graph, index: int, root: Node, new_nodes: list[Node], created_by: str) -> None:
    for new in new_nodes:
        if new.created_by is None:
            new.created_by = created_by
    last = new_nodes[-1]
    if len(last.outputs) != len(root.outputs):
        raise ValueError(f"rewrite of {root.op} '{root.name}' returned {len(last.outputs)} "
                         f"outputs for {len(root.outputs)}")
    graph.nodes[index:index + 1] = new_nodes
    for old, new in zip(root.outputs, last.outputs):
        if old is not new:
            graph.replace_all_uses(old, new)
        else:
            new.producer = last


def fused_origins(*nodes: Node) -> tuple[str, ...]:
    """The ONNX origins of several nodes, in order, without repeats."""
    seen: dict[str, None] = {}
    for node in nodes:
        for origin in node.origins:
            seen.setdefault(origin, None)
    return tuple(seen)
