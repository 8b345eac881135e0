"""Pooling against onnxruntime: random window attributes, MaxPool Indices, MaxUnpool, global pools,
edge cases and errors.

onnxruntime limits that shape the strategies (pinned by tests below where we follow the spec):
* pads must be smaller than the kernel (onnxruntime refuses the node otherwise);
* SAME_* with dilations > 1: onnxruntime pads for the undilated kernel and returns fewer outputs
  than the spec's ceil(size / stride);
* SAME_* with a stride longer than the kernel: onnxruntime computes a negative pad and fails;
* GlobalLpPool has no onnxruntime kernel for opset 22 (tests use opset 19, i.e. version 2).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import cnncompile
from cnncompile.errors import ModelError, NotConstantError, ShapeError
from cnncompile.ir.types import TensorType
from cnncompile.ops.pool import (AveragePool, GlobalLpPool, LpPool, MaxPool, MaxUnpool)
from helpers import check_against_ort, make_model, run_ort

MAX_SIZE = {1: 10, 2: 7, 3: 5}


def pool_model(op, x, n_out=1, opset=19, extra_inputs=None, consts=None, **attrs):
    outputs = ["y", "indices"][:n_out]
    names = ["x", *(extra_inputs or {}), *(consts or {})]
    feeds = {"x": x, **(extra_inputs or {})}
    node = helper.make_node(op, names, outputs, name="p0", **attrs)
    return make_model(node, feeds, outputs, consts, opset=opset), feeds


def run_pool(op, x, n_out=1, opset=19, tol=1e-5, **attrs):
    model, feeds = pool_model(op, x, n_out, opset, **attrs)
    return check_against_ort(model, feeds, tol=tol)


def compile_pool(model, feeds):
    return cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})


def extent(k, d):
    return (k - 1) * d + 1


# ---- random windows ------------------------------------------------------------------------------
@st.composite
def pool_cases(draw):
    op = draw(st.sampled_from(["MaxPool", "AveragePool", "LpPool"]))
    rank = draw(st.integers(1, 3))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "VALID", "SAME_UPPER",
                                     "SAME_LOWER"]))
    kernel = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    attrs = {"kernel_shape": kernel}
    if auto_pad.startswith("SAME"):
        dilations = [1] * rank
        attrs["strides"] = [draw(st.integers(1, k)) for k in kernel]
    else:
        dilations = draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank))
        attrs["strides"] = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
        attrs["dilations"] = dilations
    if auto_pad == "NOTSET":
        attrs["pads"] = ([draw(st.integers(0, k - 1)) for k in kernel]
                         + [draw(st.integers(0, k - 1)) for k in kernel])
    else:
        attrs["auto_pad"] = auto_pad
    attrs["ceil_mode"] = draw(st.integers(0, 1))
    n_out = 1
    if op == "MaxPool":
        n_out = draw(st.integers(1, 2))
        attrs["storage_order"] = draw(st.integers(0, 1))
    elif op == "AveragePool":
        attrs["count_include_pad"] = draw(st.integers(0, 1))
    else:
        attrs["p"] = draw(st.integers(1, 3))
    # every window then holds at least one input element
    sizes = [draw(st.integers(extent(k, d), max(extent(k, d), MAX_SIZE[rank])))
             for k, d in zip(kernel, dilations)]
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *sizes)
    return dict(op=op, shape=shape, n_out=n_out, opset=draw(st.sampled_from([19, 22])),
                attrs=attrs)


@settings(max_examples=60, deadline=None)
@given(case=pool_cases())
def test_pool_random_attributes(case):
    rng = np.random.default_rng(sum(case["shape"]) * 7 + len(case["shape"]))
    x = rng.standard_normal(case["shape"]).astype(np.float32)
    outs = run_pool(case["op"], x, case["n_out"], case["opset"], **case["attrs"])
    if case["n_out"] == 2:
        # every index points at the value it reports (column-major spatial axes: storage_order=1)
        if case["attrs"]["storage_order"]:
            x = x.transpose(0, 1, *range(x.ndim - 1, 1, -1))
        np.testing.assert_array_equal(x.reshape(-1)[outs[1]], outs[0])


def test_pool_canonical_attributes():
    x = np.zeros((1, 2, 8, 7), np.float32)
    model, feeds = pool_model("MaxPool", x, kernel_shape=[3, 2], strides=[2, 3],
                              auto_pad="SAME_LOWER", ceil_mode=1)
    attrs = cnncompile.import_onnx(model, input_shapes={"x": x.shape}).nodes[0].attrs
    assert attrs == {"ceil_mode": 0, "dilations": [1, 1], "kernel_shape": [3, 2],
                     "pads": [1, 1, 0, 0], "storage_order": 0, "strides": [2, 3]}
    types = [TensorType(np.float32, x.shape)]
    assert MaxPool.normalize(attrs, types, 19) == attrs
    attrs = AveragePool.normalize({"kernel_shape": [2, 2], "auto_pad": "VALID", "ceil_mode": 1},
                                  types, 7)
    assert attrs == {"ceil_mode": 1, "count_include_pad": 0, "dilations": [1, 1],
                     "kernel_shape": [2, 2], "pads": [0, 0, 0, 0], "strides": [1, 1]}
    assert LpPool.normalize({"kernel_shape": [2, 2]}, types, 11)["p"] == 2


def test_ceil_mode_last_window_must_start_inside():
    # ceil((5 + 2 - 2) / 2) + 1 = 4 windows, but the 4th would start in the right padding
    x = np.arange(5, dtype=np.float32).reshape(1, 1, 5)
    for op in ("MaxPool", "AveragePool", "LpPool"):
        y = run_pool(op, x, kernel_shape=[2], strides=[2], pads=[1, 1], ceil_mode=1)[0]
        assert y.shape == (1, 1, 3)
    y = run_pool("AveragePool", x, kernel_shape=[3], strides=[2], pads=[1, 0], ceil_mode=1,
                 count_include_pad=1)[0]
    # the last window overhangs the input by one element that is not padding: not counted
    np.testing.assert_allclose(y[0, 0], [1 / 3, 2.0, 3.5], rtol=1e-6)


@pytest.mark.parametrize("opset", [7, 8, 10, 11, 12])
def test_pools_at_old_opsets(opset):
    rng = np.random.default_rng(opset)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    attrs = {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1]}
    if opset >= 10:
        attrs["ceil_mode"] = 1
    run_pool("MaxPool", x, 2 if opset >= 8 else 1, opset, **attrs)
    run_pool("AveragePool", x, 1, opset, count_include_pad=1, **attrs)
    run_pool("LpPool", x, 1, opset, **{k: v for k, v in attrs.items() if k != "ceil_mode"})


def test_same_with_dilation_follows_the_spec():
    # onnxruntime pads for the undilated kernel and returns 7 values; the spec wants 8
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 8)
    model, feeds = pool_model("MaxPool", x, kernel_shape=[2], dilations=[2],
                              auto_pad="SAME_UPPER")
    mod = compile_pool(model, feeds)
    assert mod.graph.nodes[0].attrs["pads"] == [1, 1]
    np.testing.assert_array_equal(mod.run(feeds)["y"][0, 0], [1, 2, 3, 4, 5, 6, 7, 6])


def test_same_with_stride_longer_than_kernel_clips_padding():
    # onnxruntime fails here ("padding values must be non-negative")
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 9)
    model, feeds = pool_model("AveragePool", x, kernel_shape=[1], strides=[4],
                              auto_pad="SAME_UPPER", count_include_pad=1)
    np.testing.assert_array_equal(compile_pool(model, feeds).run(feeds)["y"][0, 0], [0, 4, 8])


# ---- MaxPool Indices -----------------------------------------------------------------------------
def test_maxpool_indices_row_and_column_major():
    x = np.arange(24, dtype=np.float32).reshape(2, 1, 3, 4)
    y, idx = run_pool("MaxPool", x, 2, kernel_shape=[2, 2], pads=[1, 1, 0, 0])
    # each window's bottom-right element is its maximum; indices skip the padding
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(idx, np.arange(24).reshape(x.shape))
    y, idx = run_pool("MaxPool", x, 2, kernel_shape=[2, 2], storage_order=1)
    # value 17 sits at (h=1, w=1) of image 1: 12 + 1 * 3 + 1 in column-major order
    np.testing.assert_array_equal(idx[1, 0, 0], [16, 19, 22])
    assert idx.dtype == np.int64


def test_maxpool_indices_3d_column_major_with_dilation():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 5, 4, 6)).astype(np.float32)
    run_pool("MaxPool", x, 2, kernel_shape=[2, 2, 3], dilations=[2, 1, 2], strides=[1, 2, 1],
             pads=[1, 0, 2, 0, 1, 1], storage_order=1, ceil_mode=1)


def test_maxpool_integer_and_float16_inputs():
    rng = np.random.default_rng(12)
    for dtype in (np.int8, np.uint8):
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, (2, 3, 6, 5), endpoint=True).astype(dtype)
        # the extremes must survive the padding: a window full of the minimum stays the minimum
        x[0, 0] = info.min
        run_pool("MaxPool", x, 2, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float16)
    run_pool("MaxPool", x, 2, kernel_shape=[3, 2], strides=[2, 1], ceil_mode=1)
    run_pool("AveragePool", x, 1, kernel_shape=[3, 2], pads=[1, 0, 1, 1], tol=1e-3)
    run_pool("LpPool", x, 1, kernel_shape=[2, 2], tol=1e-3)


# ---- MaxUnpool -----------------------------------------------------------------------------------
def unpool_round_trip(x, pool_attrs, output_shape=None):
    nodes = [helper.make_node("MaxPool", ["x"], ["y", "i"], **pool_attrs)]
    unpool_inputs = ["y", "i"] + (["shape"] if output_shape is not None else [])
    unpool_attrs = {k: v for k, v in pool_attrs.items() if k in ("kernel_shape", "strides",
                                                                 "pads")}
    nodes.append(helper.make_node("MaxUnpool", unpool_inputs, ["z"], **unpool_attrs))
    consts = {} if output_shape is None else {"shape": np.array(output_shape, np.int64)}
    model = make_model(nodes, {"x": x}, ["y", "z"], consts, opset=11)
    return check_against_ort(model, {"x": x})


def test_maxunpool_round_trip():
    rng = np.random.default_rng(13)
    x = (rng.random((2, 3, 6, 8)) + 0.5).astype(np.float32)  # positive: maxima beat the zeros
    y, z = unpool_round_trip(x, {"kernel_shape": [2, 2], "strides": [2, 2]})
    assert z.shape == x.shape
    # unpooling puts every maximum back where it was, zeros elsewhere; pooling again recovers y
    kept = z != 0
    np.testing.assert_array_equal(z[kept], x[kept])
    assert kept.sum() == y.size
    np.testing.assert_array_equal(MaxPool.reference(z, kernel_shape=[2, 2], strides=[2, 2])[0], y)


def test_maxunpool_with_output_shape_input():
    # 7 x 9 pools to 3 x 4; the default unpooled shape would be 6 x 8, output_shape restores 7 x 9
    rng = np.random.default_rng(14)
    x = rng.standard_normal((1, 2, 7, 9)).astype(np.float32)
    y, z = unpool_round_trip(x, {"kernel_shape": [2, 2], "strides": [2, 2]},
                             output_shape=[1, 2, 7, 9])
    assert z.shape == x.shape
    _, z = unpool_round_trip(rng.standard_normal((2, 2, 7)).astype(np.float32),
                             {"kernel_shape": [3], "strides": [2], "pads": [1, 1]})
    assert z.shape == (2, 2, 7)


def test_maxunpool_canonical_output_shape_and_errors():
    x = TensorType(np.float32, (1, 2, 3, 4))
    i = TensorType(np.int64, (1, 2, 3, 4))
    attrs = MaxUnpool.normalize({"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 1, 0, 0]},
                                [x, i], 11)
    assert attrs["output_shape"] == [1, 2, 6, 7]
    assert MaxUnpool.infer(x, i, **attrs) == TensorType(np.float32, (1, 2, 6, 7))
    with pytest.raises(ShapeError, match=r"I has shape \[1, 2, 3, 3\] but X has shape "
                                         r"\[1, 2, 3, 4\]"):
        MaxUnpool.infer(x, TensorType(np.int64, (1, 2, 3, 3)), **attrs)
    with pytest.raises(ShapeError, match=r"output_shape=\[1, 3, 6, 7\] must keep X's batch"):
        MaxUnpool.infer(x, i, **{**attrs, "output_shape": [1, 3, 6, 7]})
    with pytest.raises(ShapeError, match=r"index 99 .* output shape \[1, 1, 4\] \(4 elements\)"):
        MaxUnpool.reference(np.ones((1, 1, 2), np.float32), np.array([[[1, 99]]]),
                            kernel_shape=[2], output_shape=[1, 1, 4], pads=[0, 0], strides=[2])


def test_maxunpool_output_shape_must_be_constant():
    x = np.zeros((1, 1, 2, 2), np.float32)
    model, feeds = pool_model("MaxUnpool", x, opset=11, kernel_shape=[2, 2], strides=[2, 2],
                              extra_inputs={"i": np.zeros((1, 1, 2, 2), np.int64),
                                            "shape": np.array([1, 1, 4, 4], np.int64)})
    with pytest.raises(NotConstantError, match=r"'output_shape' \(shape\) must be known"):
        compile_pool(model, feeds)


# ---- global pools --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 5, 4, 6), (2, 2, 3, 1, 4), (1, 3, 1, 1)])
def test_global_pools(shape):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    for op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        y = run_pool(op, x)[0]
        assert y.shape == (*shape[:2], *[1] * (len(shape) - 2))
    run_pool("GlobalLpPool", x, p=3)
    run_pool("GlobalLpPool", x, p=1)
    run_pool("GlobalAveragePool", x.astype(np.float16), tol=1e-3)


# ---- edge cases ----------------------------------------------------------------------------------
def test_one_pixel_images_and_prime_channels():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 7, 1, 1)).astype(np.float32)
    run_pool("MaxPool", x, 2, kernel_shape=[1, 1])
    run_pool("MaxPool", x, 2, kernel_shape=[2, 2], pads=[1, 1, 0, 0])
    y = run_pool("AveragePool", x, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)[0]
    np.testing.assert_allclose(y, x / 9, rtol=1e-6)
    run_pool("AveragePool", x, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    run_pool("LpPool", rng.standard_normal((1, 13, 5, 1)).astype(np.float32), kernel_shape=[3, 1],
             strides=[2, 1], p=3)


def test_stride_longer_than_kernel():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((1, 3, 11, 10)).astype(np.float32)
    y = run_pool("MaxPool", x, 2, kernel_shape=[2, 1], strides=[3, 4])[0]
    assert y.shape == (1, 3, 4, 3)
    run_pool("AveragePool", x, kernel_shape=[2, 1], strides=[3, 4], ceil_mode=1)
    run_pool("LpPool", x, kernel_shape=[2, 1], strides=[3, 4], ceil_mode=1)


def test_resnet_stem_maxpool():
    rng = np.random.default_rng(17)
    x = rng.standard_normal((1, 64, 112, 112)).astype(np.float32)
    y = run_pool("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])[0]
    assert y.shape == (1, 64, 56, 56)


# ---- errors and flops ----------------------------------------------------------------------------
def test_pool_errors_name_the_shapes():
    x = np.zeros((1, 2, 3, 3), np.float32)
    model, feeds = pool_model("MaxPool", x, kernel_shape=[4, 2])
    with pytest.raises(ShapeError, match=r"MaxPool node 'p0'.*spatial shape \[3, 3\] is too small"
                                         r".*kernel_shape=\[4, 2\]"):
        compile_pool(model, feeds)
    model, feeds = pool_model("AveragePool", x, strides=[1, 1])
    with pytest.raises(ModelError, match=r"AveragePool needs the attribute kernel_shape"):
        compile_pool(model, feeds)
    model, feeds = pool_model("LpPool", x, kernel_shape=[2])
    with pytest.raises(ModelError, match=r"'kernel_shape' = \[2\] needs 2 values"):
        compile_pool(model, feeds)
    model, feeds = pool_model("MaxPool", np.zeros((2, 3), np.float32), kernel_shape=[2])
    with pytest.raises(ShapeError, match=r"X has shape \[2, 3\] \(rank 2\)"):
        compile_pool(model, feeds)
    with pytest.raises(ShapeError, match=r"float16/32/64, int8 or uint8, got i32\[1,2,3,3\]"):
        MaxPool.infer(TensorType(np.int32, (1, 2, 3, 3)), kernel_shape=[2, 2], pads=[0] * 4,
                      strides=[1, 1])
    with pytest.raises(ModelError, match=r"p=0 must be a positive integer"):
        GlobalLpPool.normalize({"p": 0}, [TensorType(np.float32, (1, 2, 3))], 11)
    model, feeds = pool_model("MaxPool", x, kernel_shape=[2, 2], storage_order=2)
    with pytest.raises(ModelError, match=r"storage_order=2"):
        compile_pool(model, feeds)


def test_pool_flops():
    x = TensorType(np.float32, (2, 3, 8, 8))
    attrs = MaxPool.normalize({"kernel_shape": [3, 3], "strides": [2, 2]}, [x], 19)
    y = MaxPool.infer(x, **attrs)
    assert y[0].shape == (2, 3, 3, 3)
    assert MaxPool.flops([x], y, **attrs) == 2 * 3 * 9 * 9
    lp = LpPool.normalize({"kernel_shape": [3, 3], "strides": [2, 2]}, [x], 19)
    assert LpPool.flops([x], [y[0]], **lp) == 2 * 2 * 3 * 9 * 9
    assert GlobalLpPool.flops([x], [TensorType(np.float32, (2, 3, 1, 1))]) == 2 * x.size
    assert MaxUnpool.flops([x, x.with_dtype(np.int64)], [x]) == 0


def test_reference_agrees_with_run_ort_for_ceil_and_cip_grid():
    # an exhaustive sweep over the 1D window grid the hypothesis test samples sparsely
    rng = np.random.default_rng(18)
    x = rng.standard_normal((1, 2, 7)).astype(np.float32)
    for k in (1, 2, 3):
        for s in (1, 2, 3):
            for d in (1, 2):
                for pb in range(k):
                    for pe in range(k):
                        attrs = {"kernel_shape": [k], "strides": [s], "dilations": [d],
                                 "pads": [pb, pe], "ceil_mode": 1, "count_include_pad": 1}
                        ours = AveragePool.reference(x, **attrs)
                        model, _ = pool_model("AveragePool", x, **attrs)
                        np.testing.assert_allclose(ours, run_ort(model, {"x": x})[0], rtol=1e-6,
                                                   err_msg=str(attrs))
