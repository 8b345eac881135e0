"""Pictures drawn as SVG text, with no graphviz or matplotlib: a layered graph drawing and a
memory-plan timeline.

The graph drawing is a small Sugiyama layout: layers are topological generations (longest path
from the inputs), an edge that spans several layers runs through invisible "dummy" points (so skip
connections get a lane of their own instead of crossing boxes), layers are ordered by barycenter
sweeps that keep the ordering with the fewest crossings, and x positions come from weighted
isotonic regression (pool adjacent violators), which places every box as near the mean of its
neighbours as the minimum spacing allows.
"""

from __future__ import annotations

import colorsys
import itertools
import math
from dataclasses import dataclass, field
from html import escape
from typing import Iterable, Sequence

from ..analysis import format_bytes
from ..ir.printer import format_node

FONT = "-apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
LINE_HEIGHT = 14
PAD_X = 9
PAD_Y = 6
H_GAP = 22          # between neighbouring boxes of one layer
V_GAP = 30          # between layers
DUMMY_WIDTH = 8
MARGIN = 14

# (fill, stroke) per op family; fused kernels stand out in orange.
PALETTE = {
    "conv": ("#dbe8fb", "#6b93cf"),
    "fused": ("#ffe0b8", "#e08a2c"),
    "linalg": ("#d7f0ee", "#4fa39b"),
    "norm": ("#fbdbe3", "#d0708a"),
    "elementwise": ("#e0f3df", "#6aad67"),
    "activation": ("#e0f3df", "#6aad67"),
    "pool": ("#ece1f8", "#9273c4"),
    "shape": ("#eceff1", "#93a0a8"),
    "other": ("#f3f3f3", "#9a9a9a"),
    "io": ("#fff6d6", "#c9a635"),
    "stub": ("#ffffff", "#b9b9b9"),
}
FUSED_OPS = {"FusedConv", "FusedGemm", "FusedElementwise", "Relu6", "Silu"}
MARKS = {"added": ("#2e9e44", "3"), "removed": ("#d2382f", "3")}


def op_family(op: str) -> str:
    from ..ops import OPS
    if op in FUSED_OPS:
        return "fused"
    cls = OPS.get(op)
    family = cls.__module__.rsplit(".", 1)[-1] if cls is not None else "other"
    if family == "fused":
        return "fused"
    return family if family in PALETTE else "other"


def text_width(text: str, size: float = 11.0, bold: bool = False) -> float:
    """A good guess of rendered width in px for a sans-serif font (no font metrics at hand)."""
    narrow = sum(1 for c in text if c in "il.,:;|!'()[]1 ")
    wide = sum(1 for c in text if c in "MWmw×@%")
    per = 0.56 * size * (1.07 if bold else 1.0)
    return per * (len(text) - narrow - wide) + 0.3 * size * narrow + 0.82 * size * wide


def shorten(text: str, limit: int = 30) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def shape_text(value) -> str:
    return "×".join(str(d) for d in value.type.shape) or "scalar"


def node_detail(node) -> str:
    """A short second line: kernel and stride of convs, what a fused kernel folds in."""
    a = node.attrs
    parts = []
    if "kernel_shape" in a and a.get("kernel_shape"):
        kernel = "×".join(str(k) for k in a["kernel_shape"])
        strides = a.get("strides") or []
        if any(s != 1 for s in strides):
            kernel += " /" + "×".join(str(s) for s in strides) if len(set(strides)) > 1 \
                else f" /{strides[0]}"
        parts.append(kernel)
        group = a.get("group", 1)
        if isinstance(group, int) and group > 1:
            parts.append(f"g{group}")
    for key in ("activation", "post_activation"):
        if a.get(key):
            parts.append(str(a[key]))
    if a.get("residual"):
        parts.insert(len(parts) - (1 if a.get("post_activation") else 0), "+skip")
    if node.op == "FusedElementwise" and isinstance(a.get("program"), list):
        parts.append("·".join(str(step[0]) for step in a["program"]))
    if node.op == "Transpose" and a.get("perm"):
        parts.append("perm " + ",".join(str(p) for p in a["perm"]))
    for key in ("view", "elided"):
        if node.annotations.get(key):
            parts.append(key)
    for key in ("layout", "algorithm"):
        if node.annotations.get(key):
            parts.append(str(node.annotations[key]))
    return shorten(" · ".join(parts), 40)


