"""Fusion passes (fold_batchnorm, fold_pad, fuse_conv_activation, fuse_residual_add,
fuse_activation_grad, fuse_elementwise) and the fused ops they create (FusedConv, FusedGemm,
FusedElementwise).

Every handmade case runs the pass with IR verification and the per-pass numerics check, then
compares the optimized module with onnxruntime on fresh inputs; the zoo cases check each pass
against the unoptimized reference and the op counts that must be left.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import cnncompile
from cnncompile import zoo
from cnncompile.errors import ModelError, ShapeError
from cnncompile.ir.types import TensorType
from cnncompile.ops import OPS
from cnncompile.passes import PASSES, PassManager
from cnncompile.passes.manager import CLEANUP, relative_l2
from helpers import REL_L2, assert_matches, make_model, random_input, run_ort

FUSION = ["fold_batchnorm", "fold_pad", "fuse_conv_activation", "fuse_residual_add",
          "fuse_elementwise"]


def optimize(model, passes, feeds):
    """Run ``passes`` with verification and the numerics check, compare with onnxruntime on
    ``feeds``; returns the optimized graph."""
    shapes = {k: v.shape for k, v in feeds.items()}
    graph = cnncompile.import_onnx(model, input_shapes=shapes)
    manager = PassManager(passes=passes, verify=True, check_numerics=True)
    result = manager.run(graph)
    for record in manager.records:
        assert record.max_rel_error <= REL_L2, (record.name, record.max_rel_error)
    mod = cnncompile.compile(model, input_shapes=shapes, passes=passes, verify_each=True)
    ours = mod.run(feeds)
    for name, expected in zip(mod.output_names, run_ort(model, feeds)):
        assert_matches(ours[name], expected, what=f"output '{name}'")
    return result


def ops(graph):
    return [node.op for node in graph.nodes]


def bn_params(rng, channels, prefix="bn"):
    return {f"{prefix}.scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
            f"{prefix}.bias": rng.uniform(-0.5, 0.5, channels).astype(np.float32),
            f"{prefix}.mean": rng.uniform(-0.5, 0.5, channels).astype(np.float32),
            f"{prefix}.var": rng.uniform(0.5, 2.0, channels).astype(np.float32)}


def bn_node(x, y, prefix="bn", **attrs):
    inputs = [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, **attrs)


# ---- fold_batchnorm ------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial,group,bias", [((6, 6), 1, True), ((6, 6), 4, False),
                                                ((7,), 2, True), ((4, 3, 5), 1, False)])
def test_batchnorm_folds_into_conv(spatial, group, bias):
    rng = np.random.default_rng(len(spatial) * 10 + group)
    rank = len(spatial)
    x = random_input(rng, (2, 4, *spatial))
    inits = {"w": random_input(rng, (8, 4 // group, *[3] * rank)), **bn_params(rng, 8)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = random_input(rng, (8,))
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", group=group,
                              pads=[1] * 2 * rank),
             bn_node("c", "y", epsilon=1e-3)]
    graph = optimize(make_model(nodes, {"x": x}, ["y"], inits), ["fold_batchnorm"], {"x": x})
    assert ops(graph) == ["Conv"]
    node = graph.nodes[0]
    assert node.origins == ("conv", "bn") and node.created_by == "fold_batchnorm"
    assert node.outputs[0].name == "y" and node.inputs[2].dtype == np.float32


@pytest.mark.parametrize("group,stride", [(1, 1), (2, 2), (3, 1)])
def test_batchnorm_folds_into_grouped_conv_transpose(group, stride):
    rng = np.random.default_rng(group)
    x = random_input(rng, (1, 6, 5, 5))
    # W is [C, M/group, k, k]: output channel g * M/group + j reads W[group g's rows, j]
    inits = {"w": random_input(rng, (6, 2, 3, 3)), "b": random_input(rng, (2 * group,)),
             **bn_params(rng, 2 * group)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv",
                              group=group, strides=[stride, stride]),
             bn_node("c", "y")]
    graph = optimize(make_model(nodes, {"x": x}, ["y"], inits), ["fold_batchnorm"], {"x": x})
    assert ops(graph) == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (4,), (3, 4), (3, 1)])
def test_batchnorm_folds_into_gemm(trans_b, c_shape):
    rng = np.random.default_rng(trans_b)
    a = random_input(rng, (3, 5))
    inits = {"w": random_input(rng, (4, 5) if trans_b else (5, 4)), **bn_params(rng, 4)}
    inputs = ["a", "w"]
    if c_shape is not None:
        inits["c"] = random_input(rng, c_shape)
        inputs.append("c")
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="fc", transB=trans_b, alpha=0.7,
                              beta=0.5),
             bn_node("g", "y")]
    graph = optimize(make_model(nodes, {"a": a}, ["y"], inits), ["fold_batchnorm"], {"a": a})
    assert ops(graph) == ["Gemm"] and graph.nodes[0].attrs["beta"] == 1.0


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_batchnorm_and_affine_fold_into_random_convs(data):
    op = data.draw(st.sampled_from(["Conv", "ConvTranspose"]))
    rank = data.draw(st.integers(1, 3))
    group = data.draw(st.sampled_from([1, 2, 3]))
    per_group_in, per_group_out = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    channels, out = group * per_group_in, group * per_group_out
    kernel = data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    strides = data.draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    x = random_input(rng, (2, channels, *[4] * rank))
    w_shape = (out, per_group_in) if op == "Conv" else (channels, per_group_out)
    inits = {"w": random_input(rng, (*w_shape, *kernel)), **bn_params(rng, out),
             "m": rng.uniform(0.5, 2, (out,) + (1,) * rank).astype(np.float32)}
    inputs = ["x", "w"]
    if data.draw(st.booleans()):
        inits["b"] = random_input(rng, (out,))
        inputs.append("b")
    nodes = [helper.make_node(op, inputs, ["c"], name="conv", group=group, strides=strides),
             bn_node("c", "n"), helper.make_node("Mul", ["n", "m"], ["y"], name="mul")]
    graph = optimize(make_model(nodes, {"x": x}, ["y"], inits), ["fold_batchnorm"], {"x": x})
    assert ops(graph) == [op]


def test_per_channel_mul_add_sub_div_fold_into_conv():
    rng = np.random.default_rng(5)
    x = random_input(rng, (1, 3, 6, 6))
    inits = {"w": random_input(rng, (4, 3, 3, 3)),
             "m": rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32),
             "a": random_input(rng, (1, 4, 1, 1)),
             "s": np.float32(0.25), "d": rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["m", "c"], ["c1"], name="mul"),
             helper.make_node("Add", ["c1", "a"], ["c2"], name="add"),
             helper.make_node("Sub", ["c2", "s"], ["c3"], name="sub"),
             helper.make_node("Div", ["c3", "d"], ["y"], name="div")]
    graph = optimize(make_model(nodes, {"x": x}, ["y"], inits), ["fold_batchnorm"], {"x": x})
    assert ops(graph) == ["Conv"]
    assert graph.nodes[0].origins == ("conv", "mul", "add", "sub", "div")


def test_non_per_channel_mul_and_shared_conv_do_not_fold():
    rng = np.random.default_rng(6)
    x = random_input(rng, (1, 3, 5, 5))
    inits = {"w": random_input(rng, (4, 3, 3, 3)), "w2": random_input(rng, (4, 3, 3, 3)),
             "m": random_input(rng, (1, 1, 3, 3)), **bn_params(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "m"], ["y"], name="mul"),  # varies over space
             helper.make_node("Conv", ["x", "w2"], ["d"], name="conv2"),
             bn_node("d", "z"),  # d is also a graph output: two readers
             ]
    model = make_model(nodes, {"x": x}, ["y", "z", "d"], inits)
    graph = optimize(model, ["fold_batchnorm"], {"x": x})
    # the BatchNormalization with nothing to fold into becomes a per-channel Mul + Add
    assert ops(graph) == ["Conv", "Mul", "Conv", "Mul", "Add"]
    assert graph.nodes[3].inputs[1].shape == (4, 1, 1)


def test_batchnorm_after_non_constant_weights_becomes_mul_add():
    rng = np.random.default_rng(7)
    x, w = random_input(rng, (1, 3, 5, 5)), random_input(rng, (4, 3, 1, 1))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    feeds = {"x": x, "w": w}
    graph = optimize(make_model(nodes, feeds, ["y"], bn_params(rng, 4)),
                     ["fold_batchnorm", "fuse_elementwise"], feeds)
    assert ops(graph) == ["Conv", "FusedElementwise"]
    assert graph.nodes[1].origins == ("bn",)


# ---- fold_pad ------------------------------------------------------------------------------------
def pad_model(x, consumer, widths, value=None, outputs=("y",), mode="constant", **attrs):
    rng = np.random.default_rng(0)
    inits = {"pads": np.array(widths, dtype=np.int64)}
    pad_inputs = ["x", "pads"]
    if value is not None:
        inits["value"] = np.array(value, dtype=np.float32)
        pad_inputs.append("value")
    consumer_inputs = ["p"]
    if consumer == "Conv":
        inits["w"] = random_input(rng, (2, x.shape[1], 3, 3))
        consumer_inputs.append("w")
    nodes = [helper.make_node("Pad", pad_inputs, ["p"], name="pad", mode=mode),
             helper.make_node(consumer, consumer_inputs, list(outputs), name="consumer",
                              **attrs)]
    return make_model(nodes, {"x": x}, list(outputs), inits)


@pytest.mark.parametrize("consumer,value,attrs", [
    ("Conv", None, {"pads": [1, 0, 1, 2]}),
    ("Conv", 0.0, {"strides": [2, 2]}),
    ("AveragePool", None, {"kernel_shape": [3, 3], "strides": [2, 2]}),
    ("AveragePool", 0.0, {"kernel_shape": [2, 2], "pads": [1, 1, 0, 0], "count_include_pad": 1}),
    ("MaxPool", -np.inf, {"kernel_shape": [3, 3], "pads": [1, 0, 0, 0]}),
    ("MaxPool", float(np.finfo(np.float32).min), {"kernel_shape": [3, 3], "strides": [2, 2]}),
])
def test_pad_folds_into_consumer(consumer, value, attrs):
    x = random_input(np.random.default_rng(1), (1, 2, 6, 7))
    model = pad_model(x, consumer, [0, 0, 1, 2, 0, 0, 2, 1], value, **attrs)
    graph = optimize(model, ["fold_pad"], {"x": x})
    assert ops(graph) == [consumer]
    node = graph.nodes[0]
    assert node.origins == ("pad", "consumer") and node.created_by == "fold_pad"
    assert node.attrs["pads"][0] >= 1 and node.attrs["pads"][2] >= 2
    if consumer == "AveragePool":
        assert node.attrs["count_include_pad"] == 1


@pytest.mark.parametrize("consumer,widths,value,mode,attrs", [
    ("Conv", [0, 0, 1, 1, 0, 0, 1, 1], 1.0, "constant", {}),          # nonzero fill
    ("Conv", [1, 0, 1, 1, 0, 0, 1, 1], None, "constant", {}),         # pads the batch axis
    ("Conv", [0, 0, 1, 1, 0, 0, -1, 1], None, "constant", {}),        # crops
    ("Conv", [0, 0, 1, 1, 0, 0, 1, 1], None, "reflect", {}),
    ("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], None, "constant",
     {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1]}),                # pool pads not counted
    ("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], None, "constant",
     {"kernel_shape": [2, 2], "ceil_mode": 1, "strides": [2, 2]}),
    ("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1], 0.0, "constant", {"kernel_shape": [3, 3]}),
])
def test_pad_that_changes_meaning_stays(consumer, widths, value, mode, attrs):
    x = random_input(np.random.default_rng(2), (1, 2, 6, 6))
    model = pad_model(x, consumer, widths, value, mode=mode, **attrs)
    graph = optimize(model, ["fold_pad"], {"x": x})
    assert ops(graph) == ["Pad", consumer]


def test_pad_with_two_readers_or_maxpool_indices_in_use_stays():
    x = random_input(np.random.default_rng(3), (1, 2, 5, 5))
    model = pad_model(x, "MaxPool", [0, 0, 1, 1, 0, 0, 1, 1], -np.inf, outputs=("y", "i"),
                      kernel_shape=[2, 2])
    assert ops(optimize(model, ["fold_pad"], {"x": x})) == ["Pad", "MaxPool"]
    model = pad_model(x, "Conv", [0, 0, 1, 1, 0, 0, 1, 1])
    model.graph.output.append(helper.make_empty_tensor_value_info("p"))
    assert ops(optimize(model, ["fold_pad"], {"x": x})) == ["Pad", "Conv"]


# ---- fuse_conv_activation ------------------------------------------------------------------------
@pytest.mark.parametrize("act,attrs", [("Relu", {}), ("LeakyRelu", {"alpha": 0.2}),
                                       ("Sigmoid", {}), ("HardSigmoid", {"alpha": 0.3}),
                                       ("Elu", {"alpha": 0.5}), ("Gelu", {}), ("Mish", {})])
def test_conv_activation_fuses(act, attrs):
    rng = np.random.default_rng(8)
    x = random_input(rng, (1, 3, 6, 6))
    inits = {"w": random_input(rng, (4, 3, 3, 3)), "b": random_input(rng, (4,))}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node(act, ["c"], ["y"], name="act", **attrs)]
    opset = {"Gelu": 20, "Mish": 18}.get(act, 17)
    model = make_model(nodes, {"x": x}, ["y"], inits, opset=opset)
    graph = optimize(model, ["fuse_conv_activation"], {"x": x})
    assert ops(graph) == ["FusedConv"]
    node = graph.nodes[0]
    assert node.attrs["activation"] == act and node.attrs["residual"] is False
    assert node.attrs["activation_attrs"] == graph.nodes[0].attrs["activation_attrs"]
    assert node.origins == ("conv", "act") and node.created_by == "fuse_conv_activation"


def test_clip_and_gemm_activations_fuse_and_shared_conv_does_not():
    rng = np.random.default_rng(9)
    x = random_input(rng, (2, 3, 4, 4))
    inits = {"w": random_input(rng, (4, 3, 1, 1)), "w2": random_input(rng, (4, 3, 1, 1)),
             "lo": np.float32(0), "hi": np.float32(6), "fc": random_input(rng, (5, 64)),
             "shape": np.array([2, 64], dtype=np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["g"], name="fc", transB=1),
             helper.make_node("Tanh", ["g"], ["y"], name="tanh"),
             helper.make_node("Conv", ["x", "w2"], ["d"], name="conv2"),
             helper.make_node("Relu", ["d"], ["z"], name="relu2")]
    model = make_model(nodes, {"x": x}, ["y", "z", "d"], inits)
    graph = optimize(model, ["fuse_conv_activation"], {"x": x})
    assert ops(graph) == ["FusedConv", "Reshape", "FusedGemm", "Conv", "Relu"]
    assert graph.nodes[0].attrs["activation_attrs"] == {"min": 0.0, "max": 6.0}


def test_conv_without_activation_stays_conv():
    rng = np.random.default_rng(10)
    x = random_input(rng, (1, 2, 4, 4))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["y"], name="gap")]
    model = make_model(nodes, {"x": x}, ["y"], {"w": random_input(rng, (3, 2, 3, 3))})
    assert ops(optimize(model, FUSION, {"x": x})) == ["Conv", "GlobalAveragePool"]


# ---- fuse_residual_add ---------------------------------------------------------------------------
def test_residual_whose_skip_is_a_graph_input():
    rng = np.random.default_rng(11)
    x = random_input(rng, (1, 4, 5, 5))
    inits = {"w": random_input(rng, (4, 4, 3, 3)), "w1": random_input(rng, (4, 4, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w"], ["c"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["x", "c"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu2")]
    model = make_model(nodes, {"x": x}, ["y"], inits)
    graph = optimize(model, ["fuse_conv_activation", "fuse_residual_add"], {"x": x})
    assert ops(graph) == ["FusedConv", "FusedConv"]
    node = graph.nodes[1]
    assert node.attrs["residual"] and node.attrs["activation"] == ""
    assert node.attrs["post_activation"] == "Relu"
    assert node.inputs[2] is None and node.inputs[3].name == "x"
    assert node.origins == ("conv2", "add", "relu2")
    assert node.created_by == "fuse_residual_add" and node.outputs[0].name == "y"


def test_residual_of_two_convs_fuses_into_the_later_one():
    """A ResNet downsample block: the Add's operands are both convs."""
    rng = np.random.default_rng(12)
    x = random_input(rng, (1, 3, 6, 6))
    inits = {"w": random_input(rng, (4, 3, 3, 3)), "wd": random_input(rng, (4, 3, 1, 1)),
             "bd": random_input(rng, (4,)), **bn_params(rng, 4, "bn"),
             **bn_params(rng, 4, "bnd")}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("c", "cb", "bn"),
             helper.make_node("Conv", ["x", "wd", "bd"], ["d"], name="down"),
             bn_node("d", "db", "bnd"),
             helper.make_node("Add", ["cb", "db"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    model = make_model(nodes, {"x": x}, ["y"], inits)
    graph = optimize(model, FUSION, {"x": x})
    assert ops(graph) == ["Conv", "FusedConv"]
    fused = graph.nodes[1]
    assert fused.origins == ("down", "bnd", "add", "relu")
    assert fused.inputs[3] is graph.nodes[0].outputs[0]


def test_broadcasting_add_and_conv_with_two_readers_do_not_fuse():
    rng = np.random.default_rng(13)
    x = random_input(rng, (1, 2, 4, 4))
    inits = {"w": random_input(rng, (3, 2, 3, 3)), "w2": random_input(rng, (3, 2, 3, 3)),
             "w3": random_input(rng, (3, 2, 4, 4))}
    feeds = {"x": x, "bias": random_input(rng, (1, 3, 1, 1)),
             "skip": random_input(rng, (1, 3, 4, 4))}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "bias"], ["y"], name="add"),       # R broadcasts
             helper.make_node("Conv", ["x", "w2"], ["d"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["d", "skip"], ["z"], name="add2"),      # d read twice
             helper.make_node("Conv", ["x", "w3"], ["e"], name="conv3"),        # 1x1 output
             helper.make_node("Add", ["e", "skip"], ["u"], name="add3")]      # e broadcasts
    model = make_model(nodes, feeds, ["y", "z", "d", "u"], inits)
    graph = optimize(model, ["fuse_residual_add"], feeds)
    assert ops(graph) == ["Conv", "Add", "Conv", "Add", "Conv", "Add"]


