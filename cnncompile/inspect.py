"""See what the compiler did to a model: ``cnncompile.inspect`` and ``cnncompile inspect``.

    report = cnncompile.inspect("resnet18.onnx", input_shapes={"input": (1, 3, 224, 224)})
    print(report)                         # pipeline table, final IR, memory plan
    report.to_dict()                      # the JSON contract of ``cnncompile inspect --json``
    report.save_html("report.html")       # one self-contained page with pictures

This module's name shadows nothing: inside the package it is ``cnncompile.inspect`` (the function
once ``cnncompile`` is imported; the module stays reachable as ``sys.modules["cnncompile.inspect"]``
and through ``from cnncompile.inspect import InspectReport``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from .analysis import format_bytes
from .errors import UserError
from .ir.graph import Graph
from .ir.printer import format_graph

if TYPE_CHECKING:
    from .passes import PassRecord


@dataclass
class TensorSlot:
    """One tensor of the memory plan: ``size`` bytes at ``offset`` (None: inside a graph output),
    live over steps ``first``..``last`` (node indices of the final order, both inclusive)."""
    name: str
    size: int
    offset: int | None
    first: int
    last: int
    alias_of: tuple | None = None      # (parent, axis, start, stop): a slice of a concat buffer
    in_place_of: str | None = None     # written over this input

    def to_dict(self) -> dict:
        return {"name": self.name, "nbytes": self.size, "offset": self.offset,
                "first": self.first, "last": self.last,
                "alias_of": list(self.alias_of) if self.alias_of else None,
                "in_place_of": self.in_place_of}

    @property
    def note(self) -> str:
        if self.alias_of:
            return f"slice of {self.alias_of[0]}"
        if self.in_place_of:
            return f"in place of {self.in_place_of}"
        return ""


@dataclass
class MemorySummary:
    arena_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    tensors: list[TensorSlot] = field(default_factory=list)    # largest first

    def to_dict(self) -> dict:
        return {"arena_bytes": self.arena_bytes, "lower_bound_bytes": self.lower_bound_bytes,
                "naive_bytes": self.naive_bytes, "tensors": [t.to_dict() for t in self.tensors]}

    @property
    def own_buffers(self) -> list[TensorSlot]:
        """Tensors with a region of the arena to themselves (no concat slices, none in outputs)."""
        return [t for t in self.tensors if t.offset is not None and not t.alias_of]


@dataclass
class InspectReport:
    """What ``cnncompile.inspect`` found: one ``PassRecord`` per pass run, the final graph and its
    memory plan. ``to_dict()`` is the JSON contract; ``str(report)`` the text of the CLI."""
    model: str
    input_graph: Graph
    graph: Graph
    passes: list[PassRecord]
    opt_level: int | None
    target: str
    check_numerics: bool
    tolerance: float
    first_bad_pass: str | None
    import_seconds: float

    @property
    def memory(self):
        """The plan the memory pass left in ``graph.meta["memory_plan"]`` (None without one)."""
        return self.graph.meta.get("memory_plan")

    @property
    def memory_summary(self) -> MemorySummary | None:
        return summarize_plan(self.memory)

    @property
    def pipeline(self) -> list[str]:
        return [record.name for record in self.passes]

    @property
    def total_seconds(self) -> float:
        return sum(record.seconds for record in self.passes)

    def record(self, name: str) -> PassRecord:
        for record in self.passes:
            if record.name == name:
                return record
        raise KeyError(f"no pass '{name}' ran; the pipeline was: {', '.join(self.pipeline)}")

    @property
    def first_bad_record(self) -> PassRecord | None:
        """The record of the first pass whose error exceeds the tolerance."""
        for record in self.passes:
            if record.max_rel_error is not None and not record.max_rel_error <= self.tolerance:
                return record
        return None

    def bad_pass_message(self) -> str | None:
        """One line naming the first pass over the tolerance (None when all are within it)."""
        bad = self.first_bad_record
        if bad is None:
            return None
        position = next(i for i, record in enumerate(self.passes) if record is bad)
        before = [record.name for record in self.passes[:position]]
        return (f"pass '{bad.name}' changed the outputs by a relative L2 error of "
                f"{format_error(bad.max_rel_error)} (tolerance {self.tolerance:g}); passes run "
                f"before it: {', '.join(before) or 'none'}; disable it to confirm")

    def conv_algorithms(self) -> list[dict]:
        """Per convolution of the final graph: the algorithm the lowering chose and why."""
        rows = []
        for node in self.graph.nodes:
            if node.op not in _CONV_OPS and "algorithm" not in node.annotations:
                continue
            data = node.inputs[0] if node.inputs else None
            rows.append({
                "node": node.outputs[0].name,
                "op": node.op,
                "origins": list(node.origins),
                "input": str(data.type) if data is not None else "",
                "output": ", ".join(str(o.type) for o in node.outputs),
                "kernel": list(node.attrs.get("kernel_shape") or []),
                "strides": list(node.attrs.get("strides") or []),
                "group": node.attrs.get("group", 1),
                "algorithm": node.annotations.get("algorithm"),
                "reason": node.annotations.get("_reason", ""),
                "tuning": node.annotations.get("_tuning"),
            })
        return rows

    def to_dict(self) -> dict:
        """``{"passes": [...], "memory": {...} or None}``: the JSON contract of ``--json``.

        ``max_rel_error`` is None where numerics were not checked, and +inf where a pass changed
        an output's shape or where non-finite values appeared."""
        summary = self.memory_summary
        return {"passes": [record.to_dict() for record in self.passes],
                "memory": summary.to_dict() if summary is not None else None}

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON (an infinite error is written as the largest double, not 'Infinity')."""
        return json.dumps(_finite(self.to_dict()), indent=indent)

    def format_text(self, ir: bool = True, top: int = 10) -> str:
        return format_report(self, ir=ir, top=top)

    def __str__(self) -> str:
        return self.format_text()

    def to_html(self) -> str:
        from .report.html import render_html
        return render_html(self)

    def save_html(self, path: str | os.PathLike) -> None:
        text = self.to_html()
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            raise UserError(f"cannot write the HTML report to {path}: "
                            f"{exc.strerror or exc}") from None


_CONV_OPS = {"Conv", "ConvTranspose", "FusedConv"}


def inspect(model, input_shapes: Mapping[str, Sequence[int]] | None = None, opt_level: int = 2,
            disabled_passes: Iterable[str] = (), passes: Sequence[str] | None = None,
            check_numerics: bool = False, tolerance: float = 1e-5,
            print_after: Iterable[str] | str = (), print_before: Iterable[str] | str = (),
            keep_graphs: bool = False, stream=None, *, target: str = "reference",
            layout: str | None = None, verify_each: bool = False,
            seed: int = 0) -> InspectReport:
    """Import ``model`` (a path, bytes, ModelProto or Graph) and run the pass pipeline with its
    instruments on; return what every pass did.

    check_numerics  run the reference executor on seeded random inputs before the first pass and
                    after every pass; ``report.first_bad_pass`` names the first pass whose error
                    exceeds ``tolerance`` (nothing is raised)
    print_after / print_before   pass names, or "all": print the IR after/before them to
                    ``stream`` (default stderr)
    keep_graphs     keep each pass's graph before and after (needed for the HTML pictures)
    target          whose preferences (layout) the passes follow
    layout          "NCHW" or "NHWC" instead of the target's preferred layout (to see what
                    choose_layout would do for a channels-last backend)
    """
    from .backends import get_backend
    from .frontend import import_onnx
    from .passes import run_pipeline

    backend = get_backend(target)
    start = time.perf_counter()
    if isinstance(model, Graph):
        graph = model.copy()
        label = model.name
    else:
        graph = import_onnx(model, input_shapes=input_shapes)
        label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else graph.name
    import_seconds = time.perf_counter() - start
    disabled = list(disabled_passes)
    names = planned_pipeline(opt_level, disabled, passes)
    after = _pass_names(print_after, "print_after", names)
    before = _pass_names(print_before, "print_before", names)
    meta = {"target": target, "layout": layout or getattr(backend, "preferred_layout", "NCHW")}
    input_graph = graph.copy()
    result, manager = run_pipeline(
        graph, opt_level, disabled, passes, verify_each, meta=meta, check_numerics=check_numerics,
        tolerance=tolerance, print_after=after, print_before=before, keep_graphs=keep_graphs,
        stream=stream, seed=seed)
    input_graph.meta.update(meta)
    return InspectReport(model=label, input_graph=input_graph, graph=result,
                         passes=list(manager.records), opt_level=opt_level if passes is None
                         else None, target=target, check_numerics=check_numerics,
                         tolerance=tolerance, first_bad_pass=manager.first_bad_pass,
                         import_seconds=import_seconds)


def planned_pipeline(opt_level: int, disabled: Sequence[str],
                     passes: Sequence[str] | None) -> list[str]:
    """The pass names the manager will run (unknown names raise the manager's UserError)."""
    from .passes import PASSES, pipeline as pipeline_for
    if passes is None:
        return pipeline_for(opt_level, disabled)
    if isinstance(passes, str):
        raise UserError(f"passes must be a list of pass names, not the string {passes!r}")
    unknown = [name for name in list(passes) + list(disabled) if name not in PASSES]
    if unknown:
        raise UserError(f"unknown pass(es) {', '.join(map(repr, unknown))}; passes: "
                        + ", ".join(sorted(PASSES)))
    return [name for name in passes if name not in set(disabled)]


def _pass_names(names: Iterable[str] | str, what: str, pipeline: list[str]) -> list[str]:
    from .passes import PASSES
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name == "all":
            continue
        if name not in PASSES:
            raise UserError(f"{what}: there is no pass '{name}'; passes: "
                            + ", ".join(sorted(PASSES)))
        if name not in pipeline:
            raise UserError(f"{what}: pass '{name}' is not in this pipeline, so it never runs; "
                            f"the pipeline is: {', '.join(pipeline) or 'empty'}")
    return names


# ---- the memory plan (passes/memory.py's MemoryPlan, or its to_dict() form) ----------------------
def _get(item, name: str, default=None):
    if isinstance(item, Mapping):
        return item.get(name, default)
    return getattr(item, name, default)


def summarize_plan(plan) -> MemorySummary | None:
    """The plan's three totals and one ``TensorSlot`` per planned tensor, largest first."""
    if plan is None:
        return None
    tensors = []
    for entry in _get(plan, "tensors", default=()) or ():
        offset = _get(entry, "offset")
        alias = _get(entry, "alias_of")
        tensors.append(TensorSlot(str(_get(entry, "name", default="?")),
                                  int(_get(entry, "nbytes", default=0)),
                                  None if offset is None else int(offset),
                                  int(_get(entry, "first", default=0)),
                                  int(_get(entry, "last", default=0)),
                                  tuple(alias) if alias else None, _get(entry, "in_place_of")))
    tensors.sort(key=lambda t: (-t.size, t.first, t.name))
    return MemorySummary(int(_get(plan, "arena_bytes", default=0)),
                         int(_get(plan, "lower_bound_bytes", default=0)),
                         int(_get(plan, "naive_bytes", default=0)), tensors)


def _finite(doc):
    if isinstance(doc, float) and not math.isfinite(doc):
        return sys.float_info.max
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_finite(v) for v in doc]
    return doc


