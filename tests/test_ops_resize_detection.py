"""Resize, Upsample, RoiAlign, MaxRoiPool and NonMaxSuppression against onnxruntime."""

import zlib

import numpy as np
import pytest
from onnx import helper

import cnncompile
from cnncompile.errors import ModelError, ShapeError
from cnncompile.ops import OPS
from helpers import check_against_ort, make_model, run_ort


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def one_node(op, inputs, feeds, inits, attrs, opset, outputs=("y",)):
    node = helper.make_node(op, list(inputs), list(outputs), **attrs)
    return make_model(node, feeds, list(outputs), inits, opset=opset)


def f32(*values):
    return np.array(values, dtype=np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


EMPTY = np.array([], np.float32)
X4 = (2, 3, 5, 7)
UP_SCALES = f32(1, 1, 1.7, 2.5)
DOWN_SCALES = f32(1, 1, 0.6, 0.45)
SIZES = i64(2, 3, 9, 4)
ROI = f32(0, 0, 0.1, -0.2, 1, 1, 0.8, 1.3)


def resize_model(x, attrs, opset, scales=None, sizes=None, roi=None):
    """A Resize whose roi/scales/sizes are initializers; absent ones are empty tensors, as
    exporters write them."""
    inits = {"roi": EMPTY if roi is None else roi, "scales": EMPTY if scales is None else scales}
    inputs = ["x", "roi", "scales"]
    if sizes is not None:
        inits["sizes"] = sizes
        inputs.append("sizes")
    return one_node("Resize", inputs, {"x": x}, inits, attrs, opset)


def check_resize(attrs, opset, scales=None, sizes=None, roi=None, shape=X4, dtype=np.float32):
    rng = rng_for("resize", sorted(attrs.items()), opset, shape, str(scales), str(sizes))
    if np.issubdtype(dtype, np.integer):
        x = rng.integers(0, 200, shape).astype(dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    model = resize_model(x, attrs, opset, scales, sizes, roi)
    (y,) = check_against_ort(model, {"x": x})
    return y


COORDINATE_MODES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                    "tf_crop_and_resize"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
TARGETS = [("up", UP_SCALES, None), ("down", DOWN_SCALES, None), ("sizes", None, SIZES)]


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("nearest_mode", NEAREST_MODES)
@pytest.mark.parametrize("ctm", COORDINATE_MODES)
def test_resize_nearest_opset13(ctm, nearest_mode, target):
    _, scales, sizes = target
    attrs = {"mode": "nearest", "coordinate_transformation_mode": ctm,
             "nearest_mode": nearest_mode, "extrapolation_value": -4.0}
    roi = ROI if ctm == "tf_crop_and_resize" else None
    check_resize(attrs, 13, scales, sizes, roi)


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("opset", [11, 13, 19])
@pytest.mark.parametrize("ctm", COORDINATE_MODES)
def test_resize_linear(ctm, opset, target):
    _, scales, sizes = target
    attrs = {"mode": "linear", "coordinate_transformation_mode": ctm, "extrapolation_value": 2.5}
    roi = ROI if ctm == "tf_crop_and_resize" else None
    check_resize(attrs, opset, scales, sizes, roi)


@pytest.mark.parametrize("mode,nearest_mode", [("nearest", "round_prefer_floor"),
                                               ("nearest", "round_prefer_ceil"),
                                               ("linear", "round_prefer_floor")])
@pytest.mark.parametrize("scales", [UP_SCALES, DOWN_SCALES], ids=["up", "down"])
def test_resize_half_pixel_symmetric_opset19(mode, nearest_mode, scales):
    attrs = {"mode": mode, "coordinate_transformation_mode": "half_pixel_symmetric",
             "nearest_mode": nearest_mode}
    check_resize(attrs, 19, scales)


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
def test_resize_tf_half_pixel_for_nn_opset11(target):
    _, scales, sizes = target
    check_resize({"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn"},
                 11, scales, sizes)


@pytest.mark.parametrize("ctm", ["half_pixel", "align_corners", "asymmetric",
                                 "tf_crop_and_resize"])
@pytest.mark.parametrize("exclude_outside,a", [(0, -0.75), (1, -0.5)])
@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
def test_resize_cubic(ctm, exclude_outside, a, target):
    _, scales, sizes = target
    attrs = {"mode": "cubic", "coordinate_transformation_mode": ctm, "cubic_coeff_a": a,
             "exclude_outside": exclude_outside}
    roi = ROI if ctm == "tf_crop_and_resize" else None
    check_resize(attrs, 13, scales, sizes, roi)


def test_resize_trilinear_5d():
    y = check_resize({"mode": "linear"}, 13, f32(1, 1, 1.5, 0.6, 2), shape=(1, 2, 3, 4, 5))
    assert y.shape == (1, 2, 4, 2, 10)


def test_resize_nearest_uint8_is_exact():
    y = check_resize({"mode": "nearest"}, 13, DOWN_SCALES, dtype=np.uint8)
    assert y.dtype == np.uint8


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [f32(1, 1, 2, 3), f32(1, 1, 0.6, 0.5), f32(1, 1, 1.5, 2.5)])
def test_resize_opset10(mode, scales):
    x = rng_for("resize10", mode).standard_normal(X4).astype(np.float32)
    model = one_node("Resize", ["x", "scales"], {"x": x}, {"scales": scales}, {"mode": mode}, 10)
    check_against_ort(model, {"x": x})


@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_opset18_axes_and_aspect_ratio_policy(policy, mode):
    x = rng_for("resize18", policy, mode).standard_normal(X4).astype(np.float32)
    attrs = {"mode": mode, "keep_aspect_ratio_policy": policy, "axes": [3, 2]}
    model = one_node("Resize", ["x", "", "", "sizes"], {"x": x}, {"sizes": i64(9, 8)}, attrs, 18)
    (y,) = check_against_ort(model, {"x": x})
    mod = cnncompile.compile(model, input_shapes={"x": X4})
    canonical = mod.graph.nodes[0].attrs
    assert canonical["axes"] is None and canonical["keep_aspect_ratio_policy"] == "stretch"
    assert canonical["sizes"] == list(y.shape)
    # onnxruntime mishandles negative axes here; ONNX allows them and they mean the same axes
    attrs["axes"] = [-1, -2]
    negative = one_node("Resize", ["x", "", "", "sizes"], {"x": x}, {"sizes": i64(9, 8)}, attrs,
                        18)
    z = cnncompile.compile(negative, input_shapes={"x": X4}).run({"x": x})["y"]
    np.testing.assert_array_equal(z, y)


def test_resize_opset19_axes_with_scales_and_roi():
    x = rng_for("resize19 roi").standard_normal(X4).astype(np.float32)
    attrs = {"mode": "linear", "axes": [3, 2], "coordinate_transformation_mode":
             "tf_crop_and_resize", "extrapolation_value": -3.0}
    inits = {"roi": f32(0.2, -0.1, 0.9, 1.3), "scales": f32(1.5, 2.0)}
    model = one_node("Resize", ["x", "roi", "scales"], {"x": x}, inits, attrs, 19)
    (y,) = check_against_ort(model, {"x": x})
    assert y.shape == (2, 3, 10, 10)


def test_resize_output_size_uses_float32_product():
    # 1.4f * 5 is 7 in float32 (onnxruntime), 6.99.. in float64
    y = check_resize({"mode": "nearest"}, 13, f32(1, 1, 1, 1.4), shape=(1, 1, 2, 5))
    assert y.shape == (1, 1, 2, 7)


@pytest.mark.parametrize("ctm", ["half_pixel", "pytorch_half_pixel", "align_corners",
                                 "asymmetric"])
@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("scales,sizes", [(UP_SCALES, None), (DOWN_SCALES, None),
                                          (None, i64(1, 2, 5, 4))], ids=["up", "down", "sizes"])
def test_resize_antialias(mode, ctm, scales, sizes):
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm, "antialias": 1}
    check_resize(attrs, 18, scales, sizes, shape=(1, 2, 9, 11))


