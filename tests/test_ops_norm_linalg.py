"""BatchNormalization, InstanceNormalization, LRN, Gemm, MatMul and ReduceMean vs onnxruntime."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import helper

import cnncompile
from cnncompile.errors import ModelError, ShapeError, UnsupportedOperatorError
from cnncompile.ir.types import TensorType
from cnncompile.ops import OPS
from helpers import REL_L2, check_against_ort, make_model


def node_model(op, feeds, attrs=None, opset=17, inits=None, inputs=None, outputs=("y",)):
    names = list(inputs) if inputs is not None else list(feeds) + list(inits or {})
    node = helper.make_node(op, names, list(outputs), name="n", **(attrs or {}))
    return make_model(node, feeds, list(outputs), inits, opset=opset)


def check_node(op, feeds, attrs=None, opset=17, inits=None, inputs=None, tol=REL_L2):
    """One-node model: compile it, run it and onnxruntime on ``feeds``, compare; return ours."""
    model = node_model(op, feeds, attrs, opset, inits, inputs)
    return check_against_ort(model, feeds, tol=tol)[0]


def compile_node(op, feeds, attrs=None, opset=17, inits=None, inputs=None, outputs=("y",)):
    model = node_model(op, feeds, attrs, opset, inits, inputs, outputs)
    return cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})


def bn_params(rng, shape, dtype=np.float32):
    return {"scale": rng.standard_normal(shape).astype(dtype),
            "bias": rng.standard_normal(shape).astype(dtype),
            "mean": rng.standard_normal(shape).astype(dtype),
            "var": rng.uniform(0.1, 2.0, shape).astype(dtype)}


# ---- BatchNormalization --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 7), (2, 3, 4, 5), (1, 3, 2, 3, 4)])
@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_batchnorm_ranks_and_opsets(shape, opset):
    rng = np.random.default_rng(len(shape) * 100 + opset)
    x = rng.standard_normal(shape).astype(np.float32)
    check_node("BatchNormalization", {"x": x}, {"epsilon": 1e-3, "momentum": 0.8}, opset,
               inits=bn_params(rng, (3,)))


def test_batchnorm_legacy_attributes_and_runtime_parameters():
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    feeds = {"x": x, **bn_params(rng, (3,))}
    check_node("BatchNormalization", feeds, {"spatial": 1}, opset=7)
    mod = compile_node("BatchNormalization", feeds, {"spatial": 1}, opset=7)
    assert mod.graph.nodes[0].attrs == {"epsilon": pytest.approx(1e-5), "momentum":
                                        pytest.approx(0.9), "training_mode": False}


def test_batchnorm_non_spatial_opset_7():
    rng = np.random.default_rng(22)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    check_node("BatchNormalization", {"x": x}, {"spatial": 0}, opset=7,
               inits=bn_params(rng, (3, 4, 5)))


def test_batchnorm_mixed_dtypes_opset_15():
    rng = np.random.default_rng(23)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float16)
    # float16 data with float32 parameters; ORT rounds f16 intermediates, we round once.
    y = check_node("BatchNormalization", {"x": x}, opset=15, inits=bn_params(rng, (3,)), tol=2e-3)
    assert y.dtype == np.float16


def test_batchnorm_training_mode_is_unsupported():
    rng = np.random.default_rng(24)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    with pytest.raises(UnsupportedOperatorError, match="training_mode=1"):
        compile_node("BatchNormalization", {"x": x}, {"training_mode": 1}, opset=15,
                     inits=bn_params(rng, (3,)), outputs=("y", "rm", "rv"))


def test_batchnorm_statistics_outputs_before_opset_14_are_unsupported():
    rng = np.random.default_rng(25)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    with pytest.raises(UnsupportedOperatorError, match="5 outputs.*training mode"):
        compile_node("BatchNormalization", {"x": x}, opset=9, inits=bn_params(rng, (3,)),
                     outputs=("y", "m", "v", "sm", "sv"))


def test_batchnorm_parameter_shape_error_names_shapes():
    rng = np.random.default_rng(26)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    params = bn_params(rng, (3,))
    params["var"] = params["var"][:2]
    with pytest.raises(ShapeError, match=r"input_var has shape \[2\].*\[3\].*\[2, 3, 4, 4\]"):
        compile_node("BatchNormalization", {"x": x}, inits=params)


# ---- InstanceNormalization and LRN ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 4, 5), (1, 3, 2, 3, 4)])
@pytest.mark.parametrize("epsilon", [1e-5, 0.1])
def test_instance_normalization(shape, epsilon):
    rng = np.random.default_rng(len(shape))
    x = (2 * rng.standard_normal(shape) + 1).astype(np.float32)
    inits = {"s": rng.standard_normal(3).astype(np.float32),
             "b": rng.standard_normal(3).astype(np.float32)}
    check_node("InstanceNormalization", {"x": x}, {"epsilon": epsilon}, inits=inits)


def test_instance_normalization_scale_shape_error():
    x = np.zeros((2, 3, 4), np.float32)
    inits = {"s": np.ones(4, np.float32), "b": np.ones(3, np.float32)}
    with pytest.raises(ShapeError, match=r"scale has shape \[4\].*\[3\].*\[2, 3, 4\]"):
        compile_node("InstanceNormalization", {"x": x}, inits=inits)


def lrn_by_definition(x, size, alpha, beta, bias):
    """ONNX's formula, one channel at a time."""
    x64 = x.astype(np.float64)
    square_sum = np.zeros_like(x64)
    channels = x.shape[1]
    for c in range(channels):
        lo = max(0, c - (size - 1) // 2)
        hi = min(channels - 1, c + int(np.ceil((size - 1) / 2)))
        square_sum[:, c] = (x64[:, lo:hi + 1] ** 2).sum(axis=1)
    return (x64 / (bias + alpha / size * square_sum) ** beta).astype(x.dtype)


@pytest.mark.parametrize("size", [1, 3, 5, 9])
@pytest.mark.parametrize("opset", [7, 13])
def test_lrn_window(size, opset):
    rng = np.random.default_rng(size)
    x = rng.standard_normal((2, 7, 3, 4)).astype(np.float32)
    attrs = {"size": size, "alpha": 0.5, "beta": 0.6, "bias": 2.0}
    check_node("LRN", {"x": x}, attrs, opset)
    check_node("LRN", {"x": x}, {"size": size}, opset)


@pytest.mark.parametrize("size", [2, 4, 6])
def test_lrn_even_window_follows_onnx_definition(size):
    # onnxruntime refuses even sizes; ONNX defines them (one more channel after than before).
    rng = np.random.default_rng(size)
    x = rng.standard_normal((2, 7, 3, 4)).astype(np.float32)
    attrs = {"size": size, "alpha": 0.5, "beta": 0.6, "bias": 2.0}
    mod = compile_node("LRN", {"x": x}, attrs)
    np.testing.assert_allclose(mod.run({"x": x})["y"], lrn_by_definition(x, **attrs), rtol=1e-6)


def test_lrn_is_rank_generic():
    # onnxruntime only runs 4-D LRN: a 3-D or 5-D input must equal the 4-D one with unit axes.
    rng = np.random.default_rng(30)
    x = rng.standard_normal((2, 6, 5)).astype(np.float32)
    lrn = OPS["LRN"].reference
    attrs = {"size": 3, "alpha": 0.3, "beta": 0.7, "bias": 1.5}
    y4 = check_node("LRN", {"x": x[..., None]}, attrs)
    np.testing.assert_allclose(lrn(x, **attrs), y4[..., 0], rtol=1e-6)
    np.testing.assert_allclose(lrn(x[..., None, None], **attrs), y4[..., None], rtol=1e-6)


def test_lrn_needs_size():
    x = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(ModelError, match="LRN needs the attribute 'size'"):
        compile_node("LRN", {"x": x})


# ---- Gemm ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (5,), (1, 5), (3, 1), (3, 5)])
def test_gemm_transposes_and_c_broadcasting(trans_a, trans_b, c_shape):
    rng = np.random.default_rng(trans_a * 2 + trans_b)
    a = rng.standard_normal((4, 3) if trans_a else (3, 4)).astype(np.float32)
    b = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": 0.7, "beta": -1.3}
    inits = {"b": b}
    if c_shape is not None:
        inits["c"] = rng.standard_normal(c_shape).astype(np.float32)
    y = check_node("Gemm", {"a": a}, attrs, opset=13, inits=inits)
    assert y.shape == (3, 5)


@pytest.mark.parametrize("opset", [7, 9, 11, 13])
def test_gemm_opsets_and_defaults(opset):
    rng = np.random.default_rng(opset)
    a = rng.standard_normal((2, 6)).astype(np.float32)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    c = rng.standard_normal(4).astype(np.float32)
    check_node("Gemm", {"a": a}, {"transB": 1}, opset, inits={"w": w, "c": c})
    check_node("Gemm", {"a": a, "w": w, "c": c}, {"transB": 1, "beta": 0.0}, opset)


def test_gemm_float64():
    rng = np.random.default_rng(40)
    a = rng.standard_normal((3, 8))
    b = rng.standard_normal((8, 2))
    assert check_node("Gemm", {"a": a, "b": b}).dtype == np.float64


def test_gemm_integer_reference():
    a = np.arange(-6, 6, dtype=np.int64).reshape(3, 4)
    b = np.arange(8, dtype=np.int64).reshape(4, 2)
    c = np.array([1, -1], np.int64)
    y = OPS["Gemm"].reference(a, b, c)
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, a @ b + c)


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1)])
def test_gemm_inner_dimension_mismatch(trans_a, trans_b):
    a = np.zeros((3, 4), np.float32)
    b = np.zeros((5, 6), np.float32)
    with pytest.raises(ShapeError) as info:
        compile_node("Gemm", {"a": a, "b": b}, {"transA": trans_a, "transB": trans_b})
    msg = str(info.value)
    assert "Gemm node 'n'" in msg and "inner dimensions" in msg
    assert "[3, 4]" in msg and "[5, 6]" in msg and f"transA={trans_a}" in msg


