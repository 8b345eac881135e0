"""choose_layout (channels-last storage with exact semantics) and Transpose cancellation."""

import numpy as np
import pytest
from onnx import helper

import cnncompile
from cnncompile import zoo
from cnncompile.backends.reference import ReferenceExecutor
from cnncompile.errors import InternalError, UserError
from cnncompile.passes import PassManager, run_pipeline
from cnncompile.passes.layout import (cancel_transposes, check_layout, is_view, storage_orders,
                                      to_last)
from cnncompile.passes.manager import random_inputs
from helpers import assert_matches, make_model

NHWC = (0, 2, 3, 1)


def _import(model, layout="NHWC", **kw):
    graph = cnncompile.import_onnx(model, **kw)
    graph.meta["layout"] = layout
    return graph


def _zoo_graph(name, size, layout="NHWC"):
    # small classifiers: the 1000-class fully connected layers only cost time here
    kw = {"num_classes": 10} if name in ("alexnet", "vgg11") else {}
    model = zoo.build(name, image_size=size, **kw)
    return _import(model, layout, input_shapes=zoo.input_shapes(model))


def _run(passes, graph):
    manager = PassManager(passes=passes, verify=True)
    return manager.run(graph), manager.records[0].summary


def _assert_same_outputs(before, after, seed=0):
    inputs = random_inputs(before, seed)
    for a, e in zip(ReferenceExecutor(after).run(inputs), ReferenceExecutor(before).run(inputs)):
        assert_matches(a, e, tol=1e-7)


def _transposes(graph):
    return [n for n in graph.nodes if n.op == "Transpose"]


def _perms(graph):
    return [(tuple(n.attrs["perm"]), is_view(n)) for n in _transposes(graph)]


# ---- choose_layout -------------------------------------------------------------------------------
def test_nchw_does_nothing():
    graph = _zoo_graph("resnet18", 32, layout="NCHW")
    after, summary = _run(["choose_layout"], graph)
    assert summary == ""
    assert str(after) == str(graph)


def test_unknown_layout_is_refused():
    graph = _zoo_graph("lenet5", 32, layout="NCHW16c")
    with pytest.raises(UserError, match="NCHW16c"):
        _run(["choose_layout"], graph)


def test_resnet18_nhwc_converts_only_at_the_input():
    graph = _zoo_graph("resnet18", 64)
    after, summary = _run(["choose_layout"], graph)
    _assert_same_outputs(graph, after)
    check_layout(after)
    # one boundary: the image is copied channels-last, then viewed as NCHW; GlobalAveragePool's
    # 1x1 output is stored the same both ways, so Flatten -> Gemm needs no conversion
    assert _perms(after) == [(NHWC, False), ((0, 3, 1, 2), True)]
    first, second = after.nodes[:2]
    assert first.inputs[0] is after.inputs[0] and second.inputs[0] is first.outputs[0]
    assert all(n.created_by == "choose_layout" for n in (first, second))
    assert "boundaries: 1 in, 0 out" in summary and "20 weights packed" in summary
    for node in after.nodes:
        if node.op in ("Conv", "BatchNormalization", "Relu", "Add", "MaxPool",
                       "GlobalAveragePool"):
            assert node.annotations["layout"] == "NHWC", node
        elif node.op in ("Flatten", "Gemm"):
            assert "layout" not in node.annotations
    orders = storage_orders(after)
    assert orders["conv1"] == NHWC and orders["input"] == (0, 1, 2, 3)
    assert "layout='NHWC'" in str(after) and "view=True" in str(after)


def test_packed_weights_are_channels_last_copies_that_survive_dead_code_removal():
    graph = _zoo_graph("resnet18", 32)
    after, _ = _run(["choose_layout"], graph)
    convs = [n for n in after.nodes if n.op == "Conv"]
    for node in convs:
        packed = after.constants[node.annotations["_packed_weight"]]
        assert node.annotations["_packed_weight_layout"] == "OHWI"
        np.testing.assert_array_equal(packed.data, node.inputs[1].data.transpose(NHWC))
        assert packed.data.flags.c_contiguous
    after.remove_unused()
    assert all(n.annotations["_packed_weight"] in after.constants for n in convs)


def test_resnet18_full_pipeline_nhwc():
    model = zoo.build("resnet18", image_size=32)
    graph = cnncompile.import_onnx(model, input_shapes=zoo.input_shapes(model))
    optimized, manager = run_pipeline(graph, opt_level=2, verify_each=True, check_numerics=True,
                                      meta={"layout": "NHWC"})
    record = next(r for r in manager.records if r.name == "choose_layout")
    assert record.max_rel_error <= 1e-5
    assert len(_transposes(optimized)) == 2
    check_layout(optimized)
    convs = [n for n in optimized.nodes if n.op in ("Conv", "FusedConv")]
    assert len(convs) == 20
    for node in convs:
        assert node.annotations["layout"] == "NHWC"
        assert node.annotations["algorithm"]
        assert node.annotations["_packed_weight"] in optimized.constants
    assert all(n.annotations.get("layout") == "NHWC" for n in optimized.nodes
               if n.op == "FusedConv" and n.attrs["residual"])


