"""CPU conv kernels (kernels/conv.py, kernels/winograd.py, kernels/epilogue.py) through their
emitters: every algorithm, forced through the node annotation, against the reference executor on
odd shapes (1x1 images, prime channel counts, stride > kernel, asymmetric pads, dilation, batch 2),
with every fused epilogue, 1-D/3-D, ConvTranspose, and writes into strided concat slices."""

import numpy as np
import pytest
from onnx import helper

import cnncompile
from cnncompile.backends.cpu.backend import CpuBackend
from cnncompile.backends.cpu.kernels import epilogue as ep
from cnncompile.backends.cpu.kernels.microkernel import pack_weights
from cnncompile.ops import OPS
from cnncompile.runtime.module import Module
from helpers import make_model, rel_l2

TOL = 1e-4
OPSET = 20  # Gelu, Mish and HardSwish are in it
CONV_OPS = ("Conv", "FusedConv", "ConvTranspose")
# the kernels an algorithm may run as (one input channel per group runs the depthwise kernel)
KERNEL_CALL = {"im2col_gemm": ("k_conv_im2col(",), "grouped": ("k_conv_im2col(",),
               "gemm_1x1": ("k_conv_gemm_1x1(",),
               "direct": ("k_conv_direct(", "k_conv_depthwise("),
               "depthwise": ("k_conv_direct(", "k_conv_depthwise("),
               "winograd_f2x2_3x3": ("k_conv_winograd(",),
               "winograd_f4x4_3x3": ("k_conv_winograd(",), "transposed": ("k_conv_transpose(",)}


def conv_model(x_shape, w_shape, attrs, seed, bias=True, op="Conv", act=None, residual=False,
               post=None):
    """Conv [-> act] [-> Add(R)] [-> post]; returns (model, feeds)."""
    rng = np.random.default_rng(seed)
    fan_in = int(np.prod(w_shape[1:]))
    inits = {"W": (rng.standard_normal(w_shape) / np.sqrt(fan_in)).astype(np.float32)}
    inputs = ["X", "W"]
    if bias:
        k_out = w_shape[0] if op == "Conv" else w_shape[1] * attrs.get("group", 1)
        inits["B"] = rng.standard_normal(k_out).astype(np.float32)
        inputs.append("B")
    nodes = [helper.make_node(op, inputs, ["Y0"], **attrs)]
    last = "Y0"
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    for stage, spec in (("act", act), ("res", residual), ("post", post)):
        if not spec:
            continue
        if stage == "res":
            nodes.append(helper.make_node("Add", [last, "R"], [f"Y_{stage}"]))
        else:
            name, kwargs = spec
            nodes.append(helper.make_node(name, [last], [f"Y_{stage}"], **kwargs))
        last = f"Y_{stage}"
    nodes[-1].output[0] = "Y"
    specs = {"X": feeds["X"]}
    if residual:
        conv = make_model(nodes[:1], {"X": feeds["X"]}, ["Y0"], inits, opset=OPSET)
        shape = cnncompile.compile(conv).graph.outputs[0].type.shape
        feeds["R"] = rng.standard_normal(shape).astype(np.float32)
        specs["R"] = feeds["R"]
    return make_model(nodes, specs, ["Y"], inits, opset=OPSET), feeds


def forced(model, feeds, algorithm):
    """Compile for the CPU with every conv node's algorithm forced (None: the pass's choice)."""
    shapes = {k: v.shape for k, v in feeds.items()}
    mod = cnncompile.compile(model, target="cpu", input_shapes=shapes)
    if algorithm is not None:
        for node in mod.graph.nodes:
            if node.op in CONV_OPS:
                node.annotations["algorithm"] = algorithm
        mod = Module(mod.graph, CpuBackend(mod.graph), "cpu")
    return mod