def test_gemm_c_that_does_not_broadcast():
    a = np.zeros((3, 4), np.float32)
    inits = {"b": np.zeros((4, 5), np.float32), "c": np.zeros((2, 5), np.float32)}
    with pytest.raises(ShapeError, match=r"C of shape \[2, 5\].*\[3, 5\]"):
        compile_node("Gemm", {"a": a}, inits=inits)


def test_gemm_rank_and_dtype_errors():
    with pytest.raises(ShapeError, match=r"Gemm A has shape \[2, 3, 4\]"):
        compile_node("Gemm", {"a": np.zeros((2, 3, 4), np.float32),
                              "b": np.zeros((4, 5), np.float32)})
    with pytest.raises(ShapeError, match=r"one dtype.*f32\[3,4\].*f64\[4,5\]"):
        compile_node("Gemm", {"a": np.zeros((3, 4), np.float32),
                              "b": np.zeros((4, 5), np.float64)})


def test_gemm_and_matmul_flops():
    f32 = np.float32
    a, b, c, y = (TensorType(f32, s) for s in [(3, 4), (4, 5), (5,), (3, 5)])
    assert OPS["Gemm"].flops([a, b], [y]) == 2 * 3 * 4 * 5
    assert OPS["Gemm"].flops([a, b, c], [y]) == 2 * 3 * 4 * 5 + 15
    at = TensorType(f32, (4, 3))
    assert OPS["Gemm"].flops([at, b], [y], transA=True) == 2 * 3 * 4 * 5
    batched = TensorType(f32, (7, 3, 4))
    assert OPS["MatMul"].flops([batched, b], [TensorType(f32, (7, 3, 5))]) == 7 * 2 * 3 * 4 * 5