# ---- fuse_elementwise ----------------------------------------------------------------------------
def test_elementwise_tree_fuses_into_one_node():
    rng = np.random.default_rng(14)
    x, y = random_input(rng, (2, 3, 4)), random_input(rng, (4,))
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
             helper.make_node("Mul", ["x", "s"], ["m"], name="silu"),
             helper.make_node("Mul", ["y", "y"], ["yy"], name="square"),
             helper.make_node("Add", ["m", "yy"], ["a"], name="add"),
             helper.make_node("Div", ["a", "c"], ["d"], name="div"),
             helper.make_node("Relu", ["d"], ["out"], name="relu")]
    feeds = {"x": x, "y": y}
    model = make_model(nodes, feeds, ["out"], {"c": np.float32(1.5)})
    graph = optimize(model, ["fuse_elementwise"], feeds)
    assert ops(graph) == ["FusedElementwise"]
    node = graph.nodes[0]
    assert [v.name for v in node.inputs] == ["x", "y", "c"]
    assert node.attrs["program"] == [["Sigmoid", ["in0"], {}], ["Mul", ["in0", "t0"], {}],
                                     ["Mul", ["in1", "in1"], {}], ["Add", ["t1", "t2"], {}],
                                     ["Div", ["t3", "in2"], {}], ["Relu", ["t4"], {}]]
    assert node.origins == ("sig", "silu", "square", "add", "div", "relu")
    assert node.outputs[0].name == "out" and node.created_by == "fuse_elementwise"