# ---- the layout ----------------------------------------------------------------------------------
@dataclass
class Box:
    kind: str                  # "node", "input", "output", "stub" or "dummy"
    lines: list[str]
    title: str = ""
    family: str = "other"
    mark: str = ""             # "", "added" or "removed"
    width: float = DUMMY_WIDTH
    height: float = 0.0
    layer: int = 0
    x: float = 0.0             # centre
    y: float = 0.0             # top
    preds: list[int] = field(default_factory=list)
    succs: list[int] = field(default_factory=list)

    def size(self) -> None:
        if self.kind == "dummy":
            return
        widths = [text_width(line, 12 if i == 0 else 10.5, bold=i == 0)
                  for i, line in enumerate(self.lines)]
        self.width = max(56.0, max(widths) + 2 * PAD_X)
        self.height = len(self.lines) * LINE_HEIGHT + 2 * PAD_Y


@dataclass
class Layout:
    boxes: list[Box]
    edges: list[list[int]]     # box ids from producer through dummies to consumer
    width: float
    height: float


def layout(boxes: list[Box], edges: Iterable[tuple[int, int]], sweeps: int = 6) -> Layout:
    """Place ``boxes`` (given in a topological order) connected by ``edges`` (source, target)."""
    for box in boxes:
        box.size()
    edges = sorted(set(edges))
    preds: dict[int, list[int]] = {i: [] for i in range(len(boxes))}
    succs: dict[int, list[int]] = {i: [] for i in range(len(boxes))}
    for s, t in edges:
        preds[t].append(s)
        succs[s].append(t)
    for i in range(len(boxes)):
        boxes[i].layer = max((boxes[p].layer + 1 for p in preds[i]), default=0)
    # Sources (graph inputs, stubs) sit just above their first consumer rather than at the top.
    for i in range(len(boxes)):
        if not preds[i] and succs[i]:
            boxes[i].layer = max(0, min(boxes[s].layer for s in succs[i]) - 1)

    chains = []
    for s, t in edges:
        chain = [s]
        for layer in range(boxes[s].layer + 1, boxes[t].layer):
            dummy = Box("dummy", [], layer=layer)
            boxes.append(dummy)
            chain.append(len(boxes) - 1)
        chain.append(t)
        chains.append(chain)
    for box in boxes:
        box.preds, box.succs = [], []
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            boxes[b].preds.append(a)
            boxes[a].succs.append(b)

    depth = max((b.layer for b in boxes), default=0) + 1
    layers: list[list[int]] = [[] for _ in range(depth)]
    for i, box in enumerate(boxes):
        layers[box.layer].append(i)
    _order(boxes, layers, sweeps)
    _place_x(boxes, layers, sweeps)

    band = [max((boxes[i].height for i in layer), default=0) for layer in layers]
    y = MARGIN
    for layer, h in zip(layers, band):
        for i in layer:
            if boxes[i].kind == "dummy":
                # a long edge runs straight down through the whole band, clear of its boxes
                boxes[i].y, boxes[i].height = y, h
            else:
                boxes[i].y = y + (h - boxes[i].height) / 2
        y += h + V_GAP
    left = min((b.x - b.width / 2 for b in boxes), default=0)
    for box in boxes:
        box.x += MARGIN - left
    width = max((b.x + b.width / 2 for b in boxes), default=0) + MARGIN
    return Layout(boxes, chains, width, y - V_GAP + MARGIN)


