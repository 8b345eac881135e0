"""Concat elision and the memory plan: the checker on every zoo model, the plan executed out of
its arena against the reference and onnxruntime, hand-made graphs, and corrupted plans."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import cnncompile
from cnncompile import zoo
from cnncompile.backends.reference import ReferenceExecutor
from cnncompile.passes import PIPELINES
from cnncompile.passes.manager import random_inputs
from cnncompile.passes.memory import (ALIGNMENT, MemoryPlanError, check_memory_plan,
                                      greedy_by_size, run_in_arena)
from helpers import assert_matches, run_ort

SMALL = {"lenet5": (32, {}), "alexnet": (64, {"num_classes": 10}),
         "vgg11": (32, {"num_classes": 10}), "resnet18": (32, {}), "resnet50": (32, {}),
         "mobilenetv2": (32, {}), "squeezenet": (32, {}), "inception_block": (16, {}),
         "densenet_block": (16, {}), "unet": (32, {}), "yolo_head": (64, {"num_classes": 8})}
PIPELINE_CASES = {
    "O2": None,                                   # the default pipeline, plan_memory last
    "O0": ["plan_memory"],
    "O1": PIPELINES[1] + ["plan_memory"],
    "O0-elide": ["elide_concat", "plan_memory"],  # unfused graph, elision on, batch 2
}


@functools.lru_cache(maxsize=None)
def _zoo_model(name, batch=1):
    size, kw = SMALL[name]
    return zoo.build(name, batch=batch, image_size=size, **kw)


def _compile(model, passes=None, batch=None):
    mod = cnncompile.compile(model, input_shapes=zoo.input_shapes(model, batch), passes=passes,
                             verify_each=True)
    return mod.graph, mod


def _assert_runs_in_arena(graph, seed=0):
    """Executing out of the planned arena (NaN-filled) gives the reference's outputs."""
    inputs = random_inputs(graph, seed)
    expected = ReferenceExecutor(graph).run(inputs)
    for actual, want, value in zip(run_in_arena(graph, inputs), expected, graph.outputs):
        assert_matches(actual, want, what=f"output %{value.name} run in the arena")
    return inputs


def test_small_sizes_cover_the_zoo():
    assert sorted(SMALL) == sorted(zoo.MODELS)


@pytest.mark.parametrize("level", list(PIPELINE_CASES))
@pytest.mark.parametrize("name", list(SMALL))
def test_zoo_plan_is_sound_and_tight(name, level):
    graph, _ = _compile(_zoo_model(name, 2 if level == "O0-elide" else 1), PIPELINE_CASES[level])
    plan = graph.meta["memory_plan"]
    check_memory_plan(graph, plan)
    assert plan.arena_bytes % ALIGNMENT == 0
    assert plan.lower_bound_bytes <= plan.arena_bytes <= 1.1 * plan.lower_bound_bytes
    assert plan.lower_bound_bytes < plan.naive_bytes
    assert plan.steps == len(graph.nodes) and not plan.dynamic
    if level != "O1":  # O1's plans are O0's minus Identity/Dropout; spare the run
        _assert_runs_in_arena(graph, seed=len(name))


def test_elision_at_the_default_pipeline():
    """The concat-heavy zoo models elide at opt_level 2; the summary line says so."""
    want = {"squeezenet": (8, 0), "inception_block": (1, 0), "densenet_block": (0, 6),
            "unet": (0, 4)}
    for name, (full, partly) in want.items():
        graph, mod = _compile(_zoo_model(name))
        plan = graph.meta["memory_plan"]
        assert (plan.elided_concats, plan.partly_elided_concats) == (full, partly), name
        summary = {r.name: r.summary for r in mod.pass_records}["plan_memory"]
        assert re.fullmatch(r"arena [\d.]+ (B|KiB|MiB) \(lower bound [\d.]+ (B|KiB|MiB), naive "
                            r"[\d.]+ (B|KiB|MiB), \d+ in-place, \d+ concats elided(, \d+ "
                            r"partly)?\)", summary), summary
        assert mod.pass_records[-1].name == "plan_memory"


