"""The pass manager: registry, pipelines, instrumentation (timing, verify, printing, numerics)."""

import io

import numpy as np
import pytest
from onnx import helper

import cnncompile
from cnncompile.errors import InternalError, UserError
from cnncompile.ir.graph import Graph, Node
from cnncompile.passes import (PASSES, PIPELINES, PassError, PassManager, list_passes, note,
                               pipeline, register_pass, run_pipeline)
from cnncompile.passes.manager import NumericsChecker, random_inputs, relative_l2
from helpers import make_model


@pytest.fixture
def temp_pass():
    """Register passes for one test and remove them afterwards, so the registry stays clean."""
    added = []

    def add(name, fn, description="a pass registered by a test"):
        register_pass(name, description)(fn)
        added.append(name)
        return fn

    yield add
    for name in added:
        PASSES.pop(name, None)


def conv_bn_relu_model():
    """x -> Conv -> BatchNormalization -> Identity -> Relu -> y, with a dead Abs branch."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "scale": rng.uniform(0.5, 1.5, 4).astype(np.float32),
             "bias": rng.standard_normal(4).astype(np.float32),
             "mean": rng.standard_normal(4).astype(np.float32),
             "var": rng.uniform(0.5, 1.5, 4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"],
                              name="bn"),
             helper.make_node("Identity", ["b"], ["i"], name="ident"),
             helper.make_node("Relu", ["i"], ["y"], name="relu"),
             helper.make_node("Abs", ["x"], ["dead"], name="dead")]
    return make_model(nodes, {"x": (np.float32, [1, 3, 8, 8])}, ["y"], inits)


@pytest.fixture
def graph():
    return cnncompile.import_onnx(conv_bn_relu_model())


def run(graph, **options):
    manager = PassManager(**options)
    return manager.run(graph), manager


def drop_first_node(g: Graph) -> Graph:
    g.nodes.pop(0)       # its output is still read: invalid IR
    return g


def scale_first_weight(g: Graph) -> Graph:
    """Change what the graph computes: multiply the first conv's weights by 1.5."""
    conv = next(n for n in g.nodes if n.op in ("Conv", "FusedConv"))
    weight = conv.inputs[1]
    conv.inputs[1] = g.add_constant(weight.name + ".scaled", weight.data * np.float32(1.5))
    note("scaled a weight")
    return g


# ---- registry and pipelines ----------------------------------------------------------------------
def test_register_pass_adds_to_registry_and_list(temp_pass):
    def my_pass(g):
        return g

    temp_pass("zz_test_noop", my_pass, "does nothing, for the test")
    assert PASSES["zz_test_noop"].fn is my_pass
    assert PASSES["zz_test_noop"].description == "does nothing, for the test"
    assert my_pass.pass_name == "zz_test_noop"
    names = [info.name for info in list_passes()]
    assert names == sorted(names) and "zz_test_noop" in names
    with pytest.raises(RuntimeError, match="zz_test_noop registered twice"):
        register_pass("zz_test_noop", "again")(lambda g: g)


def test_every_registered_pass_has_a_one_line_description():
    for info in list_passes():
        assert info.description.strip(), info.name
        assert "\n" not in info.description, info.name
        assert info.fn.pass_name == info.name


def test_pipelines_per_opt_level():
    assert pipeline(0) == []
    levels = [pipeline(level) for level in sorted(PIPELINES)]
    for lower, higher in zip(levels, levels[1:]):
        assert higher[:len(lower)] == lower      # each level extends the one below
    assert all(name in PASSES for names in levels for name in names)
    # the pipelines keep PIPELINES' order and drop what is not registered
    for level in PIPELINES:
        assert pipeline(level) == [n for n in PIPELINES[level] if n in PASSES]
    assert "eliminate_dead_code" in pipeline(1)
    assert {"fold_batchnorm", "fuse_conv_activation"} <= set(pipeline(2)) - set(pipeline(1))
    with pytest.raises(UserError, match="opt_level must be one of"):
        pipeline(7)


def test_disabled_passes_are_left_out(graph):
    assert "fold_batchnorm" in pipeline(2)
    assert "fold_batchnorm" not in pipeline(2, disabled=["fold_batchnorm"])
    out, manager = run(graph, opt_level=2, disabled=["fold_batchnorm"])
    assert "fold_batchnorm" not in [r.name for r in manager.records]
    assert "BatchNormalization" in out.op_counts()
    out, _ = run(graph, opt_level=2)
    assert "BatchNormalization" not in out.op_counts()
    mod = cnncompile.compile(conv_bn_relu_model(), disabled_passes=["fold_batchnorm"])
    assert "BatchNormalization" in mod.graph.op_counts()


