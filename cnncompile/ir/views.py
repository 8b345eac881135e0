"""Other views of a graph: networkx for graph algorithms, Graphviz DOT for pictures."""

from __future__ import annotations

import networkx as nx


def to_networkx(graph) -> "nx.MultiDiGraph":
    """Nodes are IR nodes (keyed by index in execution order), plus one node per graph input and
    output; each edge is one value, carrying it as ``value``."""
    g = nx.MultiDiGraph(name=graph.name)
    producer = {}
    for v in graph.inputs:
        key = f"input:{v.name}"
        g.add_node(key, kind="input", value=v)
        producer[id(v)] = key
    for i, node in enumerate(graph.nodes):
        g.add_node(i, kind="node", node=node, op=node.op)
        for v in node.outputs:
            producer[id(v)] = i
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None and id(v) in producer:
                g.add_edge(producer[id(v)], i, value=v)
    for v in graph.outputs:
        key = f"output:{v.name}"
        g.add_node(key, kind="output", value=v)
        if id(v) in producer:
            g.add_edge(producer[id(v)], key, value=v)
    return g


def _q(text: str) -> str:
    # Backslashes stay: "\n" in a DOT label is its line break.
    return '"' + text.replace('"', '\\"') + '"'


def to_dot(graph) -> str:
    """Graphviz source; render with `dot -Tsvg`. Constants are folded into their user's label."""
    lines = [f"digraph {_q(graph.name)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];']
    producer = {}
    for v in graph.inputs:
        key = f"in_{len(producer)}"
        producer[id(v)] = key
        label = _q(v.name + "\\n" + str(v.type))
        lines.append(f'  {key} [label={label}, shape=ellipse, fillcolor="#dff0d8"];')
    for i, node in enumerate(graph.nodes):
        key = f"n{i}"
        for v in node.outputs:
            producer[id(v)] = key
        consts = [v.name for v in node.inputs if v is not None and v.is_constant]
        label = node.op + "\\n" + ", ".join(str(v.type) for v in node.outputs)
        if consts:
            label += "\\n(" + ", ".join(consts[:3]) + (", ..." if len(consts) > 3 else "") + ")"
        lines.append(f"  {key} [label={_q(label)}, tooltip={_q(', '.join(node.origins))}];")
        for v in node.inputs:
            if v is not None and id(v) in producer:
                lines.append(f"  {producer[id(v)]} -> {key} [label={_q(str(v.type))}];")
    for j, v in enumerate(graph.outputs):
        key = f"out_{j}"
        lines.append(f"  {key} [label={_q(v.name)}, shape=ellipse, fillcolor=\"#fcf8e3\"];")
        if id(v) in producer:
            lines.append(f"  {producer[id(v)]} -> {key};")
    lines.append("}")
    return "\n".join(lines) + "\n"