ZOO = [("lenet5", 32), ("alexnet", 64), ("vgg11", 32), ("resnet50", 32), ("mobilenetv2", 32),
       ("squeezenet", 64), ("inception_block", 16), ("densenet_block", 16), ("unet", 32),
       ("yolo_head", 32)]


@pytest.mark.parametrize("name,size", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_nhwc_is_exact_and_converts_only_at_boundaries(name, size):
    graph = _zoo_graph(name, size)
    model_transposes = len(_transposes(graph))
    after, _ = _run(["choose_layout"], graph)
    _assert_same_outputs(graph, after, seed=len(name))
    check_layout(after)
    ours = [n for n in after.nodes if n.created_by == "choose_layout" and n.op == "Transpose"]
    assert len(_transposes(after)) == model_transposes + len(ours)
    users = after.users()
    outputs = {id(v) for v in after.outputs}
    for node in ours:
        if is_view(node):
            continue
        out = node.outputs[0]
        if tuple(node.attrs["perm"]) == NHWC:
            # into the region: the copy reads a tensor no channels-last op produced
            producer = node.inputs[0].producer
            assert producer is None or "layout" not in producer.annotations
            assert [is_view(u) for u in users[id(out)]] == [True]
        else:
            # out of it: the copy feeds ops without a channels-last form, or a graph output
            readers = users.get(id(out), [])
            assert id(out) in outputs or readers
            assert all("layout" not in u.annotations for u in readers)
    # every spatial op runs channels-last
    assert all(n.annotations.get("layout") for n in after.nodes
               if n.op in ("Conv", "ConvTranspose", "MaxPool", "BatchNormalization"))


def test_choose_layout_is_idempotent():
    graph = _zoo_graph("densenet_block", 16)
    once, _ = _run(["choose_layout"], graph)
    text = str(once)
    twice, summary = _run(["choose_layout"], once)
    assert summary == "" and str(twice) == text


def _small_model(nodes, x_shape, initializers, outputs=("y",)):
    return make_model(nodes, {"x": (np.float32, x_shape)}, list(outputs), initializers)


def test_flatten_with_spatial_extent_gets_an_exit_boundary():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((6 * 4 * 4, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = _import(_small_model(nodes, (2, 3, 4, 4), {"w": w, "fc": fc}))
    after, summary = _run(["choose_layout"], graph)
    _assert_same_outputs(graph, after)
    assert _perms(after) == [(NHWC, False), ((0, 3, 1, 2), True),
                             (NHWC, True), ((0, 3, 1, 2), False)]
    assert "boundaries: 1 in, 1 out" in summary
    flatten = next(n for n in after.nodes if n.op == "Flatten")
    assert flatten.inputs[0].name == "r"          # the NCHW copy keeps the original name
    assert flatten.inputs[0].producer.op == "Transpose"


def test_graph_output_keeps_its_name_and_contiguous_storage():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["y"], ["z"])]
    graph = _import(_small_model(nodes, (1, 3, 5, 5), {"w": w}, outputs=("y", "z")))
    after, _ = _run(["choose_layout"], graph)
    _assert_same_outputs(graph, after)
    assert [v.name for v in after.outputs] == ["y", "z"]
    orders = storage_orders(after)
    assert orders["y"] == orders["z"] == (0, 1, 2, 3)
    sigmoid = next(n for n in after.nodes if n.op == "Sigmoid")
    assert sigmoid.annotations["layout"] == "NHWC"   # it reads the conv's channels-last result


def test_single_channel_input_needs_no_conversion():
    graph = _zoo_graph("lenet5", 32)   # a 1 x 1 x 32 x 32 image
    after, _ = _run(["choose_layout"], graph)
    assert not _transposes(after)
    _assert_same_outputs(graph, after)


def test_tensorflow_style_model_keeps_only_views():
    """NHWC input -> Transpose to NCHW -> Conv -> Relu -> Transpose back: the boundary copies
    cancel against the model's own Transposes, and no data moves."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1])]
    graph = _import(_small_model(nodes, (1, 6, 6, 3), {"w": w}))
    after, summary = _run(["choose_layout"], graph)
    _assert_same_outputs(graph, after)
    assert _perms(after) == [((0, 3, 1, 2), True), (NHWC, True)]
    assert "removed 4 Transposes" in summary
    assert [v.name for v in after.outputs] == ["y"]
    check_layout(after)


# ---- cancel_transposes ---------------------------------------------------------------------------
def _chain(ops, shape=(1, 3, 4, 5)):
    """x -> ops -> y, where an op is a perm tuple (a Transpose) or an op name."""
    nodes, name = [], "x"
    for i, op in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i}"
        if isinstance(op, tuple):
            nodes.append(helper.make_node("Transpose", [name], [out], perm=list(op)))
        else:
            nodes.append(helper.make_node(op, [name], [out]))
        name = out
    return _import(make_model(nodes, {"x": (np.float32, shape)}, ["y"]), layout="NCHW")


def _cancelled(graph):
    before = graph.copy()
    after, summary = _run(["cancel_transposes"], graph)
    _assert_same_outputs(before, after)
    check_layout(after)
    return after, summary


def test_inverse_pair_cancels():
    after, summary = _cancelled(_chain(["Relu", NHWC, (0, 3, 1, 2), "Sigmoid"]))
    assert [n.op for n in after.nodes] == ["Relu", "Sigmoid"]
    assert summary == "removed 2 Transposes"


def test_inverse_pair_before_an_output_keeps_the_output_name():
    after, _ = _cancelled(_chain(["Relu", NHWC, (0, 3, 1, 2)]))
    assert [n.op for n in after.nodes] == ["Relu"]
    assert after.outputs[0].name == "y" and after.outputs[0].producer.op == "Relu"


def test_pair_between_input_and_output_stays():
    after, summary = _cancelled(_chain([NHWC, (0, 3, 1, 2)]))
    assert len(_transposes(after)) == 2 and summary == ""


def test_other_pairs_merge():
    after, summary = _cancelled(_chain(["Relu", (0, 2, 1, 3), (0, 1, 3, 2), "Sigmoid"]))
    assert _perms(after) == [((0, 2, 3, 1), False)]
    assert summary == "removed 1 Transposes (1 by merging)"


def test_transposes_sink_below_unary_ops_to_meet_their_inverse():
    after, summary = _cancelled(_chain(["Relu", NHWC, "Tanh", "Abs", (0, 3, 1, 2), "Exp"]))
    assert [n.op for n in after.nodes] == ["Relu", "Tanh", "Abs", "Exp"]
    assert all(n.outputs[0].shape == (1, 3, 4, 5) for n in after.nodes)
    assert "sank 2 below unary ops" in summary


def test_transposes_do_not_sink_without_a_partner():
    after, summary = _cancelled(_chain(["Relu", NHWC, "Tanh", "Exp"]))
    assert [n.op for n in after.nodes] == ["Relu", "Transpose", "Tanh", "Exp"]
    assert summary == ""


def test_shared_transpose_keeps_its_other_reader():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=list(NHWC)),
             helper.make_node("Transpose", ["t"], ["back"], perm=[0, 3, 1, 2]),
             helper.make_node("Relu", ["back"], ["y"]),
             helper.make_node("Sigmoid", ["t"], ["z"])]
    graph = _import(make_model(nodes, {"x": (np.float32, (1, 3, 4, 5))}, ["y", "z"]), "NCHW")
    after, _ = _cancelled(graph)
    assert _perms(after) == [(NHWC, False)]
    relu = next(n for n in after.nodes if n.op == "Relu")
    assert relu.inputs[0] is after.inputs[0]


def test_boundary_pairs_of_a_copy_and_a_view_stay():
    graph = _zoo_graph("unet", 32)
    converted, _ = _run(["choose_layout"], graph)
    perms = _perms(converted)
    assert perms == [(NHWC, False), ((0, 3, 1, 2), True), (NHWC, True), ((0, 3, 1, 2), False)]
    after, summary = _cancelled(converted)
    assert _perms(after) == perms and summary == ""


def test_an_elementwise_only_region_collapses():
    """copy in, view, Sigmoid, view, copy out: nothing needs channels-last, all four go."""
    graph = _chain(["Relu", NHWC, (0, 3, 1, 2), "Sigmoid", NHWC, (0, 3, 1, 2), "Exp"])
    graph.nodes[2].annotations["view"] = True
    graph.nodes[4].annotations["view"] = True
    check_layout(graph)
    after, summary = _cancelled(graph)
    assert [n.op for n in after.nodes] == ["Relu", "Sigmoid", "Exp"]
    assert "layout" not in after.nodes[1].annotations


def test_two_copies_of_a_strided_view_do_not_cancel():
    """view -> copy -> inverse copy: the copies make the view contiguous; dropping them would
    hand Relu, and the graph output, a tensor in the wrong storage order."""
    graph = _chain([NHWC, (0, 3, 1, 2), NHWC, "Relu"])
    graph.nodes[0].annotations["view"] = True
    check_layout(graph)
    after, summary = _cancelled(graph)
    assert _perms(after) == [(NHWC, True), ((0, 3, 1, 2), False), (NHWC, False)]
    assert summary == ""


def test_check_layout_catches_a_wrong_storage_order():
    graph = _chain(["Relu", NHWC, (0, 3, 1, 2), "Sigmoid"])
    check_layout(graph)
    graph.nodes[2].annotations["view"] = True   # Sigmoid, and so the output, become strided
    with pytest.raises(InternalError, match=r"graph output %y \[1, 3, 4, 5\] is stored in axis "
                                            r"order \(0, 2, 3, 1\)"):
        check_layout(graph)


def test_cancel_transposes_function_returns_counts():
    graph = _chain(["Relu", NHWC, "Tanh", (0, 3, 1, 2), (0, 1, 3, 2), (0, 1, 3, 2), "Exp"])
    removed, merged, sunk = cancel_transposes(graph)
    assert (removed, sunk) == (4, 1) and not _transposes(graph)
    assert to_last(4) == NHWC and to_last(3) == (0, 2, 1)