def test_elementwise_stops_at_shared_values_outputs_and_fused_convs():
    rng = np.random.default_rng(15)
    x = random_input(rng, (1, 2, 4, 4))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Exp", ["r"], ["e"], name="exp"),        # read by two nodes
             helper.make_node("Neg", ["e"], ["n"], name="neg"),
             helper.make_node("Abs", ["e"], ["a"], name="abs"),
             helper.make_node("Add", ["n", "a"], ["s"], name="add"),
             helper.make_node("Tanh", ["s"], ["t"], name="tanh"),       # a graph output
             helper.make_node("Sigmoid", ["t"], ["y"], name="sig")]
    model = make_model(nodes, {"x": x}, ["y", "t"], {"w": random_input(rng, (2, 2, 1, 1))})
    graph = optimize(model, ["fuse_conv_activation", "fuse_elementwise"], {"x": x})
    assert ops(graph) == ["FusedConv", "Exp", "FusedElementwise", "Sigmoid"]
    assert [step[0] for step in graph.nodes[2].attrs["program"]] == ["Neg", "Abs", "Add", "Tanh"]


def test_single_elementwise_op_is_left_alone():
    x = random_input(np.random.default_rng(16), (3, 4))
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], {"x": x}, ["y"])
    assert ops(optimize(model, ["fuse_elementwise"], {"x": x})) == ["Relu"]