def check(model, feeds, algorithm, fused=None, kernel=None):
    """Run forced and reference, compare; the kernel (not the reference fallback) must run."""
    mod = forced(model, feeds, algorithm)
    shapes = {k: v.shape for k, v in feeds.items()}
    expected = cnncompile.compile(model, target="reference", input_shapes=shapes).run(feeds)
    source = mod.source
    for op in CONV_OPS:
        assert f"ref_{op}." not in source, f"{op} fell back to the reference:\n{source}"
    if algorithm is not None:
        calls = (kernel,) if kernel else KERNEL_CALL[algorithm]
        assert any(call in source for call in calls), source
    if fused is not None:
        convs = [n for n in mod.graph.nodes if n.op in CONV_OPS]
        assert [n.op for n in convs] == ["FusedConv"], [n.op for n in mod.graph.nodes]
        for key, value in fused.items():
            assert convs[0].attrs[key] == value, (key, convs[0].attrs)
    got = mod.run(feeds)
    for name, want in expected.items():
        assert got[name].shape == want.shape
        err = rel_l2(got[name], want)
        assert err <= TOL, f"{algorithm}: relative L2 {err:.3g}"
    return got


# ---- every algorithm on odd shapes ---------------------------------------------------------------
# (x shape, w shape, attrs)
GENERAL = [
    ((1, 3, 9, 9), (7, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((2, 7, 1, 1), (13, 7, 3, 3), {"pads": [1, 1, 1, 1]}),                      # 1x1 image
    ((2, 5, 10, 7), (7, 5, 3, 2), {"pads": [0, 1, 2, 0], "strides": [2, 3],
                                   "dilations": [1, 2]}),                       # asym, dilated
    ((1, 13, 11, 8), (3, 13, 2, 2), {"strides": [3, 3]}),                       # stride > kernel
    ((1, 3, 12, 12), (5, 3, 7, 7), {"pads": [3, 3, 3, 3], "strides": [2, 2]}),  # conv1-like
    ((2, 4, 6, 5), (6, 4, 1, 1), {"pads": [1, 0, 0, 2]}),                      # padded 1x1
    ((1, 4, 8, 8), (3, 4, 1, 1), {"strides": [2, 2]}),                          # strided 1x1
]
ONE_BY_ONE = [
    ((2, 7, 5, 5), (13, 7, 1, 1), {}),
    ((1, 3, 1, 1), (5, 3, 1, 1), {}),
    ((2, 16, 3, 7), (4, 16, 1, 1), {}),
]
WINOGRAD = [
    ((1, 8, 7, 9), (5, 8, 3, 3), {"pads": [1, 1, 1, 1]}),                       # partial tiles
    ((2, 7, 11, 6), (13, 7, 3, 3), {"pads": [1, 0, 2, 1]}),                     # asym, batch 2
    ((1, 3, 1, 1), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),                       # 1x1 image
    ((1, 16, 10, 10), (16, 16, 3, 3), {}),                                      # unpadded
    ((2, 32, 13, 13), (32, 32, 3, 3), {"pads": [1, 1, 1, 1]}),
]
DEPTHWISE = [
    ((2, 7, 9, 9), (7, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 7}),
    ((1, 6, 11, 10), (6, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 6, "strides": [2, 2]}),
    ((1, 5, 12, 12), (5, 1, 5, 5), {"pads": [2, 2, 2, 2], "group": 5}),
    ((2, 6, 11, 10), (6, 1, 5, 5), {"pads": [2, 1, 2, 2], "group": 6, "strides": [2, 2]}),
    ((1, 4, 9, 9), (4, 1, 7, 7), {"pads": [3, 3, 3, 3], "group": 4}),          # generic
    ((1, 3, 9, 9), (3, 1, 3, 3), {"pads": [2, 2, 2, 2], "group": 3, "dilations": [2, 2]}),
    ((1, 3, 1, 1), (3, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 3}),
    ((1, 3, 7, 7), (3, 1, 3, 3), {"pads": [0, 2, 1, 0], "group": 3, "strides": [3, 3]}),
]
GROUPED = [  # more than 8 channels per group: im2col + one GEMM per group
    ((2, 18, 7, 7), (10, 9, 3, 3), {"pads": [1, 1, 1, 1], "group": 2}),
    ((1, 22, 5, 6), (4, 11, 1, 1), {"group": 2}),
    ((1, 27, 9, 9), (6, 9, 3, 3), {"pads": [0, 1, 1, 0], "group": 3, "strides": [2, 2]}),
]
SMALL_GROUPS = [  # up to 8 channels per group: the direct kernel
    ((2, 6, 7, 7), (9, 2, 3, 3), {"pads": [1, 1, 1, 1], "group": 3}),
    ((1, 8, 5, 6), (4, 4, 1, 1), {"group": 2}),
    ((1, 12, 9, 9), (12, 3, 3, 3), {"pads": [0, 1, 1, 0], "group": 4, "strides": [2, 2]}),
]
CASES = ([("im2col_gemm", c) for c in GENERAL] + [("direct", c) for c in GENERAL]
         + [("gemm_1x1", c) for c in ONE_BY_ONE]
         + [(a, c) for a in ("winograd_f2x2_3x3", "winograd_f4x4_3x3") for c in WINOGRAD]
         + [("depthwise", c) for c in DEPTHWISE] + [("grouped", c) for c in GROUPED]
         + [("small_groups", c) for c in SMALL_GROUPS]
         + [("direct", c) for c in GROUPED[:1] + SMALL_GROUPS[:1] + DEPTHWISE[:1]])


@pytest.mark.parametrize("algorithm, case", CASES,
                         ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_algorithm_matches_reference(algorithm, case):
    x_shape, w_shape, attrs = case
    model, feeds = conv_model(x_shape, w_shape, attrs, seed=len(str(case)))
    if algorithm == "small_groups":
        check(model, feeds, "grouped", kernel="k_conv_direct(")
    else:
        check(model, feeds, algorithm)


@pytest.mark.parametrize("algorithm", ["im2col_gemm", "direct"])
@pytest.mark.parametrize("case", [
    ((2, 3, 11), (4, 3, 3), {"pads": [1, 2], "strides": [2]}),
    ((1, 5, 13), (7, 5, 4), {"dilations": [3], "pads": [0, 3]}),
    ((1, 3, 5, 6, 7), (4, 3, 3, 3, 3), {"pads": [1, 1, 1, 0, 0, 0]}),
    ((2, 2, 4, 5, 3), (3, 2, 2, 3, 1), {"strides": [2, 1, 3], "pads": [0, 1, 0, 1, 0, 2]}),
], ids=["1d", "1d-dilated", "3d", "3d-strided"])
def test_1d_and_3d(algorithm, case):
    x_shape, w_shape, attrs = case
    model, feeds = conv_model(x_shape, w_shape, attrs, seed=3)
    check(model, feeds, algorithm)


def test_depthwise_3d_and_1d_match_the_reference():
    model, feeds = conv_model((1, 4, 5, 6, 7), (4, 1, 3, 3, 3), {"pads": [1] * 6, "group": 4}, 4)
    check(model, feeds, "depthwise")
    model, feeds = conv_model((2, 4, 9), (4, 1, 3), {"pads": [1, 1], "group": 4}, 5)
    check(model, feeds, "depthwise")


# ---- fused epilogues -----------------------------------------------------------------------------
ACTIVATIONS = [
    ("Relu", {}), ("Clip", None), ("LeakyRelu", {"alpha": 0.2}), ("Sigmoid", {}),
    ("HardSwish", {}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("Tanh", {}),
    ("Gelu", {}), ("Gelu", {"approximate": "tanh"}), ("Elu", {"alpha": 0.7}),
    ("Selu", {}), ("Softplus", {}), ("Mish", {}),
]
EPILOGUE_ALGORITHMS = ["im2col_gemm", "winograd_f4x4_3x3", "direct", "winograd_f2x2_3x3"]


@pytest.mark.parametrize("index", range(len(ACTIVATIONS)))
def test_each_activation_fused(index):
    name, kwargs = ACTIVATIONS[index]
    algorithm = EPILOGUE_ALGORITHMS[index % len(EPILOGUE_ALGORITHMS)]
    model, feeds = conv_model((2, 5, 7, 6), (6, 5, 3, 3), {"pads": [1, 1, 1, 1]}, seed=index,
                              act=(name, kwargs or {}))
    if name == "Clip":  # Clip bounds are inputs from opset 11 on
        model, feeds = clip_model(-0.5, 1.5)
    check(model, feeds, algorithm, fused={"activation": name})


def clip_model(lo, hi):
    from onnx import numpy_helper
    model, feeds = conv_model((2, 5, 7, 6), (6, 5, 3, 3), {"pads": [1, 1, 1, 1]}, seed=9)
    graph = model.graph
    graph.node[0].output[0] = "Y0"
    graph.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), "lo"),
                              numpy_helper.from_array(np.array(hi, np.float32), "hi")])
    graph.node.append(helper.make_node("Clip", ["Y0", "lo", "hi"], ["Y"]))
    return model, feeds


