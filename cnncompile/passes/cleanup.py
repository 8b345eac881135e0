"""Cleanup passes (opt_level >= 1): remove no-op nodes, fold constants, CSE, DCE."""

from __future__ import annotations

from ..ir.graph import Graph
from .manager import note, register_pass


@register_pass("eliminate_dead_code", "drop nodes whose outputs nobody reads, and unread constants")
def eliminate_dead_code(graph: Graph) -> Graph:
    removed = graph.remove_unused()
    if removed:
        note(f"removed {removed} dead node{'s' if removed != 1 else ''}")
    return graph