def test_resize_antialias_needs_an_interpolating_mode():
    x = np.zeros(X4, np.float32)
    model = resize_model(x, {"mode": "nearest", "antialias": 1}, 18, DOWN_SCALES)
    with pytest.raises(ModelError, match="antialias=1 applies to modes 'linear' and 'cubic'"):
        cnncompile.compile(model, input_shapes={"x": X4})


def test_resize_needs_exactly_one_of_scales_and_sizes():
    x = np.zeros(X4, np.float32)
    model = resize_model(x, {"mode": "nearest"}, 13, UP_SCALES, SIZES)
    with pytest.raises(ModelError, match="exactly one of 'scales' and 'sizes'.*both"):
        cnncompile.compile(model, input_shapes={"x": X4})


def test_resize_scales_length_must_match_rank():
    x = np.zeros(X4, np.float32)
    model = resize_model(x, {"mode": "nearest"}, 13, f32(2, 2))
    with pytest.raises(ShapeError, match=r"scales=\[2.0, 2.0\] must have one value per resized "
                                         r"axis \(4 for f32\[2,3,5,7\]\)"):
        cnncompile.compile(model, input_shapes={"x": X4})


def test_resize_flops_count_only_interpolation():
    from cnncompile.ir.types import TensorType
    x, y = TensorType(np.float32, (1, 1, 4, 4)), TensorType(np.float32, (1, 1, 8, 8))
    common = {"scales": [1.0, 1.0, 2.0, 2.0], "sizes": [1, 1, 8, 8]}
    assert OPS["Resize"].flops([x], [y], mode="nearest", **common) == 0
    assert OPS["Resize"].flops([x], [y], mode="linear", **common) == 64 * 2 * 2 * 2
    assert OPS["Resize"].flops([x], [y], mode="cubic", **common) == 64 * 2 * 2 * 4