# ---- MatMul --------------------------------------------------------------------------------------
def positive(rng, shape):
    # Short dot products of mixed signs can cancel to a few ulps of float32, more than 1e-5
    # relative to the result; positive data keeps the comparison meaningful.
    return rng.uniform(0.1, 1.0, shape).astype(np.float32)


@pytest.mark.parametrize("a_shape,b_shape", [
    ((4,), (4,)), ((4,), (4, 3)), ((2, 4), (4,)), ((5, 2, 4), (4,)), ((4,), (5, 4, 3)),
    ((2, 4), (4, 3)), ((5, 2, 4), (4, 3)), ((2, 4), (5, 4, 3)), ((5, 2, 4), (5, 4, 3)),
    ((6, 1, 2, 4), (5, 4, 3)), ((1, 5, 2, 4), (6, 1, 4, 3)),
])
def test_matmul_numpy_semantics(a_shape, b_shape):
    rng = np.random.default_rng(len(a_shape) * 10 + len(b_shape))
    a, b = positive(rng, a_shape), positive(rng, b_shape)
    y = check_node("MatMul", {"a": a, "b": b})
    assert y.shape == np.matmul(a, b).shape


@settings(max_examples=30, deadline=None)
@given(shapes=hnp.mutually_broadcastable_shapes(signature="(m,k),(k,n)->(m,n)", max_dims=2,
                                                min_side=1, max_side=4))
def test_matmul_random_broadcast_shapes(shapes):
    rng = np.random.default_rng(sum(map(len, shapes.input_shapes)))
    a, b = (positive(rng, s) for s in shapes.input_shapes)
    y = check_node("MatMul", {"a": a, "b": b})
    assert y.shape == shapes.result_shape


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float64])
def test_matmul_dtypes(dtype):
    rng = np.random.default_rng(41)
    a = rng.integers(-5, 5, (2, 3, 4)).astype(dtype)
    b = rng.integers(-5, 5, (4, 2)).astype(dtype)
    assert check_node("MatMul", {"a": a, "b": b}).dtype == dtype