# ---- the fused ops themselves --------------------------------------------------------------------
CONV_ATTRS = {"dilations": [1, 1], "group": 2, "kernel_shape": [3, 3], "pads": [1, 0, 1, 2],
              "strides": [1, 2]}


@pytest.mark.parametrize("act,act_attrs,post", [("", {}, ""), ("LeakyRelu", {"alpha": 0.1}, ""),
                                                ("Clip", {"min": -1.0, "max": 1.0}, "Tanh"),
                                                ("", {}, "Relu")])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_conv_is_conv_then_epilogue(act, act_attrs, post, residual):
    rng = np.random.default_rng(17)
    x, w, b = (random_input(rng, s) for s in ((2, 4, 6, 7), (6, 2, 3, 3), (6,)))
    y = OPS["Conv"].reference(x, w, b, **CONV_ATTRS)
    r = random_input(rng, y.shape) if residual else None
    expected = OPS[act].reference(y, **act_attrs) if act else y
    if residual:
        expected = OPS["Add"].reference(expected, r)
    if post:
        expected = OPS[post].reference(expected)
    attrs = dict(CONV_ATTRS, activation=act, activation_attrs=act_attrs, residual=residual,
                 post_activation=post, post_activation_attrs={})
    out = OPS["FusedConv"].reference(x, w, b, r, **attrs)
    np.testing.assert_array_equal(out, expected)
    types = [TensorType.of(a) if a is not None else None for a in (x, w, b, r)]
    assert OPS["FusedConv"].infer(*types, **attrs) == TensorType.of(expected)
    conv_flops = OPS["Conv"].flops(types[:3], [TensorType.of(y)], **CONV_ATTRS)
    assert OPS["FusedConv"].flops(types, [TensorType.of(y)], **attrs) >= conv_flops