@pytest.mark.parametrize("algorithm", ["im2col_gemm", "gemm_1x1", "winograd_f2x2_3x3",
                                       "winograd_f4x4_3x3", "direct", "depthwise"])
def test_residual_and_post_activation(algorithm):
    one = algorithm == "gemm_1x1"
    depthwise = algorithm == "depthwise"
    w_shape = (6, 1, 3, 3) if depthwise else (6, 6, 1, 1) if one else (6, 6, 3, 3)
    attrs = {} if one else {"pads": [1, 1, 1, 1]}
    if depthwise:
        attrs["group"] = 6
    model, feeds = conv_model((2, 6, 9, 7), w_shape, attrs, seed=21, act=("Relu", {}),
                              residual=True, post=("Relu", {}))
    check(model, feeds, algorithm, fused={"activation": "Relu", "residual": True,
                                          "post_activation": "Relu"})


def test_residual_with_other_post_activation():
    model, feeds = conv_model((1, 4, 6, 6), (4, 4, 3, 3), {"pads": [1, 1, 1, 1]}, seed=22,
                              act=("Sigmoid", {}), residual=True, post=("Tanh", {}))
    check(model, feeds, "winograd_f4x4_3x3", fused={"post_activation": "Tanh"})
    model, feeds = conv_model((1, 4, 6, 6), (4, 4, 3, 3), {"pads": [1, 1, 1, 1]}, seed=23,
                              residual=True)
    check(model, feeds, "im2col_gemm", fused={"residual": True, "activation": ""})


