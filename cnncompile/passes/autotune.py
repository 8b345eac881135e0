"""Autotuning (opt_level 3, or ``compile(..., tune=True)``): measure each convolution's algorithms.

For every Conv / FusedConv with static shapes and more than one algorithm that fits it
(``candidates``), each candidate is compiled by the CPU backend into a one-node module with
``annotations["algorithm"]`` forced, run on seeded random inputs of the node's real shape with its
real weights, timed (median of several calls) and compared with the reference executor (relative
L2). The fastest candidate within TOLERANCE wins. The node records ``algorithm``, ``_tuning``
({candidate: {"ms": ..., "rel_err": ...}}) and ``_reason`` ("autotuned: ...").

Decisions go to the JSON tuning cache (``cnncompile/tuning.py``) keyed by op, shapes, attributes,
dtype, CPU, thread count and version: a node found there is not timed again, and nodes of one
graph with the same key are timed once. Only the CPU backend has algorithms to choose between,
so for another target the pass changes nothing and says so.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..ir.graph import Graph, Node
from .lowering import ConvProblem, winograd_name
from .manager import note, random_inputs, register_pass, relative_l2

#: relative L2 error against the reference a candidate may have and still be chosen; Winograd
#: F(4x4,3x3) measures ~3e-6 on 256 channels (ops/winograd.py), im2col ~4e-7
TOLERANCE = 1e-5
#: timed calls per candidate: as many as fit in BUDGET_SECONDS, within these bounds
MIN_REPEATS, MAX_REPEATS = 3, 15
BUDGET_SECONDS = 0.05
#: a candidate whose first call is this many times slower than the best one is not timed further
GIVE_UP_RATIO = 4.0
TUNED_OPS = ("Conv", "FusedConv")


def candidates(problem: ConvProblem) -> list[str]:
    """Every algorithm that computes this convolution (the cost model's shortlist is a subset)."""
    if problem.op not in TUNED_OPS:
        return []
    if problem.group > 1:
        depthwise = problem.group == problem.channels == problem.out_channels
        return (["depthwise"] if depthwise else []) + ["grouped", "direct"]
    found = ["direct", "im2col_gemm"]
    if set(problem.kernel) == {1} and set(problem.strides) == {1} and not any(problem.pads):
        found.append("gemm_1x1")
    if problem.winograd_valid():
        found += [winograd_name(2), winograd_name(4)]
    return found


def single_node_graph(graph: Graph, node: Node, annotations: dict | None = None) -> Graph:
    """``node`` alone, as a graph the backend compiles by itself: its computed inputs become graph
    inputs, its constants stay constants (with any constant its annotations name, such as a
    pre-packed weight); ``annotations`` override the node's."""
    g = Graph(f"single_{node.name or node.op}", graph.opset)
    mapping = {}
    for value in node.inputs:
        if value is None or id(value) in mapping:
            continue
        if value.is_constant:
            mapping[id(value)] = g.add_constant(value.name, value.data)
        else:
            mapping[id(value)] = g.add_input(value.name, value.type)
    for name in node.annotations.values():
        if isinstance(name, str) and name in graph.constants and name not in g.constants:
            g.add_constant(name, graph.constants[name].data)
    outputs = [g.new_value(v.name, v.type) for v in node.outputs]
    g.add_node(Node(node.op, [mapping[id(v)] if v is not None else None for v in node.inputs],
                    outputs, dict(node.attrs), node.name, node.origins, node.created_by,
                    node.domain, {**node.annotations, **(annotations or {})}))
    g.outputs = outputs
    g.meta = {k: v for k, v in graph.meta.items() if k != "memory_plan"}
    return g


def measure(graphs: dict[str, Graph], feeds: list[np.ndarray]) -> dict[str, dict]:
    """Compile and time each candidate's module: {algorithm: {"ms", "outputs"}} or
    {algorithm: {"error"}} when it cannot be built or run. Candidates take turns in two rounds
    (each round: one untimed call, then the timed ones) so that drift on a shared machine and
    the other engine's spinning threads hit them alike."""
    from ..backends.cpu import CpuBackend

    results: dict[str, dict] = {}
    runs = {}
    first: dict[str, float] = {}
    for algorithm, g in graphs.items():
        try:
            backend = CpuBackend(g, warm_up=False)
            outputs = backend.run(feeds)  # compiles the kernels
            start = time.perf_counter()
            backend.run(feeds)
            first[algorithm] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001  (a broken candidate loses; it is recorded)
            results[algorithm] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        runs[algorithm] = backend
        results[algorithm] = {"outputs": outputs, "times": [first[algorithm]]}
    if not first:
        return results
    best = min(first.values())
    repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, BUDGET_SECONDS / max(best, 1e-9))))
    contenders = [a for a in runs if first[a] <= GIVE_UP_RATIO * best]
    for _ in range(2):
        for algorithm in contenders:
            backend, times = runs[algorithm], results[algorithm]["times"]
            backend.run(feeds)
            for _ in range(repeats // 2 + 1):
                start = time.perf_counter()
                backend.run(feeds)
                times.append(time.perf_counter() - start)
    for algorithm in runs:
        times = results[algorithm].pop("times")
        results[algorithm]["ms"] = 1e3 * statistics.median(times)
    return results


def tune_node(graph: Graph, node: Node, algorithms: list[str]) -> dict[str, dict]:
    """{algorithm: {"ms": median ms or None, "rel_err": error or None[, "error": why]}}."""
    from ..backends.reference import ReferenceExecutor

    graphs = {a: single_node_graph(graph, node, {"algorithm": a}) for a in algorithms}
    reference_graph = next(iter(graphs.values()))
    feeds = random_inputs(reference_graph, seed=0)
    expected = ReferenceExecutor(reference_graph).run(feeds)
    table = {}
    for algorithm, result in measure(graphs, feeds).items():
        if "error" in result:
            table[algorithm] = {"ms": None, "rel_err": None, "error": result["error"]}
            continue
        error = max((relative_l2(a, e) for a, e in zip(result["outputs"], expected)),
                    default=0.0)
        table[algorithm] = {"ms": round(float(result["ms"]), 4), "rel_err": float(error)}
    return table


def pick(table: dict[str, dict], fallback: str) -> tuple[str, bool]:
    """(the fastest candidate within TOLERANCE, whether one was); else ``fallback``."""
    good = [a for a, row in table.items()
            if row.get("ms") is not None and row.get("rel_err") is not None
            and row["rel_err"] <= TOLERANCE]
    if not good:
        return fallback, False
    return min(good, key=lambda a: table[a]["ms"]), True


def describe(table: dict[str, dict], chosen: str, found: bool, modelled: str | None,
             cached: bool) -> str:
    def cell(algorithm: str) -> str:
        row = table[algorithm]
        if row.get("ms") is None:
            return f"{algorithm} failed ({row.get('error', 'no result')})"
        mark = "" if row["rel_err"] <= TOLERANCE else f" > tolerance {TOLERANCE:g}"
        return f"{algorithm} {row['ms']:.3f} ms (err {row['rel_err']:.1e}{mark})"

    order = sorted(table, key=lambda a: (table[a].get("ms") is None, table[a].get("ms") or 0.0))
    text = "autotuned" + (" (cached)" if cached else "") + ": "
    if found:
        text += f"{chosen} is the fastest within the tolerance; "
    else:
        text += f"no candidate within tolerance {TOLERANCE:g}, kept {chosen}; "
    text += ", ".join(cell(a) for a in order)
    if modelled and modelled != chosen:
        text += f"; the cost model had chosen {modelled}"
    return text


@register_pass("autotune",
               "time every candidate algorithm of each convolution on its real shape with the "
               "CPU backend and keep the fastest within tolerance (JSON tuning cache)")
def autotune(graph: Graph) -> Graph:
    from ..runtime.progress import Progress
    from ..tuning import TuningCache, tuning_key

    target = graph.meta.get("target")
    if target != "cpu":
        note(f"skipped: target {target or 'unknown'} has no algorithms to choose between "
             "(tune with target cpu)")
        return graph
    work = []
    for node in graph.nodes:
        if node.op not in TUNED_OPS:
            continue
        types = [v.type for v in node.inputs if v is not None] + [v.type for v in node.outputs]
        if not all(t.is_static for t in types):
            continue
        algorithms = candidates(ConvProblem.of(node))
        if len(algorithms) > 1:
            work.append((node, algorithms))
    if not work:
        note("no convolution with a choice of algorithms")
        return graph
    cache = TuningCache()
    timed = cached = 0
    decided: dict[str, int] = {}
    start = time.perf_counter()
    with Progress("autotuning", len(work)) as bar:
        for node, algorithms in work:
            bar.step(node.name or node.outputs[0].name)
            key = tuning_key(node)
            modelled = node.annotations.get("algorithm")
            entry = cache.get(key)
            hit = entry is not None
            if entry is None:
                table = tune_node(graph, node, algorithms)
                entry = cache.put(key, pick(table, modelled or algorithms[0])[0], table)
                timed += 1
            else:
                cached += 1
            table = entry["candidates"]
            chosen, found = pick(table, entry["algorithm"])
            node.annotations["algorithm"] = chosen
            node.annotations["_tuning"] = {a: dict(row) for a, row in table.items()}
            node.annotations["_reason"] = describe(table, chosen, found, modelled, hit)
            decided[chosen] = decided.get(chosen, 0) + 1
    if timed:
        cache.save()
    tally = ", ".join(f"{n} {a}" for a, n in sorted(decided.items(), key=lambda kv: -kv[1]))
    note(f"tuned {len(work)} convolutions ({timed} timed, {cached} from the cache "
         f"{cache.path}) in {time.perf_counter() - start:.1f} s: {tally}")
    return graph
