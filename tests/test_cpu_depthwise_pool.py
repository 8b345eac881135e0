"""The depthwise convolution kernel (kernels/depthwise.py) and the pooling kernels
(kernels/pool.py) through their emitters, against the reference executor: odd sizes (1x1
images, prime channel counts, stride > kernel, asymmetric pads, dilation, ceil_mode), fused
epilogues, channel multipliers, batch > 1 writing strided concat slices, serial and parallel."""

import numpy as np
import pytest
from onnx import helper

import cnncompile
from helpers import assert_matches, make_model

TOL = 1e-4
OPSET = 20  # HardSwish


def compile_both(model, feeds):
    shapes = {k: v.shape for k, v in feeds.items()}
    cpu = cnncompile.compile(model, target="cpu", input_shapes=shapes)
    ref = cnncompile.compile(model, target="reference", input_shapes=shapes)
    return cpu, ref.run(feeds)


def assert_close(got: dict, expected: dict, exact: bool = False):
    """Every output within TOL (NaN positions equal), or bit-exact."""
    for name, want in expected.items():
        if exact:
            assert got[name].dtype == want.dtype, name
            np.testing.assert_array_equal(got[name], want, err_msg=name)
        else:
            assert_matches(got[name], want, TOL, what=name)


# ---- depthwise -----------------------------------------------------------------------------------
def depthwise_model(x_shape, k_out, kernel, attrs, seed, act=None, residual=False, post=None,
                    bias=True):
    rng = np.random.default_rng(seed)
    channels = x_shape[1]
    w = (rng.standard_normal((k_out, 1) + tuple(kernel)) / np.sqrt(np.prod(kernel)))
    inits = {"W": w.astype(np.float32)}
    inputs = ["X", "W"]
    if bias:
        inits["B"] = rng.standard_normal(k_out).astype(np.float32)
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["Y0"], group=channels, kernel_shape=list(kernel),
                              **attrs)]
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    last = "Y0"
    if act:
        nodes.append(helper.make_node(act[0], [last] + act[2], ["Y1"], **act[1]))
        last = "Y1"
    if residual:
        nodes.append(helper.make_node("Add", [last, "R"], ["Y2"]))
        last = "Y2"
    if post:
        nodes.append(helper.make_node(post, [last], ["Y3"]))
        last = "Y3"
    nodes[-1].output[0] = "Y"
    specs = {"X": feeds["X"]}
    if residual:
        probe = make_model(nodes[:1], specs, ["Y0"], inits, opset=OPSET)
        shape = cnncompile.compile(probe).graph.outputs[0].type.shape
        feeds["R"] = rng.standard_normal(shape).astype(np.float32)
        specs["R"] = feeds["R"]
    if act and act[0] == "Clip":  # ReLU6
        inits.update(lo=np.float32(0), hi=np.float32(6))
    return make_model(nodes, specs, ["Y"], inits, opset=OPSET), feeds


def check_depthwise(model, feeds, parallel=None):
    cpu, expected = compile_both(model, feeds)
    assert "k_conv_depthwise(" in cpu.source, cpu.source
    if parallel is not None:
        assert f"parallel={parallel}" in cpu.source
    assert_close(cpu.run(feeds), expected)
    return cpu