# ---- ConvTranspose -------------------------------------------------------------------------------
TRANSPOSED = [
    ((2, 4, 5, 5), (4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 0, 0],
                                  "output_padding": [1, 1]}),
    ((1, 4, 5, 6), (4, 2, 2, 3), {"strides": [2, 1], "group": 2, "dilations": [1, 2]}),
    ((1, 6, 3, 3), (6, 1, 3, 3), {"strides": [3, 3], "group": 6, "output_padding": [2, 1]}),
    ((1, 3, 7), (3, 5, 4), {"strides": [3], "pads": [1, 2]}),
    ((1, 2, 3, 4, 3), (2, 3, 2, 2, 2), {"strides": [2, 2, 2], "pads": [0, 1, 0, 1, 0, 1]}),
    ((2, 3, 1, 1), (3, 7, 2, 2), {"strides": [2, 2]}),
]


@pytest.mark.parametrize("case", TRANSPOSED, ids=["output_padding", "groups-dilated",
                                                  "depthwise-op", "1d", "3d", "1x1-image"])
def test_conv_transpose(case):
    x_shape, w_shape, attrs = case
    model, feeds = conv_model(x_shape, w_shape, attrs, seed=31, op="ConvTranspose")
    check(model, feeds, "transposed")


def test_conv_transpose_without_bias():
    model, feeds = conv_model((1, 3, 4, 4), (3, 2, 3, 3), {"strides": [2, 2]}, seed=32,
                              op="ConvTranspose", bias=False)
    check(model, feeds, "transposed")


