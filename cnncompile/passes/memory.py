"""Concat elision and static memory planning: liveness, in-place reuse and a 64-byte-aligned arena.

Where tensors live (the contract of ``graph.meta["memory_plan"]``):

* Graph inputs and outputs belong to the caller and constants to the module: none is in the arena.
* Every other node output with a static shape gets a ``TensorAlloc``: a byte offset in one arena
  and its lifetime [first, last] in node indices of the final order (inclusive: a node's inputs and
  outputs are live at its step together).
* ``in_place_of=x``: an elementwise node writes its output over its same-typed input x, which dies
  at that node.
* ``alias_of=(parent, axis, start, stop)``: the tensor is the slice ``start:stop`` along ``axis`` of
  ``parent`` (a Concat output), so its producer writes straight into the concat's buffer. With
  N > 1 a channel slice of NCHW is strided; ``offset`` is then the byte of its first element.
* ``offset`` None: the tensor lies inside a caller-owned graph output (a slice of an elided Concat
  whose output is a graph output).
* Values with data-dependent dims ("?") cannot be planned; ``MemoryPlan.dynamic`` lists them.

Concat elision generalises to DenseNet's pattern: a Concat whose inputs are a run of a larger
Concat's inputs (same axis) becomes a view of that host's buffer, so each feature map is written
once into the host and every layer's Concat copies only what no producer wrote in place (e.g. a
graph input). ``run_in_arena`` executes a graph out of its planned arena, which proves a plan end
to end in the tests.

Annotations for backends (elide_concat writes them, plan_memory re-checks and rewrites them):
a Concat has ``elided=True`` (copy nothing), or ``elided_inputs=[i, ...]`` (copy every other
input into its slice); ``_view_of=[host, axis, start, stop]`` when its output is a view of a larger
Concat; ``_reason`` says what it still copies and why. A producer has
``_slices={value: [axis, start, stop]}`` and ``_slice_parents={value: concat output}``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from ..errors import InternalError
from ..ir.graph import Graph, Node, Value
from .manager import note, register_pass

ALIGNMENT = 64

#: ops whose output element i depends only on element i of every input of the output's shape, so
#: the output may be written over such an input
IN_PLACE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "PRelu",
    "Relu", "Relu6", "Clip", "LeakyRelu", "Sigmoid", "Silu", "HardSwish", "HardSigmoid", "Tanh",
    "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Abs", "Neg",
    "Exp", "Log", "Sqrt", "Erf", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "FusedElementwise", "BatchNormalization", "Identity", "Dropout", "Cast"})


class MemoryPlanError(InternalError):
    """A memory plan breaks one of its invariants."""


# annotation keys this module owns
_CONCAT_KEYS = ("elided", "elided_inputs", "_view_of", "_reason")
_PRODUCER_KEYS = ("_slices", "_slice_parents")


@dataclass
class TensorAlloc:
    name: str
    nbytes: int
    offset: int | None
    first: int
    last: int
    alias_of: tuple[str, int, int, int] | None = None
    in_place_of: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "nbytes": self.nbytes, "offset": self.offset,
                "first": self.first, "last": self.last,
                "alias_of": list(self.alias_of) if self.alias_of else None,
                "in_place_of": self.in_place_of}


@dataclass
class MemoryPlan:
    """The arena layout. Sizes in ``arena_bytes`` and ``lower_bound_bytes`` count each buffer
    rounded up to ``alignment`` (every buffer starts on a boundary, so no arena can be smaller);
    the lower bound is the most bytes live at one step, a buffer shared by slices or an in-place
    chain counted once over its whole life. ``naive_bytes``: every planned tensor its own buffer,
    unrounded. ``steps``: nodes in the order the lifetimes refer to."""
    tensors: list[TensorAlloc]
    arena_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    alignment: int = ALIGNMENT
    steps: int = 0
    dynamic: list[str] = field(default_factory=list)
    elided_concats: int = 0
    partly_elided_concats: int = 0

    def tensor(self, name: str) -> TensorAlloc:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def in_place_count(self) -> int:
        return sum(1 for t in self.tensors if t.in_place_of)

    def summary(self) -> str:
        elided = f"{self.elided_concats} concats elided"
        if self.partly_elided_concats:
            elided += f", {self.partly_elided_concats} partly"
        line = (f"arena {format_bytes(self.arena_bytes)} (lower bound "
                f"{format_bytes(self.lower_bound_bytes)}, naive {format_bytes(self.naive_bytes)}, "
                f"{self.in_place_count} in-place, {elided})")
        if self.dynamic:
            line += f"; {len(self.dynamic)} dynamic-shape values left to run time"
        return line

    def to_dict(self) -> dict:
        return {"arena_bytes": self.arena_bytes, "lower_bound_bytes": self.lower_bound_bytes,
                "naive_bytes": self.naive_bytes, "alignment": self.alignment,
                "steps": self.steps, "dynamic": list(self.dynamic),
                "tensors": [t.to_dict() for t in self.tensors]}


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _align(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


# ---- concat elision ------------------------------------------------------------------------------
@dataclass
class _ConcatLayout:
    # value name -> (parent value name, axis, start, stop): placed values and host views
    views: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)
    placed: set[str] = field(default_factory=set)      # written in place by their producer
    members: set[str] = field(default_factory=set)     # concat outputs that view a host
    resident: dict[int, list[int]] = field(default_factory=dict)  # id(concat) -> input indices
    copied: dict[str, str] = field(default_factory=dict)  # input left to the copy -> why


def _plain_concat(node: Node) -> bool:
    return (node.op == "Concat" and node.outputs[0].type.is_static
            and all(v is not None and v.type.is_static for v in node.inputs))


def _find_run(items: list, run: list) -> int | None:
    ids = [id(v) for v in items]
    want = [id(v) for v in run]
    for pos in range(len(ids) - len(want) + 1):
        if ids[pos:pos + len(want)] == want:
            return pos
    return None


def _analyse_concats(graph: Graph, candidates: set[int] | None = None) -> _ConcatLayout:
    """Which concat inputs their producers can write in place, and which concats view a host.

    A host is a Concat that is no run of a larger one; its members are the Concats whose inputs
    are a contiguous run of its inputs (DenseNet's per-layer concats). A host input is placed (its
    producer writes into the host's slice) when a node produces it, it is no graph output, and
    every use of it is by a Concat of the family at the same position. ``candidates`` restricts
    the analysis to those concat nodes (plan_memory keeps to what elide_concat chose)."""
    layout = _ConcatLayout()
    outputs = {id(v) for v in graph.outputs}
    users = graph.users()
    concats = [n for n in graph.nodes if _plain_concat(n)
               and (candidates is None or id(n) in candidates)]

    host_of: dict[int, tuple[Node, int]] = {}
    for a in concats:
        if id(a.outputs[0]) in outputs:
            continue
        best = None
        for b in concats:
            if b is a or b.attrs["axis"] != a.attrs["axis"] or len(b.inputs) <= len(a.inputs):
                continue
            pos = _find_run(b.inputs, a.inputs)
            if pos is not None and (best is None or len(b.inputs) > len(best[0].inputs)):
                best = (b, pos)
        if best is not None:
            host_of[id(a)] = best

    families: dict[int, list[tuple[Node, int]]] = {}
    hosts: dict[int, Node] = {}
    for node in concats:
        if id(node) in host_of:
            host, pos = host_of[id(node)]
            axis = host.attrs["axis"]
            start = sum(v.type.shape[axis] for v in host.inputs[:pos])
            families.setdefault(id(host), []).append((node, start))
        else:
            hosts[id(node)] = node
            families.setdefault(id(node), []).insert(0, (node, 0))
    member_outputs = {id(node.outputs[0]) for node in concats if id(node) in host_of}

    for key, family in families.items():
        host = hosts[key]
        axis = host.attrs["axis"]
        spots: dict[int, list[int]] = {}
        for node, base in family:
            start = base
            for v in node.inputs:
                spots.setdefault(id(v), []).append(start)
                start += v.type.shape[axis]
        in_family = {id(node) for node, _ in family}
        placed_here: dict[int, tuple[int, int]] = {}
        start = 0
        for v in host.inputs:
            stop = start + v.type.shape[axis]
            blocker = _placement_blocker(v, users, outputs, member_outputs, in_family,
                                         spots[id(v)])
            if blocker is None:
                placed_here[id(v)] = (start, stop)
            else:
                layout.copied[v.name] = blocker
            start = stop
        if not placed_here:
            continue  # sharing the host's buffer would only lengthen its life
        host_name = host.outputs[0].name
        for v in host.inputs:
            if id(v) in placed_here:
                layout.placed.add(v.name)
                layout.views[v.name] = (host_name, axis, *placed_here[id(v)])
        for node, base in family:
            if node is not host:
                out = node.outputs[0]
                layout.members.add(out.name)
                layout.views[out.name] = (host_name, axis, base, base + out.type.shape[axis])
            layout.resident[id(node)] = [i for i, v in enumerate(node.inputs)
                                         if id(v) in placed_here]
    return layout


def _placement_blocker(v: Value, users, outputs, member_outputs, in_family, spots) -> str | None:
    """Why the producer of host input v cannot write it into the host's slice (None: it can)."""
    if v.is_constant:
        return "a constant"
    if v.producer is None:
        return "a graph input"
    if id(v) in outputs:
        return "a graph output"
    if id(v) in member_outputs:
        return "itself a view of a concat"
    readers = users.get(id(v), [])
    if len(readers) != len(spots) or any(id(n) not in in_family for n in readers):
        return "read by other nodes"
    if len(set(spots)) != 1:
        return "at different positions in the concats that read it"
    return None


def _annotate_concats(graph: Graph, layout: _ConcatLayout) -> list[str]:
    """Write the layout into node annotations; returns the note for the pass summary."""
    for node in graph.nodes:
        keys = _CONCAT_KEYS if node.op == "Concat" else ()
        for key in keys + _PRODUCER_KEYS:
            node.annotations.pop(key, None)
    concats = full = partly = 0
    still_copied: dict[str, str] = {}
    for node in graph.nodes:
        for v in node.outputs:
            if v.name in layout.placed:
                parent, axis, start, stop = layout.views[v.name]
                node.annotations.setdefault("_slices", {})[v.name] = [axis, start, stop]
                node.annotations.setdefault("_slice_parents", {})[v.name] = parent
        if node.op != "Concat":
            continue
        concats += 1
        out = node.outputs[0].name
        if out in layout.members:
            node.annotations["_view_of"] = list(layout.views[out])
        resident = layout.resident.get(id(node), [])
        if len(resident) == len(node.inputs):
            node.annotations["elided"] = True
            full += 1
            continue
        if resident:
            node.annotations["elided_inputs"] = resident
            partly += 1
        if not _plain_concat(node):
            node.annotations["_reason"] = "not elided: a data-dependent shape"
            continue
        copies = list(dict.fromkeys(v.name for i, v in enumerate(node.inputs)
                                    if i not in resident))
        node.annotations["_reason"] = "copies " + ", ".join(
            f"%{name} ({layout.copied.get(name, 'not chosen')})" for name in copies)
        if resident:
            still_copied.update((name, layout.copied.get(name, "")) for name in copies)
    notes = []
    if full or partly:
        notes.append(f"elided {full} of {concats} Concat")
    if partly:
        listing = ", ".join(f"%{name}: {why}" for name, why in list(still_copied.items())[:3])
        more = ", ..." if len(still_copied) > 3 else ""
        notes.append(f"{partly} partly (still copying {listing}{more})")
    if layout.members:
        notes.append(f"{len(layout.members)} Concat are views of a larger one")
    return notes


@register_pass("elide_concat", "let producers write straight into their slice of a Concat's "
                               "output (DenseNet-style concats become views of one buffer)")
def elide_concat(graph: Graph) -> Graph:
    notes = _annotate_concats(graph, _analyse_concats(graph))
    if notes:
        note("; ".join(notes))
    return graph


# ---- planning ------------------------------------------------------------------------------------
class _Liveness:
    """First and last step of every node output, over the graph's node order."""

    def __init__(self, graph: Graph):
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        for i, node in enumerate(graph.nodes):
            for v in node.outputs:
                self.first[id(v)] = i
                self.last[id(v)] = i
            for v in node.inputs:
                if v is not None and id(v) in self.first:
                    self.last[id(v)] = i


def _intermediates(graph: Graph) -> list[Value]:
    outputs = {id(v) for v in graph.outputs}
    return [v for node in graph.nodes for v in node.outputs if id(v) not in outputs]


class _Classes:
    """Union-find over value names: a class shares one location (an in-place chain)."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        root = name
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while name != root:
            self.parent[name], name = root, self.parent.get(name, name)
        return root

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _locate(names, types, classes: _Classes, alias: dict[str, tuple], external: dict[str, Value]):
    """(root, box) per name: root is a class representative in the arena or ("output", name) of a
    caller-owned graph output; box is [(lo, hi)] per axis of the root's shape."""
    class_alias: dict[str, str] = {}
    for name in names:
        if name in alias:
            rep = classes.find(name)
            if rep in class_alias:
                raise MemoryPlanError(f"memory plan: %{class_alias[rep]} and %{name} share a "
                                      "buffer but are placed in two concat slices")
            class_alias[rep] = name
    located: dict[str, tuple] = {}

    def locate(rep: str, depth: int = 0):
        if rep in located:
            return located[rep]
        if depth > len(types) + 1:
            raise MemoryPlanError(f"memory plan: the aliases of %{rep} form a cycle")
        member = class_alias.get(rep)
        if member is None:
            result = (rep, [(0, d) for d in types[rep].shape])
        else:
            parent, axis, start, stop = alias[member]
            if parent in types:
                root, box = locate(classes.find(parent), depth + 1)
            else:
                root, box = ("output", parent), [(0, d) for d in external[parent].type.shape]
            box = list(box)
            lo = box[axis][0]
            box[axis] = (lo + start, lo + stop)
            result = (root, box)
        located[rep] = result
        return result

    return {name: locate(classes.find(name)) for name in names}


def _strides(shape, itemsize: int) -> list[int]:
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return strides[::-1]


def _box_offset(box, root_shape, itemsize: int) -> int:
    return sum(lo * s for (lo, _), s in zip(box, _strides(root_shape, itemsize)))


def _box_extent(box, root_shape, itemsize: int) -> int:
    """Bytes from the box's first element to just past its last (0 when empty)."""
    if any(hi <= lo for lo, hi in box):
        return 0
    strides = _strides(root_shape, itemsize)
    return sum((hi - 1 - lo) * s for (lo, hi), s in zip(box, strides)) + itemsize


def greedy_by_size(buffers: list[tuple[int, int, int]], alignment: int = ALIGNMENT) -> list[int]:
    """Offsets for buffers (nbytes, first, last), TensorFlow Lite's greedy-by-size: largest first,
    each into the smallest gap between the buffers already placed that overlap it in time, else
    above them all."""
    order = sorted(range(len(buffers)), key=lambda k: (-buffers[k][0], buffers[k][1], k))
    placed: list[tuple[int, int, int, int]] = []   # (offset, size, first, last), by offset
    offsets = [0] * len(buffers)
    for k in order:
        nbytes, first, last = buffers[k]
        size = _align(nbytes, alignment)
        best, best_gap, cursor = None, None, 0
        for off, other, f, l in placed:
            if l < first or f > last:
                continue
            gap = off - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, off + other)
        offset = cursor if best is None else best
        offsets[k] = offset
        bisect.insort(placed, (offset, size, first, last))
    return offsets


