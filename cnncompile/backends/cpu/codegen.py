"""Generate one readable Python module per compiled graph (in the manner of torch.fx's codegen).

The module holds: imports of the kernels it calls, the constants (weights, pre-packed weights) as
module-level names bound from a ``_constants`` dict, the arena and one view per planned tensor (so the
memory plan can be read in the code), and ``run(...)``, which calls one kernel per node with a
comment naming the IR node and the ONNX nodes it covers, and marks where each buffer dies.

The source is self-contained given its constants: ``cnncompile compile -o DIR`` writes it next to a
``constants.npz`` and ``cnncompile.load(DIR)`` runs it again without recompiling. It is registered in
``linecache`` so tracebacks through ``run`` show the generated lines.

Emitters (``emitters.py``) turn one node into code through the ``Codegen`` methods:
``arg(value)`` (the expression that reads a value), ``dest(value)`` (a preallocated array the node
must write), ``constant(array, hint)``, ``kernel(module, name)`` and ``line(text)``.
"""

from __future__ import annotations

import hashlib
import keyword
import linecache
import re
from dataclasses import dataclass, field

import numpy as np

from ...errors import InternalError
from ...ir.graph import Graph, Node, Value
from ...ir.printer import format_node

_IDENT = re.compile(r"[^0-9A-Za-z_]")


@dataclass
class GeneratedModule:
    source: str
    constants: dict[str, np.ndarray]
    filename: str
    namespace: dict = field(default_factory=dict)
    #: each node's generated lines, in graph order (what ``cnncompile bench --per-layer`` reads)
    node_code: list[str] = field(default_factory=list)

    @property
    def run(self):
        return self.namespace["run"]