def test_fused_conv_rejects_bad_epilogues():
    x, w = TensorType(np.float32, (1, 4, 6, 7)), TensorType(np.float32, (6, 2, 3, 3))
    fused = OPS["FusedConv"]
    with pytest.raises(ModelError, match="residual=True needs the input R"):
        fused.infer(x, w, None, None, residual=True, **CONV_ATTRS)
    with pytest.raises(ShapeError, match=r"R f32\[1,6,1,1\].*f32\[1,6,6,4\]"):
        fused.infer(x, w, None, TensorType(np.float32, (1, 6, 1, 1)), residual=True,
                    **CONV_ATTRS)
    with pytest.raises(ModelError, match="Softmax"):
        fused.infer(x, w, activation="Softmax", activation_attrs={}, **CONV_ATTRS)


@pytest.mark.parametrize("trans_b,act,attrs", [(False, "Relu", {}), (True, "Sigmoid", {}),
                                               (True, "", {}),
                                               (False, "HardSigmoid", {"alpha": 0.5})])
def test_fused_gemm_is_gemm_then_activation(trans_b, act, attrs):
    rng = np.random.default_rng(18)
    a, b, c = (random_input(rng, s) for s in ((3, 5), (4, 5) if trans_b else (5, 4), (4,)))
    gemm = {"alpha": 0.5, "beta": 2.0, "transA": False, "transB": trans_b}
    y = OPS["Gemm"].reference(a, b, c, **gemm)
    expected = OPS[act].reference(y, **attrs) if act else y
    out = OPS["FusedGemm"].reference(a, b, c, **gemm, activation=act, activation_attrs=attrs)
    np.testing.assert_array_equal(out, expected)
    types = [TensorType.of(v) for v in (a, b, c)]
    assert OPS["FusedGemm"].infer(*types, **gemm, activation=act,
                                  activation_attrs=attrs) == TensorType(np.float32, (3, 4))


