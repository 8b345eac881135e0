"""Pass registry, pipelines and the instrumented pass manager.

A pass is a named function ``Graph -> Graph`` registered with ``@register_pass``. While it runs it may
call ``note("folded 20 BatchNormalization into Conv")``; the manager collects those notes into the
pass's one-line summary. The manager times every pass, can verify the IR and print it before/after
chosen passes, can check numerics after every pass against the unoptimized graph, and wraps a
failure with the pass's name and the passes that ran before it (as Numba's compiler machinery does).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import CnnCompileError, InternalError, UserError
from ..ir.graph import Graph
from ..ir.verifier import verify


@dataclass
class PassInfo:
    name: str
    fn: Callable[[Graph], Graph]
    description: str


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, description: str):
    """Register ``fn`` as pass ``name``; ``description`` is the one line ``list_passes`` shows."""
    def decorate(fn: Callable[[Graph], Graph]) -> Callable[[Graph], Graph]:
        if name in PASSES:
            raise RuntimeError(f"pass {name} registered twice")
        PASSES[name] = PassInfo(name, fn, description)
        fn.pass_name = name
        return fn
    return decorate


# Pipelines name passes; a name that is not registered yet is skipped, so a pipeline can list the
# passes that later work adds without breaking earlier builds.
CLEANUP = ["remove_identity", "fold_constants", "canonicalize", "cancel_transposes",
           "eliminate_common_subexpressions", "eliminate_dead_code"]
OPTIMIZE = ["fold_batchnorm", "fold_pad", "fuse_conv_activation", "fuse_residual_add",
            "fuse_activation_grad", "fuse_elementwise", "eliminate_dead_code", "choose_layout", "lower_convolutions",
            "elide_concat", "plan_memory"]
PIPELINES: dict[int, list[str]] = {
    0: [],
    1: CLEANUP,
    2: CLEANUP + OPTIMIZE,
    3: CLEANUP + OPTIMIZE + ["autotune"],
}


def list_passes() -> list[PassInfo]:
    return [PASSES[name] for name in sorted(PASSES)]


def pipeline(opt_level: int = 2, disabled: Iterable[str] = ()) -> list[str]:
    if opt_level not in PIPELINES:
        raise UserError(f"opt_level must be one of {sorted(PIPELINES)}, not {opt_level!r}")
    disabled = list(disabled)
    unknown = [name for name in disabled if name not in PASSES]
    if unknown:
        raise UserError(f"unknown pass(es) {', '.join(map(repr, unknown))}; passes: "
                        + ", ".join(sorted(PASSES)))
    return [name for name in PIPELINES[opt_level] if name in PASSES and name not in disabled]


# ---- what a pass says about itself ---------------------------------------------------------------
_active_notes: list[list[str]] = []


def note(message: str) -> None:
    """Add to the running pass's summary line. Outside a pass manager it does nothing."""
    if _active_notes:
        _active_notes[-1].append(message)


@dataclass
class PassRecord:
    name: str
    seconds: float
    summary: str
    nodes_before: int
    nodes_after: int
    op_counts_after: dict[str, int]
    max_rel_error: float | None = None
    graph_before: Graph | None = field(default=None, repr=False)
    graph_after: Graph | None = field(default=None, repr=False)

    @property
    def changed(self) -> bool:
        return bool(self.summary) or self.nodes_before != self.nodes_after

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": self.seconds, "summary": self.summary,
                "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "op_counts_after": dict(self.op_counts_after),
                "max_rel_error": self.max_rel_error}


class PassError(InternalError):
    """A pass crashed or left invalid IR."""


class NumericsError(UserError):
    """``check_numerics`` found a pass whose output drifts beyond the tolerance."""


