"""`cnncompile inspect` and cnncompile.inspect: the JSON contract, text, HTML, DOT/SVG, numerics."""

import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from onnx import helper

import cnncompile
from cnncompile import zoo
from cnncompile.cli import main
from cnncompile.inspect import InspectReport, summarize_plan
from cnncompile.ops import OPS
from cnncompile.passes import PASSES, note, pipeline, register_pass
from cnncompile.report.html import changed_regions, render_html
from cnncompile.report.svg import (Box, Interval, graph_svg, layout, memory_svg,
                                   _spaced_fit)
from helpers import make_model

PASS_KEYS = {"name", "seconds", "summary", "nodes_before", "nodes_after", "op_counts_after",
             "max_rel_error"}
MEMORY_KEYS = {"arena_bytes", "lower_bound_bytes", "naive_bytes", "tensors"}
PROJECT_OPS = {"FusedConv", "FusedGemm", "FusedElementwise", "Relu6", "Silu"}


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "resnet18.onnx"
    zoo.save("resnet18", str(path), image_size=32)
    return path


@pytest.fixture(scope="module")
def resnet18_report(resnet18):
    return cnncompile.inspect(str(resnet18), input_shapes={"input": (1, 3, 32, 32)},
                              keep_graphs=True)


def small_model():
    """x -> Conv -> BatchNormalization -> Relu -> Add(x) -> y: every kind of pass has work."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.3,
             "scale": rng.uniform(0.5, 1.5, 3).astype(np.float32),
             "bias": rng.standard_normal(3).astype(np.float32),
             "mean": rng.standard_normal(3).astype(np.float32),
             "var": rng.uniform(0.5, 1.5, 3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"],
                              name="bn"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "x"], ["y"], name="add")]
    return make_model(nodes, {"x": (np.float32, [1, 3, 6, 6])}, ["y"], inits)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(small_model(), str(path))
    return path


@pytest.fixture
def perturb_pass():
    """A deliberately wrong pass: it scales the first conv's weights by 1.5."""
    def perturb_weights(g):
        conv = next(n for n in g.nodes if n.op in ("Conv", "FusedConv"))
        w = conv.inputs[1]
        conv.inputs[1] = g.add_constant(w.name + ".perturbed", w.data * np.float32(1.5))
        note("scaled a conv weight by 1.5")
        return g

    register_pass("zz_perturb_weights", "test pass: changes what the graph computes")(
        perturb_weights)
    yield "zz_perturb_weights"
    PASSES.pop("zz_perturb_weights", None)


