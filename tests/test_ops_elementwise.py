"""Elementwise arithmetic, variadic ops, unary math, Cast, Dropout and Identity vs onnxruntime."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

import cnncompile
from cnncompile.errors import ShapeError, UnsupportedOperatorError
from helpers import REL_L2, check_against_ort, make_model


def node_model(op, feeds, attrs=None, opset=17, inits=None, inputs=None, outputs=("y",)):
    names = list(inputs) if inputs is not None else list(feeds) + list(inits or {})
    node = helper.make_node(op, names, list(outputs), name="n", **(attrs or {}))
    return make_model(node, feeds, list(outputs), inits, opset=opset)


def check_node(op, feeds, attrs=None, opset=17, inits=None, inputs=None, outputs=("y",),
               tol=REL_L2):
    """One-node model: compile it, run it and onnxruntime on ``feeds``, compare; return ours."""
    model = node_model(op, feeds, attrs, opset, inits, inputs, outputs)
    return check_against_ort(model, feeds, tol=tol)


def compile_node(op, feeds, attrs=None, opset=17, inits=None, outputs=("y",)):
    model = node_model(op, feeds, attrs, opset, inits, outputs=outputs)
    return cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})


def away_from_zero(rng, shape, dtype=np.float32):
    return np.asarray(rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape), dtype=dtype)


# ---- binary ops with broadcasting ----------------------------------------------------------------
BROADCAST_PAIRS = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 3, 4), ()), ((), (3, 1)),
                   ((2, 1, 4), (3, 1)), ((1,), (2, 3)), ((5, 1, 1, 2), (1, 3, 1))]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shapes", BROADCAST_PAIRS)
@pytest.mark.parametrize("opset", [7, 13, 14])
def test_binary_broadcasting(op, shapes, opset):
    rng = np.random.default_rng(len(shapes[0]) * 10 + len(shapes[1]))
    a = rng.standard_normal(shapes[0]).astype(np.float32)
    b = away_from_zero(rng, shapes[1])
    (y,) = check_node(op, {"a": a, "b": b}, opset=opset)
    assert y.shape == np.broadcast_shapes(shapes[0], shapes[1])


@settings(max_examples=40, deadline=None)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4),
       op=st.sampled_from(["Add", "Sub", "Mul", "Div", "Pow"]), constant_b=st.booleans())
def test_binary_random_broadcast_shapes(shapes, op, constant_b):
    rng = np.random.default_rng(sum(map(len, shapes.input_shapes)))
    a_shape, b_shape = shapes.input_shapes
    a = rng.uniform(0.5, 2.0, a_shape).astype(np.float32)
    b = away_from_zero(rng, b_shape)
    if constant_b:
        (y,) = check_node(op, {"a": a}, inits={"b": b})
    else:
        (y,) = check_node(op, {"a": a, "b": b})
    assert y.shape == shapes.result_shape


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.uint32])
def test_integer_div_truncates_toward_zero(dtype):
    rng = np.random.default_rng(1)
    signed = np.issubdtype(dtype, np.signedinteger)
    a = rng.integers(-100 if signed else 0, 100, (4, 6)).astype(dtype)
    b = rng.integers(1, 9, (6,)).astype(dtype)
    if signed:
        b = b * rng.choice(np.array([-1, 1], dtype), (6,))
    (y,) = check_node("Div", {"a": a, "b": b}, opset=14)
    assert y.dtype == dtype


def test_int64_div_is_exact_beyond_float_precision():
    a = np.array([2**62 + 1, -(2**62) - 3, 2**53 + 1, -7], np.int64)
    b = np.array([1, 2, 1, 2], np.int64)
    (y,) = check_node("Div", {"a": a, "b": b}, opset=14)
    np.testing.assert_array_equal(y, [2**62 + 1, -(2**61) - 1, 2**53 + 1, -3])


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_arithmetic(op, dtype):
    rng = np.random.default_rng(2)
    a = rng.integers(-1000, 1000, (3, 4)).astype(dtype)
    b = rng.integers(-1000, 1000, (4,)).astype(dtype)
    (y,) = check_node(op, {"a": a, "b": b}, opset=14)
    assert y.dtype == dtype


@pytest.mark.parametrize("opset", [7, 12, 15])
def test_pow_float(opset):
    rng = np.random.default_rng(3)
    x = rng.uniform(0.1, 3.0, (3, 4)).astype(np.float32)
    exponent = rng.uniform(-2.0, 2.0, (4,)).astype(np.float32)
    check_node("Pow", {"x": x, "e": exponent}, opset=opset)


def test_pow_mixed_and_integer_types():
    rng = np.random.default_rng(4)
    x = rng.uniform(-3.0, 3.0, (3, 4)).astype(np.float32)
    exponent = rng.integers(0, 4, (3, 4)).astype(np.int64)
    (y,) = check_node("Pow", {"x": x, "e": exponent}, opset=15)
    assert y.dtype == np.float32
    xi = rng.integers(-5, 5, (3, 4)).astype(np.int64)
    (yi,) = check_node("Pow", {"x": xi, "e": exponent}, opset=15)
    assert yi.dtype == np.int64
    # int ** float: computed in floating point, truncated back to int (negative bases are NaN)
    (yf,) = check_node("Pow", {"x": np.abs(xi), "e": x * x}, opset=15)
    assert yf.dtype == np.int64


def test_mismatched_broadcast_names_both_shapes():
    with pytest.raises(ShapeError) as info:
        compile_node("Add", {"a": np.zeros((2, 3), np.float32), "b": np.zeros((4,), np.float32)})
    msg = str(info.value)
    assert "Add node 'n'" in msg and "[2, 3]" in msg and "[4]" in msg
    assert "cannot be broadcast" in msg


def test_dtype_mismatch_is_a_shape_error():
    with pytest.raises(ShapeError, match=r"one dtype.*f32\[2\].*f64\[2\]"):
        compile_node("Mul", {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float64)})


# ---- variadic ops --------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Sum", "Max", "Min", "Mean"])
@pytest.mark.parametrize("shapes", [[(2, 3)], [(2, 3), (2, 3)], [(2, 1, 4), (3, 1), (4,)],
                                    [(), (2, 3), (1, 3), (2, 1)]])
@pytest.mark.parametrize("opset", [8, 13])  # broadcasting since opset 8
def test_variadic_broadcasting(op, shapes, opset):
    rng = np.random.default_rng(len(shapes))
    feeds = {f"x{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    (y,) = check_node(op, feeds, opset=opset)
    assert y.shape == np.broadcast_shapes(*shapes)


@settings(max_examples=25, deadline=None)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=3),
       op=st.sampled_from(["Sum", "Max", "Min", "Mean"]))
def test_variadic_random_broadcast_shapes(shapes, op):
    rng = np.random.default_rng(sum(map(len, shapes.input_shapes)))
    feeds = {f"x{i}": rng.standard_normal(s).astype(np.float32)
             for i, s in enumerate(shapes.input_shapes)}
    (y,) = check_node(op, feeds, opset=13)
    assert y.shape == shapes.result_shape


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8])
def test_integer_max_min(op, dtype):
    rng = np.random.default_rng(5)
    a = rng.integers(0, 100, (3, 4)).astype(dtype)
    b = rng.integers(0, 100, (4,)).astype(dtype)
    (y,) = check_node(op, {"a": a, "b": b}, opset=13)
    assert y.dtype == dtype


def test_variadic_mismatch_names_every_shape():
    feeds = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3,), np.float32),
             "c": np.zeros((4, 1), np.float32)}
    with pytest.raises(ShapeError, match=r"\[2, 3\], \[3\], \[4, 1\] cannot be broadcast"):
        compile_node("Sum", feeds)


# ---- unary math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Sqrt", "Exp", "Erf", "Reciprocal", "Floor", "Ceil", "Neg", "Abs"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unary_math(op, dtype):
    if op == "Erf" and dtype == np.float64:
        dtype = np.float16  # onnxruntime has no float64 Erf
    rng = np.random.default_rng(6)
    x = away_from_zero(rng, (3, 5), dtype) * 2
    if op == "Sqrt":
        x = np.abs(x)
    (y,) = check_node(op, {"x": x}, opset=13)
    assert y.dtype == dtype


@pytest.mark.parametrize("op", ["Neg", "Abs"])
def test_unary_integer(op):
    x = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    (y,) = check_node(op, {"x": x}, opset=13)
    assert y.dtype == np.int32


def test_float_only_unary_rejects_integers():
    with pytest.raises(ShapeError, match=r"Sqrt takes a floating-point tensor, got i64\[3\]"):
        compile_node("Sqrt", {"x": np.zeros(3, np.int64)})


# ---- Cast ----------------------------------------------------------------------------------------
CASTS = [(np.float32, np.float16), (np.float32, np.float64), (np.float64, np.float32),
         (np.float16, np.float32), (np.float32, np.int32), (np.float32, np.int64),
         (np.float32, np.uint8), (np.float32, np.bool_), (np.int64, np.float32),
         (np.int64, np.int32), (np.int32, np.int8), (np.bool_, np.float32), (np.uint8, np.float32),
         (np.int32, np.bool_), (np.int64, np.float16), (np.bool_, np.int64)]


@pytest.mark.parametrize("src,dst", CASTS)
@pytest.mark.parametrize("opset", [7, 13, 21])
def test_cast(src, dst, opset):
    rng = np.random.default_rng(7)
    values = rng.uniform(0 if dst == np.uint8 else -200, 250, (4, 5))
    values[0, :3] = 0  # zeros matter for bool
    if np.issubdtype(src, np.floating):
        x = values.astype(src)
    elif src == np.bool_:
        x = values > 0
    else:
        # int32 -> int8 wraps around, as in C
        x = np.round(values * (300 if dst == np.int8 else 1)).astype(src)
    to = helper.np_dtype_to_tensor_dtype(np.dtype(dst))
    (y,) = check_node("Cast", {"x": x}, {"to": to}, opset=opset)
    assert y.dtype == dst


def test_cast_canonical_attribute_and_unsupported_target():
    x = np.zeros(3, np.float32)
    mod = compile_node("Cast", {"x": x}, {"to": TensorProto.INT64})
    assert mod.graph.nodes[0].attrs == {"to": "int64", "saturate": True}
    with pytest.raises(cnncompile.errors.ModelError, match="STRING"):
        compile_node("Cast", {"x": x}, {"to": TensorProto.STRING})


@pytest.mark.parametrize("saturate", [0, 1])
@pytest.mark.parametrize("to", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2])
def test_cast_to_float8_saturates_like_the_spec(to, saturate):
    x = np.array([0.3, -1.7, 500.0, -70000.0, np.inf, -np.inf, np.nan, 1e-9], np.float32)
    mod = compile_node("Cast", {"x": x}, {"to": to, "saturate": saturate}, opset=19)
    y = mod(x).astype(np.float32)
    top = float(ml_dtypes.finfo(mod.graph.nodes[0].outputs[0].dtype).max)
    if saturate:
        assert y[4] == top and y[5] == -top
        assert abs(y[3]) == top
    else:
        assert not np.isfinite(y[4]) and not np.isfinite(y[3])
    assert np.isnan(y[6]) and abs(y[0] - 0.3) < 0.02


# ---- Dropout and Identity ------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 10, 12, 13, 22])
def test_dropout_is_identity_in_inference(opset):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    attrs = {"ratio": 0.3} if opset < 12 else {}
    (y,) = check_node("Dropout", {"x": x}, attrs, opset=opset)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("opset", [12, 13, 22])
def test_dropout_inputs_and_mask_from_opset_12(opset):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    inits = {"ratio": np.array(0.2, np.float32), "train": np.array(False)}
    y, mask = check_node("Dropout", {"x": x}, opset=opset, inits=inits, outputs=("y", "mask"))
    np.testing.assert_array_equal(y, x)
    assert mask.dtype == np.bool_ and mask.all()


@pytest.mark.parametrize("opset,mask_dtype", [(7, np.float32), (10, np.bool_)])
def test_dropout_mask_dtype_before_opset_12(opset, mask_dtype):
    # Opsets 7-9 type the mask like the data, 10 on as bool. onnxruntime fills it with zeros
    # before opset 12 and ones after; we give ones (nothing was dropped) for every opset.
    x = np.ones((2, 3), np.float32)
    mod = compile_node("Dropout", {"x": x}, opset=opset, outputs=("y", "mask"))
    out = mod.run({"x": x})
    assert out["mask"].dtype == mask_dtype and out["mask"].shape == (2, 3)


def test_dropout_training_mode_is_unsupported():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(UnsupportedOperatorError, match="training_mode"):
        compile_node("Dropout", {"x": x}, opset=13,
                     inits={"ratio": np.array(0.5, np.float32), "train": np.array(True)})


def test_identity():
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    (y,) = check_node("Identity", {"x": x})
    np.testing.assert_array_equal(y, x)
