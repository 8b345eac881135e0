"""Shape-manipulation ops against onnxruntime, across opsets: lifted inputs live in initializers."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import cnncompile
from cnncompile.errors import ModelError, ShapeError
from cnncompile.ops import OPS
from helpers import check_against_ort, make_model

HYPOTHESIS = settings(max_examples=30, deadline=None)


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def check(op, feeds, attrs=None, opset=13, inits=None, inputs=None, outputs=("y",)):
    """One-node model compiled and run against onnxruntime; returns (our outputs, the module)."""
    names = list(inputs) if inputs is not None else list(feeds) + list(inits or {})
    node = helper.make_node(op, names, list(outputs), **(attrs or {}))
    model = make_model(node, feeds, list(outputs), inits, opset=opset)
    ours = check_against_ort(model, feeds)
    mod = cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})
    return ours, mod


def compile_node(op, feeds, attrs=None, opset=13, inits=None, inputs=None, outputs=("y",)):
    names = list(inputs) if inputs is not None else list(feeds) + list(inits or {})
    node = helper.make_node(op, names, list(outputs), **(attrs or {}))
    model = make_model(node, feeds, list(outputs), inits, opset=opset)
    return cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})


def i64(*values):
    return np.array(values, dtype=np.int64)


# ---- Flatten / Reshape / Transpose ---------------------------------------------------------------
@pytest.mark.parametrize("opset,axis", [(9, 0), (9, 2), (9, 4), (13, -4), (13, -1), (13, 1),
                                        (13, 3), (13, 4)])
def test_flatten(axis, opset):
    x = rng_for("flatten", axis).standard_normal((2, 3, 4, 5)).astype(np.float32)
    (y,), mod = check("Flatten", {"x": x}, {"axis": axis}, opset)
    outer = int(np.prod(x.shape[:axis + 4 if axis < 0 else axis]))
    assert y.shape == (outer, x.size // outer)
    assert mod.graph.nodes[0].attrs["axis"] >= 0


def test_flatten_rejects_out_of_range_axis():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ShapeError, match="axis=3 is out of range .* rank 2"):
        compile_node("Flatten", {"x": x}, {"axis": 3})


def _factorizations(draw, total, rank):
    dims = [1] * rank
    n = total
    for p in (2, 3, 5, 7):
        while n % p == 0:
            dims[draw(st.integers(0, rank - 1))] *= p
            n //= p
    return dims


@HYPOTHESIS
@given(data=st.data())
def test_reshape_random(data):
    in_shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), "in_shape")
    total = int(np.prod(in_shape))
    target = _factorizations(data.draw, total, data.draw(st.integers(1, 4), "rank"))
    spec = list(target)
    if data.draw(st.booleans(), "use -1"):
        spec[data.draw(st.integers(0, len(spec) - 1), "minus one at")] = -1
    for i in range(min(len(spec), len(in_shape))):
        if spec[i] == in_shape[i] and data.draw(st.booleans(), f"zero at {i}"):
            spec[i] = 0
    x = rng_for("reshape", in_shape, spec).standard_normal(in_shape).astype(np.float32)
    (y,), _ = check("Reshape", {"x": x}, inits={"shape": np.array(spec, np.int64)}, opset=13)
    assert y.shape == tuple(target)


def test_reshape_allowzero_keeps_literal_zero():
    x = np.zeros((0, 3), np.float32)
    (y,), _ = check("Reshape", {"x": x}, {"allowzero": 1}, opset=14, inits={"shape": i64(3, 0)})
    assert y.shape == (3, 0)


def test_reshape_opset7_int64_data():
    x = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    (y,), _ = check("Reshape", {"x": x}, opset=7, inits={"shape": i64(4, -1)})
    np.testing.assert_array_equal(y, x.reshape(4, 6))


@pytest.mark.parametrize("spec,match", [
    ([5, -1], r"cannot reshape \[2,3,4\] \(24 elements\) into \[5, -1\]"),
    ([4, 4], r"cannot reshape \[2,3,4\] \(24 elements\) into \[4, 4\]"),
    ([-1, -1], "at most one -1"),
])
def test_reshape_errors_name_the_shapes(spec, match):
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ShapeError, match=match):
        compile_node("Reshape", {"x": x}, inits={"shape": np.array(spec, np.int64)})


@HYPOTHESIS
@given(data=st.data())
def test_transpose_random(data):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=5), "shape")
    perm = data.draw(st.permutations(range(len(shape))), "perm")
    x = rng_for("transpose", shape, perm).standard_normal(shape).astype(np.float32)
    (y,), mod = check("Transpose", {"x": x}, {"perm": list(perm)})
    assert y.shape == tuple(shape[p] for p in perm)


def test_transpose_default_reverses_axes():
    x = rng_for("transpose default").standard_normal((2, 3, 4)).astype(np.float32)
    (y,), mod = check("Transpose", {"x": x}, opset=21)
    assert y.shape == (4, 3, 2)
    assert mod.graph.nodes[0].attrs["perm"] == [2, 1, 0]


def test_transpose_rejects_bad_perm():
    with pytest.raises(ShapeError, match=r"perm=\[0, 0\] is not a permutation"):
        compile_node("Transpose", {"x": np.zeros((2, 3), np.float32)}, {"perm": [0, 0]})


# ---- Concat / Split ----------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 11, 13])
@pytest.mark.parametrize("axis", [-3, -1, 0, 2])
def test_concat(axis, opset):
    rng = rng_for("concat", axis, opset)
    base = [2, 3, 4]
    feeds = {}
    for i, extra in enumerate((1, 2, 3)):
        shape = list(base)
        shape[axis] = extra
        feeds[f"x{i}"] = rng.standard_normal(shape).astype(np.float32)
    (y,), _ = check("Concat", feeds, {"axis": axis}, opset)
    assert y.shape[axis] == 6


def test_concat_int64_with_constant():
    x = np.array([2, 3], np.int64)
    (y,), _ = check("Concat", {"x": x}, {"axis": 0}, inits={"c": i64(-1)})
    np.testing.assert_array_equal(y, [2, 3, -1])


def test_concat_mismatch_names_all_shapes():
    feeds = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((4, 5), np.float32)}
    with pytest.raises(ShapeError, match=r"f32\[2,3\], f32\[4,5\]"):
        compile_node("Concat", feeds, {"axis": 0})


SPLIT_CASES = [
    # opset, attrs, initializers (the 'split' input), outputs
    (11, {"axis": 1}, None, 3),
    (11, {"axis": -1, "split": [1, 4, 2]}, None, 3),
    (13, {"axis": 2}, None, 2),
    (13, {"axis": 2}, {"split": i64(3, 1)}, 2),
    (18, {"axis": 3, "num_outputs": 4}, None, 4),      # uneven: 2, 2, 2, 1
    (18, {"axis": -1, "num_outputs": 3}, None, 3),     # uneven: 3, 3, 1
    (18, {"axis": 0}, {"split": i64(1, 1)}, 2),
]


@pytest.mark.parametrize("opset,attrs,inits,count", SPLIT_CASES)
def test_split(opset, attrs, inits, count):
    x = rng_for("split", opset, str(attrs)).standard_normal((2, 3, 4, 7)).astype(np.float32)
    inputs = ["x"] + (["split"] if inits else [])
    outputs = tuple(f"y{i}" for i in range(count))
    ours, mod = check("Split", {"x": x}, attrs, opset, inits, inputs, outputs)
    assert len(ours) == count
    assert sum(o.shape[mod.graph.nodes[0].attrs["axis"]] for o in ours) == x.shape[
        mod.graph.nodes[0].attrs["axis"]]


def test_split_opset18_rejects_an_empty_last_chunk():
    # ceil(6 / 4) = 2 leaves nothing for the fourth output
    with pytest.raises(ShapeError, match=r"num_outputs=4 leaves no elements"):
        compile_node("Split", {"x": np.zeros((6,), np.float32)}, {"num_outputs": 4}, 18,
                     outputs=("a", "b", "c", "d"))


def test_split_uneven_before_opset18_is_an_error():
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ShapeError, match=r"cannot divide axis 1 of f32\[2,5\] \(size 5\) into 2"):
        compile_node("Split", {"x": x}, {"axis": 1}, 13, outputs=("a", "b"))


# ---- Squeeze / Unsqueeze -----------------------------------------------------------------------
@pytest.mark.parametrize("opset,axes,expected", [
    (11, [0, -2], (3, 4)), (11, None, (3, 4)), (13, [0, -2], (3, 4)), (13, None, (3, 4)),
    (21, [2], (1, 3, 4)),
])
def test_squeeze(opset, axes, expected):
    x = rng_for("squeeze", opset, axes).standard_normal((1, 3, 1, 4)).astype(np.float32)
    attrs, inits, inputs = {}, None, ["x"]
    if axes is not None and opset < 13:
        attrs = {"axes": axes}
    elif axes is not None:
        inits, inputs = {"axes": np.array(axes, np.int64)}, ["x", "axes"]
    (y,), _ = check("Squeeze", {"x": x}, attrs, opset, inits, inputs)
    assert y.shape == expected


def test_squeeze_rejects_non_unit_axis():
    with pytest.raises(ShapeError, match=r"axis 1 of f32\[1,3\] has size 3, not 1"):
        compile_node("Squeeze", {"x": np.zeros((1, 3), np.float32)}, inits={"axes": i64(1)})


@pytest.mark.parametrize("opset,axes", [(11, [0, 3]), (11, [-1]), (13, [0, 3]), (13, [-1, 1])])
def test_unsqueeze(opset, axes):
    x = rng_for("unsqueeze", opset, axes).standard_normal((3, 4)).astype(np.float32)
    if opset < 13:
        (y,), _ = check("Unsqueeze", {"x": x}, {"axes": axes}, opset)
    else:
        (y,), _ = check("Unsqueeze", {"x": x}, opset=opset,
                        inits={"axes": np.array(axes, np.int64)})
    assert y.ndim == 2 + len(axes)


# ---- Slice -------------------------------------------------------------------------------------
BIG = 2 ** 62


@st.composite
def slice_specs(draw):
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    axes = draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1,
                         max_size=len(shape), unique_by=lambda a: a % len(shape)))
    bound = st.one_of(st.integers(-8, 8), st.sampled_from([BIG, -BIG]))
    starts = [draw(bound) for _ in axes]
    ends = [draw(bound) for _ in axes]
    steps = [draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) for _ in axes]
    return shape, starts, ends, axes, steps


@HYPOTHESIS
@given(spec=slice_specs())
def test_slice_random_opset13(spec):
    shape, starts, ends, axes, steps = spec
    x = rng_for("slice", spec).standard_normal(shape).astype(np.float32)
    inits = {"starts": np.array(starts, np.int64), "ends": np.array(ends, np.int64),
             "axes": np.array(axes, np.int64), "steps": np.array(steps, np.int64)}
    (y,), mod = check("Slice", {"x": x}, inits=inits)
    assert mod.graph.nodes[0].op == "Slice"


@HYPOTHESIS
@given(spec=slice_specs())
def test_slice_random_opset9_attributes(spec):
    shape, starts, ends, axes, _ = spec
    x = rng_for("slice9", spec).standard_normal(shape).astype(np.float32)
    attrs = {"starts": starts, "ends": ends, "axes": [a % len(shape) for a in axes]}
    check("Slice", {"x": x}, attrs, opset=9)


def test_slice_default_axes_and_steps():
    x = rng_for("slice defaults").standard_normal((4, 5)).astype(np.float32)
    (y,), mod = check("Slice", {"x": x}, inits={"starts": i64(1, -4), "ends": i64(3, 100)})
    assert y.shape == (2, 4)
    assert mod.graph.nodes[0].attrs["axes"] == [0, 1]
    assert mod.graph.nodes[0].attrs["steps"] == [1, 1]


def test_slice_zero_step_is_an_error():
    with pytest.raises(ShapeError, match=r"steps=\[0\] contains 0"):
        compile_node("Slice", {"x": np.zeros((4,), np.float32)},
                     inits={"starts": i64(0), "ends": i64(4), "axes": i64(0), "steps": i64(0)})


# ---- Pad ---------------------------------------------------------------------------------------
@st.composite
def pad_specs(draw):
    shape = draw(st.lists(st.integers(2, 5), min_size=1, max_size=4))
    mode = draw(st.sampled_from(["constant", "reflect", "edge", "wrap"]))
    pads = []
    for side in range(2):
        for d in shape:
            # reflect needs pads < size; crops (negative pads) only in constant mode
            high = d - 1 if mode in ("reflect", "wrap") else 3
            low = -(d // 2) if mode == "constant" else 0
            pads.append(draw(st.integers(low, high)))
    return shape, mode, pads


@HYPOTHESIS
@given(spec=pad_specs())
def test_pad_random_opset19(spec):
    shape, mode, pads = spec
    x = rng_for("pad", spec).standard_normal(shape).astype(np.float32)
    inits = {"pads": np.array(pads, np.int64), "value": np.array(0.75, np.float32)}
    (y,), _ = check("Pad", {"x": x}, {"mode": mode}, 19, inits)
    assert y.shape == tuple(d + pads[i] + pads[len(shape) + i] for i, d in enumerate(shape))


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_opset10_attributes(mode):
    x = rng_for("pad10", mode).standard_normal((2, 3, 4, 5)).astype(np.float32)
    attrs = {"mode": mode, "pads": [0, 0, 1, 2, 0, 0, 3, 1], "value": -2.0}
    check("Pad", {"x": x}, attrs, opset=10)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_opset13_inputs(mode):
    x = rng_for("pad13", mode).standard_normal((1, 2, 4, 5)).astype(np.float32)
    inits = {"pads": i64(0, 0, 2, 1, 0, 0, 1, 3), "value": np.array(1.5, np.float32)}
    check("Pad", {"x": x}, {"mode": mode}, 13, inits)


def test_pad_opset18_axes_and_int_data():
    x = np.arange(20, dtype=np.int32).reshape(4, 5)
    inits = {"pads": i64(1, 2, 3, 0), "value": np.array(7, np.int32), "axes": i64(-1, 0)}
    (y,), mod = check("Pad", {"x": x}, {"mode": "constant"}, 18, inits)
    assert y.shape == (4 + 2, 5 + 1 + 3)
    assert mod.graph.nodes[0].attrs["pads"] == [2, 1, 0, 3]


def test_pad_with_missing_constant_value_uses_zero():
    x = rng_for("pad missing").standard_normal((3, 4)).astype(np.float32)
    (y,), _ = check("Pad", {"x": x}, {}, 18, {"pads": i64(1, 1), "axes": i64(1)},
                    inputs=["x", "pads", "", "axes"])
    assert np.all(y[:, 0] == 0)


# ---- Expand / Gather ---------------------------------------------------------------------------
@pytest.mark.parametrize("in_shape,shape", [
    ((3, 1), (2, 3, 4)), ((1, 4), (3, 1)), ((2, 1, 5), (1, 6, 1)), ((4,), (4,)), ((), (2, 3)),
])
def test_expand(in_shape, shape):
    x = rng_for("expand", in_shape).standard_normal(in_shape).astype(np.float32)
    (y,), _ = check("Expand", {"x": x}, inits={"shape": np.array(shape, np.int64)})
    assert y.shape == np.broadcast_shapes(in_shape, shape)


@pytest.mark.parametrize("opset", [7, 11, 13])
@pytest.mark.parametrize("axis,indices", [
    (0, [[0, -1], [1, 0]]), (1, [2, -3, 0]), (-1, 3), (2, [[[1]]]),
])
def test_gather(axis, indices, opset):
    x = rng_for("gather", axis, opset).standard_normal((2, 3, 4)).astype(np.float32)
    idx = np.array(indices, np.int64)
    if opset < 11:
        idx = np.where(idx < 0, idx + x.shape[axis], idx)
    (y,), _ = check("Gather", {"x": x, "i": idx}, {"axis": axis}, opset)
    assert y.shape == np.take(x, idx, axis=axis).shape


def test_gather_int32_indices_and_int_data():
    x = np.arange(12, dtype=np.int64).reshape(3, 4)
    (y,), _ = check("Gather", {"x": x, "i": np.array([2, 0], np.int32)}, {"axis": 1})
    np.testing.assert_array_equal(y, x[:, [2, 0]])


def test_gather_out_of_range_index_is_reported():
    mod = compile_node("Gather", {"x": np.zeros((3, 4), np.float32),
                                  "i": np.zeros((2,), np.int64)}, {"axis": 0})
    with pytest.raises(ModelError, match=r"outside \[-3, 2\] for axis 0 of data shape \[3, 4\]"):
        mod.run({"x": np.zeros((3, 4), np.float32), "i": np.array([0, 3], np.int64)})


# ---- Shape / ConstantOfShape / Range -----------------------------------------------------------
@pytest.mark.parametrize("opset,attrs,expected", [
    (13, {}, [2, 3, 4, 5]), (15, {"start": 1}, [3, 4, 5]), (15, {"start": -3, "end": -1}, [3, 4]),
    (15, {"start": 3, "end": 1}, []), (19, {"end": 10}, [2, 3, 4, 5]),
])
def test_shape_folds_to_a_constant(opset, attrs, expected):
    x = np.zeros((2, 3, 4, 5), np.float32)
    (y,), mod = check("Shape", {"x": x}, attrs, opset)
    np.testing.assert_array_equal(y, expected)
    assert y.dtype == np.int64
    assert mod.graph.nodes == []


def test_shape_value_from_types_needs_static_dims():
    from cnncompile.ir.types import TensorType
    shape = OPS["Shape"]
    assert shape.value_from_types(TensorType(np.float32, ("?", 3)), start=1, end=2).tolist() == [3]
    assert shape.value_from_types(TensorType(np.float32, ("?", 3)), start=0, end=2) is None


@pytest.mark.parametrize("opset", [9, 20])
@pytest.mark.parametrize("value", [None, np.array([2.5], np.float32), np.array([7], np.int64),
                                   np.array([1], np.int32)])
def test_constant_of_shape(opset, value):
    from onnx import numpy_helper
    x = np.zeros((2, 3), np.float32)
    attrs = {} if value is None else {"value": numpy_helper.from_array(value, "v")}
    shape_node = helper.make_node("Shape", ["x"], ["s"])
    node = helper.make_node("ConstantOfShape", ["s"], ["y"], **attrs)
    model = make_model([shape_node, node], {"x": x}, ["y"], opset=opset)
    (y,) = check_against_ort(model, {"x": x})
    assert y.shape == (2, 3)
    assert y.dtype == (np.float32 if value is None else value.dtype)


@pytest.mark.parametrize("dtype,start,limit,delta", [
    (np.int64, 0, 10, 3), (np.int32, 5, -4, -2), (np.float32, 0.5, 4.0, 0.7),
    (np.float32, 1.0, 0.0, 0.25), (np.float64, -1.5, 2.5, 0.5), (np.int64, 3, 3, 1),
])
def test_range_folds_with_exact_dtype(dtype, start, limit, delta):
    x = np.zeros((2,), np.float32)
    inits = {"start": np.array(start, dtype), "limit": np.array(limit, dtype),
             "delta": np.array(delta, dtype)}
    node = helper.make_node("Range", ["start", "limit", "delta"], ["r"])
    ident = helper.make_node("Shape", ["x"], ["sx"])
    model = make_model([node, ident], {"x": x}, ["r", "sx"], inits, opset=11)
    ours = check_against_ort(model, {"x": x})
    assert ours[0].dtype == dtype
    assert cnncompile.compile(model, input_shapes={"x": (2,)}).graph.nodes == []


def test_range_on_run_time_inputs_has_run_time_length():
    feeds = {"s": np.array(1, np.int64), "l": np.array(9, np.int64), "d": np.array(2, np.int64)}
    (y,), mod = check("Range", feeds, opset=11)
    np.testing.assert_array_equal(y, [1, 3, 5, 7])
    assert mod.graph.nodes[0].outputs[0].type.shape == ("?",)


# ---- DepthToSpace / SpaceToDepth ---------------------------------------------------------------
@pytest.mark.parametrize("opset,mode", [(9, None), (11, "DCR"), (11, "CRD"), (13, "DCR"),
                                        (13, "CRD")])
def test_depth_to_space(opset, mode):
    x = rng_for("d2s", opset, mode).standard_normal((2, 8, 3, 2)).astype(np.float32)
    attrs = {"blocksize": 2} if mode is None else {"blocksize": 2, "mode": mode}
    (y,), _ = check("DepthToSpace", {"x": x}, attrs, opset)
    assert y.shape == (2, 2, 6, 4)


@pytest.mark.parametrize("opset,blocksize", [(9, 2), (13, 3)])
def test_space_to_depth(opset, blocksize):
    x = rng_for("s2d", opset).standard_normal((1, 2, 6, 6)).astype(np.float32)
    (y,), _ = check("SpaceToDepth", {"x": x}, {"blocksize": blocksize}, opset)
    assert y.shape == (1, 2 * blocksize ** 2, 6 // blocksize, 6 // blocksize)


def test_depth_to_space_rejects_indivisible_channels():
    with pytest.raises(ShapeError, match=r"channels divisible by 4, got f32\[1,6,2,2\]"):
        compile_node("DepthToSpace", {"x": np.zeros((1, 6, 2, 2), np.float32)}, {"blocksize": 2})


# ---- cost ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Flatten", "Reshape", "Transpose", "Concat", "Split", "Squeeze",
                                "Unsqueeze", "Slice", "Pad", "Expand", "Gather", "Shape",
                                "ConstantOfShape", "Range", "DepthToSpace", "SpaceToDepth"])
def test_data_movement_costs_no_flops(op):
    from cnncompile.ir.types import TensorType
    t = TensorType(np.float32, (2, 3))
    assert OPS[op].flops([t], [t]) == 0