def test_fused_elementwise_runs_its_program():
    rng = np.random.default_rng(19)
    x, y = random_input(rng, (2, 1, 4)), random_input(rng, (3, 1))
    program = [["Clip", ["in0"], {"min": -0.5, "max": None}], ["Mul", ["t0", "in1"], {}],
               ["Pow", ["t1", "in2"], {}], ["Max", ["t2", "in0", "in1"], {}]]
    two = np.float32(2.0)
    out = OPS["FusedElementwise"].reference(x, y, two, program=program)
    expected = np.maximum(np.maximum((np.maximum(x, -0.5) * y) ** 2, x), y)
    assert_matches(out, expected.astype(np.float32))
    types = [TensorType.of(v) for v in (x, y, two)]
    assert OPS["FusedElementwise"].infer(*types, program=program) == TensorType.of(out)
    assert OPS["FusedElementwise"].flops(types, [TensorType.of(out)], program=program) > 0
    with pytest.raises(ModelError, match="reads 't5'"):
        OPS["FusedElementwise"].infer(*types, program=[["Relu", ["t5"], {}]])
    with pytest.raises(ModelError, match="Conv"):
        OPS["FusedElementwise"].infer(*types, program=[["Conv", ["in0", "in1"], {}]])
    with pytest.raises(ShapeError):
        OPS["FusedElementwise"].infer(TensorType(np.float32, (2, 3)),
                                      TensorType(np.float32, (4,)),
                                      program=[["Add", ["in0", "in1"], {}]])


