"""The one-page HTML report of ``cnncompile inspect --html``: inline CSS and SVG, no scripts.

Sections: headline numbers; the pipeline (time, node counts, what each pass did); for each pass that
changed the graph, before/after pictures of the places it changed; the convolution algorithms with
the reasons the lowering gave; the memory plan as a timeline; the final graph and its IR.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timezone
from html import escape

from ..analysis import format_bytes
from ..inspect import format_error
from ..ir.printer import format_graph, format_node
from .svg import PALETTE, Interval, graph_svg, memory_svg

FULL_GRAPH_NODES = 70      # before + after node count up to which a pass shows whole graphs
MAX_REGIONS = 3            # changed places drawn per pass
MAX_REGION_NODES = 60      # nodes drawn per side at most
# passes whose work a section of the page shows better than a before/after picture
SECTION_OF = {"lower_convolutions": "algorithms", "plan_memory": "memory"}

CSS = """
:root { --fg:#1f2328; --muted:#57606a; --line:#d0d7de; --bg:#f6f8fa; --card:#ffffff;
        --accent:#0969da; --bad:#cf222e; --good:#1a7f37; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:14px/1.45 -apple-system,'Segoe UI',Helvetica,Arial,sans-serif; }
header { background:#24292f; color:#fff; padding:22px 32px 18px; }
header h1 { margin:0; font-size:22px; font-weight:600; }
header h1 small { font-weight:400; color:#c9d1d9; font-size:15px; margin-left:8px; }
header p { margin:6px 0 0; color:#c9d1d9; font-size:13px; }
header nav { margin-top:12px; display:flex; gap:18px; font-size:13px; }
header nav a { color:#9ecbff; }
main { max-width:1280px; margin:0 auto; padding:20px 28px 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px;
          padding:18px 22px; margin:18px 0; }
h2 { font-size:17px; margin:0 0 12px; }
h3 { font-size:15px; margin:0; display:inline; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(170px,1fr)); gap:12px;
         margin-top:4px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px;
        padding:12px 16px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:22px; font-weight:600; margin-top:2px; white-space:nowrap; }
.card .s { color:var(--muted); font-size:12px; }
.card.bad .v { color:var(--bad); } .card.good .v { color:var(--good); }
table { border-collapse:collapse; width:100%; font-size:13px; }
th { text-align:left; color:var(--muted); font-weight:600; border-bottom:2px solid var(--line);
     padding:6px 8px; white-space:nowrap; }
td { border-bottom:1px solid #eaeef2; padding:6px 8px; vertical-align:top; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr.same td { color:#8c959f; }
tr.bad td { background:#ffebe9; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
code, .mono { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12px; }
.bar { height:8px; background:#54aeff; border-radius:4px; min-width:2px; }
.barcell { width:120px; }
.delta { font-size:12px; color:var(--muted); }
.delta.down { color:var(--good); } .delta.up { color:#9a6700; }
.err { font-family:ui-monospace,monospace; font-size:12px; padding:1px 6px; border-radius:10px;
       background:#dafbe1; color:var(--good); }
.err.bad { background:#ffebe9; color:var(--bad); font-weight:600; }
.badge { display:inline-block; font-family:ui-monospace,monospace; font-size:12px; padding:1px 7px;
         border-radius:10px; background:#ddf4ff; color:#0550ae; white-space:nowrap; }
details.pass { border:1px solid var(--line); border-radius:8px; margin:10px 0; background:#fff; }
details.pass > summary { cursor:pointer; padding:10px 14px; list-style-position:outside; }
details.pass > summary .sum { color:var(--muted); margin-left:8px; }
details.pass[open] > summary { border-bottom:1px solid var(--line); }
.pair { display:grid; grid-template-columns:1fr 1fr; gap:0; }
.pair > div { padding:10px 12px; overflow:auto; max-height:680px; text-align:center; }
.pair > div + div { border-left:1px solid var(--line); }
.pair .label { text-align:left; font-size:12px; font-weight:600; color:var(--muted);
               text-transform:uppercase; letter-spacing:.05em; margin-bottom:6px; }
.caption { color:var(--muted); font-size:12px; padding:8px 14px 12px; }
@media (max-width: 820px) { .pair { grid-template-columns:1fr; }
  .pair > div + div { border-left:none; border-top:1px solid var(--line); } }
svg.graph { max-width:100%; height:auto; }
.scroll { overflow:auto; max-height:78vh; border:1px solid #eaeef2; border-radius:8px;
          padding:8px; text-align:center; background:#fff; }
svg.memory { width:100%; height:auto; }
.legend { display:flex; flex-wrap:wrap; gap:14px; font-size:12px; color:var(--muted);
          margin:4px 0 10px; }
.legend span i { display:inline-block; width:12px; height:12px; border-radius:3px;
                 vertical-align:-2px; margin-right:5px; border:1px solid; }
pre.ir { max-height:60vh; overflow:auto; background:#f6f8fa; padding:12px; border-radius:8px;
         font-size:12px; line-height:1.4; }
.muted { color:var(--muted); }
.reason { color:var(--muted); font-size:12px; }
"""

LEGEND = [("conv", "convolution"), ("fused", "fused kernel"), ("linalg", "Gemm / MatMul"),
          ("norm", "normalization"), ("elementwise", "elementwise / activation"),
          ("pool", "pooling"), ("shape", "data movement"), ("io", "graph input / output")]


def render_html(report) -> str:
    """The report as one HTML document (a str)."""
    parts = [_head(report), "<main>", _cards(report), _pipeline(report), _changes(report),
             _algorithms(report), _memory(report), _final(report), "</main>",
             '<footer class="muted" style="text-align:center;padding:0 0 28px;font-size:12px">'
             f"made by cnncompile inspect · {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
             "</footer></body></html>"]
    return "\n".join(parts)


def _head(report) -> str:
    g = report.graph
    level = f"opt-level {report.opt_level}" if report.opt_level is not None \
        else "custom pipeline"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>cnncompile inspect · {escape(report.model)}</title>"
            f"<style>{CSS}</style></head><body>"
            f"<header><h1>cnncompile inspect<small>{escape(report.model)}</small></h1>"
            f"<p>graph '{escape(g.name)}' · opset {g.opset} · target {escape(report.target)} · "
            f"{level} · inputs "
            + ", ".join(f"<code style='color:#fff'>{escape(v.name)}: {escape(str(v.type))}</code>"
                        for v in g.inputs)
            + "</p><nav><a href='#pipeline'>pipeline</a><a href='#changes'>what changed</a>"
            "<a href='#algorithms'>conv algorithms</a><a href='#memory'>memory plan</a>"
            "<a href='#final'>final graph</a></nav></header>")


def _card(key: str, value: str, sub: str = "", cls: str = "") -> str:
    return (f'<div class="card {cls}"><div class="k">{escape(key)}</div>'
            f'<div class="v">{escape(value)}</div><div class="s">{escape(sub)}</div></div>')


def _cards(report) -> str:
    before, after = len(report.input_graph.nodes), len(report.graph.nodes)
    changed = sum(1 for r in report.passes if r.changed)
    cards = [_card("nodes", f"{before} → {after}",
                   f"{100 * (before - after) / before:.0f}% fewer" if before else ""),
             _card("passes", str(len(report.passes)), f"{changed} changed the graph"),
             _card("compile time", f"{report.total_seconds * 1e3:.1f} ms",
                   f"+ {report.import_seconds * 1e3:.0f} ms import")]
    mem = report.memory_summary
    if mem is not None:
        ratio = mem.arena_bytes / mem.lower_bound_bytes if mem.lower_bound_bytes else math.nan
        cards.append(_card("arena", format_bytes(mem.arena_bytes),
                           f"{ratio:.2f} × lower bound {format_bytes(mem.lower_bound_bytes)}"))
        saved = 1 - mem.arena_bytes / mem.naive_bytes if mem.naive_bytes else 0.0
        cards.append(_card("vs naive", f"−{100 * saved:.0f}%",
                           f"naive {format_bytes(mem.naive_bytes)}"))
    if report.check_numerics:
        if report.first_bad_pass:
            cards.append(_card("numerics", report.first_bad_pass,
                               f"first pass over {report.tolerance:g}", "bad"))
        else:
            worst = max((r.max_rel_error or 0.0 for r in report.passes), default=0.0)
            cards.append(_card("numerics", "all passes ok",
                               f"max rel. L2 {worst:.1e} ≤ {report.tolerance:g}", "good"))
    return f'<div class="cards">{"".join(cards)}</div>'


def _pipeline(report) -> str:
    from ..passes import PASSES
    if not report.passes:
        return ("<section id='pipeline'><h2>Pipeline</h2><p class='muted'>No passes ran.</p>"
                "</section>")
    longest = max(r.seconds for r in report.passes) or 1.0
    numerics = report.check_numerics
    rows = ['<tr><th>#</th><th>pass</th><th class="num">time</th><th></th>'
            '<th class="num">nodes</th>' + ('<th class="num">max rel. error</th>'
                                            if numerics else "") + "<th>what it did</th></tr>"]
    first_bad = report.first_bad_record
    for k, rec in enumerate(report.passes, 1):
        bad = rec is first_bad
        cls = "bad" if bad else ("" if rec.changed else "same")
        delta = rec.nodes_after - rec.nodes_before
        delta_html = (f' <span class="delta {"down" if delta < 0 else "up"}">'
                      f'{delta:+d}</span>' if delta else "")
        info = PASSES.get(rec.name)
        desc = escape(info.description) if info is not None else ""
        anchor = SECTION_OF.get(rec.name) if rec.changed else None
        if anchor is None and _has_pictures(rec):
            anchor = f"pass-{k}"
        name = f'<a href="#{anchor}">{escape(rec.name)}</a>' if anchor else escape(rec.name)
        err = ""
        if numerics:
            over = rec.max_rel_error is not None and not rec.max_rel_error <= report.tolerance
            err = (f'<td class="num"><span class="err{" bad" if over else ""}">'
                   f'{format_error(rec.max_rel_error)}</span></td>')
        width = max(1.5, 100 * rec.seconds / longest)
        rows.append(
            f'<tr class="{cls}"><td class="num">{k}</td><td title="{desc}"><b>{name}</b></td>'
            f'<td class="num">{rec.seconds * 1e3:.2f} ms</td>'
            f'<td class="barcell"><div class="bar" style="width:{width:.1f}%"></div></td>'
            f'<td class="num">{rec.nodes_before} → {rec.nodes_after}{delta_html}</td>{err}'
            f'<td>{escape(rec.summary) if rec.summary else "<span class=muted>no change</span>"}'
            "</td></tr>")
    note = ""
    if numerics:
        note = (f'<p class="muted">Max relative L2 error of the outputs against the unoptimized '
                f"graph, on the same seeded random inputs, after each pass; tolerance "
                f"{report.tolerance:g}.</p>")
        if report.first_bad_pass:
            note += f'<p style="color:var(--bad)"><b>{escape(report.bad_pass_message())}</b></p>'
    return f"<section id='pipeline'><h2>Pipeline</h2><table>{''.join(rows)}</table>{note}</section>"


def _has_pictures(rec) -> bool:
    if rec.graph_before is None or rec.graph_after is None:
        return False
    removed, added = diff_keys(rec.graph_before, rec.graph_after)
    return bool(removed or added)


# ---- what changed --------------------------------------------------------------------------------
def diff_keys(before, after) -> tuple[list[int], list[int]]:
    """Indices of nodes of ``before`` that are gone and of ``after`` that are new (a node whose
    printed line changed, in its inputs, attributes or annotations, counts as both)."""
    kb = [format_node(n) for n in before.nodes]
    ka = [format_node(n) for n in after.nodes]
    sb, sa = set(kb), set(ka)
    gone = [i for i, k in enumerate(kb) if k not in sa]
    return gone, [j for j, k in enumerate(ka) if k not in sb]


def changed_regions(before, after, limit: int = MAX_REGIONS):
    """Which nodes to draw for one pass: (before indices, before marks, after indices, after marks,
    places changed, places drawn). Small graphs are drawn whole (indices None)."""
    removed, added = diff_keys(before, after)
    marks_b = {i: "removed" for i in removed}
    marks_a = {j: "added" for j in added}
    places = _places(before, after, removed, added)
    if len(before.nodes) + len(after.nodes) <= FULL_GRAPH_NODES:
        return None, marks_b, None, marks_a, len(places), len(places)
    # Prefer one place of each kind (which ops went, which came) before repeating a kind.
    chosen, kinds = [], set()
    for place in places:
        if place["kind"] not in kinds:
            kinds.add(place["kind"])
            chosen.append(place)
        if len(chosen) == limit:
            break
    for place in places:
        if len(chosen) == limit:
            break
        if place not in chosen:
            chosen.append(place)
    show_b, show_a = set(), set()
    for place in chosen:
        show_b |= place["before"]
        show_a |= place["after"]
    nb = _context(before, show_b)
    na = _context(after, show_a)
    # unchanged neighbours drawn on one side are drawn on the other too, so the sides line up
    keys_b = {format_node(before.nodes[i]): i for i in range(len(before.nodes))}
    keys_a = {format_node(after.nodes[j]): j for j in range(len(after.nodes))}
    for i in list(nb):
        j = keys_a.get(format_node(before.nodes[i]))
        if j is not None:
            na.add(j)
    for j in list(na):
        i = keys_b.get(format_node(after.nodes[j]))
        if i is not None:
            nb.add(i)
    return (sorted(nb)[:MAX_REGION_NODES], marks_b, sorted(na)[:MAX_REGION_NODES], marks_a,
            len(places), len(chosen))


def _places(before, after, removed: list[int], added: list[int]) -> list[dict]:
    """Group changed nodes into places: a new node and the old nodes it shares ONNX origins with
    (what a rewrite replaced) form one place."""
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        parent[find(a)] = find(b)

    by_origin: dict[str, list] = defaultdict(list)
    for i in removed:
        find(("b", i))
        for origin in before.nodes[i].origins:
            by_origin[origin].append(("b", i))
    for j in added:
        find(("a", j))
        for origin in after.nodes[j].origins:
            by_origin[origin].append(("a", j))
    for members in by_origin.values():
        for other in members[1:]:
            union(members[0], other)
    groups: dict = defaultdict(list)
    for key in list(parent):
        groups[find(key)].append(key)
    places = []
    for members in groups.values():
        b = {i for side, i in members if side == "b"}
        a = {j for side, j in members if side == "a"}
        kind = (tuple(sorted(before.nodes[i].op for i in b)),
                tuple(sorted(after.nodes[j].op for j in a)))
        first = min([i for i in b] + [j for j in a])
        places.append({"before": b, "after": a, "kind": kind, "first": first})
    places.sort(key=lambda p: p["first"])
    return places


def _context(graph, chosen: set[int]) -> set[int]:
    """``chosen`` plus the nodes that feed them or read from them."""
    producer = {}
    for index, node in enumerate(graph.nodes):
        for out in node.outputs:
            producer[id(out)] = index
    result = set(chosen)
    for index, node in enumerate(graph.nodes):
        feeds = {producer[id(v)] for v in node.inputs if v is not None and id(v) in producer}
        if index in chosen:
            result |= feeds
        elif feeds & chosen:
            result.add(index)
    return result


def _changes(report) -> str:
    pictured = [(k, rec) for k, rec in enumerate(report.passes, 1) if _has_pictures(rec)]
    if not pictured:
        kept = any(rec.graph_before is not None for rec in report.passes)
        why = ("no pass changed the graph" if kept else
               "the graphs were not kept (inspect(..., keep_graphs=True) keeps them)")
        return (f"<section id='changes'><h2>What each pass changed</h2>"
                f"<p class='muted'>No pictures: {why}."
                "</p></section>")
    legend = "".join(f'<span><i style="background:{PALETTE[f][0]};border-color:{PALETTE[f][1]}">'
                     f"</i>{escape(text)}</span>" for f, text in LEGEND)
    legend += ('<span><i style="background:#fff;border:2px dashed #d2382f"></i>removed by the '
               'pass</span><span><i style="background:#fff;border:2px solid #2e9e44"></i>'
               'new or changed</span>')
    blocks = ['<section id="changes"><h2>What each pass changed</h2>'
              f'<div class="legend">{legend}</div>']
    for n, (k, rec) in enumerate(pictured):
        nb, mb, na, ma, places, shown = changed_regions(rec.graph_before, rec.graph_after)
        svg_b = graph_svg(rec.graph_before, nb, mb, title=f"before {rec.name}")
        svg_a = graph_svg(rec.graph_after, na, ma, title=f"after {rec.name}")
        if nb is None:
            caption = f"The whole graph; {places} place{'s' if places != 1 else ''} changed."
        else:
            caption = (f"{shown} of {places} changed place{'s' if places != 1 else ''} shown, "
                       "with their neighbours; italic pills stand for tensors computed elsewhere.")
        is_open = " open" if n < 4 else ""
        blocks.append(
            f'<details class="pass" id="pass-{k}"{is_open}><summary><h3>{k}. '
            f'{escape(rec.name)}</h3><span class="sum">{escape(rec.summary or "")} · '
            f'{rec.nodes_before} → {rec.nodes_after} nodes · {rec.seconds * 1e3:.2f} ms</span>'
            f'</summary><div class="pair"><div><div class="label">before</div>{svg_b}</div>'
            f'<div><div class="label">after</div>{svg_a}</div></div>'
            f'<div class="caption">{caption} Hover a box for its IR line and ONNX origins.'
            "</div></details>")
    blocks.append("</section>")
    return "\n".join(blocks)


# ---- convolution algorithms ----------------------------------------------------------------------
def _algorithms(report) -> str:
    rows = report.conv_algorithms()
    if not rows:
        return ""
    chosen = [r for r in rows if r["algorithm"]]
    counts: dict[str, int] = defaultdict(int)
    for r in chosen:
        counts[r["algorithm"]] += 1
    summary = ", ".join(f'<span class="badge">{escape(str(a))}</span> × {n}'
                        for a, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if not chosen:
        summary = ("<span class='muted'>no algorithm annotations: the lowering pass did not "
                   "run</span>")
    body = ["<tr><th>#</th><th>convolution</th><th>op</th><th>input → output</th>"
            "<th>kernel</th><th>algorithm</th><th>why</th></tr>"]
    for k, r in enumerate(rows, 1):
        kernel = "×".join(map(str, r["kernel"]))
        strides = r["strides"]
        if any(st != 1 for st in strides):
            kernel += " /" + (str(strides[0]) if len(set(strides)) == 1
                              else "×".join(map(str, strides)))
        if r["group"] and r["group"] != 1:
            kernel += f" g{r['group']}"
        algo = (f'<span class="badge">{escape(str(r["algorithm"]))}</span>' if r["algorithm"]
                else "<span class=muted>–</span>")
        origins = ", ".join(r["origins"])
        body.append(
            f'<tr><td class="num">{k}</td><td><code>{escape(r["node"])}</code>'
            f'<div class="reason">from {escape(origins)}</div></td><td>{escape(r["op"])}</td>'
            f'<td class="mono">{escape(r["input"])} → {escape(r["output"])}</td>'
            f'<td style="white-space:nowrap">{escape(kernel)}</td><td>{algo}</td>'
            f'<td class="reason">{escape(str(r["reason"]))}</td></tr>')
    return (f"<section id='algorithms'><h2>Convolution algorithms</h2><p>{summary}</p>"
            f"<table>{''.join(body)}</table></section>")


# ---- memory --------------------------------------------------------------------------------------
def _memory(report) -> str:
    mem = report.memory_summary
    if mem is None:
        return ("<section id='memory'><h2>Memory plan</h2><p class='muted'>No memory plan: the "
                "plan_memory pass did not run (it is part of opt-level 2).</p></section>")
    graph = report.graph
    made_by = {}
    for step, node in enumerate(graph.nodes):
        for out in node.outputs:
            made_by[out.name] = f"{node.op} at step {step}"
    own = mem.own_buffers
    by_first = sorted(own, key=lambda t: (t.first, t.offset))
    intervals = [Interval(t.name, t.size, t.offset, t.first, t.last,
                          "; ".join(x for x in (f"made by {made_by[t.name]}"
                                                if t.name in made_by else "", t.note) if x))
                 for t in by_first]
    svg = memory_svg(intervals, mem.arena_bytes, len(graph.nodes), mem.lower_bound_bytes)
    ratio = mem.arena_bytes / mem.lower_bound_bytes if mem.lower_bound_bytes else math.nan
    share = mem.arena_bytes / mem.naive_bytes if mem.naive_bytes else math.nan
    slices = len(mem.tensors) - len(own)
    cards = "".join([
        _card("arena", format_bytes(mem.arena_bytes), f"{mem.arena_bytes:,} bytes"),
        _card("lower bound", format_bytes(mem.lower_bound_bytes), "most bytes live at one step"),
        _card("naive", format_bytes(mem.naive_bytes), "every intermediate its own buffer"),
        _card("arena / lower bound", f"{ratio:.3f}", f"arena is {100 * share:.0f}% of naive",
              "good" if ratio <= 1.1 else ""),
        _card("tensors", str(len(mem.tensors)),
              f"{slices} written into a concat's buffer" if slices else "placed in the arena")])
    rows = ["<tr><th>tensor</th><th class='num'>size</th><th class='num'>offset</th>"
            "<th class='num'>live steps</th><th>made by</th><th></th></tr>"]
    for t in own[:12]:
        rows.append(f"<tr><td><code>{escape(t.name)}</code></td>"
                    f"<td class='num'>{format_bytes(t.size)}</td><td class='num'>{t.offset:,}</td>"
                    f"<td class='num'>{t.first}–{t.last}</td>"
                    f"<td class='muted'>{escape(made_by.get(t.name, ''))}</td>"
                    f"<td class='muted'>{escape(t.note)}</td></tr>")
    return (f"<section id='memory'><h2>Memory plan</h2><div class='cards'>{cards}</div>"
            f"<p class='muted'>One rectangle per tensor: it spans the steps the tensor is live "
            f"(x) and its bytes at its offset in the arena (y). The black line is the bytes live "
            f"at each step; its peak is the lower bound. Hover a rectangle for its name, size and "
            f"interval.</p>{svg}<h2 style='margin-top:16px'>Largest tensors</h2>"
            f"<table>{''.join(rows)}</table></section>")


# ---- the final graph -----------------------------------------------------------------------------
def _final(report) -> str:
    g = report.graph
    svg = graph_svg(g, title=f"final graph of {report.model}")
    ir = escape(format_graph(g, constants=False))
    return (f"<section id='final'><h2>Final graph <span class='muted' style='font-weight:400'>"
            f"({len(g.nodes)} nodes)</span></h2><div class='scroll'>{svg}</div>"
            f"<details style='margin-top:12px'><summary>Final IR (text)</summary>"
            f"<pre class='ir'>{ir}</pre></details></section>")