# ---- strided destinations: elided concat slices with N > 1 ---------------------------------------
CONCAT_CASES = [
    ("im2col_gemm", (6, 5, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("gemm_1x1", (6, 5, 1, 1), {}),
    ("winograd_f4x4_3x3", (6, 5, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("winograd_f2x2_3x3", (6, 5, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("direct", (6, 5, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("depthwise", (5, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 5}),
]


@pytest.mark.parametrize("algorithm, w_shape, attrs", CONCAT_CASES,
                         ids=[c[0] for c in CONCAT_CASES])
def test_fused_conv_writes_into_concat_slice(algorithm, w_shape, attrs):
    rng = np.random.default_rng(41)
    x = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
    inits = {"W": (rng.standard_normal(w_shape) * 0.3).astype(np.float32),
             "B": rng.standard_normal(w_shape[0]).astype(np.float32),
             "W2": (rng.standard_normal((3, 5, 1, 1)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["a"], **attrs),
             helper.make_node("Relu", ["a"], ["a_relu"]),
             helper.make_node("Conv", ["X", "W2"], ["b"]),
             helper.make_node("Concat", ["b", "a_relu"], ["cat"], axis=1),
             helper.make_node("Sigmoid", ["cat"], ["Y"])]
    model = make_model(nodes, {"X": x}, ["Y"], inits, opset=OPSET)
    mod = forced(model, {"X": x}, algorithm)
    concat = [n for n in mod.graph.nodes if n.op == "Concat"]
    assert concat and concat[0].annotations.get("elided"), "the concat should be elided"
    assert "a slice of its concat" in mod.source
    fused = [n for n in mod.graph.nodes if n.op == "FusedConv"]
    assert fused and fused[0].attrs["activation"] == "Relu"
    check(model, {"X": x}, algorithm)


def test_strided_input_view():
    """A conv reading a concat slice (strided with N = 2) and a channel-sliced output."""
    rng = np.random.default_rng(42)
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    inits = {"W": (rng.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32),
             "W3": (rng.standard_normal((3, 4, 3, 3)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["X", "W"], ["a"]),
             helper.make_node("Concat", ["X", "a"], ["cat"], axis=1),
             helper.make_node("Conv", ["a", "W3"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["cat", "c"], ["Y"], axis=1)]
    model = make_model(nodes, {"X": x}, ["Y"], inits)
    for algorithm in ("im2col_gemm", "winograd_f2x2_3x3"):
        check(model, {"X": x}, None if algorithm == "im2col_gemm" else algorithm)


# ---- how the drivers split the work -------------------------------------------------------------
# shapes large enough for the other plan of each driver (the cases above are small: batched
# columns, Winograd image blocks): position blocks for im2col / 1x1, tile-row bands for Winograd
SPLIT_CASES = [
    ("im2col_gemm", (2, 5, 23, 29), (7, 5, 3, 3), {"pads": [2, 1, 0, 1], "strides": [1, 2]}),
    ("gemm_1x1", (2, 13, 20, 17), (11, 13, 1, 1), {}),
    ("winograd_f2x2_3x3", (2, 11, 26, 23), (7, 11, 3, 3), {"pads": [1, 0, 2, 1]}),
    ("winograd_f4x4_3x3", (1, 16, 70, 64), (17, 16, 3, 3), {"pads": [1, 1, 1, 1]}),
]


@pytest.mark.parametrize("algorithm, x_shape, w_shape, attrs", SPLIT_CASES,
                         ids=[c[0] for c in SPLIT_CASES])
def test_blocks_and_bands_match_reference(algorithm, x_shape, w_shape, attrs):
    model, feeds = conv_model(x_shape, w_shape, attrs, seed=61, act=("Relu", {}), residual=True,
                              post=("Relu", {}))
    check(model, feeds, algorithm)


# the batched plan (small images side by side): its products split by rows, or (few output
# channels, images enough) by images, with an odd last share; grouped; 1x1 reading x itself
BATCHED_CASES = [
    ("im2col_gemm", (5, 6, 7, 7), (12, 6, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("im2col_gemm", (3, 8, 5, 6), (300, 8, 3, 3), {"pads": [1, 0, 1, 2]}),
    ("grouped", (3, 32, 6, 6), (10, 16, 3, 3), {"pads": [1, 1, 1, 1], "group": 2}),
    ("gemm_1x1", (7, 9, 4, 5), (13, 9, 1, 1), {}),
]


@pytest.mark.parametrize("algorithm, x_shape, w_shape, attrs", BATCHED_CASES,
                         ids=["image_split", "row_split", "grouped", "1x1"])
def test_batched_plan_matches_reference(algorithm, x_shape, w_shape, attrs):
    model, feeds = conv_model(x_shape, w_shape, attrs, seed=63, act=("Relu", {}), residual=True,
                              post=("Relu", {}))
    check(model, feeds, algorithm)


@pytest.mark.parametrize("algorithm", [c[0] for c in SPLIT_CASES])
def test_blocks_and_bands_write_into_concat_slice(algorithm):
    _, x_shape, w_shape, attrs = next(c for c in SPLIT_CASES if c[0] == algorithm)
    rng = np.random.default_rng(62)
    x = rng.standard_normal((2,) + x_shape[1:]).astype(np.float32)
    inits = {"W": (rng.standard_normal(w_shape) * 0.3).astype(np.float32),
             "B": rng.standard_normal(w_shape[0]).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["a"], **attrs),
             helper.make_node("Relu", ["a"], ["a_relu"]),
             helper.make_node("Conv", ["X", "W"], ["b"], **attrs),
             helper.make_node("Concat", ["b", "a_relu"], ["cat"], axis=1),
             helper.make_node("Sigmoid", ["cat"], ["Y"])]
    model = make_model(nodes, {"X": x}, ["Y"], inits, opset=OPSET)
    assert "a slice of its concat" in forced(model, {"X": x}, algorithm).source
    check(model, {"X": x}, algorithm)


def _conv_reference(x, w, bias, attrs, residual):
    """Conv + bias, Relu, + residual, Relu in float64: what the drivers compute below."""
    y = OPS["Conv"].reference(x.astype(np.float64), w.astype(np.float64), bias.astype(np.float64),
                              pads=attrs.get("pads", [0] * 4), strides=[1, 1], dilations=[1, 1])
    return np.maximum(np.maximum(y, 0) + residual, 0)


@pytest.mark.parametrize("threads", [1, 2])
def test_drivers_split_the_same_with_any_thread_count(threads):
    """The drivers called directly with 1 and 2 threads, with and without enough scratch (a
    smaller ws makes them allocate), in both plans each, against the reference."""
    import numba

    from cnncompile.backends.cpu.kernels import conv, winograd

    rng = np.random.default_rng(63 + threads)
    relu = (1, 0.0, 0.0)
    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for x_shape, k_out, kernel, attrs in [((3, 6, 5, 4), 9, 3, {"pads": [1, 1, 1, 1]}),
                                              ((1, 4, 30, 33), 5, 3, {"pads": [1, 0, 1, 1]}),
                                              ((2, 5, 3, 2), 3, 1, {}),
                                              ((1, 5, 17, 19), 3, 1, {})]:
            x = rng.standard_normal(x_shape).astype(np.float32)
            w = rng.standard_normal((k_out, x_shape[1], kernel, kernel)).astype(np.float32)
            bias = rng.standard_normal(k_out).astype(np.float32)
            out_shape = _conv_reference(x, w, bias, attrs, 0).shape
            res = rng.standard_normal(out_shape).astype(np.float32)
            want = _conv_reference(x, w, bias, attrs, res)
            g = conv.geometry((kernel, kernel), (1, 1), (1, 1), attrs.get("pads", [0] * 4),
                              out_shape[2:])
            runs = {}
            for ws in (None, np.empty(0, np.float32)):
                out = np.full(out_shape, np.nan, np.float32)
                wmat = w.reshape(1, k_out, -1)
                if kernel == 1:
                    conv.conv_gemm_1x1(x, wmat[0], bias, out, relu, res, relu, ws=ws)
                    runs["gemm_1x1"] = out
                    out = np.full(out_shape, np.nan, np.float32)
                    conv.conv_gemm_1x1(x, None, bias, out, relu, res, relu, ws=ws,
                                       packed=pack_weights(wmat))
                    runs["gemm_1x1 packed"] = out
                else:
                    size = conv.scratch_size("im2col_gemm", x.shape, w.shape, g)
                    for packed in (False, True):
                        out = np.full(out_shape, np.nan, np.float32)
                        conv.conv_im2col(x, None if packed else wmat, bias, out,
                                         np.empty(size, np.float32) if ws is None else ws, g,
                                         act=relu, residual=res, post=relu,
                                         packed=pack_weights(wmat) if packed else None)
                        runs[f"im2col packed={packed}"] = out
                    for m in (2, 4):
                        for packed in (False, True):
                            out = np.full(out_shape, np.nan, np.float32)
                            size = winograd.scratch_size(x.shape[0], x.shape[1], k_out,
                                                         *out_shape[2:], m)
                            u = winograd.transform_weights(w, m, packed=packed)
                            winograd.conv_winograd(x, u, bias, out,
                                                   np.empty(size, np.float32) if ws is None
                                                   else ws, m, attrs["pads"], relu, res, relu)
                            runs[f"F({m}x{m}) packed={packed}"] = out
                for name, got in runs.items():
                    assert rel_l2(got, want) <= TOL, (name, x_shape, rel_l2(got, want))
    finally:
        numba.set_num_threads(saved)


# ---- declines and defaults -----------------------------------------------------------------------
def test_float64_falls_back_to_reference():
    rng = np.random.default_rng(51)
    x = rng.standard_normal((1, 3, 5, 5))
    node = helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])
    model = make_model([node], {"X": x}, ["Y"], {"W": rng.standard_normal((2, 3, 3, 3))})
    mod = cnncompile.compile(model, target="cpu", input_shapes={"X": x.shape})
    assert "ref_Conv.reference(" in mod.source
    expected = cnncompile.compile(model, input_shapes={"X": x.shape}).run({"X": x})["Y"]
    np.testing.assert_allclose(mod.run({"X": x})["Y"], expected, rtol=1e-12)


def test_unannotated_conv_runs_im2col_at_opt_level_0():
    model, feeds = conv_model((1, 3, 6, 6), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}, seed=52)
    mod = cnncompile.compile(model, target="cpu", input_shapes={"X": (1, 3, 6, 6)}, opt_level=0)
    assert "k_conv_im2col(" in mod.source
    expected = cnncompile.compile(model, input_shapes={"X": (1, 3, 6, 6)}).run(feeds)["Y"]
    assert rel_l2(mod.run(feeds)["Y"], expected) <= TOL


def test_unsupported_epilogue_declines():
    model, feeds = conv_model((1, 3, 6, 6), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}, seed=53,
                              act=("Abs", {}))
    mod = cnncompile.compile(model, target="cpu", input_shapes={"X": (1, 3, 6, 6)})
    assert "ref_FusedConv.reference(" in mod.source
    expected = cnncompile.compile(model, input_shapes={"X": (1, 3, 6, 6)}).run(feeds)["Y"]
    assert rel_l2(mod.run(feeds)["Y"], expected) <= TOL


def test_pass_choices_run_their_kernels():
    """The lowering pass's own choice on a small ResNet-like block (no forcing)."""
    model, feeds = conv_model((2, 32, 10, 10), (32, 32, 3, 3), {"pads": [1, 1, 1, 1]}, seed=54,
                              act=("Relu", {}), residual=True, post=("Relu", {}))
    got = check(model, feeds, None)
    assert got["Y"].min() >= 0


# ---- the epilogue kernel itself ------------------------------------------------------------------
def test_epilogue_kernel_matches_references():
    rng = np.random.default_rng(61)
    y = (rng.standard_normal((2, 5, 4, 3)) * 3).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    r = rng.standard_normal(y.shape).astype(np.float32)
    big = np.zeros((2, 9, 4, 3), np.float32)
    for name, kwargs in ACTIVATIONS + [("Clip", {"min": -1.0, "max": None}), ("Relu6", {}),
                                       ("Silu", {}), ("", {})]:
        if kwargs is None:
            kwargs = {"min": -0.5, "max": 1.5}
        attrs = OPS[name].normalize(kwargs, [], OPSET) if name else {}
        code, params = ep.activation_code(name, attrs)
        want = y + b[None, :, None, None]
        want = OPS[name].reference(want, **attrs) if name else want
        want = np.maximum(want + r, 0)
        out = big[:, 2:7]  # a strided destination
        ep.epilogue(y, b, code, params, r, *ep.activation_code("Relu", {}), out=out)
        assert rel_l2(out, want) <= 1e-6, name
        assert not big[:, :2].any() and not big[:, 7:].any()


def test_activation_code_rejects_other_ops():
    with pytest.raises(ep.UnsupportedActivation):
        ep.activation_code("Abs", {})
    assert ep.activation_code("", None)[0] == ep.NONE


def test_saved_module_runs_after_load(tmp_path):
    """The artifact is source + constants: pre-transformed weights and the module-level scratch
    buffer must come back with it."""
    model, feeds = conv_model((2, 8, 9, 9), (8, 8, 3, 3), {"pads": [1, 1, 1, 1]}, seed=71,
                              act=("Relu", {}))
    mod = forced(model, feeds, "winograd_f4x4_3x3")
    assert "conv_scratch = np.empty(" in mod.source
    expected = mod.run(feeds)["Y"]
    cnncompile.save(mod, tmp_path / "art")
    loaded = cnncompile.load(tmp_path / "art")
    assert "k_conv_winograd(" in loaded.source
    np.testing.assert_array_equal(loaded.run(feeds)["Y"], expected)