def _choose_in_place(graph: Graph, live: _Liveness, planned: dict[int, Value],
                     layout: _ConcatLayout, classes: _Classes) -> dict[str, str]:
    """Output name -> the input whose buffer it takes: an input of the same type that dies at
    this elementwise node and whose buffer no other live tensor shares."""
    children: dict[str, list[str]] = {}
    for name, (parent, *_rest) in layout.views.items():
        children.setdefault(parent, []).append(name)
    last_by_name = {v.name: live.last[id(v)] for v in planned.values()}

    def descendants(name: str):
        for child in children.get(name, ()):
            yield child
            yield from descendants(child)

    donated: set[int] = set()
    in_place: dict[str, str] = {}
    for i, node in enumerate(graph.nodes):
        if node.op not in IN_PLACE_OPS:
            continue
        for out in node.outputs:
            if id(out) not in planned:
                continue
            for x in node.inputs:
                if (x is None or id(x) not in planned or id(x) in donated or x.type != out.type
                        or live.last[id(x)] != i or x.name in layout.members):
                    continue
                if any(last_by_name.get(d, i) > i for d in descendants(x.name)):
                    continue
                in_place[out.name] = x.name
                donated.add(id(x))
                classes.union(out.name, x.name)
                break
    return in_place


def build_memory_plan(graph: Graph, layout: _ConcatLayout | None = None,
                      alignment: int = ALIGNMENT) -> MemoryPlan:
    """The plan for the graph's final node order (see the module docstring for what it says)."""
    layout = layout or _ConcatLayout()
    live = _Liveness(graph)
    values = _intermediates(graph)
    planned = {id(v): v for v in values if v.type.is_static}
    dynamic = [v.name for v in values if not v.type.is_static]
    types = {v.name: v.type for v in planned.values()}
    external = {v.name: v for v in graph.outputs}

    classes = _Classes()
    in_place = _choose_in_place(graph, live, planned, layout, classes)
    alias = {name: view for name, view in layout.views.items() if name in types}
    names = list(types)
    where = _locate(names, types, classes, alias, external)

    # one buffer per arena root, alive from the first to the last step of anything inside it
    roots: dict[str, list[int]] = {}
    for v in planned.values():
        root = where[v.name][0]
        if isinstance(root, tuple):
            continue
        span = roots.setdefault(root, [live.first[id(v)], live.last[id(v)]])
        span[0] = min(span[0], live.first[id(v)])
        span[1] = max(span[1], live.last[id(v)])
    keys = list(roots)
    buffers = [(types[k].nbytes, roots[k][0], roots[k][1]) for k in keys]
    offsets = dict(zip(keys, greedy_by_size(buffers, alignment)))
    arena = max((offsets[k] + _align(types[k].nbytes, alignment) for k in keys), default=0)

    usage = [0] * (len(graph.nodes) + 1)
    for nbytes, first, last in buffers:
        usage[first] += _align(nbytes, alignment)
        usage[last + 1] -= _align(nbytes, alignment)
    lower_bound = int(max(np.cumsum(usage), default=0))

    tensors = []
    for v in planned.values():
        root, box = where[v.name]
        offset = None
        if not isinstance(root, tuple):
            offset = offsets[root] + _box_offset(box, types[root].shape, v.type.dtype.itemsize)
        tensors.append(TensorAlloc(v.name, v.type.nbytes, offset, live.first[id(v)],
                                   live.last[id(v)], alias.get(v.name), in_place.get(v.name)))
    full = sum(1 for n in graph.nodes if n.op == "Concat" and n.annotations.get("elided"))
    partly = sum(1 for n in graph.nodes if n.op == "Concat" and n.annotations.get("elided_inputs"))
    return MemoryPlan(tensors, arena, lower_bound, sum(t.nbytes for t in tensors), alignment,
                      len(graph.nodes), dynamic, full, partly)