# ---- text ----------------------------------------------------------------------------------------
def format_error(value: float | None) -> str:
    """A relative error for people: '-' where not measured, '0' where exact."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf"
    return f"{value:.2e}" if value else "0"


def table(rows: list[list[str]], indent: int = 2, numeric: Iterable[int] = ()) -> list[str]:
    """Left-aligned text columns, right-aligned ``numeric`` ones; the last column is not padded."""
    if not rows:
        return []
    numeric = set(numeric)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [f"{c:>{widths[i]}}" if i in numeric else f"{c:<{widths[i]}}"
                 for i, c in enumerate(r)]
        lines.append(" " * indent + "  ".join(cells).rstrip())
    return lines


def format_pipeline(report: InspectReport) -> list[str]:
    header = ["pass", "ms", "nodes"] + (["max rel err"] if report.check_numerics else []) \
        + ["summary"]
    rows = [header]
    for rec in report.passes:
        row = [rec.name, f"{rec.seconds * 1e3:.2f}", f"{rec.nodes_before} -> {rec.nodes_after}"]
        if report.check_numerics:
            bad = rec.max_rel_error is not None and not rec.max_rel_error <= report.tolerance
            row.append(format_error(rec.max_rel_error) + (" !" if bad else "  "))
        row.append(rec.summary or "-")
        rows.append(row)
    total = ["total", f"{report.total_seconds * 1e3:.2f}",
             f"{len(report.input_graph.nodes)} -> {len(report.graph.nodes)}"]
    rows.append(total + ([""] if report.check_numerics else []) + [""])
    lines = table(rows, numeric={1, 3} if report.check_numerics else {1})
    if not report.passes:
        lines = ["  (no passes ran: opt-level 0 or an empty pipeline)"]
    return lines


def format_memory(summary: MemorySummary | None, top: int = 10) -> list[str]:
    if summary is None:
        return ["  no memory plan (the plan_memory pass did not run)"]

    def amount(n: int) -> str:
        return f"{format_bytes(n)} ({n:,} bytes)"

    lines = []
    ratio = summary.arena_bytes / summary.lower_bound_bytes if summary.lower_bound_bytes else None
    share = summary.arena_bytes / summary.naive_bytes if summary.naive_bytes else None
    arena = amount(summary.arena_bytes)
    if ratio is not None:
        arena += f", {ratio:.3f} x the lower bound"
    if share is not None:
        arena += f", {100 * share:.1f}% of naive"
    own = summary.own_buffers
    rows = [["arena", arena],
            ["lower bound", amount(summary.lower_bound_bytes) + "  (most bytes live at one step)"],
            ["naive", amount(summary.naive_bytes) + "  (every intermediate its own buffer)"],
            ["tensors", _tensor_counts(summary)]]
    lines += table(rows)
    if own and top:
        lines.append(f"  largest tensors (of {len(own)} with their own buffer)")
        rows = [["name", "bytes", "offset", "live steps", ""]]
        for t in own[:top]:
            rows.append([t.name, f"{t.size:,}", f"{t.offset:,}", f"{t.first}-{t.last}", t.note])
        lines += table(rows, indent=4, numeric={1, 2})
    return lines


def _tensor_counts(summary: MemorySummary) -> str:
    slices = sum(1 for t in summary.tensors if t.alias_of)
    in_place = sum(1 for t in summary.tensors if t.in_place_of)
    text = f"{len(summary.tensors)} planned"
    extras = []
    if in_place:
        extras.append(f"{in_place} written in place")
    if slices:
        extras.append(f"{slices} written straight into a concat's buffer")
    return text + (f" ({', '.join(extras)})" if extras else "")


def format_report(report: InspectReport, ir: bool = True, top: int = 10) -> str:
    g = report.graph
    level = f"opt-level {report.opt_level}" if report.opt_level is not None \
        else "custom pipeline"
    lines = [f"model     {report.model}  (graph '{g.name}', opset {g.opset})",
             f"compile   target {report.target}, {level}: {len(report.passes)} "
             f"pass{'es' if len(report.passes) != 1 else ''}, "
             f"{len(report.input_graph.nodes)} -> {len(g.nodes)} nodes",
             "", "pipeline"]
    lines += format_pipeline(report)
    if report.check_numerics:
        bad = report.bad_pass_message()
        lines.append("  numerics: " + (bad or f"every pass within the tolerance "
                                                f"{report.tolerance:g} (relative L2, seeded "
                                                f"random inputs)"))
    if ir:
        lines += ["", "final IR", format_graph(g, constants=False)]
    tuned = format_tuning(report.conv_algorithms())
    if tuned:
        lines += ["", "autotuning (ms: median time of the one-node module; err: relative L2 "
                  "against the reference)"] + tuned
    lines += ["", "memory plan"] + format_memory(report.memory_summary, top)
    return "\n".join(lines)


def format_tuning(rows: list[dict]) -> list[str]:
    """One line per tuned convolution: the chosen algorithm first, then the other candidates by
    time, each with its error."""
    table_rows = [["convolution", "chosen", "candidates: ms (err)"]]
    for row in rows:
        tuning = row.get("tuning")
        if not tuning:
            continue
        order = sorted(tuning, key=lambda a: (a != row["algorithm"], tuning[a].get("ms") is None,
                                              tuning[a].get("ms") or 0.0))
        cells = []
        for algorithm in order:
            ms, err = tuning[algorithm].get("ms"), tuning[algorithm].get("rel_err")
            cells.append(f"{algorithm} failed" if ms is None
                         else f"{algorithm} {ms:.3f} ({format_error(err)})")
        table_rows.append([row["node"], str(row["algorithm"]), ", ".join(cells)])
    return table(table_rows) if len(table_rows) > 1 else []


__all__ = ["inspect", "InspectReport", "MemorySummary", "TensorSlot", "summarize_plan",
           "format_report"]