# ---- the zoo -------------------------------------------------------------------------------------
ZOO = [("lenet5", 32, {}), ("alexnet", 64, {"num_classes": 10}),
       ("vgg11", 32, {"num_classes": 10}), ("resnet18", 32, {}), ("resnet50", 32, {}),
       ("mobilenetv2", 32, {}), ("squeezenet", 64, {}), ("inception_block", 16, {}),
       ("densenet_block", 16, {}), ("unet", 32, {}), ("yolo_head", 64, {"num_classes": 8})]


def test_zoo_cases_cover_the_zoo():
    assert sorted(name for name, _, _ in ZOO) == sorted(zoo.MODELS)


@pytest.mark.parametrize("name,size,kw", ZOO, ids=[case[0] for case in ZOO])
def test_zoo_every_fusion_pass_keeps_outputs(name, size, kw):
    model = zoo.build(name, image_size=size, seed=2, **kw)
    graph = cnncompile.import_onnx(model, input_shapes=zoo.input_shapes(model))
    originals = {node.name for node in graph.nodes}
    # cleanup first, as at opt_level 2; the numerics check starts from its result
    graph = PassManager(passes=[p for p in CLEANUP if p in PASSES], verify=True).run(graph)
    manager = PassManager(passes=FUSION, verify=True, check_numerics=True, seed=len(name))
    result = manager.run(graph)
    for record in manager.records:
        assert record.max_rel_error <= REL_L2, (record.name, record.max_rel_error)
    counts = result.op_counts()
    assert "BatchNormalization" not in counts
    assert counts.get("FusedConv", 0) + counts.get("FusedGemm", 0) > 0
    for node in result.nodes:
        if node.created_by in FUSION:
            assert node.origins and set(node.origins) <= originals, node
    if name == "resnet18":
        summaries = {record.name: record.summary for record in manager.records}
        assert summaries["fold_batchnorm"] == "folded 20 BatchNormalization into Conv"
        assert summaries["fuse_residual_add"] == ("fused 8 Add into Conv, "
                                                  "8 Relu after the residual add")