@register_pass("plan_memory", "liveness over the final order, in-place reuse for elementwise ops "
                              "and one 64-byte-aligned arena (greedy by size, best fit)")
def plan_memory(graph: Graph) -> Graph:
    # Keep to the concats elide_concat chose, re-checked: a pass between them may have changed the
    # graph, and the plan must not trust stale annotations.
    chosen = {id(n) for n in graph.nodes if n.op == "Concat" and any(
        k in n.annotations for k in ("elided", "elided_inputs", "_view_of"))}
    layout = _analyse_concats(graph, chosen)
    _annotate_concats(graph, layout)
    plan = build_memory_plan(graph, layout)
    check_memory_plan(graph, plan)
    graph.meta["memory_plan"] = plan
    note(plan.summary())
    return graph


# ---- the checker ---------------------------------------------------------------------------------
def _fail(message: str):
    raise MemoryPlanError(f"memory plan: {message}")


def check_memory_plan(graph: Graph, plan: MemoryPlan) -> None:
    """Prove the plan sound for the graph, or raise MemoryPlanError naming what is wrong.

    Checks: every intermediate has exactly one allocation with its true size and lifetime; roots
    are aligned and inside the arena; in-place pairs are an elementwise node's output over an input
    of its type that dies there; slices lie inside their parent at the offset their box implies;
    elided concats find every input in place; and no two tensors live at the same step share a
    byte unless they hold the same data there (a slice and the concat built from it)."""
    live = _Liveness(graph)
    values = {v.name: v for v in _intermediates(graph)}
    allocs: dict[str, TensorAlloc] = {}
    for t in plan.tensors:
        if t.name in allocs:
            _fail(f"%{t.name} is allocated twice")
        if t.name not in values:
            _fail(f"%{t.name} is allocated but is no intermediate of the graph")
        allocs[t.name] = t
    for name, v in values.items():
        if v.type.is_static and name not in allocs:
            _fail(f"intermediate %{name}: {v.type} has no allocation")
        if not v.type.is_static and (name in allocs or name not in plan.dynamic):
            _fail(f"%{name}: {v.type} has a data-dependent shape; it must be listed as dynamic "
                  "and have no allocation")
    if plan.naive_bytes != sum(t.nbytes for t in allocs.values()):
        _fail(f"naive_bytes {plan.naive_bytes} is not the sum of the tensors' sizes")
    if plan.lower_bound_bytes > plan.arena_bytes:
        _fail(f"the arena ({plan.arena_bytes} bytes) is below the lower bound "
              f"({plan.lower_bound_bytes} bytes)")
    for name, t in allocs.items():
        v = values[name]
        want = (v.type.nbytes, live.first[id(v)], live.last[id(v)])
        if (t.nbytes, t.first, t.last) != want:
            _fail(f"%{name} is recorded as {t.nbytes} bytes live at steps {t.first}..{t.last}; "
                  f"the graph says {want[0]} bytes at steps {want[1]}..{want[2]}")

    classes = _Classes()
    donors: dict[str, str] = {}
    for name, t in allocs.items():
        if t.in_place_of is not None:
            _check_in_place(t, allocs, values, donors)
            classes.union(name, t.in_place_of)
    external = {v.name: v for v in graph.outputs}
    alias = {}
    for name, t in allocs.items():
        if t.alias_of is not None:
            _check_slice(t, allocs, values, external)
            alias[name] = tuple(t.alias_of)
    types = {name: values[name].type for name in allocs}
    where = _locate(list(allocs), types, classes, alias, external)

    for name, t in allocs.items():
        root, box = where[name]
        itemsize = types[name].dtype.itemsize
        if isinstance(root, tuple):
            if t.offset is not None:
                _fail(f"%{name} lies in graph output %{root[1]} (caller-owned) but has arena "
                      f"offset {t.offset}")
            continue
        root_alloc = allocs[root]
        if root_alloc.offset is None or root_alloc.offset % plan.alignment:
            _fail(f"buffer %{root} starts at offset {root_alloc.offset}, not a multiple of "
                  f"{plan.alignment}")
        if root_alloc.offset < 0 or root_alloc.offset + root_alloc.nbytes > plan.arena_bytes:
            _fail(f"buffer %{root} (bytes [{root_alloc.offset}, "
                  f"{root_alloc.offset + root_alloc.nbytes})) is outside the arena of "
                  f"{plan.arena_bytes} bytes")
        want = root_alloc.offset + _box_offset(box, types[root].shape, itemsize)
        if t.offset != want:
            how = f"slice {list(box)} of %{root}" if name != root else f"buffer of %{root}"
            _fail(f"%{name} is at offset {t.offset}, but as the {how} it starts at {want}")

    _check_elided_concats(graph, allocs, where)
    _check_overlaps(graph, allocs, where, types, classes)
    _check_slice_annotations(graph, allocs)