def test_plan_to_dict_is_json():
    graph, _ = _compile(_zoo_model("squeezenet"), ["elide_concat", "plan_memory"])
    doc = json.loads(json.dumps(graph.meta["memory_plan"].to_dict()))
    assert {"arena_bytes", "lower_bound_bytes", "naive_bytes", "tensors"} <= set(doc)
    tensor = next(t for t in doc["tensors"] if t["alias_of"])
    assert set(tensor) == {"name", "nbytes", "offset", "first", "last", "alias_of",
                           "in_place_of"}
    parent, axis, start, stop = tensor["alias_of"]
    assert axis == 1 and 0 <= start < stop and parent.endswith(".concat")


# ---- hand-made graphs ----------------------------------------------------------------------------
def _conv(rng, name, x, out, cin, k=1, relu=True):
    """A Conv (and Relu) node list and its weights."""
    nodes = [helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                              pads=[k // 2] * 4, kernel_shape=[k, k])]
    weights = {f"{name}.w": (rng.standard_normal((out, cin, k, k)) / np.sqrt(cin * k * k)
                             ).astype(np.float32),
               f"{name}.b": rng.standard_normal(out).astype(np.float32) * 0.1}
    if relu:
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu"))
    return nodes, weights


def _model(parts, inputs, outputs):
    from helpers import make_model
    nodes, weights = [], {}
    for n, w in parts:
        nodes += n
        weights.update(w)
    return make_model(nodes, inputs, outputs, weights)


def _compile_and_check_ort(model, feeds, passes):
    mod = cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()},
                             passes=passes, verify_each=True)
    graph = mod.graph
    check_memory_plan(graph, graph.meta["memory_plan"])
    ours = run_in_arena(graph, [feeds[v.name] for v in graph.inputs])
    for value, got, want in zip(graph.outputs, ours, run_ort(model, feeds)):
        assert_matches(got, want, what=f"output %{value.name} run in the arena vs onnxruntime")
    return graph, graph.meta["memory_plan"]


def _fire_model(rng, batch):
    parts = [_conv(rng, "squeeze", "x", 4, 8), _conv(rng, "e1", "squeeze.relu", 6, 4),
             _conv(rng, "e3", "squeeze.relu", 6, 4, k=3),
             ([helper.make_node("Concat", ["e1.relu", "e3.relu"], ["cat"], name="cat",
                                axis=1)], {}),
             _conv(rng, "head", "cat", 5, 12, relu=False)]
    return _model(parts, {"x": (np.float32, [batch, 8, 6, 6])}, ["head"])


@pytest.mark.parametrize("batch", [1, 2])
def test_fire_module_concat_is_elided(batch):
    """SqueezeNet's fire module: both expand branches write straight into their channel slice of
    the concat (strided when batch > 1), and the conv before each Relu writes there too."""
    rng = np.random.default_rng(batch)
    model = _fire_model(rng, batch)
    feeds = {"x": rng.standard_normal((batch, 8, 6, 6)).astype(np.float32)}
    graph, plan = _compile_and_check_ort(model, feeds, ["elide_concat", "plan_memory"])
    cat = next(n for n in graph.nodes if n.op == "Concat")
    assert cat.annotations["elided"] is True
    relu = {n.outputs[0].name: n for n in graph.nodes if n.op == "Relu"}
    assert relu["e1.relu"].annotations["_slices"] == {"e1.relu": [1, 0, 6]}
    assert relu["e3.relu"].annotations["_slices"] == {"e3.relu": [1, 6, 12]}
    t = {a.name: a for a in plan.tensors}
    assert t["e1.relu"].alias_of == ("cat", 1, 0, 6)
    assert t["e3.relu"].alias_of == ("cat", 1, 6, 12)
    assert t["e1.relu"].in_place_of == "e1" and t["e3.relu"].in_place_of == "e3"
    assert t["e1"].offset == t["cat"].offset
    assert t["e3"].offset == t["cat"].offset + 6 * 6 * 6 * 4  # channel 6 of image 0
    assert t["cat"].offset % ALIGNMENT == 0
    assert plan.elided_concats == 1 and "elided=True" in str(graph)