# ---- Upsample ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.5, 2.5]])
@pytest.mark.parametrize("opset", [7, 9])
def test_upsample(opset, scales, mode):
    x = rng_for("upsample", opset, scales, mode).standard_normal(X4).astype(np.float32)
    if opset < 9:
        model = one_node("Upsample", ["x"], {"x": x}, None, {"mode": mode, "scales": scales}, 7)
    else:
        model = one_node("Upsample", ["x", "s"], {"x": x}, {"s": np.array(scales, np.float32)},
                         {"mode": mode}, 9)
    (y,) = check_against_ort(model, {"x": x})
    assert y.shape == tuple(int(d * s) for d, s in zip(X4, scales))


def test_upsample_rejects_shrinking():
    x = np.zeros(X4, np.float32)
    model = one_node("Upsample", ["x", "s"], {"x": x}, {"s": f32(1, 1, 0.5, 1)}, {}, 9)
    with pytest.raises(ShapeError, match="must all be >= 1"):
        cnncompile.compile(model, input_shapes={"x": X4})


# ---- RoiAlign / MaxRoiPool ---------------------------------------------------------------------
ROIS = f32([0, 0, 11, 9], [2.3, 1.7, 8.2, 6.9], [-2, -3, 4, 5], [5, 5, 5.5, 5.2],
           [9, 7, 14, 13], [1, 2, 1, 2])
BATCH = i64(0, 1, 1, 0, 1, 0)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("opset,ctm", [(10, None), (16, "half_pixel"),
                                       (16, "output_half_pixel")])
def test_roi_align(opset, ctm, mode, sampling_ratio):
    x = rng_for("roialign", opset, ctm, mode).standard_normal((2, 3, 10, 12)).astype(np.float32)
    attrs = {"mode": mode, "output_height": 3, "output_width": 4,
             "sampling_ratio": sampling_ratio, "spatial_scale": 0.9}
    if ctm is not None:
        attrs["coordinate_transformation_mode"] = ctm
    model = one_node("RoiAlign", ["x", "rois", "batch"], {"x": x},
                     {"rois": ROIS, "batch": BATCH}, attrs, opset)
    (y,) = check_against_ort(model, {"x": x})
    assert y.shape == (6, 3, 3, 4)


def test_roi_align_rois_as_run_time_inputs_float64():
    rng = rng_for("roialign f64")
    feeds = {"x": rng.standard_normal((1, 2, 8, 8)), "rois": ROIS[:3].astype(np.float64),
             "batch": np.zeros(3, np.int64)}
    model = one_node("RoiAlign", ["x", "rois", "batch"], feeds, None,
                     {"output_height": 2, "output_width": 2}, 16)
    (y,) = check_against_ort(model, feeds)
    assert y.dtype == np.float64


def test_roi_align_rejects_bad_rois():
    feeds = {"x": np.zeros((1, 2, 8, 8), np.float32), "rois": np.zeros((3, 5), np.float32),
             "batch": np.zeros(3, np.int64)}
    model = one_node("RoiAlign", ["x", "rois", "batch"], feeds, None, {}, 16)
    with pytest.raises(ShapeError, match=r"rois must be \[num_rois, 4\], got f32\[3,5\]"):
        cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})


@pytest.mark.parametrize("pooled_shape,spatial_scale", [([3, 2], 0.8), ([2, 2], 1.0),
                                                        ([1, 4], 0.5)])
def test_max_roi_pool(pooled_shape, spatial_scale):
    # Non-negative data: onnxruntime starts each bin's maximum at FLT_MIN (> 0), so for all-negative
    # bins it returns FLT_MIN where ONNX's max pooling gives the negative maximum.
    x = rng_for("maxroipool", pooled_shape).random((2, 3, 10, 12)).astype(np.float32)
    rois = np.concatenate([BATCH[:, None].astype(np.float32), ROIS], axis=1)
    model = one_node("MaxRoiPool", ["x", "rois"], {"x": x}, {"rois": rois},
                     {"pooled_shape": pooled_shape, "spatial_scale": spatial_scale}, 13)
    (y,) = check_against_ort(model, {"x": x})
    assert y.shape == (6, 3, *pooled_shape)


