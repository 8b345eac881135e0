"""The intermediate representation: typed values, nodes, graphs, printer, verifier, views."""

from .graph import Graph, Node, Value
from .printer import format_graph, format_node
from .types import TensorType
from .verifier import verify

__all__ = ["Graph", "Node", "Value", "TensorType", "format_graph", "format_node", "verify"]
