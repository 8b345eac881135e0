"""Graph -> Graph transformations.

The pass manager and the optimization passes (fusion, conv lowering, memory planning) arrive with the
pipeline issue. Until then ``run_pipeline`` only removes dead nodes and verifies the IR, so every
backend already receives a graph that went through the one entry point passes will use.
"""

from __future__ import annotations

from ..ir.graph import Graph
from ..ir.verifier import verify


def run_pipeline(graph: Graph, opt_level: int = 2) -> Graph:
    graph = graph.copy()
    graph.remove_unused()
    verify(graph)
    return graph