def _check_in_place(t: TensorAlloc, allocs, values, donors) -> None:
    x = t.in_place_of
    node = values[t.name].producer
    if x not in allocs:
        _fail(f"%{t.name} takes the buffer of %{x}, which has no allocation")
    if x in donors:
        _fail(f"%{donors[x]} and %{t.name} both take the buffer of %{x}")
    donors[x] = t.name
    if node.op not in IN_PLACE_OPS or all(v is None or v.name != x for v in node.inputs):
        _fail(f"%{t.name} takes the buffer of %{x}, but its producer {node.op} '{node.name}' is "
              "not an elementwise node reading it")
    if values[x].type != values[t.name].type:
        _fail(f"%{t.name}: {values[t.name].type} cannot take the buffer of %{x}: "
              f"{values[x].type}")
    if allocs[x].last != t.first:
        _fail(f"%{t.name} (steps {t.first}..{t.last}) takes the buffer of %{x}, which lives on "
              f"until step {allocs[x].last}")
    if allocs[x].offset != t.offset:
        _fail(f"%{t.name} takes the buffer of %{x} but sits at offset {t.offset}, not "
              f"{allocs[x].offset}")


def _check_slice(t: TensorAlloc, allocs, values, external) -> None:
    parent, axis, start, stop = t.alias_of
    if parent in allocs:
        ptype = values[parent].type
    elif parent in external and external[parent].type.is_static:
        ptype = external[parent].type
    else:
        _fail(f"%{t.name} is a slice of %{parent}, which is no planned tensor or static graph "
              "output")
    mine = values[t.name].type
    ok = 0 <= axis < ptype.rank and mine.rank == ptype.rank and mine.dtype == ptype.dtype
    if ok:
        want = list(ptype.shape)
        want[axis] = stop - start
        ok = 0 <= start <= stop <= ptype.shape[axis] and list(mine.shape) == want
    if not ok:
        _fail(f"%{t.name}: {mine} is no slice {start}:{stop} along axis {axis} of "
              f"%{parent}: {ptype}")