class Codegen:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.plan = graph.meta.get("memory_plan")
        self.imports: dict[str, str] = {}          # local name -> import line
        self.constants: dict[str, np.ndarray] = {}  # local name -> array
        self.header: list[str] = []                 # module-level statements (arena, views)
        self.body: list[str] = []                   # run()'s statements
        self._names: dict[int, str] = {}            # id(Value) -> local name
        self._taken: set[str] = set()
        self._ready: set[int] = set()               # values whose array exists at this point

    # ---- naming ---------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = _IDENT.sub("_", hint).strip("_") or "v"
        if base[0].isdigit() or keyword.iskeyword(base):
            base = "v_" + base
        name, n = base, 1
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        return name

    def var(self, value: Value) -> str:
        if id(value) not in self._names:
            self._names[id(value)] = self.fresh(value.name)
        return self._names[id(value)]

    # ---- what emitters call ---------------------------------------------------------------------
    def arg(self, value: Value | None) -> str:
        if value is None:
            return "None"
        if value.is_constant:
            if id(value) not in self._names:
                name = self.fresh("c_" + value.name)
                self._names[id(value)] = name
                self.constants[name] = value.data
            return self._names[id(value)]
        if id(value) not in self._ready:
            raise InternalError(f"codegen: %{value.name} is read before it is written")
        return self.var(value)

    def dest(self, value: Value) -> str:
        """An array the node writes its result into: the tensor's arena view, a view into a
        caller-owned graph output, or a fresh array allocated here."""
        name = self.var(value)
        if id(value) not in self._ready:
            self.line(f"{name} = np.empty({tuple(value.type.shape)!r}, "
                      f"dtype={dtype_source(value.type.dtype)})")
            self._ready.add(id(value))
        return name

    def assign(self, value: Value, expression: str) -> None:
        """Bind a value to a freshly computed array, or copy it into its planned place."""
        name = self.var(value)
        if id(value) in self._ready:
            self.line(f"np.copyto({name}, {expression})")
        else:
            self.line(f"{name} = {expression}")
            self._ready.add(id(value))

    def constant(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh("c_" + hint)
        self.constants[name] = np.ascontiguousarray(array)
        return name

    def kernel(self, module: str, name: str) -> str:
        """Import a kernel function into the generated module; returns its local name."""
        return self.import_name(module, name, f"k_{name}")

    def import_name(self, module: str, name: str, local: str) -> str:
        line = f"from {module} import {name} as {local}"
        if self.imports.get(local, line) != line:
            raise InternalError(f"codegen: two imports named {local}")
        self.imports[local] = line
        return local

    def line(self, text: str) -> None:
        self.body.append(text)

    # ---- building -------------------------------------------------------------------------------
    def place_planned(self, views: dict[str, str]) -> None:
        """Module-level arena views, and the per-call views into graph outputs."""
        if self.plan is None:
            return
        from ...passes.memory import placements
        where = placements(self.graph, self.plan)
        by_name = {v.name: v for node in self.graph.nodes for v in node.outputs}
        roots: dict[str, str] = {}
        self.header.append(f"_arena = np.empty({self.plan.arena_bytes}, dtype=np.uint8)"
                           f"  # {self.plan.arena_bytes:,} bytes for {len(where)} tensors")
        for name in sorted(where, key=lambda n: (where[n].output, where[n].offset or 0, n)):
            p = where[name]
            value = by_name[name]
            var = self.var(value)
            box = ", ".join(f"{lo}:{hi}" for lo, hi in p.box)
            if p.output:
                root = self.var(by_name[p.root] if p.root in by_name else value)
                views[var] = f"{var} = {root}[{box}]  # written in place into output %{p.root}"
            else:
                nbytes = int(np.prod(p.root_shape, dtype=np.int64)) * p.dtype.itemsize
                key = f"{p.offset}:{p.root}"
                if key not in roots:
                    roots[key] = var if p.is_whole else self.fresh("buf_" + p.root)
                    self.header.append(
                        f"{roots[key]} = _arena[{p.offset}:{p.offset + nbytes}]"
                        f".view({dtype_source(p.dtype)}).reshape({tuple(p.root_shape)!r})")
                if roots[key] != var:
                    self.header.append(f"{var} = {roots[key]}[{box}]"
                                       + ("" if p.is_whole else "  # a slice of its concat"))
            self._ready.add(id(value))

    def finish(self, params: list[str], outputs: list[str], views: dict[str, str],
               spans: list[tuple[int, int]] | None = None) -> str:
        lines = [f"# Generated by cnncompile for graph {self.graph.name!r} (target cpu).",
                 "# Every kernel call names the IR node and the ONNX nodes it covers.",
                 "import numpy as np", ""]
        lines += sorted(self.imports.values())
        lines.append("")
        for name in self.constants:
            lines.append(f"{name} = _constants[{name!r}]")
        lines.append("")
        lines += self.header
        lines += ["", "", f"def run({''.join(p + ', ' for p in params)}_outs=None):"]
        lines += ["    " + v for v in views.values()]
        lines += ["    " + b if b else "" for b in self.body]
        lines.append(f"    return ({''.join(o + ', ' for o in outputs)})")
        if spans is not None:
            lines += self.profiled(params, outputs, views, spans)
        return "\n".join(lines) + "\n"

    def profiled(self, params: list[str], outputs: list[str], views: dict[str, str],
                 spans: list[tuple[int, int]]) -> list[str]:
        """``run_profiled``: run's statements with a clock read after every node; it returns the
        outputs and the seconds each node took (in graph order)."""
        lines = ["", "", f"def run_profiled({''.join(p + ', ' for p in params)}_outs=None):"]
        lines += ["    " + v for v in views.values()]
        lines += [f"    _times = [0.0] * {len(spans)}", "    _start = _clock()"]
        for index, (lo, hi) in enumerate(spans):
            lines += ["    " + b for b in self.body[lo:hi] if b]
            lines += ["    _now = _clock()", f"    _times[{index}] = _now - _start",
                      "    _start = _now"]
        lines.append(f"    return ({''.join(o + ', ' for o in outputs)}), _times")
        return lines


def generate(graph: Graph, emit_node, profile: bool = False) -> GeneratedModule:
    """Source and constants for ``graph``; ``emit_node(node, codegen)`` writes one node's code.
    ``profile`` also generates ``run_profiled`` (per-node seconds, for ``cnncompile bench``)."""
    cg = Codegen(graph)
    params = [cg.var(v) for v in graph.inputs]
    cg._ready.update(id(v) for v in graph.inputs)
    views: dict[str, str] = {}
    # Graph outputs are the caller's: allocated per call, before anything writes into them, or
    # the caller's own buffers (_outs, one per output) when it reuses them from run to run
    for index, value in enumerate(graph.outputs):
        if value.producer is not None and value.type.is_static and id(value) not in cg._ready:
            views[cg.var(value)] = (f"{cg.var(value)} = np.empty({tuple(value.type.shape)!r}, "
                                    f"dtype={dtype_source(value.type.dtype)}) if _outs is None "
                                    f"else _outs[{index}]")
            cg._ready.add(id(value))
    cg.place_planned(views)
    last_use = _last_uses(graph)
    spans = []
    for index, node in enumerate(graph.nodes):
        start = len(cg.body)
        cg.line(f"# {format_node(node)}")
        emit_node(node, cg)
        spans.append((start, len(cg.body)))
        for value in last_use.get(index, ()):
            cg.line(f"# last use of %{value.name}: its buffer is free from here")
        cg.line("")
    outputs = [cg.arg(v) for v in graph.outputs]
    if profile:
        cg.import_name("time", "perf_counter", "_clock")
    source = cg.finish(params, outputs, views, spans if profile else None)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    node_code = ["\n".join(cg.body[lo:hi]) for lo, hi in spans]
    return GeneratedModule(source, cg.constants, f"<cnncompile-generated {graph.name} {digest}>",
                           node_code=node_code)


def load_generated(module: GeneratedModule) -> GeneratedModule:
    """exec the source, registered in linecache so that tracebacks show generated lines."""
    lines = module.source.splitlines(keepends=True)
    linecache.cache[module.filename] = (len(module.source), None, lines, module.filename)
    namespace = {"_constants": module.constants, "__name__": "cnncompile_generated"}
    exec(compile(module.source, module.filename, "exec"), namespace)
    module.namespace = namespace
    return module


def _last_uses(graph: Graph) -> dict[int, list[Value]]:
    keep = {id(v) for v in graph.outputs}
    last: dict[int, tuple[int, Value]] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None and not v.is_constant and v.producer is not None \
                    and id(v) not in keep:
                last[id(v)] = (i, v)
    result: dict[int, list[Value]] = {}
    for i, v in last.values():
        result.setdefault(i, []).append(v)
    return result


def dtype_source(dtype) -> str:
    """Source for a dtype: np.float32 for NumPy's own, np.dtype('bfloat16') for ml_dtypes' ones
    (registered with NumPy by name once ml_dtypes is imported, which cnncompile.ir does)."""
    dtype = np.dtype(dtype)
    if hasattr(np, dtype.name) and np.dtype(getattr(np, dtype.name)) == dtype:
        return f"np.{dtype.name}"
    return f"np.dtype({dtype.name!r})"


def node_comment(node: Node) -> str:
    return format_node(node)