class PassManager:
    """Run a list of passes with instrumentation.

    passes         names to run in order (default: the pipeline of ``opt_level``)
    verify         verify the IR after every pass (on in tests and with ``--debug``)
    print_before / print_after   pass names (or "all") whose IR is printed to ``stream``
    check_numerics run the reference executor before the first pass and after every pass on the
                   same seeded random inputs; record each pass's max relative L2 error
    keep_graphs    keep a copy of the graph before and after each pass (for reports)
    """

    def __init__(self, passes: Sequence[str] | None = None, opt_level: int = 2,
                 disabled: Iterable[str] = (), verify: bool = False,
                 print_before: Iterable[str] = (), print_after: Iterable[str] = (),
                 check_numerics: bool = False, tolerance: float = 1e-5, seed: int = 0,
                 keep_graphs: bool = False, stream=None):
        if passes is None:
            passes = pipeline(opt_level, disabled)
        else:
            unknown = [name for name in passes if name not in PASSES]
            if unknown:
                raise UserError(f"unknown pass(es) {', '.join(map(repr, unknown))}; passes: "
                                + ", ".join(sorted(PASSES)))
            passes = [name for name in passes if name not in set(disabled)]
        self.passes = list(passes)
        self.verify = verify
        self.print_before = set(print_before)
        self.print_after = set(print_after)
        self.check_numerics = check_numerics
        self.tolerance = tolerance
        self.seed = seed
        self.keep_graphs = keep_graphs
        self.stream = stream if stream is not None else sys.stderr
        self.records: list[PassRecord] = []
        self.first_bad_pass: str | None = None

    def run(self, graph: Graph) -> Graph:
        graph = graph.copy()  # the caller's graph is never mutated
        checker = NumericsChecker(graph, self.seed) if self.check_numerics else None
        done: list[str] = []
        for name in self.passes:
            graph = self._run_one(PASSES[name], graph, done, checker)
            done.append(name)
        return graph

    def _run_one(self, info: PassInfo, graph: Graph, done: list[str], checker) -> Graph:
        if self._wants(self.print_before, info.name):
            self._print(f"IR before {info.name}", graph)
        before = graph.copy() if self.keep_graphs else None
        nodes_before = len(graph.nodes)
        notes: list[str] = []
        _active_notes.append(notes)
        start = time.perf_counter()
        try:
            result = info.fn(graph)
        except UserError:
            raise
        except Exception as exc:
            raise PassError(f"pass '{info.name}' failed: {exc!r}\n  passes run before it: "
                            f"{', '.join(done) or 'none'}") from exc
        finally:
            _active_notes.pop()
        seconds = time.perf_counter() - start
        if not isinstance(result, Graph):
            raise PassError(f"pass '{info.name}' returned {type(result).__name__}, not a Graph")
        if self.verify:
            try:
                verify(result)
            except CnnCompileError as exc:
                raise PassError(f"pass '{info.name}' left invalid IR (passes run before it: "
                                f"{', '.join(done) or 'none'}):\n{exc}") from exc
        record = PassRecord(info.name, seconds, "; ".join(notes), nodes_before, len(result.nodes),
                            result.op_counts(), graph_before=before,
                            graph_after=result.copy() if self.keep_graphs else None)
        if checker is not None:
            record.max_rel_error = checker.error(result)
            if record.max_rel_error > self.tolerance and self.first_bad_pass is None:
                self.first_bad_pass = info.name
        self.records.append(record)
        if self._wants(self.print_after, info.name):
            self._print(f"IR after {info.name} ({record.summary or 'no change'})", result)
        return result

    @staticmethod
    def _wants(names: set[str], name: str) -> bool:
        return "all" in names or name in names

    def _print(self, title: str, graph: Graph) -> None:
        print(f"// ---- {title} ----", file=self.stream)
        print(graph, file=self.stream)


class NumericsChecker:
    """The unoptimized graph's outputs on seeded random inputs, and each later graph's distance."""

    def __init__(self, graph: Graph, seed: int = 0):
        from ..backends.reference import ReferenceExecutor
        self.inputs = random_inputs(graph, seed)
        self.expected = ReferenceExecutor(graph).run(self.inputs)

    def error(self, graph: Graph) -> float:
        from ..backends.reference import ReferenceExecutor
        actual = ReferenceExecutor(graph).run(self.inputs)
        return max((relative_l2(a, e) for a, e in zip(actual, self.expected)), default=0.0)


def random_inputs(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for value in graph.inputs:
        dtype = value.type.dtype
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(value.type.shape).astype(dtype))
        elif dtype.kind == "b":
            arrays.append(rng.random(value.type.shape) < 0.5)
        else:
            arrays.append(rng.integers(0, 10, value.type.shape).astype(dtype))
    return arrays


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return float("inf")
    finite = np.isfinite(e) & np.isfinite(a)
    if not np.array_equal(np.isfinite(a), np.isfinite(e)):
        return float("inf")
    denom = np.linalg.norm(e[finite])
    diff = np.linalg.norm((a - e)[finite])
    return float(diff / denom) if denom > 0 else float(diff)