def _sub_boxes(node: Node, box, root_axis_lo: int):
    """Each concat input's box inside the output's box."""
    axis = node.attrs["axis"]
    start = root_axis_lo
    for v in node.inputs:
        sub = list(box)
        sub[axis] = (start, start + v.type.shape[axis])
        start += v.type.shape[axis]
        yield v, sub


def _check_elided_concats(graph: Graph, allocs, where) -> None:
    for node in graph.nodes:
        if node.op != "Concat":
            continue
        if node.annotations.get("elided"):
            relies = range(len(node.inputs))
        else:
            relies = node.annotations.get("elided_inputs", ())
        if not relies:
            continue
        out = node.outputs[0]
        if out.name in where:
            root, box = where[out.name]
        elif any(out is v for v in graph.outputs) and out.type.is_static:
            root, box = ("output", out.name), [(0, d) for d in out.type.shape]
        else:
            _fail(f"Concat '{node.name}' is elided but its output %{out.name} has no plan")
        subs = list(_sub_boxes(node, box, box[node.attrs["axis"]][0]))
        for i in relies:
            v, sub = subs[i]
            if v is None or v.name not in where or where[v.name] != (root, sub):
                _fail(f"Concat '{node.name}' does not copy input {i} %{getattr(v, 'name', '_')}, "
                      f"but that input is not in its slice {sub} of the concat's buffer")


