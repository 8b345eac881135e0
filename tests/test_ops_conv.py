"""Conv and ConvTranspose against onnxruntime: random attribute combinations, edge cases, errors.

onnxruntime limits that shape the strategies (each pinned by a test below where we follow the spec):
* Conv with auto_pad=SAME_* and dilations > 1 is refused by onnxruntime;
* Conv with SAME_* and a stride longer than the kernel: onnxruntime lets the head pad go negative
  and shifts every window; the spec (and its reference) clip the padding at zero;
* ConvTranspose with SAME_* where stride > kernel extent + output_padding: onnxruntime returns a
  shorter output than the spec's input_size * stride;
* ConvTranspose: onnxruntime needs output_padding < stride and output_shape no longer than the full
  result plus stride - 1.
"""

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import cnncompile
from cnncompile.errors import ModelError, ShapeError
from cnncompile.ir.types import TensorType
from cnncompile.ops import OPS
from cnncompile.ops.conv import Conv, ConvTranspose
from helpers import check_against_ort, make_model

MAX_SIZE = {1: 9, 2: 7, 3: 5}


def conv_model(op, x, w, b=None, opset=17, weights_as_inputs=False, **attrs):
    consts = {"w": w} if b is None else {"w": w, "b": b}
    names = ["x", *consts]
    feeds = {"x": x}
    if weights_as_inputs:
        feeds.update(consts)
        consts = {}
    node = helper.make_node(op, names, ["y"], name="n0", **attrs)
    return make_model(node, feeds, ["y"], consts, opset=opset), feeds


def run_conv(op, x, w, b=None, opset=17, tol=1e-5, **attrs):
    model, feeds = conv_model(op, x, w, b, opset, **attrs)
    return check_against_ort(model, feeds, tol=tol)[0]


def conv_attrs(model, feeds):
    graph = cnncompile.import_onnx(model, input_shapes={k: v.shape for k, v in feeds.items()})
    return graph.nodes[0].attrs


def extent(k, d):
    return (k - 1) * d + 1


def channels(draw):
    """(C, M, group) with depthwise and grouped layouts as likely as plain ones."""
    layout = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if layout == "depthwise":
        group = draw(st.sampled_from([1, 2, 3, 5]))
        return group, group * draw(st.integers(1, 2)), group
    group = 1 if layout == "plain" else draw(st.integers(2, 3))
    return group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3)), group


# ---- Conv ----------------------------------------------------------------------------------------
@st.composite
def conv_cases(draw):
    rank = draw(st.integers(1, 3))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    kernel = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    attrs = {}
    if auto_pad.startswith("SAME"):
        dilations = [1] * rank
        strides = [draw(st.integers(1, k)) for k in kernel]
    else:
        dilations = draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank))
        strides = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
        attrs["dilations"] = dilations
    attrs["strides"] = strides
    if auto_pad == "NOTSET":
        attrs["pads"] = draw(st.lists(st.integers(0, 2), min_size=2 * rank, max_size=2 * rank))
    else:
        attrs["auto_pad"] = auto_pad
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    sizes = [draw(st.integers(extent(k, d), max(extent(k, d), MAX_SIZE[rank])))
             for k, d in zip(kernel, dilations)]
    c, m, group = channels(draw)
    if group > 1 or draw(st.booleans()):
        attrs["group"] = group
    return dict(rank=rank, kernel=kernel, sizes=sizes, c=c, m=m, group=group,
                batch=draw(st.integers(1, 2)), bias=draw(st.booleans()),
                opset=draw(st.sampled_from([11, 17, 22])), attrs=attrs)