def test_densenet_block_concats_are_views_of_one_buffer():
    """DenseNet (torchvision form, after a stem conv): every layer's Concat of all earlier
    features is a prefix of the block's last Concat, so each feature map is written once, in
    place, and no Concat copies anything."""
    rng = np.random.default_rng(7)
    parts = [_conv(rng, "stem", "x", 8, 3, relu=False)]
    features = ["stem"]
    for i in range(1, 4):
        parts.append(([helper.make_node("Concat", list(features), [f"cat{i}"], name=f"cat{i}",
                                        axis=1)], {}))
        parts.append(([helper.make_node("Relu", [f"cat{i}"], [f"act{i}"], name=f"act{i}")], {}))
        parts.append(_conv(rng, f"f{i}", f"act{i}", 4, 8 + 4 * (i - 1), k=3, relu=False))
        features.append(f"f{i}")
    parts.append(([helper.make_node("Concat", features, ["block"], name="block", axis=1)], {}))
    parts.append(_conv(rng, "transition", "block", 6, 20))
    model = _model(parts, {"x": (np.float32, [2, 3, 5, 5])}, ["transition.relu"])
    feeds = {"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)}
    graph, plan = _compile_and_check_ort(model, feeds, ["elide_concat", "plan_memory"])
    concats = [n for n in graph.nodes if n.op == "Concat"]
    assert len(concats) == 4 and all(n.annotations.get("elided") for n in concats)
    t = {a.name: a for a in plan.tensors}
    assert t["cat1"].alias_of == ("block", 1, 0, 8)
    assert t["cat3"].alias_of == ("block", 1, 0, 16)
    assert t["stem"].alias_of == ("block", 1, 0, 8)
    assert t["f3"].alias_of == ("block", 1, 16, 20)
    # a view of the shared buffer must not be overwritten in place: later layers still read it
    assert t["act1"].in_place_of is None and t["act1"].offset != t["block"].offset
    # the whole block lives in one buffer from the stem conv to the transition conv
    assert t["block"].offset == t["stem"].offset == t["cat2"].offset


def test_zoo_densenet_copies_only_the_graph_input():
    """The zoo block concatenates the graph input itself, which no node produces: each Concat
    copies just that input and finds the features in place."""
    graph, _ = _compile(zoo.build("densenet_block", image_size=16, layers=3),
                        ["elide_concat", "plan_memory"])
    concats = [n for n in graph.nodes if n.op == "Concat"]
    assert [n.annotations.get("elided_inputs") for n in concats] == [[1], [1, 2], [1, 2, 3]]
    assert all(n.annotations["_reason"] == "copies %input (a graph input)" for n in concats)
    _assert_runs_in_arena(graph)


def test_nested_and_output_concats():
    """An elided Concat feeding another is a slice of the outer one; a Concat that is a graph
    output receives its producers' results directly (caller-owned, outside the arena)."""
    rng = np.random.default_rng(3)
    parts = [_conv(rng, "a", "x", 2, 3), _conv(rng, "b", "x", 3, 3), _conv(rng, "c", "x", 4, 3),
             ([helper.make_node("Concat", ["a.relu", "b.relu"], ["inner"], name="inner",
                                axis=1),
               helper.make_node("Concat", ["inner", "c.relu"], ["outer"], name="outer",
                                axis=1)], {})]
    model = _model(parts, {"x": (np.float32, [2, 3, 4, 4])}, ["outer"])
    feeds = {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}
    graph, plan = _compile_and_check_ort(model, feeds, ["elide_concat", "plan_memory"])
    assert all(n.annotations.get("elided") for n in graph.nodes if n.op == "Concat")
    t = {a.name: a for a in plan.tensors}
    assert t["inner"].alias_of == ("outer", 1, 0, 5) and t["inner"].offset is None
    assert t["b.relu"].alias_of == ("inner", 1, 2, 5) and t["b.relu"].offset is None
    assert t["c.relu"].alias_of == ("outer", 1, 5, 9)
    assert plan.arena_bytes == 0 and "outer" not in t


def test_concat_inputs_that_cannot_be_written_in_place():
    """A graph input, a value read twice by the Concat, and a value also read by another node
    are copied; the rest are still written in place."""
    rng = np.random.default_rng(4)
    parts = [_conv(rng, "a", "x", 2, 3), _conv(rng, "b", "x", 2, 3), _conv(rng, "c", "x", 2, 3),
             ([helper.make_node("Concat", ["x", "a.relu", "a.relu", "b.relu", "c.relu"],
                                ["cat"], name="cat", axis=1),
               helper.make_node("Relu", ["cat"], ["y"], name="y"),
               helper.make_node("Sigmoid", ["b.relu"], ["z"], name="z")], {})]
    model = _model(parts, {"x": (np.float32, [1, 3, 4, 4])}, ["y", "z"])
    feeds = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    graph, plan = _compile_and_check_ort(model, feeds, ["elide_concat", "plan_memory"])
    cat = next(n for n in graph.nodes if n.op == "Concat")
    assert cat.annotations["elided_inputs"] == [4]
    reason = cat.annotations["_reason"]
    assert "%x (a graph input)" in reason and "%b.relu (read by other nodes)" in reason
    assert reason.count("%a.relu (at different positions in the concats that read it)") == 1
    assert plan.tensor("c.relu").alias_of == ("cat", 1, 9, 11)


def test_in_place_reuse_for_elementwise_ops():
    rng = np.random.default_rng(5)
    scale = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    parts = [_conv(rng, "a", "x", 4, 3, relu=False), _conv(rng, "e", "x", 4, 3, relu=False),
             ([helper.make_node("Relu", ["a"], ["b"], name="b"),          # a dies: in place
               helper.make_node("Mul", ["b", "scale"], ["c"], name="c"),  # broadcast constant
               helper.make_node("Add", ["c", "e"], ["d"], name="d"),      # both die: takes c
               helper.make_node("Relu", ["d"], ["h"], name="h"),          # d read again below
               helper.make_node("Add", ["h", "d"], ["k"], name="k"),
               helper.make_node("Sigmoid", ["k"], ["y"], name="y"),       # graph output
               helper.make_node("Relu", ["x"], ["r"], name="r"),          # graph input
               helper.make_node("Sigmoid", ["r"], ["z"], name="z")], {"scale": scale})]
    model = _model(parts, {"x": (np.float32, [1, 3, 5, 5])}, ["y", "z"])
    feeds = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    graph, plan = _compile_and_check_ort(model, feeds, ["plan_memory"])
    in_place = {t.name: t.in_place_of for t in plan.tensors}
    assert in_place == {"a": None, "e": None, "b": "a", "c": "b", "d": "c", "h": None,
                        "k": "h", "r": None}
    assert plan.in_place_count == 4
    d = plan.tensor("d")
    bad = dataclasses.replace(plan, tensors=[
        dataclasses.replace(t, in_place_of="d", offset=d.offset) if t.name == "h" else t
        for t in plan.tensors])
    with pytest.raises(MemoryPlanError, match=r"%h \(steps 5..6\) takes the buffer of %d, "
                                              r"which lives on until step 6"):
        check_memory_plan(graph, bad)


def test_greedy_by_size_beats_naive_on_a_chain():
    """A chain of convolutions of alternating width: two buffers suffice at every step."""
    rng = np.random.default_rng(6)
    parts, x, cin = [], "x", 3
    for i, width in enumerate([8, 16, 8, 16, 8]):
        parts.append(_conv(rng, f"conv{i}", x, width, cin, k=3, relu=False))
        x, cin = f"conv{i}", width
    parts.append(([helper.make_node("GlobalAveragePool", [x], ["y"], name="pool")], {}))
    model = _model(parts, {"x": (np.float32, [1, 3, 8, 8])}, ["y"])
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    _, plan = _compile_and_check_ort(model, feeds, ["plan_memory"])
    widest_pair = (8 + 16) * 8 * 8 * 4
    assert plan.arena_bytes == plan.lower_bound_bytes == widest_pair
    assert plan.naive_bytes == (8 * 3 + 16 * 2) * 8 * 8 * 4


def test_greedy_by_size_known_layout():
    # largest first: the two 100-byte buffers share offset 0, the 50-byte one goes above them
    assert greedy_by_size([(100, 0, 1), (50, 1, 2), (100, 2, 3)]) == [0, 128, 0]
    # best fit: at step 2 the holes are [512, 704) and [832, 896); the last buffer takes the
    # 64-byte one, where first fit would have taken the lower, 192-byte one
    buffers = [(512, 0, 3), (192, 0, 0), (128, 0, 3), (64, 0, 0), (64, 0, 3), (64, 2, 2)]
    assert greedy_by_size(buffers) == [0, 512, 704, 832, 896, 832]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 12), st.integers(0, 6)),
                min_size=1, max_size=25))