def test_unknown_pass_names_are_user_errors(graph):
    with pytest.raises(UserError, match=r"unknown pass\(es\) 'no_such_pass'.*fold_batchnorm"):
        pipeline(2, disabled=["no_such_pass"])
    with pytest.raises(UserError, match="'no_such_pass'"):
        PassManager(passes=["eliminate_dead_code", "no_such_pass"])
    with pytest.raises(UserError, match="'nope'"):
        cnncompile.compile(conv_bn_relu_model(), passes=["nope"])


def test_custom_pipeline_runs_exactly_the_given_passes(graph):
    out, manager = run(graph, passes=["eliminate_dead_code", "remove_identity",
                                      "eliminate_dead_code"])
    assert [r.name for r in manager.records] == ["eliminate_dead_code", "remove_identity",
                                                 "eliminate_dead_code"]
    assert out.op_counts() == {"BatchNormalization": 1, "Conv": 1, "Relu": 1}


# ---- instrumentation -----------------------------------------------------------------------------
def test_records_time_counts_and_summaries(graph):
    out, manager = run(graph, opt_level=2)
    records = manager.records
    assert [r.name for r in records] == pipeline(2)
    assert all(r.seconds >= 0 for r in records) and sum(r.seconds for r in records) > 0
    assert records[0].nodes_before == len(graph.nodes) == 5
    for a, b in zip(records, records[1:]):
        assert a.nodes_after == b.nodes_before
    assert records[-1].nodes_after == len(out.nodes)
    assert records[-1].op_counts_after == out.op_counts()
    by_name = {r.name: r for r in records}
    assert "1 BatchNormalization" in by_name["fold_batchnorm"].summary
    assert by_name["fold_batchnorm"].changed
    dce = next(r for r in records if r.name == "eliminate_dead_code")
    assert dce.summary == "removed 1 dead node" and dce.nodes_after == dce.nodes_before - 1
    d = records[0].to_dict()
    assert set(d) == {"name", "seconds", "summary", "nodes_before", "nodes_after",
                      "op_counts_after", "max_rel_error"}
    assert d["max_rel_error"] is None   # numerics not checked


def test_the_callers_graph_is_not_mutated(graph):
    before = str(graph)
    run(graph, opt_level=2)
    assert str(graph) == before


def test_notes_join_into_the_summary_and_do_nothing_outside_a_pass(graph, temp_pass):
    def chatty(g):
        note("first thing")
        note("second thing")
        return g

    temp_pass("zz_test_chatty", chatty)
    note("outside any pass")    # no error, goes nowhere
    _, manager = run(graph, passes=["zz_test_chatty"])
    assert manager.records[0].summary == "first thing; second thing"


def test_verify_catches_a_pass_that_breaks_the_ir(graph, temp_pass):
    temp_pass("zz_test_breaker", drop_first_node)
    with pytest.raises(PassError) as info:
        run(graph, passes=["remove_identity", "eliminate_dead_code", "zz_test_breaker"],
            verify=True)
    message = str(info.value)
    assert "pass 'zz_test_breaker' left invalid IR" in message
    assert "passes run before it: remove_identity, eliminate_dead_code" in message
    assert isinstance(info.value, InternalError)
    # run_pipeline verifies the final graph even without verify_each
    with pytest.raises(InternalError):
        run_pipeline(graph, passes=["zz_test_breaker"])


def test_a_crashing_pass_is_named_with_the_passes_before_it(graph, temp_pass):
    def crash(g):
        raise ValueError("boom")

    temp_pass("zz_test_crash", crash)
    with pytest.raises(PassError, match=r"pass 'zz_test_crash' failed: ValueError\('boom'\)"
                       r"\n  passes run before it: remove_identity"):
        run(graph, passes=["remove_identity", "zz_test_crash"])


def test_a_user_error_from_a_pass_is_passed_through(graph, temp_pass):
    def refuse(g):
        raise UserError("this model cannot be optimized")

    temp_pass("zz_test_refuse", refuse)
    with pytest.raises(UserError, match="cannot be optimized") as info:
        run(graph, passes=["zz_test_refuse"])
    assert not isinstance(info.value, PassError)