@settings(max_examples=40, deadline=None)
@given(case=conv_cases())
def test_conv_random_attributes(case):
    rng = np.random.default_rng(sum(case["sizes"]) * 31 + case["c"])
    x = rng.standard_normal((case["batch"], case["c"], *case["sizes"])).astype(np.float32)
    w = rng.standard_normal((case["m"], case["c"] // case["group"], *case["kernel"]))
    b = rng.standard_normal(case["m"]).astype(np.float32) if case["bias"] else None
    y = run_conv("Conv", x, w.astype(np.float32), b, case["opset"], **case["attrs"])
    assert y.shape[:2] == (case["batch"], case["m"])


def test_conv_canonical_attributes_resolve_auto_pad():
    x = np.zeros((1, 2, 7, 7), np.float32)
    w = np.zeros((3, 2, 3, 2), np.float32)
    # totals 2 and 1: SAME_LOWER puts the odd one at the beginning
    model, feeds = conv_model("Conv", x, w, auto_pad="SAME_LOWER", strides=[2, 3])
    attrs = conv_attrs(model, feeds)
    assert attrs == {"dilations": [1, 1], "group": 1, "kernel_shape": [3, 2],
                     "pads": [1, 1, 1, 0], "strides": [2, 3]}
    model, feeds = conv_model("Conv", x, w, auto_pad="VALID")
    assert conv_attrs(model, feeds)["pads"] == [0, 0, 0, 0]
    # normalize is idempotent on its own output
    types = [TensorType(np.float32, x.shape), TensorType(np.float32, w.shape)]
    assert Conv.normalize(attrs, types, 17) == attrs


@pytest.mark.parametrize("opset", [7, 11, 22])
def test_conv_every_opset(opset):
    rng = np.random.default_rng(opset)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    run_conv("Conv", x, w, b, opset, group=2, pads=[1, 0, 0, 1], strides=[2, 1])


def test_conv_one_pixel_images():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)
    y = run_conv("Conv", x, rng.standard_normal((5, 3, 1, 1)).astype(np.float32))
    assert y.shape == (2, 5, 1, 1)
    y = run_conv("Conv", x, rng.standard_normal((5, 3, 3, 3)).astype(np.float32),
                 pads=[1, 1, 1, 1])
    assert y.shape == (2, 5, 1, 1)


def test_conv_prime_channel_counts():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 7, 5, 6)).astype(np.float32)
    run_conv("Conv", x, rng.standard_normal((11, 7, 3, 3)).astype(np.float32),
             rng.standard_normal(11).astype(np.float32), pads=[1, 1, 1, 1])
    x = rng.standard_normal((1, 13, 5, 6)).astype(np.float32)
    y = run_conv("Conv", x, rng.standard_normal((13, 1, 3, 3)).astype(np.float32), group=13)
    assert y.shape == (1, 13, 3, 4)


@pytest.mark.parametrize("group", [1, 2, 3, 96])
def test_conv_grouped_paths_agree(group):
    # groups of <= 32 channels take the tap loop (3, 96), wider ones im2col (1, 2)
    rng = np.random.default_rng(group)
    x = rng.standard_normal((2, 96, 6, 5)).astype(np.float32)
    w = rng.standard_normal((96, 96 // group, 3, 2)).astype(np.float32)
    run_conv("Conv", x, w, rng.standard_normal(96).astype(np.float32), group=group,
             strides=[2, 1], dilations=[1, 2], pads=[1, 0, 1, 1])


def test_conv_stride_longer_than_kernel():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 11, 10)).astype(np.float32)
    y = run_conv("Conv", x, rng.standard_normal((3, 2, 2, 1)).astype(np.float32),
                 strides=[4, 3])
    assert y.shape == (1, 3, 3, 4)


def test_conv_same_with_stride_longer_than_kernel_clips_padding_at_zero():
    # onnxruntime gives [1, 5] here (a negative head pad shifts its windows); the spec's pads are
    # max(0, ...), as in onnx's reference implementation and TensorFlow
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 8)
    w = np.ones((1, 1, 1), np.float32)
    model, feeds = conv_model("Conv", x, w, auto_pad="SAME_UPPER", strides=[4])
    mod = cnncompile.compile(model, input_shapes={"x": x.shape})
    np.testing.assert_array_equal(mod.run(feeds)["y"], [[[0.0, 4.0]]])
    assert mod.graph.nodes[0].attrs["pads"] == [0, 0]


def test_conv_same_with_dilation_uses_the_dilated_extent():
    # onnxruntime refuses SAME with dilations; the output must still be ceil(size / stride)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 9, 8)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    model, feeds = conv_model("Conv", x, w, auto_pad="SAME_UPPER", dilations=[2, 3])
    mod = cnncompile.compile(model, input_shapes={"x": x.shape})
    assert mod.graph.nodes[0].attrs["pads"] == [2, 3, 2, 3]
    explicit = run_conv("Conv", x, w, dilations=[2, 3], pads=[2, 3, 2, 3])
    np.testing.assert_array_equal(mod.run(feeds)["y"], explicit)


def test_conv_weights_and_bias_as_graph_inputs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    model, feeds = conv_model("Conv", x, w, b, weights_as_inputs=True, group=2,
                              auto_pad="SAME_UPPER")
    check_against_ort(model, feeds)