def _atoms(name: str, allocs, where, producers) -> set:
    """What a tensor's bytes hold, as (source value, box) pieces: a Concat's output is made of its
    inputs, which are either in place (their own pieces) or copied in."""
    node = producers[name]
    root, box = where[name]
    if node.op != "Concat":
        return {(name, tuple(box))}
    pieces = set()
    for v, sub in _sub_boxes(node, box, box[node.attrs["axis"]][0]):
        if v.name in where and where[v.name] == (root, sub):
            pieces |= _atoms(v.name, allocs, where, producers)
        else:
            pieces.add((v.name, tuple(sub)))
    return pieces


def _boxes_meet(a, b) -> bool:
    return all(max(alo, blo) < min(ahi, bhi) for (alo, ahi), (blo, bhi) in zip(a, b))


def _check_overlaps(graph: Graph, allocs, where, types, classes: _Classes) -> None:
    producers = {v.name: node for node in graph.nodes for v in node.outputs}
    atoms: dict[str, set] = {}

    def atoms_of(name: str) -> set:
        if name not in atoms:
            atoms[name] = _atoms(name, allocs, where, producers)
        return atoms[name]
    spans = []
    for name, t in allocs.items():
        root, box = where[name]
        if t.offset is None:
            continue
        extent = _box_extent(box, types[root].shape, types[name].dtype.itemsize)
        if extent:
            spans.append((t.offset, t.offset + extent, name))
    spans.sort()
    active: list[tuple[int, int, str]] = []
    for lo, hi, name in spans:
        active = [s for s in active if s[1] > lo]
        for olo, ohi, other in active:
            a, b = allocs[other], allocs[name]
            if a.last < b.first or b.last < a.first:
                continue
            if classes.find(other) == classes.find(name):
                continue
            (ra, ba), (rb, bb) = where[other], where[name]
            if ra == rb:
                if not _boxes_meet(ba, bb):
                    continue
                # both may hold the same data there: a slice and a concat made of it
                if ({p for p in atoms_of(other) if _boxes_meet(p[1], bb)}
                        == {p for p in atoms_of(name) if _boxes_meet(p[1], ba)}):
                    continue
            _fail(f"%{other} (steps {a.first}..{a.last}, bytes [{olo}, {ohi})) and %{name} "
                  f"(steps {b.first}..{b.last}, bytes [{lo}, {hi})) are live at the same time "
                  "and overlap in the arena")
        active.append((lo, hi, name))