def test_max_roi_pool_negative_data_takes_the_true_maximum():
    x = -1.0 - np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    rois = f32([0, 0, 0, 3, 3])
    model = one_node("MaxRoiPool", ["x", "rois"], {"x": x}, {"rois": rois},
                     {"pooled_shape": [1, 1]}, 13)
    y = cnncompile.compile(model, input_shapes={"x": x.shape}).run({"x": x})["y"]
    assert y.reshape(-1).tolist() == [-1.0]


# ---- NonMaxSuppression -------------------------------------------------------------------------
def nms_boxes(rng, center_point_box, batch=2, count=40):
    if center_point_box:
        centers = rng.random((batch, count, 2)) * 10
        sizes = rng.random((batch, count, 2)) * 4 + 0.5
        return np.concatenate([centers, sizes], -1).astype(np.float32)
    corner = rng.random((batch, count, 2)) * 10
    # some boxes have their corners swapped (y2 < y1), which NMS must accept
    other = corner + rng.random((batch, count, 2)) * 5 - 1
    return np.concatenate([corner, other], -1).astype(np.float32)


NMS_PARAMS = [
    ("all three", ["m", "iou", "score"], {"m": i64(5), "iou": f32(0.4), "score": f32(0.3)}),
    ("scalar inputs", ["m", "iou"], {"m": np.array(100, np.int64), "iou": np.array(0.2,
                                                                               np.float32)}),
    ("defaults: no output", [], {}),
    ("no iou threshold", ["m", "", "score"], {"m": i64(3), "score": f32(0.5)}),
    ("iou 1", ["m", "iou"], {"m": i64(1000), "iou": f32(1.0)}),
]


@pytest.mark.parametrize("center_point_box", [0, 1])
@pytest.mark.parametrize("name,extra,inits", NMS_PARAMS, ids=[p[0] for p in NMS_PARAMS])
@pytest.mark.parametrize("opset", [10, 11])
def test_non_max_suppression(opset, name, extra, inits, center_point_box):
    rng = rng_for("nms", name, center_point_box)
    feeds = {"boxes": nms_boxes(rng, center_point_box),
             "scores": rng.random((2, 3, 40)).astype(np.float32)}
    model = one_node("NonMaxSuppression", ["boxes", "scores"] + extra, feeds, inits,
                     {"center_point_box": center_point_box}, opset)
    mod = cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})
    ours = mod.run(feeds)["y"]
    (theirs,) = run_ort(model, feeds)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, theirs)
    assert mod.graph.outputs[0].type.shape == ("?", 3)
    node = mod.graph.nodes[0]
    assert len(node.inputs) == 2  # the three parameters were lifted into attributes


def test_non_max_suppression_feeds_run_time_sized_gather():
    """The '?' row count flows through Gather/Squeeze/Slice into a data Gather."""
    rng = rng_for("nms chain")
    feeds = {"boxes": nms_boxes(rng, 0, batch=1, count=30),
             "scores": rng.random((1, 1, 30)).astype(np.float32)}
    inits = {"m": i64(10), "iou": f32(0.3), "col": np.array(2, np.int64), "s0": i64(0),
             "s1": i64(1), "ax": i64(1)}
    nodes = [
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "m", "iou"], ["sel"]),
        helper.make_node("Gather", ["sel", "col"], ["box_idx"], axis=1),        # [?]
        helper.make_node("Squeeze", ["boxes", "s0"], ["boxes2d"]),              # [30, 4]
        helper.make_node("Gather", ["boxes2d", "box_idx"], ["picked"], axis=0),  # [?, 4]
        helper.make_node("Slice", ["picked", "s0", "s1", "ax"], ["first_col"]),  # [?, 1]
    ]
    model = make_model(nodes, feeds, ["picked", "first_col"], inits, opset=13)
    ours = check_against_ort(model, feeds)
    assert ours[0].shape[1] == 4 and ours[1].shape[1] == 1
    mod = cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})
    assert [v.type.shape for v in mod.graph.outputs] == [("?", 4), ("?", 1)]


def test_non_max_suppression_rejects_mismatched_inputs():
    feeds = {"boxes": np.zeros((1, 5, 4), np.float32), "scores": np.zeros((1, 2, 6), np.float32)}
    model = one_node("NonMaxSuppression", ["boxes", "scores"], feeds, None, {}, 11)
    with pytest.raises(ShapeError, match=r"boxes f32\[1,5,4\] and scores f32\[1,2,6\] disagree"):
        cnncompile.compile(model, input_shapes={k: v.shape for k, v in feeds.items()})