def test_a_pass_returning_a_non_graph_is_a_pass_error(graph, temp_pass):
    temp_pass("zz_test_forgets_return", lambda g: None)
    with pytest.raises(PassError, match="pass 'zz_test_forgets_return' returned NoneType, "
                                        "not a Graph"):
        run(graph, passes=["zz_test_forgets_return"])


def test_print_before_and_after(graph):
    stream = io.StringIO()
    run(graph, opt_level=2, print_before=["fold_batchnorm"], print_after=["fold_batchnorm"],
        stream=stream)
    text = stream.getvalue()
    before, _, after = text.partition("// ---- IR after fold_batchnorm")
    assert before.startswith("// ---- IR before fold_batchnorm ----\n")
    assert "= BatchNormalization(" in before
    assert after.startswith(" (folded 1 BatchNormalization into Conv) ----\n")
    assert "BatchNormalization(" not in after and "= Conv(" in after
    assert text.count("// ----") == 2

    stream = io.StringIO()
    run(graph, opt_level=1, print_after=["all"], stream=stream)
    headers = [line for line in stream.getvalue().splitlines() if line.startswith("// ----")]
    assert [h.split()[4] for h in headers] == pipeline(1)
    assert headers[0].startswith("// ---- IR after remove_identity (") and "Identity" in headers[0]
    assert "(no change)" in headers[1]


def test_keep_graphs_keeps_copies_before_and_after(graph):
    _, manager = run(graph, opt_level=2, keep_graphs=True)
    record = next(r for r in manager.records if r.name == "fold_batchnorm")
    assert "BatchNormalization" in record.graph_before.op_counts()
    assert "BatchNormalization" not in record.graph_after.op_counts()
    assert record.graph_after is not record.graph_before
    _, manager = run(graph, opt_level=2)
    assert all(r.graph_before is None and r.graph_after is None for r in manager.records)


def test_numerics_check_names_the_first_bad_pass(graph, temp_pass):
    temp_pass("zz_test_scale_weight", scale_first_weight)
    passes = ["remove_identity", "fold_batchnorm", "zz_test_scale_weight", "eliminate_dead_code"]
    _, manager = run(graph, passes=passes, check_numerics=True)
    errors = {r.name: r.max_rel_error for r in manager.records}
    assert errors["remove_identity"] == 0.0
    assert errors["fold_batchnorm"] <= 1e-5
    assert errors["zz_test_scale_weight"] > 0.1
    assert errors["eliminate_dead_code"] > 0.1     # the damage persists
    assert manager.first_bad_pass == "zz_test_scale_weight"

    _, manager = run(graph, opt_level=2, check_numerics=True)
    assert manager.first_bad_pass is None
    assert all(r.max_rel_error <= 1e-5 for r in manager.records)
    # a looser tolerance lets the same perturbation through
    _, manager = run(graph, passes=passes, check_numerics=True, tolerance=10.0)
    assert manager.first_bad_pass is None


def test_numerics_helpers():
    graph = cnncompile.import_onnx(conv_bn_relu_model())
    a, b = random_inputs(graph, seed=3), random_inputs(graph, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (1, 3, 8, 8) and a[0].dtype == np.float32
    checker = NumericsChecker(graph, seed=3)
    assert checker.error(graph) == 0.0
    x = np.ones(4, np.float32)
    assert relative_l2(x * 1.1, x) == pytest.approx(0.1, rel=1e-5)
    assert relative_l2(np.ones(3), x) == float("inf")
    assert relative_l2(np.array([1.0, np.inf]), np.array([1.0, 2.0])) == float("inf")


def test_compile_records_pass_records_and_verifies_each(temp_pass):
    temp_pass("zz_test_breaker", drop_first_node)
    mod = cnncompile.compile(conv_bn_relu_model())
    assert [r.name for r in mod.pass_records] == pipeline(2)
    with pytest.raises(PassError, match="zz_test_breaker"):
        cnncompile.compile(conv_bn_relu_model(), passes=["zz_test_breaker"], verify_each=True)


def test_node_created_by_a_pass_keeps_origins(graph):
    out, _ = run(graph, opt_level=2)
    fused = [n for n in out.nodes if n.created_by]
    assert fused, out
    conv = next(n for n in out.nodes if "conv" in n.origins)
    assert {"conv", "bn"} <= set(conv.origins)
    assert isinstance(conv, Node) and conv.created_by in PASSES