class Page(HTMLParser):
    """Every start tag with its attributes, and the text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def count(self, tag, cls=None):
        return sum(1 for t, a in self.tags
                   if t == tag and (cls is None or cls in (a.get("class") or "").split()))


def parse_html(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


# ---- the JSON contract ---------------------------------------------------------------------------
def test_json_contract_on_a_zoo_model(resnet18, capsys):
    code, out, err = cli(capsys, "inspect", resnet18, "--shape", "input=1x3x32x32", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"passes", "memory"}
    assert [p["name"] for p in doc["passes"]] == pipeline(2)
    for p in doc["passes"]:
        assert set(p) == PASS_KEYS
        assert isinstance(p["name"], str) and isinstance(p["summary"], str)
        assert isinstance(p["seconds"], float) and p["seconds"] >= 0
        assert isinstance(p["nodes_before"], int) and isinstance(p["nodes_after"], int)
        assert p["nodes_after"] == sum(p["op_counts_after"].values())
        assert all(isinstance(n, int) and n > 0 for n in p["op_counts_after"].values())
        assert set(p["op_counts_after"]) <= set(OPS), "op names are registered op names"
        assert p["max_rel_error"] is None
    for a, b in zip(doc["passes"], doc["passes"][1:]):
        assert a["nodes_after"] == b["nodes_before"]
    # unfused ops keep their ONNX names; fused kernels use the project's names
    first = doc["passes"][0]["op_counts_after"]
    assert first["BatchNormalization"] == 20 and first["Relu"] == 17 and first["Add"] == 8
    final = doc["passes"][-1]["op_counts_after"]
    assert "BatchNormalization" not in final and "Relu" not in final and "Add" not in final
    assert final["FusedConv"] >= 16 and set(final) & PROJECT_OPS == {"FusedConv"}
    fold = next(p for p in doc["passes"] if p["name"] == "fold_batchnorm")
    assert fold["summary"].startswith("folded 20 BatchNormalization")
    assert fold["nodes_before"] - fold["nodes_after"] == 20

    memory = doc["memory"]
    assert set(memory) == MEMORY_KEYS
    assert all(isinstance(memory[k], int) for k in MEMORY_KEYS - {"tensors"})
    assert memory["lower_bound_bytes"] <= memory["arena_bytes"] <= 1.1 * \
        memory["lower_bound_bytes"]
    assert memory["arena_bytes"] < memory["naive_bytes"]
    assert memory["tensors"] and all({"name", "nbytes", "offset", "first", "last"} <= set(t)
                                     for t in memory["tensors"])
    assert all(t["nbytes"] > 0 and t["first"] <= t["last"] for t in memory["tensors"])
    assert max(t["nbytes"] for t in memory["tensors"]) <= memory["lower_bound_bytes"]


def test_python_api_returns_the_same_records(resnet18, resnet18_report, capsys):
    report = resnet18_report
    assert isinstance(report, InspectReport)
    _, out, _ = cli(capsys, "inspect", resnet18, "--shape", "input=1x3x32x32", "--json")
    doc = json.loads(out)
    api = report.to_dict()

    def timeless(d):
        return [{k: v for k, v in p.items() if k != "seconds"} for p in d["passes"]]

    assert timeless(api) == timeless(doc)
    assert api["memory"] == doc["memory"]
    assert report.memory is report.graph.meta["memory_plan"]
    assert report.first_bad_pass is None
    assert [r.name for r in report.passes] == pipeline(2)
    assert report.graph.op_counts() == report.passes[-1].op_counts_after
    assert report.record("fold_batchnorm").graph_before is not None


def test_inspect_api_options():
    graph = cnncompile.import_onnx(small_model())
    stream = io.StringIO()
    report = cnncompile.inspect(graph, passes=["fold_batchnorm", "fuse_conv_activation"],
                                print_after="all", stream=stream, check_numerics=True)
    assert report.pipeline == ["fold_batchnorm", "fuse_conv_activation"]
    assert report.opt_level is None and report.memory is None
    assert report.to_dict()["memory"] is None
    assert all(r.max_rel_error <= 1e-5 for r in report.passes)
    assert stream.getvalue().count("// ---- IR after") == 2
    assert len(graph.nodes) == 4    # the caller's graph is left alone

    report = cnncompile.inspect(small_model(), opt_level=0)
    assert report.passes == [] and report.graph.op_counts() == graph.op_counts()
    report = cnncompile.inspect(small_model(), disabled_passes=["fold_batchnorm"])
    assert "BatchNormalization" in report.graph.op_counts()
    with pytest.raises(cnncompile.errors.UserError, match="'fuse_residual_add' is not in this "
                                                          "pipeline"):
        cnncompile.inspect(small_model(), passes=["fold_batchnorm"],
                           print_after=["fuse_residual_add"])
    with pytest.raises(cnncompile.errors.UserError, match="no pass 'fold_bn'"):
        cnncompile.inspect(small_model(), print_before=["fold_bn"])


def test_json_is_strict_when_a_pass_makes_outputs_infinite():
    def to_inf(g):
        conv = next(n for n in g.nodes if n.op in ("Conv", "FusedConv"))
        w = conv.inputs[1]
        conv.inputs[1] = g.add_constant(w.name + ".inf", np.full_like(w.data, np.inf))
        return g

    register_pass("zz_to_inf", "test pass: makes the outputs infinite")(to_inf)
    try:
        with np.errstate(all="ignore"):
            report = cnncompile.inspect(small_model(), passes=["zz_to_inf"], check_numerics=True)
    finally:
        PASSES.pop("zz_to_inf")
    assert report.first_bad_pass == "zz_to_inf"
    assert report.to_dict()["passes"][0]["max_rel_error"] == float("inf")

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(report.to_json(), parse_constant=refuse)
    assert doc["passes"][0]["max_rel_error"] > 1e300


def test_stdlib_inspect_is_not_shadowed():
    import inspect as stdlib_inspect

    assert callable(cnncompile.inspect) and cnncompile.inspect.__module__ == "cnncompile.inspect"
    assert stdlib_inspect.signature(cnncompile.inspect).parameters["opt_level"].default == 2


# ---- text mode -----------------------------------------------------------------------------------
def test_text_mode(resnet18, capsys):
    code, out, err = cli(capsys, "inspect", resnet18, "--shape", "input=1x3x32x32")
    assert code == 0 and err == ""
    head, _, rest = out.partition("\nfinal IR\n")
    ir, _, memory = rest.partition("\nmemory plan\n")
    lines = head.splitlines()
    table_start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["pass", "ms",
                                                                                "nodes"])
    rows = lines[table_start + 1:table_start + 1 + len(pipeline(2))]
    assert [row.split()[0] for row in rows] == pipeline(2)
    fold = next(row for row in rows if row.split()[0] == "fold_batchnorm")
    assert "69 -> 49" in fold and "folded 20 BatchNormalization into Conv" in fold
    assert lines[table_start + 1 + len(pipeline(2))].split()[0] == "total"
    assert "max rel err" not in head
    assert ir.startswith("graph 'resnet18'") and "= FusedConv(" in ir
    assert "BatchNormalization" not in ir
    assert re.search(r"\n  # \d+ constants, \d+ elements\n", ir)    # constants summarised
    assert "arena" in memory and "lower bound" in memory and "naive" in memory
    assert "x the lower bound" in memory and "largest tensors" in memory

    code, out, _ = cli(capsys, "inspect", resnet18, "--shape", "input=1x3x32x32", "--no-ir",
                       "--opt-level", "1")
    assert code == 0 and "final IR" not in out
    assert "no memory plan" in out and "fold_batchnorm" not in out


def test_list_passes(capsys):
    code, out, _ = cli(capsys, "inspect", "--list-passes")
    assert code == 0
    for name, info in PASSES.items():
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert info.description[:40] in line
    assert f"opt-level 2: {' -> '.join(pipeline(2))}" in out


# ---- HTML ----------------------------------------------------------------------------------------
def test_html_report_parses_and_has_the_pictures(resnet18, resnet18_report, tmp_path, capsys):
    path = tmp_path / "report.html"
    code, out, err = cli(capsys, "inspect", resnet18, "--shape", "input=1x3x32x32",
                         "--html", path, "--no-ir")
    assert code == 0, err
    assert f"wrote    {path} (HTML report)" in out
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page = parse_html(text)
    # self-contained: no scripts, stylesheets or images fetched from anywhere
    assert page.count("script") == 0 and page.count("link") == 0 and page.count("img") == 0
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            assert not (attrs.get(key) or "").startswith(("http", "//")), (tag, attrs)
    assert page.count("style") == 1

    report = resnet18_report
    changed = [r for r in report.passes if r.graph_before is not None
               and str(r.graph_before) != str(r.graph_after)]
    assert {"fold_batchnorm", "fuse_conv_activation", "fuse_residual_add"} <= \
        {r.name for r in changed}
    # one before/after pair per pass that changed the graph, plus the final graph
    assert page.count("details", "pass") == len(changed)
    assert page.count("svg", "graph") == 2 * len(changed) + 1
    assert page.count("g", "fused") > 16 and page.count("g", "removed") > 0
    assert page.count("g", "added") > 0
    # the memory plot: one rectangle per tensor with its own buffer, each with a hover title
    assert page.count("svg", "memory") == 1
    own = report.memory_summary.own_buffers
    words = "".join(page.text)
    for t in own:
        assert f"{t.name}: " in words and f"live steps {t.first}-{t.last}" in words
    # conv algorithms with reasons, the pipeline, the numerics
    assert "Convolution algorithms" in words
    conv_rows = report.conv_algorithms()
    assert len(conv_rows) == report.graph.op_counts().get("FusedConv", 0) + \
        report.graph.op_counts().get("Conv", 0)
    for row in conv_rows:
        assert str(row["reason"]) in words
    for name in pipeline(2):
        assert name in words
    assert "numerics" not in words.lower()


def test_html_shows_the_numerics(perturb_pass):
    graph = cnncompile.import_onnx(small_model())
    report = cnncompile.inspect(graph, passes=["fold_batchnorm"], check_numerics=True)
    words = "".join(parse_html(report.to_html()).text)
    assert "all passes ok" in words and "max rel. error" in words
    report = cnncompile.inspect(graph, passes=["fold_batchnorm", perturb_pass],
                                check_numerics=True, keep_graphs=True)
    page = parse_html(report.to_html())
    words = "".join(page.text)
    assert f"pass '{perturb_pass}' changed the outputs" in words
    assert page.count("tr", "bad") == 1 and page.count("span", "bad") == 1


def test_html_of_resnet50_renders():
    model = zoo.build("resnet50", image_size=32)
    report = cnncompile.inspect(model, input_shapes=zoo.input_shapes(model), keep_graphs=True)
    page = parse_html(render_html(report))
    assert page.count("svg", "graph") >= 7 and page.count("svg", "memory") == 1
    final = [a for t, a in page.tags if t == "svg" and a.get("class") == "graph"][-1]
    # the final graph stays narrow (a chain with its skip lanes), however long it is
    assert float(final["width"]) < 400 and float(final["height"]) > 3000
    # 53 folds: a few places are drawn, not the whole graph
    nb, _, na, _, places, shown = changed_regions(report.record("fold_batchnorm").graph_before,
                                                  report.record("fold_batchnorm").graph_after)
    assert places == 53 and shown == 3 and len(nb) < 30 and len(na) < 30


def test_changed_regions_mark_what_a_pass_replaced(resnet18_report):
    rec = resnet18_report.record("fold_batchnorm")
    nb, marks_b, na, marks_a, places, shown = changed_regions(rec.graph_before, rec.graph_after)
    assert places == 20 and shown == 3
    removed_ops = {rec.graph_before.nodes[i].op for i in marks_b}
    added_ops = {rec.graph_after.nodes[j].op for j in marks_a}
    assert removed_ops == {"Conv", "BatchNormalization"} and added_ops == {"Conv"}
    assert len(marks_b) == 40 and len(marks_a) == 20
    shown_bn = [i for i in nb if rec.graph_before.nodes[i].op == "BatchNormalization"]
    assert len(shown_bn) == 3 and all(marks_b[i] == "removed" for i in shown_bn)
    assert sum(1 for j in na if j in marks_a) == 3      # the three new convs


def test_html_without_kept_graphs_or_passes_still_renders():
    report = cnncompile.inspect(small_model(), opt_level=0)
    page = parse_html(render_html(report))
    words = "".join(page.text)
    assert "No passes ran" in words and "No memory plan" in words
    assert page.count("svg", "graph") == 1
    report = cnncompile.inspect(small_model())
    words = "".join(parse_html(report.to_html()).text)
    assert "keep_graphs=True" in words


# ---- DOT and SVG ---------------------------------------------------------------------------------
def test_dot_writes_graphviz_source_or_an_svg_picture(small, tmp_path, capsys):
    dot = tmp_path / "g.dot"
    code, out, err = cli(capsys, "inspect", small, "--dot", dot)
    assert code == 0, err
    report = cnncompile.inspect(str(small))
    assert dot.read_text() == report.graph.to_dot()
    assert dot.read_text().startswith('digraph "test" {')

    svg = tmp_path / "g.svg"
    code, out, err = cli(capsys, "inspect", small, "--dot", svg)
    assert code == 0, err
    root = ET.fromstring(svg.read_text())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    groups = [g for g in root.iter("{http://www.w3.org/2000/svg}g")
              if "node" in (g.get("class") or "").split()]
    # one box per node, graph input and graph output
    assert len(groups) == len(report.graph.nodes) + 2
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert set(report.graph.op_counts()) <= texts
    assert len(list(root.iter("{http://www.w3.org/2000/svg}path"))) >= len(report.graph.nodes)

    code, _, err = cli(capsys, "inspect", small, "--dot", tmp_path / "g.png")
    assert code == 2 and "must end in .dot or .gv or .svg" in err
    code, _, err = cli(capsys, "inspect", small, "--html", tmp_path / "missing" / "r.html")
    assert code == 2 and "does not exist" in err


# ---- numerics ------------------------------------------------------------------------------------
def test_check_numerics_names_the_bad_pass_and_exits_1(small, perturb_pass, capsys):
    passes = f"remove_identity,fold_batchnorm,{perturb_pass},eliminate_dead_code"
    code, out, err = cli(capsys, "inspect", small, "--passes", passes, "--check-numerics",
                         "--no-ir")
    assert code == 1
    assert err.count("\n") == 1, err        # one clear line
    assert err.startswith(f"error: --check-numerics: pass '{perturb_pass}' changed the outputs")
    assert "tolerance 1e-05" in err and "passes run before it: remove_identity, fold_batchnorm" \
        in err
    row = next(ln for ln in out.splitlines() if ln.split()[:1] == [perturb_pass])
    assert " !" in row and "scaled a conv weight by 1.5" in row
    ok_row = next(ln for ln in out.splitlines() if ln.split()[:1] == ["fold_batchnorm"])
    assert " !" not in ok_row
    assert "max rel err" in out

    # the JSON still comes out, with the errors
    code, out, err = cli(capsys, "inspect", small, "--passes", passes, "--check-numerics",
                         "--json")
    assert code == 1 and perturb_pass in err
    errors = {p["name"]: p["max_rel_error"] for p in json.loads(out)["passes"]}
    assert errors["fold_batchnorm"] <= 1e-5 < errors[perturb_pass]

    # disabling the culprit, or a loose tolerance, makes it pass
    code, out, err = cli(capsys, "inspect", small, "--passes", passes, "--check-numerics",
                         "--disable", perturb_pass)
    assert code == 0 and err == "" and "every pass within the tolerance" in out
    code, _, _ = cli(capsys, "inspect", small, "--passes", passes, "--check-numerics",
                     "--tolerance", "10")
    assert code == 0


def test_check_numerics_on_the_default_pipeline(small, capsys):
    code, out, err = cli(capsys, "inspect", small, "--check-numerics", "--no-ir")
    assert code == 0, err
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] and ln.split()[0] in
            pipeline(2)]
    assert len(rows) == len(pipeline(2))
    assert all(float(r[5]) <= 1e-5 for r in rows)      # name, ms, a, ->, b, error


# ---- printing the IR -----------------------------------------------------------------------------
def test_print_after_and_before(small, capsys):
    code, out, err = cli(capsys, "inspect", small, "--print-after", "fold_batchnorm",
                         "fuse_conv_activation", "--print-before", "fold_batchnorm", "--no-ir")
    assert code == 0, err
    headers = [ln for ln in out.splitlines() if ln.startswith("// ----")]
    assert headers == ["// ---- IR before fold_batchnorm ----",
                       "// ---- IR after fold_batchnorm (folded 1 BatchNormalization into "
                       "Conv) ----",
                       "// ---- IR after fuse_conv_activation (fused 1 Conv+Relu) ----"]
    before = out.split("// ---- IR before fold_batchnorm ----\n")[1].split("// ----")[0]
    assert "= BatchNormalization(" in before
    # the dumps come before the table, which is still printed
    assert out.index("// ---- IR after") < out.index("\npipeline\n")

    code, out, err = cli(capsys, "inspect", small, "--print-after-all", "--json")
    assert code == 0
    assert json.loads(out)["passes"]          # stdout stays one JSON document
    assert err.count("// ---- IR after") == len(pipeline(2))

    code, out, err = cli(capsys, "inspect", small, "--print-after", "fold_batchnorm,fold_pad")
    assert code == 0 and out.count("// ---- IR after") == 2


# ---- errors --------------------------------------------------------------------------------------
def test_command_line_errors(small, capsys):
    code, _, err = cli(capsys, "inspect", small, "--disable", "no_such_pass")
    assert code == 1 and "unknown pass(es) 'no_such_pass'" in err and "fold_batchnorm" in err
    code, _, err = cli(capsys, "inspect", small, "--print-after", "fold_bn")
    assert code == 1 and "there is no pass 'fold_bn'" in err
    code, _, err = cli(capsys, "inspect", small, "--opt-level", "1", "--print-after",
                       "fold_batchnorm")
    assert code == 1 and "not in this pipeline" in err
    code, _, err = cli(capsys, "inspect")
    assert code == 2 and "MODEL is required" in err
    code, _, err = cli(capsys, "inspect", "--disable", "fold_pad", small)
    assert code == 2 and "read as a pass name" in err
    code, _, err = cli(capsys, "inspect", small, "--opt-level", "5")
    assert code == 2
    code, _, err = cli(capsys, "inspect", small.parent / "missing.onnx")
    assert code == 1 and err.startswith("error:")


def test_help_teaches_with_examples(capsys):
    code, out, _ = cli(capsys, "inspect", "--help")
    assert code == 0
    for flag in ("--print-after-all", "--check-numerics", "--html", "--json", "--dot",
                 "--disable", "--list-passes", "examples:"):
        assert flag in out
    assert "cnncompile inspect resnet18.onnx --html report.html" in out
    code, out, _ = cli(capsys, "--help")
    assert "inspect" in out


# ---- the SVG drawings ----------------------------------------------------------------------------
def test_spaced_fit_keeps_order_and_gaps():
    xs = _spaced_fit([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [10.0, 20.0])
    assert xs[1] - xs[0] >= 10 - 1e-9 and xs[2] - xs[1] >= 20 - 1e-9
    assert sum(xs) == pytest.approx(0.0)        # centred on the common target
    assert _spaced_fit([5.0, 100.0], [1.0, 1.0], [10.0]) == [5.0, 100.0]
    heavy = _spaced_fit([0.0, 0.0], [1000.0, 1.0], [10.0])
    assert heavy[0] == pytest.approx(0.0, abs=0.02) and heavy[1] >= 9.98


def test_layout_places_boxes_in_layers_without_overlap():
    # a diamond with a long skip edge: 0 -> 1 -> 2 -> 3, 0 -> 3, 1 -> 4 -> 3
    boxes = [Box("node", [f"Op{i}", "1×3"]) for i in range(5)]
    edges = [(0, 1), (1, 2), (2, 3), (0, 3), (1, 4), (4, 3)]
    order = [0, 1, 2, 4, 3]
    boxes = [boxes[i] for i in order]
    index = {old: new for new, old in enumerate(order)}
    lay = layout(boxes, [(index[a], index[b]) for a, b in edges])
    real = [b for b in lay.boxes if b.kind != "dummy"]
    assert [b.layer for b in real] == [0, 1, 2, 2, 3]
    assert len(lay.boxes) > 5        # the skip edge 0 -> 3 runs through dummies
    for a in lay.boxes:
        assert a.x - a.width / 2 >= 0 and a.x + a.width / 2 <= lay.width
        assert a.y >= 0 and a.y + a.height <= lay.height
        for b in lay.boxes:
            if a is not b and a.layer == b.layer:
                assert abs(a.x - b.x) >= (a.width + b.width) / 2
    for s, t in edges:
        assert real[index[s]].y + real[index[s]].height < real[index[t]].y


def test_graph_svg_of_a_region_uses_stubs_for_outside_values(resnet18_report):
    g = resnet18_report.graph
    svg = graph_svg(g, nodes=[3, 4], marks={4: "added"})
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    kinds = [(el.get("class") or "").split() for el in root.iter(ns + "g")]
    assert sum("stub" in k for k in kinds) >= 1 and sum("added" in k for k in kinds) == 1
    assert sum("node" in k and "stub" not in k for k in kinds) == 2


def test_memory_svg_draws_one_rectangle_per_tensor():
    intervals = [Interval("a", 4096, 0, 0, 1), Interval("b", 1024, 4096, 1, 2),
                 Interval("c", 4096, 0, 2, 3, "in place of a")]
    svg = memory_svg(intervals, arena_bytes=5120, steps=4, lower_bound=5120)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    rects = [r for r in root.iter(ns + "rect") if r.find(ns + "title") is not None]
    assert len(rects) == 3
    titles = [r.find(ns + "title").text for r in rects]
    assert titles[0].startswith("a: 4.00 KiB (4,096 bytes) at offset 0, live steps 0-1")
    assert "in place of a" in titles[2]
    text = "".join(t.text or "" for t in root.iter(ns + "text"))
    assert "arena 5.00 KiB" in text and "lower bound 5.00 KiB" in text


def test_summarize_plan_accepts_the_dict_form(resnet18_report):
    plan = resnet18_report.memory
    from_dict = summarize_plan(plan.to_dict())
    assert from_dict == resnet18_report.memory_summary
    assert summarize_plan(None) is None