def _check_slice_annotations(graph: Graph, allocs) -> None:
    for node in graph.nodes:
        parents = node.annotations.get("_slice_parents", {})
        for name, (axis, start, stop) in node.annotations.get("_slices", {}).items():
            want = (parents.get(name), axis, start, stop)
            got = allocs[name].alias_of if name in allocs else None
            if got is None or tuple(got) != want:
                _fail(f"node '{node.name}' is annotated to write %{name} into slice "
                      f"{list(want)}, but the plan says {got}")


# ---- executing a plan ----------------------------------------------------------------------------
@dataclass
class Placement:
    """Where a planned tensor lives: the sub-box ``box`` ([(lo, hi)] per axis) of ``root``, which is
    an arena buffer at byte ``offset`` or, when ``output`` is True, the caller-owned graph output
    named ``root``. A backend turns this into a view once, at build time."""
    root: str
    output: bool
    offset: int | None
    root_shape: tuple
    dtype: np.dtype
    box: list

    @property
    def is_whole(self) -> bool:
        return all(lo == 0 and hi == d for (lo, hi), d in zip(self.box, self.root_shape))


def placements(graph: Graph, plan: MemoryPlan | None = None) -> dict[str, Placement]:
    """Placement of every planned tensor (in-place chains share one root, concat slices are boxes
    of their concat's buffer)."""
    plan = plan or graph.meta["memory_plan"]
    allocs = {t.name: t for t in plan.tensors}
    types = {v.name: v.type for node in graph.nodes for v in node.outputs}
    classes = _Classes()
    for t in plan.tensors:
        if t.in_place_of is not None:
            classes.union(t.name, t.in_place_of)
    alias = {t.name: tuple(t.alias_of) for t in plan.tensors if t.alias_of is not None}
    external = {v.name: v for v in graph.outputs}
    where = _locate(list(allocs), {n: types[n] for n in allocs}, classes, alias, external)
    result = {}
    for name, (root, box) in where.items():
        if isinstance(root, tuple):
            rtype = external[root[1]].type
            result[name] = Placement(root[1], True, None, rtype.shape, rtype.dtype, box)
        else:
            rtype = types[root]
            result[name] = Placement(root, False, allocs[root].offset, rtype.shape, rtype.dtype,
                                     box)
    return result