def test_greedy_by_size_never_overlaps_live_buffers(spec):
    buffers = [(n, first, first + length) for n, first, length in spec]
    offsets = greedy_by_size(buffers)
    assert all(o % ALIGNMENT == 0 for o in offsets)
    for i, (n, f, last) in enumerate(buffers):
        for j in range(i):
            m, g, last2 = buffers[j]
            if f <= last2 and g <= last and n and m:
                assert offsets[i] + n <= offsets[j] or offsets[j] + m <= offsets[i]


def test_dynamic_shapes_are_left_out_of_the_arena():
    nodes = [helper.make_node("Relu", ["boxes"], ["b"], name="relu"),
             helper.make_node("NonMaxSuppression", ["b", "scores", "max", "iou"], ["sel"],
                              name="nms"),
             helper.make_node("Cast", ["sel"], ["self"], name="cast", to=1),
             helper.make_node("Neg", ["self"], ["y"], name="neg")]
    from helpers import make_model
    model = make_model(nodes, {"boxes": (np.float32, [1, 6, 4]),
                               "scores": (np.float32, [1, 2, 6])}, ["y"],
                       {"max": np.array([3], np.int64), "iou": np.array([0.5], np.float32)})
    mod = cnncompile.compile(model, passes=["plan_memory"])
    plan = mod.graph.meta["memory_plan"]
    assert plan.dynamic == ["sel", "self"] and [t.name for t in plan.tensors] == ["b"]
    assert "2 dynamic-shape values" in plan.summary()
    rng = np.random.default_rng(0)
    feeds = [rng.random((1, 6, 4), dtype=np.float32), rng.random((1, 2, 6), dtype=np.float32)]
    assert_matches(run_in_arena(mod.graph, feeds)[0], ReferenceExecutor(mod.graph).run(feeds)[0])


