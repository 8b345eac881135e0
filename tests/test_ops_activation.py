"""Activations, Clip, Softmax and LogSoftmax against onnxruntime, across opsets and attributes."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import cnncompile
from cnncompile.errors import ModelError, ShapeError
from helpers import REL_L2, check_against_ort, make_model

SHAPE = (2, 3, 4, 5)


def check_node(op, feeds, attrs=None, opset=17, inits=None, inputs=None, tol=REL_L2):
    """One-node model: compile it, run it and onnxruntime on ``feeds``, compare; return ours."""
    names = list(inputs) if inputs is not None else list(feeds) + list(inits or {})
    node = helper.make_node(op, names, ["y"], **(attrs or {}))
    model = make_model(node, feeds, ["y"], inits, opset=opset)
    return check_against_ort(model, feeds, tol=tol)[0]


def compiled_attrs(op, feeds, attrs=None, opset=17, inits=None, inputs=None):
    names = list(inputs) if inputs is not None else list(feeds) + list(inits or {})
    node = helper.make_node(op, names, ["y"], **(attrs or {}))
    model = make_model(node, feeds, ["y"], inits, opset=opset)
    mod = cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})
    (node,) = mod.graph.nodes
    return node.attrs


UNARY_CASES = [
    ("Relu", {}, 7), ("Relu", {}, 14),
    ("LeakyRelu", {}, 7), ("LeakyRelu", {"alpha": 0.3}, 16),
    ("Elu", {}, 7), ("Elu", {"alpha": 0.5}, 22),
    ("Selu", {}, 7), ("Selu", {"alpha": 1.2, "gamma": 0.9}, 22),
    ("Gelu", {}, 20), ("Gelu", {"approximate": "tanh"}, 20), ("Gelu", {"approximate": "none"}, 20),
    ("Sigmoid", {}, 7), ("Sigmoid", {}, 13),
    ("HardSigmoid", {}, 7), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 22),
    ("HardSwish", {}, 14),
    ("Tanh", {}, 13),
    ("Softplus", {}, 7),
    ("Mish", {}, 18),
]


@pytest.mark.parametrize("op,attrs,opset", UNARY_CASES)
def test_unary_activation_float32(op, attrs, opset):
    rng = np.random.default_rng(zlib.crc32(f"{op}{attrs}{opset}".encode()))
    # scaled so that saturating regions (|x| > 3 for HardSigmoid/HardSwish) are exercised
    x = (4 * rng.standard_normal(SHAPE)).astype(np.float32)
    y = check_node(op, {"x": x}, attrs, opset)
    assert y.dtype == np.float32 and y.shape == SHAPE


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "Tanh"])
def test_unary_activation_float64(op):
    rng = np.random.default_rng(11)
    x = (3 * rng.standard_normal((3, 7))).astype(np.float64)
    y = check_node(op, {"x": x}, opset=20)
    assert y.dtype == np.float64


def test_activation_float16_keeps_dtype():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 6)).astype(np.float16)
    # onnxruntime rounds float16 intermediates; ours rounds once, so allow a few f16 ulps.
    y = check_node("Sigmoid", {"x": x}, tol=2e-3)
    assert y.dtype == np.float16


def test_sigmoid_softplus_extreme_inputs_are_finite():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], np.float32)
    sig = check_node("Sigmoid", {"x": x})
    assert np.array_equal(sig, np.array([0.0, sig[1], 0.5, 1.0, 1.0], np.float32))
    soft = check_node("Softplus", {"x": x})
    assert soft[-1] == 1000.0 and soft[0] == 0.0


@pytest.mark.parametrize("dtype", [np.int8, np.int32])
def test_relu_integer(dtype):
    rng = np.random.default_rng(3)
    x = rng.integers(-100, 100, SHAPE).astype(dtype)
    y = check_node("Relu", {"x": x}, opset=14)
    assert y.dtype == dtype and (y >= 0).all()


@pytest.mark.parametrize("slope_shape", [(3, 1, 1), (1,), (), (5,), (4, 5), (1, 3, 1, 5), SHAPE])
@pytest.mark.parametrize("opset", [9, 16])
def test_prelu_slope_broadcasting(slope_shape, opset):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    slope = rng.uniform(0.01, 0.5, slope_shape).astype(np.float32)
    check_node("PRelu", {"x": x}, opset=opset, inits={"slope": slope})
    # slope as a runtime input too
    check_node("PRelu", {"x": x, "slope": slope}, opset=opset)


def test_prelu_integer():
    rng = np.random.default_rng(5)
    x = rng.integers(-50, 50, (2, 3, 4)).astype(np.int32)
    slope = rng.integers(1, 4, (3, 1)).astype(np.int32)
    y = check_node("PRelu", {"x": x}, opset=16, inits={"slope": slope})
    assert y.dtype == np.int32


def test_prelu_channel_vector_is_rejected_with_hint():
    x = np.zeros(SHAPE, np.float32)
    model = make_model(helper.make_node("PRelu", ["x", "slope"], ["y"]), {"x": x}, ["y"],
                       {"slope": np.ones(3, np.float32)}, opset=16)
    with pytest.raises(ShapeError) as info:
        cnncompile.compile(model, input_shapes={"x": SHAPE})
    msg = str(info.value)
    assert "[3]" in msg and "[2, 3, 4, 5]" in msg and "[3, 1, 1]" in msg


def test_prelu_slope_wider_than_x_is_rejected():
    x = np.zeros((3, 1), np.float32)
    model = make_model(helper.make_node("PRelu", ["x", "slope"], ["y"]), {"x": x}, ["y"],
                       {"slope": np.ones((3, 4), np.float32)}, opset=16)
    with pytest.raises(ShapeError, match=r"\[3, 4\].*\[3, 1\]"):
        cnncompile.compile(model, input_shapes={"x": (3, 1)})


# ---- Clip ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs", [{}, {"min": -0.5}, {"max": 0.7}, {"min": -0.5, "max": 0.7}])
def test_clip_attributes_before_opset_11(attrs):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    y = check_node("Clip", {"x": x}, attrs, opset=10)
    assert y.min() >= attrs.get("min", -np.inf) and y.max() <= np.float32(attrs.get("max", np.inf))
    canonical = compiled_attrs("Clip", {"x": x}, attrs, opset=10)
    for key in ("min", "max"):
        # attributes are float32 in ONNX: 0.7 comes back as 0.699999988...
        expected = pytest.approx(attrs[key]) if key in attrs else None
        assert canonical[key] == expected


@pytest.mark.parametrize("inputs,bounds", [
    (["x"], {}),
    (["x", "lo"], {"lo": -0.5}),
    (["x", "", "hi"], {"hi": 0.7}),
    (["x", "lo", "hi"], {"lo": -0.5, "hi": 0.7}),
    (["x", "lo", "hi"], {"lo": 0.5, "hi": -0.5}),
])
def test_clip_inputs_from_opset_11(inputs, bounds):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    inits = {k: np.array(v, np.float32) for k, v in bounds.items()}
    for opset in (11, 13):
        y = check_node("Clip", {"x": x}, opset=opset, inits=inits, inputs=inputs)
    if bounds.get("lo", -np.inf) > bounds.get("hi", np.inf):
        assert (y == np.float32(bounds["hi"])).all()  # min > max: everything becomes max
    canonical = compiled_attrs("Clip", {"x": x}, opset=13, inits=inits, inputs=inputs)
    assert canonical["min"] == (pytest.approx(bounds["lo"]) if "lo" in bounds else None)
    assert canonical["max"] == (pytest.approx(bounds["hi"]) if "hi" in bounds else None)
    assert all(isinstance(v, (float, type(None))) for v in canonical.values())


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.uint64])
def test_clip_integer(dtype):
    rng = np.random.default_rng(8)
    low = 0 if np.issubdtype(dtype, np.unsignedinteger) else -60
    x = rng.integers(low, 100, SHAPE).astype(dtype)
    inits = {"lo": np.array(low + 10, dtype), "hi": np.array(70, dtype)}
    y = check_node("Clip", {"x": x}, opset=13, inits=inits, inputs=["x", "lo", "hi"])
    assert y.dtype == dtype and y.min() >= low + 10 and y.max() <= 70
    canonical = compiled_attrs("Clip", {"x": x}, opset=13, inits=inits, inputs=["x", "lo", "hi"])
    assert canonical == {"min": low + 10, "max": 70} and isinstance(canonical["min"], int)


def test_clip_bound_of_shape_1_is_accepted_and_2_elements_rejected():
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    model = make_model(helper.make_node("Clip", ["x", "lo"], ["y"]), {"x": x}, ["y"],
                       {"lo": np.array([0.25], np.float32)}, opset=13)
    out = cnncompile.compile(model, input_shapes={"x": x.shape}).run({"x": x})["y"]
    np.testing.assert_array_equal(out, np.maximum(x, np.float32(0.25)))
    model = make_model(helper.make_node("Clip", ["x", "lo"], ["y"]), {"x": x}, ["y"],
                       {"lo": np.array([0.25, 1.0], np.float32)}, opset=13)
    with pytest.raises(ShapeError, match=r"min.*\[2\]"):
        cnncompile.compile(model, input_shapes={"x": x.shape})


def test_constant_input_is_folded_by_reference():
    x = np.linspace(-3, 3, 10, dtype=np.float32)
    nodes = [helper.make_node("Clip", ["c", "lo", "hi"], ["t"]),
             helper.make_node("Add", ["x", "t"], ["y"])]
    model = make_model(nodes, {"x": x}, ["y"], {"c": x, "lo": np.array(-1, np.float32),
                                                "hi": np.array(1, np.float32)}, opset=13)
    out = check_against_ort(model, {"x": x})[0]
    np.testing.assert_allclose(out, x + np.clip(x, -1, 1))


# ---- Softmax / LogSoftmax ------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [7, 11, 13])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, 3, -1, -2, -4])
def test_softmax_axes_and_opsets(op, opset, axis):
    rng = np.random.default_rng(9)
    x = (3 * rng.standard_normal(SHAPE)).astype(np.float32)
    attrs = {} if axis is None else {"axis": axis}
    check_node(op, {"x": x}, attrs, opset)


@pytest.mark.parametrize("opset,axis,expected", [
    (11, None, {"axis": 1, "legacy_flatten": True}),
    (11, -1, {"axis": 3, "legacy_flatten": False}),
    (11, 3, {"axis": 3, "legacy_flatten": False}),
    (11, -3, {"axis": 1, "legacy_flatten": True}),
    (13, None, {"axis": 3, "legacy_flatten": False}),
    (13, 1, {"axis": 1, "legacy_flatten": False}),
])
def test_softmax_canonical_form(opset, axis, expected):
    x = np.zeros(SHAPE, np.float32)
    attrs = {} if axis is None else {"axis": axis}
    assert compiled_attrs("Softmax", {"x": x}, attrs, opset) == expected


def test_softmax_legacy_flatten_normalises_jointly():
    rng = np.random.default_rng(10)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    y = check_node("Softmax", {"x": x}, {"axis": 1}, opset=11)
    np.testing.assert_allclose(y.sum(axis=(1, 2, 3)), 1.0, rtol=1e-5)
    y13 = check_node("Softmax", {"x": x}, {"axis": 1}, opset=13)
    np.testing.assert_allclose(y13.sum(axis=1), 1.0, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(),
       op=st.sampled_from(["Softmax", "LogSoftmax"]), opset=st.sampled_from([11, 13]))
def test_softmax_random_shapes_and_axes(shape, data, op, opset):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    rng = np.random.default_rng(len(shape) * 100 + axis)
    x = (5 * rng.standard_normal(shape)).astype(np.float32)
    check_node(op, {"x": x}, {"axis": axis}, opset)


def test_softmax_large_inputs_do_not_overflow():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]], np.float32)
    y = check_node("Softmax", {"x": x}, {"axis": 1}, opset=13)
    assert np.isfinite(y).all()
    check_node("LogSoftmax", {"x": x}, {"axis": 1}, opset=13)


# ---- errors and flops ----------------------------------------------------------------------------
def test_softmax_axis_out_of_range():
    x = np.zeros((2, 3), np.float32)
    model = make_model(helper.make_node("Softmax", ["x"], ["y"], axis=2, name="sm"), {"x": x},
                       ["y"], opset=13)
    with pytest.raises(ShapeError, match=r"Softmax node 'sm'.*axis=2.*rank 2"):
        cnncompile.compile(model, input_shapes={"x": x.shape})


def test_gelu_bad_approximate():
    x = np.zeros((2, 3), np.float32)
    model = make_model(helper.make_node("Gelu", ["x"], ["y"], approximate="fast"), {"x": x},
                       ["y"], opset=20)
    with pytest.raises(ModelError, match="approximate='fast'"):
        cnncompile.compile(model, input_shapes={"x": x.shape})


def test_float_activation_rejects_integers():
    x = np.zeros((2, 3), np.int32)
    model = make_model(helper.make_node("Sigmoid", ["x"], ["y"]), {"x": x}, ["y"])
    with pytest.raises(ShapeError, match=r"Sigmoid.*i32\[2,3\]"):
        cnncompile.compile(model, input_shapes={"x": x.shape})


def test_unknown_attribute_is_rejected():
    x = np.zeros((2, 3), np.float32)
    model = make_model(helper.make_node("LeakyRelu", ["x"], ["y"], beta=0.1), {"x": x}, ["y"])
    with pytest.raises(ModelError, match="unknown attribute 'beta'"):
        cnncompile.compile(model, input_shapes={"x": x.shape})


def test_flops_per_element():
    from cnncompile.ir.types import TensorType
    from cnncompile.ops import OPS
    t = TensorType(np.float32, SHAPE)
    assert OPS["Relu"].flops([t], [t]) == 120
    assert OPS["Sigmoid"].flops([t], [t]) == 4 * 120
    assert OPS["Softmax"].flops([t], [t], axis=3, legacy_flatten=False) == 5 * 120