def run_in_arena(graph: Graph, inputs: list[np.ndarray], plan: MemoryPlan | None = None,
                 fill: int = 0xFF) -> list[np.ndarray]:
    """Run the graph with every planned tensor stored in one arena at its planned place, the way a
    compiled backend would: elided concats copy nothing, producers write into their slices and
    in-place nodes over their inputs. The arena starts filled with ``fill`` bytes (NaN for
    floats), so reading a clobbered or never-written byte shows in the outputs."""
    from ..backends.reference import run_node

    plan = plan or graph.meta["memory_plan"]
    where = placements(graph, plan)
    arena = np.full(plan.arena_bytes, fill, dtype=np.uint8)
    outputs = {}
    for v in graph.outputs:
        if v.producer is not None and v.type.is_static:
            raw = np.full(v.type.nbytes, fill, dtype=np.uint8)
            outputs[v.name] = raw.view(v.type.dtype).reshape(v.type.shape)

    def place(name: str) -> np.ndarray:
        p = where[name]
        if p.output:
            base = outputs[p.root]
        else:
            nbytes = int(np.prod(p.root_shape, dtype=np.int64)) * p.dtype.itemsize
            base = arena[p.offset:p.offset + nbytes].view(p.dtype).reshape(p.root_shape)
        return base[tuple(slice(lo, hi) for lo, hi in p.box)]

    env: dict[int, np.ndarray] = {id(v): np.asarray(a) for v, a in zip(graph.inputs, inputs)}
    env.update((id(v), v.data) for v in graph.constants.values())
    for node in graph.nodes:
        for v in node.outputs:
            if v.name in where:
                env[id(v)] = place(v.name)
            elif v.name in outputs:
                env[id(v)] = outputs[v.name]
        args = [env[id(v)] if v is not None else None for v in node.inputs]
        if node.op == "Concat" and node.outputs[0].type.is_static:
            run_concat(node, args, env[id(node.outputs[0])])
            continue
        results = run_node(node, args)
        for v, result in zip(node.outputs, results):
            if id(v) in env:
                np.copyto(env[id(v)], result)
            else:
                env[id(v)] = result
    return [np.array(env[id(v)]) for v in graph.outputs]


def run_concat(node: Node, args: list[np.ndarray], out: np.ndarray) -> None:
    """Copy the inputs that no producer wrote in place into their slices of ``out``."""
    if node.annotations.get("elided"):
        return
    concat_into(out, args, node.attrs["axis"], node.annotations.get("elided_inputs", ()))


def concat_into(out: np.ndarray, arrays: list[np.ndarray], axis: int, skip=()) -> None:
    """Concatenate ``arrays`` along ``axis`` into ``out``, leaving the slices of the inputs listed
    in ``skip`` alone (their producers wrote them in place). Backends call this too."""
    skip = set(skip)
    start = 0
    for i, array in enumerate(arrays):
        stop = start + array.shape[axis]
        if i not in skip:
            index = [slice(None)] * out.ndim
            index[axis] = slice(start, stop)
            np.copyto(out[tuple(index)], array)
        start = stop