def test_conv_float16_and_float64():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 3, 6, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    run_conv("Conv", x.astype(np.float16), w.astype(np.float16), tol=2e-3, pads=[1, 1, 1, 1])
    y = Conv.reference(x, w, pads=[1, 1, 1, 1])
    want = Conv.reference(x.astype(np.float32), w.astype(np.float32), pads=[1, 1, 1, 1])
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_conv_resnet50_layer_reference_is_fast():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 64, 56, 56)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    attrs = {"dilations": [1, 1], "group": 1, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
             "strides": [1, 1]}
    Conv.reference(x, w, **attrs)  # warm up BLAS
    start = time.perf_counter()
    y = Conv.reference(x, w, **attrs)
    elapsed = time.perf_counter() - start
    assert y.shape == (1, 64, 56, 56)
    assert elapsed < 0.5, f"the reference took {elapsed:.3f} s"
    # and it is right: one output pixel computed by hand
    patch = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))[0, :, 10:13, 20:23]
    np.testing.assert_allclose(y[0, 5, 10, 20], (patch * w[5]).sum(), rtol=1e-4)


# ---- Conv errors ---------------------------------------------------------------------------------
def compile_error(model, feeds):
    return cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})


def test_conv_channel_mismatch_names_both_shapes():
    model, feeds = conv_model("Conv", np.zeros((1, 3, 5, 5), np.float32),
                              np.zeros((4, 2, 3, 3), np.float32))
    with pytest.raises(ShapeError, match=r"Conv node 'n0'.*\[1, 3, 5, 5\].*\[4, 2, 3, 3\]"):
        compile_error(model, feeds)


def test_conv_group_not_dividing_channels():
    model, feeds = conv_model("Conv", np.zeros((1, 5, 5, 5), np.float32),
                              np.zeros((4, 2, 3, 3), np.float32), group=2)
    with pytest.raises(ShapeError, match=r"\[1, 5, 5, 5\] with 5 channels.*group=2"):
        compile_error(model, feeds)
    model, feeds = conv_model("Conv", np.zeros((1, 4, 5, 5), np.float32),
                              np.zeros((3, 2, 3, 3), np.float32), group=2)
    with pytest.raises(ShapeError, match=r"\[3, 2, 3, 3\].*3 output channels.*group=2"):
        compile_error(model, feeds)


def test_conv_bad_bias_kernel_shape_and_too_small_input():
    x = np.zeros((1, 2, 4, 4), np.float32)
    w = np.zeros((3, 2, 3, 3), np.float32)
    model, feeds = conv_model("Conv", x, w, np.zeros(4, np.float32))
    with pytest.raises(ShapeError, match=r"B has shape \[4\]; expected \[3\]"):
        compile_error(model, feeds)
    model, feeds = conv_model("Conv", x, w, kernel_shape=[3, 2])
    with pytest.raises(ShapeError, match=r"kernel_shape=\[3, 2\].*\[3, 2, 3, 3\]"):
        compile_error(model, feeds)
    model, feeds = conv_model("Conv", x, w, dilations=[3, 1])
    with pytest.raises(ShapeError, match=r"shape \[4, 4\] is too small.*dilations=\[3, 1\]"):
        compile_error(model, feeds)
    model, feeds = conv_model("Conv", x, w, strides=[1, 1, 1])
    with pytest.raises(ModelError, match=r"'strides' = \[1, 1, 1\] needs 2 values"):
        compile_error(model, feeds)
    model, feeds = conv_model("Conv", x, w, auto_pad="SAME")
    with pytest.raises(ModelError, match=r"auto_pad='SAME' is not one of"):
        compile_error(model, feeds)


def test_conv_rank_mismatch():
    model, feeds = conv_model("Conv", np.zeros((1, 2, 4, 4), np.float32),
                              np.zeros((3, 2, 3), np.float32))
    with pytest.raises(ShapeError, match=r"W has shape \[3, 2, 3\] \(rank 3\).*needs rank 4"):
        compile_error(model, feeds)


def test_conv_flops():
    x, w = TensorType(np.float32, (2, 8, 10, 10)), TensorType(np.float32, (6, 4, 3, 3))
    attrs = {"dilations": [1, 1], "group": 2, "kernel_shape": [3, 3], "pads": [0, 0, 0, 0],
             "strides": [1, 1]}
    y = Conv.infer(x, w, **attrs)
    assert y == TensorType(np.float32, (2, 6, 8, 8))
    assert OPS["Conv"].flops([x, w], [y], **attrs) == 2 * 2 * 6 * 64 * 4 * 9