def _order(boxes: list[Box], layers: list[list[int]], sweeps: int) -> None:
    best = [list(layer) for layer in layers]
    best_crossings = _crossings(boxes, layers)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        rng = range(1, len(layers)) if down else range(len(layers) - 2, -1, -1)
        for li in rng:
            position = {i: k for k, i in enumerate(layers[li - 1 if down else li + 1])}
            keyed = []
            for k, i in enumerate(layers[li]):
                near = boxes[i].preds if down else boxes[i].succs
                ranks = [position[j] for j in near if j in position]
                keyed.append((sum(ranks) / len(ranks) if ranks else k, k, i))
            layers[li] = [i for _, _, i in sorted(keyed)]
        crossings = _crossings(boxes, layers)
        if crossings < best_crossings:
            best, best_crossings = [list(layer) for layer in layers], crossings
    layers[:] = best


def _crossings(boxes: list[Box], layers: list[list[int]]) -> int:
    total = 0
    for upper, lower in zip(layers, layers[1:]):
        if len(upper) < 2 and len(lower) < 2:
            continue
        pos_u = {i: k for k, i in enumerate(upper)}
        pos_l = {i: k for k, i in enumerate(lower)}
        segments = sorted((pos_u[i], pos_l[j]) for i in upper for j in boxes[i].succs
                          if j in pos_l)
        for a in range(len(segments)):
            for b in range(a + 1, len(segments)):
                if segments[a][0] < segments[b][0] and segments[a][1] > segments[b][1]:
                    total += 1
    return total


def _place_x(boxes: list[Box], layers: list[list[int]], sweeps: int) -> None:
    for layer in layers:
        x = 0.0
        for k, i in enumerate(layer):
            if k:
                x += _gap(boxes[layer[k - 1]], boxes[i])
            boxes[i].x = x
        shift = x / 2
        for i in layer:
            boxes[i].x -= shift
    for sweep in range(2 * sweeps + 1):
        down = sweep % 2 == 0
        last = sweep == 2 * sweeps
        rng = range(1, len(layers)) if down else range(len(layers) - 2, -1, -1)
        for li in rng:
            layer = layers[li]
            targets, weights = [], []
            for i in layer:
                box = boxes[i]
                near = box.preds if down else box.succs
                if near:
                    targets.append(sum(boxes[j].x for j in near) / len(near))
                    weights.append(_weight(boxes, box, near, down, last))
                else:
                    targets.append(box.x)
                    weights.append(0.1)
            xs = _spaced_fit(targets, weights, [_gap(boxes[a], boxes[b])
                                                for a, b in zip(layer, layer[1:])])
            for i, x in zip(layer, xs):
                boxes[i].x = x


def _weight(boxes: list[Box], box: Box, near: list[int], down: bool, last: bool) -> float:
    """How hard a box pulls toward its neighbours. One-to-one links (plain chains) and long edges
    (dummies) pull hard, and on the last sweep hardest, so that they come out straight."""
    if len(near) == 1:
        other = boxes[near[0]]
        back = other.succs if down else other.preds
        if len(back) == 1:
            return 1000.0 if last else 60.0
    return 1.0 + 0.5 * len(near)


def _gap(a: Box, b: Box) -> float:
    gap = H_GAP if a.kind != "dummy" and b.kind != "dummy" else H_GAP / 2
    return (a.width + b.width) / 2 + gap