def test_matmul_constant_operand_is_folded():
    rng = np.random.default_rng(42)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["w", "w"], ["w2"]),
             helper.make_node("MatMul", ["x", "w2"], ["y"])]
    model = make_model(nodes, {"x": x}, ["y"], {"w": w})
    check_against_ort(model, {"x": x})
    mod = cnncompile.compile(model, input_shapes={"x": x.shape})
    assert [n.op for n in mod.graph.nodes] == ["MatMul"]


@pytest.mark.parametrize("a_shape,b_shape,pattern", [
    ((2, 4), (3, 5), r"inner dimensions.*\[2, 4\].*\[3, 5\]"),
    ((4,), (3,), r"inner dimensions.*\[4\].*\[3\]"),
    ((2, 3, 4), (5, 4, 2), r"batch dimensions.*\[2, 3, 4\].*\[5, 4, 2\]"),
])
def test_matmul_shape_errors(a_shape, b_shape, pattern):
    with pytest.raises(ShapeError, match=pattern):
        compile_node("MatMul", {"a": np.zeros(a_shape, np.float32),
                                "b": np.zeros(b_shape, np.float32)})


# ---- ReduceMean ----------------------------------------------------------------------------------
SHAPE = (2, 3, 4, 5)


@pytest.mark.parametrize("axes", [None, [0], [1], [-1], [1, 2], [3, 0], [0, 1, 2, 3], [-3, -1]])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_axes_attribute_opset_13(axes, keepdims):
    rng = np.random.default_rng(50)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    attrs = {"keepdims": keepdims} if axes is None else {"axes": axes, "keepdims": keepdims}
    check_node("ReduceMean", {"x": x}, attrs, opset=13)
    check_node("ReduceMean", {"x": x}, attrs, opset=11)


@pytest.mark.parametrize("axes", [None, [], [1], [-1, 0], [0, 1, 2, 3]])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("noop", [0, 1])
def test_reduce_mean_axes_input_opset_18(axes, keepdims, noop):
    rng = np.random.default_rng(51)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    attrs = {"keepdims": keepdims, "noop_with_empty_axes": noop}
    inits = None if axes is None else {"axes": np.array(axes, np.int64)}
    y = check_node("ReduceMean", {"x": x}, attrs, opset=18, inits=inits)
    if not axes and noop:
        np.testing.assert_array_equal(y, x)


def test_reduce_mean_canonical_attributes():
    x = np.zeros(SHAPE, np.float32)
    mod = compile_node("ReduceMean", {"x": x}, {"axes": [-1, 1], "keepdims": 0}, opset=13)
    assert mod.graph.nodes[0].attrs == {"axes": [1, 3], "keepdims": False}
    mod = compile_node("ReduceMean", {"x": x}, {"keepdims": 1}, opset=18)
    assert mod.graph.nodes[0].attrs == {"axes": [0, 1, 2, 3], "keepdims": True}
    mod = compile_node("ReduceMean", {"x": x}, {"noop_with_empty_axes": 1}, opset=18,
                       inits={"axes": np.zeros(0, np.int64)})
    assert mod.graph.nodes[0].attrs == {"axes": [], "keepdims": True}


@settings(max_examples=30, deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data(),
       keepdims=st.booleans(), opset=st.sampled_from([13, 18]))
def test_reduce_mean_random_axes(shape, data, keepdims, opset):
    rank = len(shape)
    axes = data.draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank,
                              unique_by=lambda a: a % rank), label="axes")
    rng = np.random.default_rng(rank * 10 + len(axes))
    # Means of zero-centred data sit near 0, where relative error measures only float32 summation
    # order (onnxruntime's vs ours), not correctness; keep the data away from a zero mean.
    x = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if opset == 13:
        check_node("ReduceMean", {"x": x}, {"axes": axes, "keepdims": int(keepdims)}, opset)
    else:
        check_node("ReduceMean", {"x": x}, {"keepdims": int(keepdims)}, opset,
                   inits={"axes": np.array(axes, np.int64)})


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_reduce_mean_integer_truncates(dtype):
    rng = np.random.default_rng(52)
    x = rng.integers(-100, 100, SHAPE).astype(dtype)
    y = check_node("ReduceMean", {"x": x}, {"axes": [1, 3]}, opset=13)
    assert y.dtype == dtype


def test_reduce_mean_errors():
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ShapeError, match="axis=4 is out of range for a tensor of rank 4"):
        compile_node("ReduceMean", {"x": x}, {"axes": [4]}, opset=13)
    with pytest.raises(ModelError, match=r"axes \[1, -3\] name an axis twice"):
        compile_node("ReduceMean", {"x": x}, {"axes": [1, -3]}, opset=13)
