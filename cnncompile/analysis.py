"""What a model costs: parameters, FLOPs per layer and activation memory.

Everything here reads an IR ``Graph`` and returns plain dataclasses (``to_dict`` gives JSON-ready
dicts), so ``cnncompile info`` can print a table or JSON and tests can assert on numbers.

    summary = summarize(cnncompile.import_onnx("model.onnx", input_shapes={"x": (1, 3, 224, 224)}))
    summary.total_flops, summary.memory.peak_bytes

Activation memory is counted two ways: ``naive_bytes`` gives every graph input and node output its
own buffer; ``peak_bytes`` walks the nodes in order and frees each intermediate right after its last
reader, the way a memory planner without in-place reuse would. Graph inputs (the caller owns them)
stay live for the whole run, graph outputs from the node that makes them to the end. Constants are
parameters, not activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InternalError
from .ir.graph import Graph, Node, Value
from .ir.types import TensorType
from .ops import OPS, Op


@dataclass
class TensorInfo:
    name: str
    type: TensorType

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.type.dtype.name, "shape": list(self.type.shape),
                "type": str(self.type)}


@dataclass
class LayerRow:
    """One node: what it computes, the parameters (constant inputs) it reads, what it costs.
    ``flops`` is None where it cannot be known before running (data-dependent shapes)."""
    name: str
    op: str
    outputs: list[TensorInfo]
    params: int
    flops: int | None

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "outputs": [o.to_dict() for o in self.outputs],
                "params": self.params, "flops": self.flops}


@dataclass
class MemoryStats:
    naive_bytes: int
    peak_bytes: int
    #: the node while which the peak is reached (None: before the first node, the inputs alone)
    peak_node: str | None
    #: values whose size only the run knows; they count as 0 bytes above
    unknown: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"naive_bytes": self.naive_bytes, "peak_bytes": self.peak_bytes,
                "peak_node": self.peak_node, "unknown_size": list(self.unknown)}


@dataclass
class Summary:
    name: str
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_counts: dict[str, int]
    parameters: int
    parameter_bytes: int
    layers: list[LayerRow]
    memory: MemoryStats

    @property
    def total_flops(self) -> int:
        return sum(row.flops for row in self.layers if row.flops is not None)

    @property
    def unknown_flops(self) -> list[str]:
        return [row.name for row in self.layers if row.flops is None]

    def to_dict(self) -> dict:
        return {
            "graph": self.name,
            "opset": self.opset,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "op_counts": dict(self.op_counts),
            "nodes": len(self.layers),
            "parameters": {"count": self.parameters, "bytes": self.parameter_bytes},
            "flops": {"total": self.total_flops, "gflops": self.total_flops / 1e9,
                      "unknown_nodes": self.unknown_flops},
            "activation_memory": self.memory.to_dict(),
            "layers": [row.to_dict() for row in self.layers],
        }


# ---- per node ------------------------------------------------------------------------------------
def node_params(node: Node) -> int:
    """Elements of the constants a node reads (a constant read by two nodes counts in both rows)."""
    seen = set()
    total = 0
    for v in node.inputs:
        if v is not None and v.is_constant and id(v) not in seen:
            seen.add(id(v))
            total += v.type.size
    return total


def node_flops(node: Node) -> int | None:
    """The op's ``flops`` rule for this node; None when shapes are data-dependent and the rule
    cannot evaluate them."""
    op = OPS.get(node.op, Op)
    in_types = [v.type if v is not None else None for v in node.inputs]
    out_types = [v.type for v in node.outputs]
    static = all(t is None or t.is_static for t in in_types + out_types)
    try:
        return int(op.flops(in_types, out_types, **node.attrs))
    except Exception as exc:
        if not static:
            return None
        shapes = ", ".join("none" if t is None else str(t) for t in in_types)
        raise InternalError(f"{node.op} node '{node.name}': the FLOP count rule failed ({exc!r}); "
                            f"inputs: {shapes}") from exc


def layer_rows(graph: Graph) -> list[LayerRow]:
    return [LayerRow(node.name, node.op if not node.domain else f"{node.domain}.{node.op}",
                     [TensorInfo(v.name, v.type) for v in node.outputs],
                     node_params(node), node_flops(node))
            for node in graph.nodes]


# ---- whole graph ---------------------------------------------------------------------------------
def parameter_stats(graph: Graph) -> tuple[int, int]:
    """(element count, bytes) of every constant in the graph."""
    count = sum(v.type.size for v in graph.constants.values())
    nbytes = sum(v.type.nbytes for v in graph.constants.values())
    return count, nbytes


def activation_memory(graph: Graph) -> MemoryStats:
    unknown: list[str] = []

    def size(value: Value) -> int:
        if value.type.is_static:
            return value.type.nbytes
        unknown.append(value.name)
        return 0

    last_reader: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None and not v.is_constant:
                last_reader[id(v)] = i
    held_to_end = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}

    freed_after: dict[int, list[Value]] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.outputs:
            if id(v) not in held_to_end:
                # an output nobody reads (Dropout's mask, say) dies right after its node
                freed_after.setdefault(last_reader.get(id(v), i), []).append(v)

    live = sum(size(v) for v in {id(v): v for v in graph.inputs}.values())
    naive = live
    peak, peak_node = live, None
    for i, node in enumerate(graph.nodes):
        produced = sum(size(v) for v in node.outputs)
        naive += produced
        live += produced
        if live > peak:
            peak, peak_node = live, node.name
        live -= sum(v.type.nbytes for v in freed_after.get(i, ()) if v.type.is_static)
    return MemoryStats(naive, peak, peak_node, list(dict.fromkeys(unknown)))


def summarize(graph: Graph) -> Summary:
    count, nbytes = parameter_stats(graph)
    return Summary(
        name=graph.name,
        opset=graph.opset,
        inputs=[TensorInfo(v.name, v.type) for v in graph.inputs],
        outputs=[TensorInfo(v.name, v.type) for v in graph.outputs],
        op_counts=graph.op_counts(),
        parameters=count,
        parameter_bytes=nbytes,
        layers=layer_rows(graph),
        memory=activation_memory(graph),
    )


# ---- formatting helpers shared by the CLI -------------------------------------------------------
def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


__all__ = ["Summary", "LayerRow", "MemoryStats", "TensorInfo", "summarize", "layer_rows",
           "node_flops", "node_params", "parameter_stats", "activation_memory", "format_bytes"]