def _spaced_fit(targets: Sequence[float], weights: Sequence[float],
                gaps: Sequence[float]) -> list[float]:
    """x minimising sum w (x - target)^2 subject to x[k+1] - x[k] >= gaps[k].

    Subtracting the cumulative gaps turns the spacing into plain monotonicity, which weighted
    pool-adjacent-violators solves exactly."""
    offsets = [0.0]
    for g in gaps:
        offsets.append(offsets[-1] + g)
    blocks: list[list[float]] = []     # [mean, weight, count]
    for t, w, off in zip(targets, weights, offsets):
        blocks.append([t - off, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    values = [m for m, _, c in blocks for _ in range(c)]
    return [v + off for v, off in zip(values, offsets)]


# ---- graphs to boxes -----------------------------------------------------------------------------
def graph_boxes(graph, nodes: Sequence[int] | None = None,
                marks: dict[int, str] | None = None) -> tuple[list[Box], list[tuple[int, int]]]:
    """Boxes and edges for the nodes at ``nodes`` (indices into graph.nodes; default all).

    Values that come from outside the chosen nodes appear as small stubs named after the value;
    graph inputs and outputs as rounded pills."""
    marks = marks or {}
    chosen = list(range(len(graph.nodes))) if nodes is None else sorted(set(nodes))
    full = nodes is None or len(chosen) == len(graph.nodes)
    boxes: list[Box] = []
    edges: list[tuple[int, int]] = []
    producer: dict[int, int] = {}
    input_ids = {id(v) for v in graph.inputs}

    for v in graph.inputs:
        if full:
            producer[id(v)] = len(boxes)
            boxes.append(Box("input", [v.name, shape_text(v)], title=f"input %{v.name}: {v.type}",
                             family="io"))
    for index in chosen:
        node = graph.nodes[index]
        sources = []
        for v in node.inputs:
            if v is None or v.is_constant:
                continue
            if id(v) not in producer:
                where = "graph input" if id(v) in input_ids else "computed outside this view"
                producer[id(v)] = len(boxes)
                boxes.append(Box("stub", [shorten(v.name, 22)],
                                 title=f"%{v.name}: {v.type} ({where})", family="stub"))
            sources.append(producer[id(v)])
        detail = node_detail(node)
        lines = [shorten(node.op, 24)] + ([detail] if detail else []) \
            + [shorten(", ".join(shape_text(o) for o in node.outputs), 30)]
        me = len(boxes)
        boxes.append(Box("node", lines, title=format_node(node), family=op_family(node.op),
                         mark=marks.get(index, "")))
        edges.extend((s, me) for s in sources)
        for o in node.outputs:
            producer[id(o)] = me
    if full:
        for v in graph.outputs:
            if id(v) in producer:
                boxes.append(Box("output", [v.name, shape_text(v)],
                                 title=f"output %{v.name}: {v.type}", family="io"))
                edges.append((producer[id(v)], len(boxes) - 1))
    return boxes, edges


# ---- drawing -------------------------------------------------------------------------------------
def graph_svg(graph, nodes: Sequence[int] | None = None, marks: dict[int, str] | None = None,
              title: str = "", css_class: str = "graph") -> str:
    """An SVG drawing of ``graph`` (or of the nodes at ``nodes``, with ``marks`` outlining
    nodes as "added" or "removed")."""
    boxes, edges = graph_boxes(graph, nodes, marks)
    return draw_layout(layout(boxes, edges), title=title, css_class=css_class)


_drawings = itertools.count()


def draw_layout(lay: Layout, title: str = "", css_class: str = "graph") -> str:
    w, h = math.ceil(lay.width), math.ceil(lay.height)
    # ids are document-wide: each drawing needs its own marker, or hiding one hides the others'
    arrow = f"arrow{next(_drawings)}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" width="{w}" '
           f'height="{h}" viewBox="0 0 {w} {h}" font-family="{escape(FONT)}" '
           f'role="img" aria-label="{escape(title or "graph")}">']
    if title:
        out.append(f"<title>{escape(title)}</title>")
    out.append('<rect width="100%" height="100%" fill="#ffffff"/>')
    out.append(f'<defs><marker id="{arrow}" viewBox="0 0 10 10" refX="9" refY="5" '
               'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
               '<path d="M0,1 L9,5 L0,9 z" fill="#7d8590"/></marker></defs>')
    out.append('<g fill="none" stroke="#8b949e" stroke-width="1.3">')
    for chain, ports in zip(lay.edges, _ports(lay)):
        out.append(f'<path d="{_edge_path(lay.boxes, chain, ports)}" '
                   f'marker-end="url(#{arrow})"/>')
    out.append("</g>")
    for box in lay.boxes:
        if box.kind != "dummy":
            out.append(_draw_box(box))
    out.append("</svg>")
    return "\n".join(out)


def _ports(lay: Layout) -> list[tuple[float, float]]:
    """(x offset at the source, x offset at the target) per edge: several edges at one box side
    leave or arrive side by side, ordered by where their other end lies, so they do not cross."""
    boxes = lay.boxes
    result = [[0.0, 0.0] for _ in lay.edges]
    arriving: dict[int, list[tuple[float, int]]] = {}
    leaving: dict[int, list[tuple[float, int]]] = {}
    for k, chain in enumerate(lay.edges):
        arriving.setdefault(chain[-1], []).append((boxes[chain[-2]].x, k))
        leaving.setdefault(chain[0], []).append((boxes[chain[1]].x, k))
    for side, groups in ((1, arriving), (0, leaving)):
        for box_id, group in groups.items():
            group.sort()
            n = len(group)
            step = min(14.0, boxes[box_id].width / (n + 1))
            for rank, (_, k) in enumerate(group):
                result[k][side] = (rank - (n - 1) / 2) * step
    return [tuple(p) for p in result]


def _edge_path(boxes: list[Box], chain: list[int], ports: tuple[float, float]) -> str:
    first, last = boxes[chain[0]], boxes[chain[-1]]
    points = [(first.x + ports[0], first.y + first.height)]
    for i in chain[1:-1]:
        points.append((boxes[i].x, boxes[i].y))
        points.append((boxes[i].x, boxes[i].y + boxes[i].height))
    points.append((last.x + ports[1], last.y - 1.5))
    d = f"M{points[0][0]:.1f},{points[0][1]:.1f}"
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 == x1:
            d += f" V{y1:.1f}"
        else:
            mid = (y0 + y1) / 2
            d += f" C{x0:.1f},{mid:.1f} {x1:.1f},{mid:.1f} {x1:.1f},{y1:.1f}"
    return d


def _draw_box(box: Box) -> str:
    fill, stroke = PALETTE.get(box.family, PALETTE["other"])
    width = "1.2"
    dash = ""
    if box.mark in MARKS:
        stroke, width = MARKS[box.mark]
        if box.mark == "removed":
            dash = ' stroke-dasharray="5,3"'
    x0, y0 = box.x - box.width / 2, box.y
    radius = box.height / 2 if box.kind in ("input", "output", "stub") else 5
    cls = f"node {box.kind} {box.family} {box.mark}".strip()
    parts = [f'<g class="{cls}"><title>{escape(box.title)}</title>',
             f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" '
             f'rx="{radius:.1f}" fill="{fill}" stroke="{stroke}" stroke-width="{width}"{dash}/>']
    for k, line in enumerate(box.lines):
        y = y0 + PAD_Y + LINE_HEIGHT * k + 10.5
        if box.kind == "stub":
            style = 'font-size="10" fill="#6e7781" font-style="italic"'
        elif k == 0:
            style = 'font-size="12" font-weight="600" fill="#1f2328"'
        else:
            style = 'font-size="10.5" fill="#57606a"'
        parts.append(f'<text x="{box.x:.1f}" y="{y:.1f}" text-anchor="middle" {style}>'
                     f"{escape(line)}</text>")
    parts.append("</g>")
    return "".join(parts)


# ---- the memory timeline -------------------------------------------------------------------------
@dataclass
class Interval:
    name: str
    size: int          # bytes
    offset: int        # bytes from the arena start
    start: int         # first step (node index) it is live
    end: int           # last step it is live (inclusive)
    label: str = ""    # extra text for the hover title


def tensor_colour(k: int) -> str:
    hue = (k * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.72, 0.55)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def nice_step(span: float, target: int) -> float:
    raw = span / max(1, target)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for mult in (1, 2, 2.5, 5, 10):
        if mult * power >= raw:
            return mult * power
    return 10 * power


def memory_svg(intervals: Sequence[Interval], arena_bytes: int, steps: int,
               lower_bound: int | None = None, step_labels: Sequence[str] = (),
               width: int = 960, height: int = 380) -> str:
    """Arena offset (y, bytes) over schedule step (x): one rectangle per tensor, hover for details.

    A dark step line shows the bytes live at each step; its peak is the lower bound."""
    left, right, top, bottom = 74, 16, 26, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    steps = max(steps, max((iv.end + 1 for iv in intervals), default=1), 1)
    ymax = max(arena_bytes, lower_bound or 0, 1)

    def sx(step: float) -> float:
        return left + plot_w * step / steps

    def sy(offset: float) -> float:
        return top + plot_h * (1 - offset / ymax)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="memory" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" font-family="{escape(FONT)}" '
           f'font-size="11" role="img" aria-label="memory plan timeline">',
           "<title>memory plan: arena offset over schedule step</title>",
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fbfcfd" '
           f'stroke="#d0d7de"/>']
    # grid and axes
    unit, scale = _byte_unit(ymax)
    ystep = nice_step(ymax / scale, 6)
    k = 0
    while k * ystep * scale <= ymax * 1.0001:
        y = sy(k * ystep * scale)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                   f'stroke="#eaeef2"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#57606a">'
                   f"{_fmt_tick(k * ystep)} {unit}</text>")
        k += 1
    xstep = max(1, int(nice_step(steps, 12)))
    for s in range(0, steps + 1, xstep):
        x = sx(s)
        out.append(f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 4}" '
                   f'stroke="#8b949e"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
                   f'fill="#57606a">{s}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" '
               f'fill="#1f2328">schedule step (node index)</text>')
    out.append(f'<text transform="translate(14,{top + plot_h / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle" fill="#1f2328">arena offset</text>')
    # one rectangle per tensor
    out.append('<g class="tensors" stroke="#ffffff" stroke-width="0.6">')
    for k, iv in enumerate(intervals):
        x0, x1 = sx(iv.start), sx(iv.end + 1)
        y0, y1 = sy(iv.offset + iv.size), sy(iv.offset)
        label = (f"{iv.name}: {format_bytes(iv.size)} ({iv.size:,} bytes) at offset "
                 f"{iv.offset:,}, live steps {iv.start}-{iv.end}")
        if iv.label:
            label += f"\n{iv.label}"
        out.append(f'<rect x="{x0:.2f}" y="{y0:.2f}" width="{max(x1 - x0, 0.8):.2f}" '
                   f'height="{max(y1 - y0, 0.8):.2f}" fill="{tensor_colour(k)}">'
                   f"<title>{escape(label)}</title></rect>")
    out.append("</g>")
    # bytes live per step, and the two horizontal references
    live = [0] * steps
    for iv in intervals:
        for s in range(max(iv.start, 0), min(iv.end + 1, steps)):
            live[s] += iv.size
    if intervals:
        d = f"M{sx(0):.1f},{sy(live[0]):.1f}"
        for s, value in enumerate(live):
            d += f" H{sx(s):.1f} V{sy(value):.1f}"
        d += f" H{sx(steps):.1f}"
        out.append(f'<path d="{d}" fill="none" stroke="#24292f" stroke-width="1.4" '
                   f'stroke-opacity="0.75"><title>bytes live at each step</title></path>')
    refs = [(arena_bytes, "arena", "#cf222e", "")]
    if lower_bound is not None:
        refs.append((lower_bound, "lower bound", "#0969da", ' stroke-dasharray="6,4"'))
    placed: list[float] = []
    for value, name, colour, dash in refs:
        y = sy(value)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                   f'stroke="{colour}" stroke-width="1.3"{dash}/>')
        ty = y - 4 if all(abs(y - p) > 12 for p in placed) else y + 12
        placed.append(ty)
        out.append(f'<text x="{left + plot_w - 4}" y="{ty:.1f}" text-anchor="end" '
                   f'fill="{colour}" font-weight="600">{name} {format_bytes(value)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _byte_unit(n: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= scale:
            return unit, scale
    return "B", 1


def _fmt_tick(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.2f}".rstrip("0")


__all__ = ["Box", "Interval", "Layout", "graph_svg", "graph_boxes", "layout", "draw_layout",
           "memory_svg", "op_family"]