# ---- ConvTranspose -------------------------------------------------------------------------------
@st.composite
def conv_transpose_cases(draw):
    rank = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["pads", "pads", "output_shape", "SAME_UPPER", "SAME_LOWER",
                                 "VALID"]))
    kernel = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    dilations = draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank))
    strides = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    sizes = draw(st.lists(st.integers(1, MAX_SIZE[rank] - 1), min_size=rank, max_size=rank))
    padding = [draw(st.integers(0, s - 1)) for s in strides]
    if mode.startswith("SAME"):
        # onnxruntime and the spec part ways when stride > extent + output_padding (module doc)
        strides = [min(s, extent(k, d) + p) for s, k, d, p in zip(strides, kernel, dilations,
                                                                 padding)]
    attrs = {"strides": strides, "dilations": dilations}
    if mode == "pads":
        begins = [draw(st.integers(0, extent(k, d) - 1)) for k, d in zip(kernel, dilations)]
        ends = [draw(st.integers(0, extent(k, d) - 1 - b))
                for k, d, b in zip(kernel, dilations, begins)]
        attrs["pads"] = begins + ends
    elif mode == "output_shape":
        padding = [0] * rank
        full = [s * (n - 1) + extent(k, d) for s, n, k, d in zip(strides, sizes, kernel, dilations)]
        totals = [draw(st.integers(-(s - 1), extent(k, d) - 1))
                  for s, k, d in zip(strides, kernel, dilations)]
        attrs["output_shape"] = [f - t for f, t in zip(full, totals)]
        if draw(st.booleans()):
            attrs["auto_pad"] = draw(st.sampled_from(["SAME_UPPER", "SAME_LOWER"]))
    else:
        attrs["auto_pad"] = mode
    if any(padding) or draw(st.booleans()):
        attrs["output_padding"] = padding
    c, m, group = channels(draw)
    if group > 1:
        attrs["group"] = group
    return dict(kernel=kernel, sizes=sizes, c=c, m=m, group=group, batch=draw(st.integers(1, 2)),
                bias=draw(st.booleans()), opset=draw(st.sampled_from([11, 17, 22])), attrs=attrs)