def test_plan_memory_rechecks_stale_elision():
    """If a pass between elide_concat and plan_memory gives a slice producer another reader, the
    planner drops that slice instead of trusting the annotation."""
    from cnncompile.ir import Node
    from cnncompile.passes import PassManager
    graph = cnncompile.import_onnx(_fire_model(np.random.default_rng(0), 1))
    graph = PassManager(["elide_concat"]).run(graph)
    e1 = graph.value("e1.relu")
    extra = graph.new_value("extra", e1.type)
    graph.add_node(Node("Sigmoid", [e1], [extra], name="extra"))
    graph.outputs.append(extra)
    graph = PassManager(["plan_memory"]).run(graph)
    cat = next(n for n in graph.nodes if n.op == "Concat")
    assert "elided" not in cat.annotations and cat.annotations["elided_inputs"] == [1]
    plan = graph.meta["memory_plan"]
    assert plan.tensor("e1.relu").alias_of is None
    assert "_slices" not in graph.value("e1.relu").producer.annotations
    _assert_runs_in_arena(graph)


# ---- the checker rejects broken plans ------------------------------------------------------------
def _residual_graph():
    """a = conv(x); b = conv(a); y = conv(a + b): a is live while b is written."""
    rng = np.random.default_rng(8)
    parts = [_conv(rng, "a", "x", 4, 3, relu=False), _conv(rng, "b", "a", 4, 4, relu=False),
             ([helper.make_node("Add", ["a", "b"], ["s"], name="s")], {}),
             _conv(rng, "y", "s", 2, 4, relu=False)]
    model = _model(parts, {"x": (np.float32, [1, 3, 4, 4])}, ["y"])
    graph = cnncompile.compile(model, passes=["plan_memory"]).graph
    return graph, graph.meta["memory_plan"]