@pytest.mark.parametrize("name,size,kw", ZOO, ids=[case[0] for case in ZOO])
def test_zoo_opt_level_2_matches_unoptimized(name, size, kw):
    model = zoo.build(name, image_size=size, seed=3, **kw)
    shapes = zoo.input_shapes(model)
    feeds = zoo.random_inputs(model, seed=4)
    plain = cnncompile.compile(model, input_shapes=shapes, opt_level=0).run(feeds)
    mod = cnncompile.compile(model, input_shapes=shapes, opt_level=2)
    ours = mod.run(feeds)
    for key, expected in plain.items():
        assert relative_l2(ours[key], expected) <= REL_L2, key
    counts = mod.graph.op_counts()
    if name == "resnet18":
        assert not {"BatchNormalization", "Relu", "Add"} & set(counts), counts
    if name == "mobilenetv2":
        assert "BatchNormalization" not in counts and "Relu6" not in counts, counts


# ---- fuse_activation_grad ------------------------------------------------------------------------
@pytest.mark.parametrize("activation,at", [("Relu", "Y"), ("Sigmoid", "Y")])
def test_activation_grad_fuses_into_batchnorm_train_grad(activation, at):
    """The gradient of BatchNorm -> activation in a training graph: ActivationGrad's only reader
    is BatchNormTrainGrad, which takes it in (the per-pass numerics check compares the graphs on
    random inputs); the fused graph runs on the CPU target like the reference executor."""
    from cnncompile.autodiff.training import _compile_graph
    from cnncompile.ir.graph import Graph, Node

    rng = np.random.default_rng(14)
    shape, float32 = (2, 3, 4, 5), np.dtype(np.float32)
    graph = Graph("bn_act_grad")
    names = {"dy": shape, "v": shape, "x": shape, "scale": (3,), "mean": (3,), "log_var": (3,)}
    values = {name: graph.add_input(name, TensorType(float32, s)) for name, s in names.items()}
    # the numerics check draws its own inputs: the variance as an Exp stays positive
    values["var"] = graph.new_value("var", TensorType(float32, (3,)))
    graph.add_node(Node("Exp", [values["log_var"]], [values["var"]], {}, name="exp"))
    dact = graph.new_value("dact", TensorType(float32, shape))
    graph.add_node(Node("ActivationGrad", [values["dy"], values["v"]], [dact],
                        {"activation": activation, "activation_attrs": None, "at": at},
                        name="act_grad"))
    outs = [graph.new_value(n, TensorType(float32, s))
            for n, s in (("dx", shape), ("dscale", (3,)), ("db", (3,)))]
    graph.add_node(Node("BatchNormTrainGrad", [dact, values["x"], values["scale"],
                                               values["mean"], values["var"]], outs,
                        {"epsilon": 1e-5}, name="bn_grad"))
    graph.outputs = outs
    feeds = {name: rng.standard_normal(s).astype(np.float32) for name, s in names.items()}
    manager = PassManager(passes=["fuse_activation_grad"], verify=True, check_numerics=True)
    fused = manager.run(graph)
    assert ops(fused) == ["Exp", "BatchNormTrainGrad"]
    node = fused.nodes[1]
    assert node.attrs["activation"] == activation and node.inputs[7].name == "v"
    assert node.origins == ("act_grad", "bn_grad") and node.created_by == "fuse_activation_grad"
    assert manager.records[0].max_rel_error <= 1e-5
    module = _compile_graph(fused, "cpu", 0, True)
    assert "batchnorm_train_backward(" in module.executor.source
    got = module.run(feeds)
    d = OPS["ActivationGrad"].reference(feeds["dy"], feeds["v"], activation, None, at)
    want = OPS["BatchNormTrainGrad"].reference(d, feeds["x"], feeds["scale"], feeds["mean"],
                                               np.exp(feeds["log_var"]))
    for name, array in zip(("dx", "dscale", "db"), want):
        assert relative_l2(got[name], array) <= 1e-5, name
