"""Graph -> Graph transformations and the pass manager that runs them.

Each pass module registers its passes with ``@register_pass`` on import; ``manager.PIPELINES`` says
which run at each ``opt_level``. ``run_pipeline`` is what ``cnncompile.compile`` calls.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..ir.graph import Graph
from ..ir.verifier import verify
from .manager import (PASSES, PIPELINES, PassError, PassManager, PassRecord, list_passes, note,
                      pipeline, register_pass)
from . import canonicalize, cleanup, fusion, layout, lowering, memory  # noqa: F401  (registers)
from . import autotune  # noqa: F401  (registers; it builds on lowering)


def run_pipeline(graph: Graph, opt_level: int = 2, disabled_passes: Iterable[str] = (),
                 passes: Sequence[str] | None = None, verify_each: bool = False,
                 meta: dict | None = None, **manager_options) -> tuple[Graph, PassManager]:
    """Run the pipeline; ``meta`` (target, layout...) is recorded on the graph for passes to read."""
    graph.meta.update(meta or {})
    manager = PassManager(passes=passes, opt_level=opt_level, disabled=disabled_passes,
                          verify=verify_each, **manager_options)
    result = manager.run(graph)
    verify(result)
    return result, manager


__all__ = ["PASSES", "PIPELINES", "PassError", "PassManager", "PassRecord", "list_passes", "note",
           "pipeline", "register_pass", "run_pipeline"]