@settings(max_examples=40, deadline=None)
@given(case=conv_transpose_cases())
def test_conv_transpose_random_attributes(case):
    rng = np.random.default_rng(sum(case["sizes"]) * 17 + case["m"])
    x = rng.standard_normal((case["batch"], case["c"], *case["sizes"])).astype(np.float32)
    w = rng.standard_normal((case["c"], case["m"] // case["group"], *case["kernel"]))
    b = rng.standard_normal(case["m"]).astype(np.float32) if case["bias"] else None
    y = run_conv("ConvTranspose", x, w.astype(np.float32), b, case["opset"], **case["attrs"])
    if "output_shape" in case["attrs"]:
        assert list(y.shape[2:]) == case["attrs"]["output_shape"]


def test_conv_transpose_canonical_attributes():
    x = np.zeros((1, 2, 3), np.float32)
    w = np.zeros((2, 1, 3), np.float32)
    model, feeds = conv_model("ConvTranspose", x, w, strides=[2], output_shape=[6])
    attrs = conv_attrs(model, feeds)
    assert attrs == {"dilations": [1], "group": 1, "kernel_shape": [3], "output_padding": [0],
                     "pads": [1, 0], "strides": [2]}
    model, feeds = conv_model("ConvTranspose", x, w, strides=[2], auto_pad="SAME_UPPER")
    assert conv_attrs(model, feeds)["pads"] == [0, 1]
    # an output_shape past the full result becomes output_padding (onnxruntime agrees)
    model, feeds = conv_model("ConvTranspose", x, w, strides=[2], output_shape=[8])
    attrs = conv_attrs(model, feeds)
    assert attrs["pads"] == [0, 0] and attrs["output_padding"] == [1]
    types = [TensorType(np.float32, x.shape), TensorType(np.float32, w.shape)]
    assert ConvTranspose.normalize(attrs, types, 17) == attrs


def test_conv_transpose_output_shape_with_batch_and_channels_is_accepted():
    # the spec wants spatial sizes only; some exporters write the full shape
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    model, feeds = conv_model("ConvTranspose", x, w, strides=[2, 2], output_shape=[2, 2, 8, 9])
    y = cnncompile.compile(model, input_shapes={"x": x.shape}).run(feeds)["y"]
    assert y.shape == (2, 2, 8, 9)
    np.testing.assert_array_equal(y, run_conv("ConvTranspose", x, w, strides=[2, 2],
                                              output_shape=[8, 9]))


def test_conv_transpose_same_with_long_stride_follows_the_spec():
    # output = size * stride; onnxruntime stops at the full result (8 here)
    x = np.array([1, 10, 100], np.float32).reshape(1, 1, 3)
    w = np.array([1, 2], np.float32).reshape(1, 1, 2)
    b = np.array([0.5], np.float32)
    model, feeds = conv_model("ConvTranspose", x, w, b, strides=[3], auto_pad="SAME_UPPER")
    y = cnncompile.compile(model, input_shapes={"x": x.shape}).run(feeds)["y"]
    np.testing.assert_array_equal(y[0, 0], np.array([1, 2, 0, 10, 20, 0, 100, 200, 0]) + 0.5)


def test_conv_transpose_edge_cases():
    rng = np.random.default_rng(9)
    # one-pixel input, prime channel counts, stride longer than the kernel, depthwise
    run_conv("ConvTranspose", rng.standard_normal((1, 7, 1, 1)).astype(np.float32),
             rng.standard_normal((7, 5, 3, 3)).astype(np.float32),
             rng.standard_normal(5).astype(np.float32))
    y = run_conv("ConvTranspose", rng.standard_normal((2, 3, 4, 3)).astype(np.float32),
                 rng.standard_normal((3, 2, 2, 1)).astype(np.float32), strides=[3, 2])
    assert y.shape == (2, 2, 11, 5)
    run_conv("ConvTranspose", rng.standard_normal((1, 11, 5)).astype(np.float32),
             rng.standard_normal((11, 1, 3)).astype(np.float32), group=11, strides=[2],
             pads=[1, 1], output_padding=[1])


@pytest.mark.parametrize("opset", [7, 11, 22])
def test_conv_transpose_every_opset(opset):
    rng = np.random.default_rng(opset + 100)
    x = rng.standard_normal((1, 4, 5, 4)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    run_conv("ConvTranspose", x, w, rng.standard_normal(6).astype(np.float32), opset, group=2,
             strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 0])


def test_conv_transpose_float16():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float16)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float16)
    run_conv("ConvTranspose", x, w, tol=2e-3, strides=[2, 2])


def test_conv_transpose_errors():
    x = np.zeros((1, 4, 5, 5), np.float32)
    model, feeds = conv_model("ConvTranspose", x, np.zeros((3, 2, 3, 3), np.float32))
    with pytest.raises(ShapeError, match=r"\[1, 4, 5, 5\] \(4 channels\).*\[3, 2, 3, 3\]"):
        compile_error(model, feeds)
    model, feeds = conv_model("ConvTranspose", x, np.zeros((4, 2, 3, 3), np.float32), group=3)
    with pytest.raises(ShapeError, match=r"\[1, 4, 5, 5\] with 4 channels.*group=3"):
        compile_error(model, feeds)
    model, feeds = conv_model("ConvTranspose", x, np.zeros((4, 2, 3, 3), np.float32),
                              pads=[4, 0, 4, 0])
    with pytest.raises(ShapeError, match=r"pads=\[4, 0, 4, 0\] leave nothing"):
        compile_error(model, feeds)
    model, feeds = conv_model("ConvTranspose", x, np.zeros((4, 2, 3, 3), np.float32),
                              output_shape=[9])
    with pytest.raises(ModelError, match=r"output_shape=\[9\] must list 2"):
        compile_error(model, feeds)


def test_conv_transpose_flops():
    x, w = TensorType(np.float32, (2, 4, 5, 5)), TensorType(np.float32, (4, 3, 3, 3))
    attrs = {"dilations": [1, 1], "group": 2, "kernel_shape": [3, 3], "output_padding": [0, 0],
             "pads": [0, 0, 0, 0], "strides": [1, 1]}
    y = ConvTranspose.infer(x, w, **attrs)
    assert y == TensorType(np.float32, (2, 6, 7, 7))
    assert ConvTranspose.flops([x, w], [y], **attrs) == 2 * 2 * 4 * 25 * 3 * 9
    assert math.prod(y.shape) == y.size