def _with(plan, name, **changes):
    tensors = [dataclasses.replace(t, **changes) if t.name == name else t for t in plan.tensors]
    return dataclasses.replace(plan, tensors=tensors)


def test_checker_rejects_overlapping_live_tensors():
    graph, plan = _residual_graph()
    check_memory_plan(graph, plan)
    a, b = plan.tensor("a"), plan.tensor("b")
    assert a.offset != b.offset
    bad = _with(plan, "b", offset=a.offset)
    with pytest.raises(MemoryPlanError) as info:
        check_memory_plan(graph, bad)
    msg = str(info.value)
    assert "%a (steps 0..2, bytes [0, 256))" in msg and "%b (steps 1..2, bytes [0, 256))" in msg
    assert "live at the same time" in msg
    # and the plan really is wrong: run out of it, conv b overwrites a before a + b
    inputs = random_inputs(graph, 0)
    expected = ReferenceExecutor(graph).run(inputs)[0]
    with pytest.raises(AssertionError):
        assert_matches(run_in_arena(graph, inputs, bad)[0], expected)


@pytest.mark.parametrize("corrupt,message", [
    (lambda p: _with(p, "b", offset=p.tensor("b").offset + 4), "not a multiple of 64"),
    (lambda p: dataclasses.replace(p, arena_bytes=256, lower_bound_bytes=256), "outside the arena"),
    (lambda p: dataclasses.replace(p, arena_bytes=256), "below the lower bound"),
    (lambda p: dataclasses.replace(p, tensors=p.tensors[1:]), r"%a: f32\[1,4,4,4\] has no alloc"),
    (lambda p: _with(p, "s", last=5), "the graph says 256 bytes at steps 2..3"),
    (lambda p: _with(p, "b", in_place_of="a", offset=p.tensor("a").offset),
     "Conv 'b' is not an elementwise node reading it"),
    (lambda p: _with(p, "b", in_place_of="s"), "takes the buffer of %s, but its producer"),
    (lambda p: _with(p, "b", alias_of=("s", 1, 2, 6)), "no slice 2:6 along axis 1 of %s"),
    (lambda p: _with(p, "b", alias_of=("nothing", 1, 0, 4)), "no planned tensor"),
])
def test_checker_rejects_corrupted_plans(corrupt, message):
    graph, plan = _residual_graph()
    with pytest.raises(MemoryPlanError, match=message):
        check_memory_plan(graph, corrupt(plan))


def test_checker_rejects_an_elided_concat_whose_inputs_are_elsewhere():
    graph, _ = _compile(_zoo_model("unet"), ["elide_concat", "plan_memory"])
    cat = next(n for n in graph.nodes if n.op == "Concat")
    cat.annotations["elided"] = True   # but the skip connection is copied, not in place
    with pytest.raises(MemoryPlanError, match=r"does not copy input 0 %down4"):
        check_memory_plan(graph, graph.meta["memory_plan"])