# (x shape, output channels, kernel, attrs)
DEPTHWISE = [
    ((2, 7, 9, 9), 7, (3, 3), {"pads": [1, 1, 1, 1]}),
    ((1, 11, 12, 13), 11, (3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ((2, 5, 11, 10), 5, (3, 3), {"pads": [0, 1, 2, 0], "strides": [2, 2]}),       # asym, odd
    ((1, 5, 12, 12), 5, (5, 5), {"pads": [2, 2, 2, 2]}),
    ((2, 3, 11, 14), 3, (5, 5), {"pads": [2, 1, 2, 2], "strides": [2, 2]}),
    ((1, 3, 1, 1), 3, (3, 3), {"pads": [1, 1, 1, 1]}),                           # 1x1 image
    ((1, 3, 1, 1), 3, (3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ((1, 3, 7, 8), 3, (3, 3), {"pads": [0, 2, 1, 0], "strides": [3, 3]}),         # stride 3
    ((1, 2, 9, 9), 2, (2, 2), {"strides": [3, 3]}),                              # stride > k
    ((1, 3, 9, 10), 3, (3, 3), {"pads": [2, 2, 2, 2], "dilations": [2, 2]}),
    ((2, 3, 13, 12), 3, (3, 3), {"pads": [2, 1, 2, 3], "dilations": [2, 3],
                                 "strides": [2, 2]}),
    ((1, 4, 9, 9), 4, (7, 7), {"pads": [3, 3, 3, 3]}),                           # generic
    ((1, 3, 8, 9), 6, (3, 3), {"pads": [1, 1, 1, 1]}),                           # multiplier 2
    ((2, 2, 9, 7), 6, (5, 5), {"pads": [2, 2, 1, 1], "strides": [2, 1]}),         # multiplier 3
    ((1, 1, 6, 6), 3, (3, 3), {"pads": [1, 1, 1, 1]}),                           # C = 1, K = 3
    ((3, 13, 3, 2), 13, (3, 3), {"pads": [1, 1, 1, 1]}),                         # many planes
    # rows of 16 and more take the vector row copies
    ((2, 3, 17, 19), 3, (3, 3), {"pads": [0, 1, 2, 0], "strides": [2, 2]}),
    ((1, 2, 16, 21), 4, (5, 5), {"pads": [3, 4, 2, 1], "dilations": [2, 2]}),
    ((1, 3, 18, 20), 3, (3, 3), {"pads": [1, 2, 1, 0], "strides": [3, 3]}),
    ((1, 2, 17, 33), 2, (3, 3), {"strides": [2, 4], "dilations": [1, 3]}),
]


@pytest.mark.parametrize("case", DEPTHWISE, ids=[str(i) for i in range(len(DEPTHWISE))])
def test_depthwise_matches_reference(case):
    x_shape, k_out, kernel, attrs = case
    model, feeds = depthwise_model(x_shape, k_out, kernel, attrs, seed=len(str(case)))
    check_depthwise(model, feeds)


@pytest.mark.parametrize("act, residual, post", [
    (("Relu", {}, []), False, None),
    (("Clip", {}, ["lo", "hi"]), False, None),
    (("HardSwish", {}, []), True, None),
    (("Relu", {}, []), True, "Relu"),
    (None, True, "Sigmoid"),
], ids=["relu", "relu6", "hardswish-residual", "relu-residual-relu", "residual-sigmoid"])
def test_depthwise_epilogues(act, residual, post):
    for x_shape, k_out in (((2, 5, 9, 8), 5), ((1, 3, 6, 7), 6)):
        model, feeds = depthwise_model(x_shape, k_out, (3, 3), {"pads": [1, 1, 1, 1]}, seed=7,
                                       act=act, residual=residual, post=post)
        check_depthwise(model, feeds)


def test_depthwise_without_bias_1d_and_3d():
    model, feeds = depthwise_model((2, 5, 17), 5, (3,), {"pads": [1, 2], "strides": [2]}, 3,
                                   bias=False)
    check_depthwise(model, feeds)
    model, feeds = depthwise_model((1, 4, 5, 6, 7), 4, (3, 3, 3), {"pads": [1] * 6}, 4)
    check_depthwise(model, feeds)
    model, feeds = depthwise_model((2, 3, 6, 7, 9), 3, (3, 3, 3),
                                   {"pads": [1, 0, 1, 1, 1, 0], "strides": [2, 1, 2]}, 5)
    check_depthwise(model, feeds)


def test_depthwise_parallel_and_serial():
    """Large work runs the parallel kernel, small work its serial twin; same results."""
    model, feeds = depthwise_model((2, 37, 40, 40), 37, (3, 3),
                                   {"pads": [1, 1, 1, 1], "strides": [2, 2]}, 9,
                                   act=("Clip", {}, ["lo", "hi"]))
    check_depthwise(model, feeds, parallel=True)
    model, feeds = depthwise_model((2, 5, 12, 12), 5, (3, 3), {"pads": [1, 1, 1, 1]}, 9)
    check_depthwise(model, feeds, parallel=False)


@pytest.mark.parametrize("channels, spatial", [(5, 7), (29, 40)], ids=["serial", "parallel"])
def test_depthwise_writes_into_concat_slice(channels, spatial):
    """Batch 2 into a channel slice of an elided concat: a strided destination."""
    rng = np.random.default_rng(41)
    x = rng.standard_normal((2, channels, spatial, spatial)).astype(np.float32)
    inits = {"W": (rng.standard_normal((channels, 1, 3, 3)) * 0.3).astype(np.float32),
             "B": rng.standard_normal(channels).astype(np.float32),
             "W2": (rng.standard_normal((3, channels, 1, 1)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["a"], group=channels, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["a_relu"]),
             helper.make_node("Conv", ["X", "W2"], ["b"]),
             helper.make_node("Concat", ["b", "a_relu"], ["cat"], axis=1),
             helper.make_node("Sigmoid", ["cat"], ["Y"])]
    model = make_model(nodes, {"X": x}, ["Y"], inits, opset=OPSET)
    cpu = check_depthwise(model, {"X": x})
    concat = [n for n in cpu.graph.nodes if n.op == "Concat"]
    assert concat and concat[0].annotations.get("elided"), "the concat should be elided"


# ---- pooling -------------------------------------------------------------------------------------
def pool_model(op, x, outputs=("y",), opset=19, **attrs):
    node = helper.make_node(op, ["x"], list(outputs), **attrs)
    return make_model([node], {"x": x}, list(outputs), opset=opset)


# (x shape, attrs): the fast shapes (2x2/s2, 3x3/s2, 3x3/s1) and the general path's corners
POOLS = [
    ((2, 5, 13, 12), dict(kernel_shape=[2, 2], strides=[2, 2])),
    ((1, 3, 15, 17), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ((2, 7, 13, 13), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ((1, 3, 9, 10), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])),
    ((2, 3, 9, 8), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1)),
    ((1, 5, 11, 10), dict(kernel_shape=[2, 2], strides=[3, 3])),                 # stride > k
    ((2, 3, 10, 9), dict(kernel_shape=[3, 2], dilations=[2, 3], pads=[2, 1, 1, 2])),
    ((1, 3, 9, 11), dict(kernel_shape=[3, 3], strides=[2, 2], dilations=[2, 2], ceil_mode=1,
                         pads=[1, 2, 0, 1])),
    ((2, 3, 1, 1), dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),                # 1x1 image
    ((1, 2, 3, 3), dict(kernel_shape=[2, 2], pads=[2, 2, 2, 2])),                # pad windows
    ((1, 2, 7, 7), dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    ((1, 2, 8, 7), dict(kernel_shape=[2, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    ((2, 5, 13), dict(kernel_shape=[4], strides=[3], pads=[1, 2], ceil_mode=1)),
    ((1, 3, 5, 6, 7), dict(kernel_shape=[2, 3, 2], strides=[2, 1, 2], pads=[1, 0, 1, 0, 1, 1])),
]
POOL_IDS = [str(i) for i in range(len(POOLS))]


@pytest.mark.parametrize("case", POOLS, ids=POOL_IDS)
def test_max_pool_values_and_indices(case):
    shape, attrs = case
    rng = np.random.default_rng(len(str(case)))
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::7] = x.reshape(-1)[1]  # ties: the first maximum's index wins
    for outputs in (("y",), ("y", "i")):
        model = pool_model("MaxPool", x, outputs, opset=12, **attrs)
        cpu, expected = compile_both(model, {"x": x})
        assert "ref_MaxPool" not in cpu.source
        assert_close(cpu.run({"x": x}), expected, exact=True)


@pytest.mark.parametrize("case", POOLS, ids=POOL_IDS)
def test_average_and_lp_pool(case):
    shape, attrs = case
    rng = np.random.default_rng(len(str(case)) + 1)
    x = rng.standard_normal(shape).astype(np.float32)
    for op, extra in (("AveragePool", {"count_include_pad": 0}),
                      ("AveragePool", {"count_include_pad": 1}), ("LpPool", {"p": 2}),
                      ("LpPool", {"p": 3})):
        lp_attrs = {k: v for k, v in attrs.items() if op != "LpPool" or k != "dilations"}
        model = pool_model(op, x, opset=19 if op == "AveragePool" else 18, **lp_attrs, **extra)
        cpu, expected = compile_both(model, {"x": x})
        assert f"ref_{op}" not in cpu.source
        assert_close(cpu.run({"x": x}), expected)


def test_max_pool_nan_int_and_storage_order():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    x[0, 1, 2, 3] = np.nan
    x[1, 2, 0, 0] = -np.inf
    model = pool_model("MaxPool", x, ("y", "i"), opset=12, kernel_shape=[3, 3], strides=[2, 2],
                       pads=[1, 1, 1, 1], storage_order=1)
    cpu, expected = compile_both(model, {"x": x})
    got = cpu.run({"x": x})
    np.testing.assert_array_equal(got["i"], expected["i"])
    np.testing.assert_array_equal(got["y"], expected["y"])  # NaN positions included
    model = pool_model("MaxPool", x, opset=12, kernel_shape=[3, 3], strides=[2, 2])
    cpu, expected = compile_both(model, {"x": x})
    np.testing.assert_array_equal(cpu.run({"x": x})["y"], expected["y"])
    q = rng.integers(-128, 127, (1, 3, 7, 7)).astype(np.int8)
    model = pool_model("MaxPool", q, opset=12, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    cpu, expected = compile_both(model, {"x": q})
    assert_close(cpu.run({"x": q}), expected, exact=True)


def test_pools_parallel_into_concat_slices():
    """Above the serial threshold: the parallel kernels, writing channel slices of an elided
    concat with batch 2 (strided destinations)."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((2, 19, 58, 57)).astype(np.float32)
    nodes = [helper.make_node("MaxPool", ["x"], ["a"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["x"], ["b"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1], count_include_pad=0),
             helper.make_node("MaxPool", ["x"], ["c"], kernel_shape=[2, 2], strides=[2, 2],
                              pads=[0, 0, 1, 1], ceil_mode=1),
             helper.make_node("Concat", ["a", "b", "c"], ["cat"], axis=1),
             helper.make_node("Relu", ["cat"], ["y"])]
    model = make_model(nodes, {"x": x}, ["y"], opset=19)
    cpu, expected = compile_both(model, {"x": x})
    assert "k_max_pool(" in cpu.source and "k_sum_pool(" in cpu.source
    concat = [n for n in cpu.graph.nodes if n.op == "Concat"]
    assert concat and concat[0].annotations.get("elided"), "the concat should be elided"
    assert_close(cpu.run({"x": x}), expected)
