"""Resize (opsets 10-19) and the deprecated Upsample (opsets 7-9).

``normalize`` turns every way of asking for a size (scales or sizes, with or without ``axes``,
``keep_aspect_ratio_policy``, the opset-10 input layout) into one canonical form: full-rank
``scales`` (the float32 factors the coordinate transform divides by), full-rank ``sizes`` (the
output shape) and, for tf_crop_and_resize, a full-rank ``roi``.

The reference resizes one axis at a time (interpolation is separable). Source coordinates are
computed in float32 in the same order of operations as onnxruntime, so that nearest-neighbour ties
fall the same way. Output sizes ignore ``roi`` (floor(size * scale)), as onnxruntime and ONNX shape
inference do.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError, ShapeError
from ..ir.types import TensorType
from .base import Op, fill_defaults, normalize_axis, register

MODES = ("nearest", "linear", "cubic")
COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
                    "asymmetric", "tf_half_pixel_for_nn", "tf_crop_and_resize")
#: "legacy" is opsets < 11 (Upsample, Resize-10): ceil when an axis shrinks, floor otherwise
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "legacy")
ASPECT_POLICIES = ("stretch", "not_larger", "not_smaller")

F32 = np.float32
TIE_EPS = 1e-6


def _float_list(value) -> list[float] | None:
    """A lifted input as a list of floats; an empty tensor counts as absent."""
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64).reshape(-1)
    return [float(v) for v in array] if array.size else None


def _int_list(value, what: str) -> list[int] | None:
    if value is None:
        return None
    array = np.asarray(value).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ModelError(f"{what} must hold integers, got {array.dtype} values {array.tolist()}")
    return [int(v) for v in array] if array.size else None


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _output_sizes(x: TensorType, axes, scales, sizes, policy, what: str):
    """Full-rank (scales, sizes) from scales or sizes given for ``axes``."""
    rank = x.rank
    given = scales if sizes is None else sizes
    if len(given) != len(axes):
        kind = "scales" if sizes is None else "sizes"
        raise ShapeError(f"{what} {kind}={given} must have one value per resized axis "
                         f"({len(axes)} for {x})")
    for axis in axes:
        if isinstance(x.shape[axis], str):
            raise ShapeError(f"{what} cannot resize axis {axis} of {x}: its size is known only "
                             "at run time")
    full_scales = [1.0] * rank
    full_sizes = list(x.shape)
    if sizes is None:
        for axis, scale in zip(axes, scales):
            if not scale > 0:
                raise ShapeError(f"{what} scales={scales} must be positive")
            scale = F32(scale)
            full_scales[axis] = float(scale)
            # float32 product, as onnxruntime computes it (1.4f * 5 gives 7, not 6).
            full_sizes[axis] = int(np.floor(scale * F32(x.shape[axis])))
        return full_scales, full_sizes
    if any(s < 0 for s in sizes):
        raise ShapeError(f"{what} sizes={sizes} has a negative size")
    ratios = {}
    for axis, size in zip(axes, sizes):
        dim = x.shape[axis]
        if dim == 0 and size != 0:
            raise ShapeError(f"{what} cannot resize the empty axis {axis} of {x} to {size}")
        ratios[axis] = F32(1.0) if dim == 0 else F32(size) / F32(dim)
        full_sizes[axis] = size
    if policy != "stretch":
        pick = min if policy == "not_larger" else max
        common = pick(ratios.values())
        for axis in axes:
            ratios[axis] = common
            full_sizes[axis] = _round_half_up(float(common * F32(x.shape[axis])))
    for axis, ratio in ratios.items():
        full_scales[axis] = float(ratio)
    return full_scales, full_sizes


def _source_coords(mode: str, out_len: int, in_len: int, scale: float, roi) -> np.ndarray:
    """Source coordinate of every output index along one axis (float32, onnxruntime's order)."""
    y = np.arange(out_len, dtype=F32)
    s = F32(scale)
    half = F32(0.5)
    if mode == "asymmetric":
        return y / s
    if mode == "half_pixel":
        return (y + half) / s - half
    if mode == "pytorch_half_pixel":
        return (y + half) / s - half if out_len > 1 else np.zeros(out_len, F32)
    if mode == "tf_half_pixel_for_nn":
        return (y + half) / s
    if mode == "align_corners":
        if out_len == 1:
            return np.zeros(out_len, F32)
        return y * F32(in_len - 1) / F32(out_len - 1)
    if mode == "tf_crop_and_resize":
        start, end = F32(roi[0]), F32(roi[1])
        if out_len == 1:
            return np.full(out_len, 0.5 * (float(start) + float(end)) * (in_len - 1), F32)
        return start * F32(in_len - 1) + (y * (end - start) * F32(in_len - 1)) / F32(out_len - 1)
    # half_pixel_symmetric: centre the (possibly fractional) scaled extent on the output
    adjustment = F32(out_len) / (s * F32(in_len))
    offset = F32(in_len) / F32(2) * (F32(1) - adjustment)
    return (float(offset) + (y.astype(np.float64) + 0.5) / float(s) - 0.5).astype(F32)


def _nearest_index(x: np.ndarray, mode: str, shrinking: bool) -> np.ndarray:
    x = x.astype(np.float64)  # holds the float32 coordinates exactly
    # A coordinate within 1e-6 of a half is a tie: 7 -> 16 pixels puts output 8 at 3.5 exactly, but
    # float32 gives 3.4999998. onnxruntime decides ties the same way.
    tie = np.abs(x - np.floor(x) - 0.5) <= TIE_EPS
    if mode == "round_prefer_floor":
        idx = np.where(tie, np.floor(x), np.round(x))
    elif mode == "round_prefer_ceil":
        idx = np.where(tie, np.ceil(x), np.round(x))
    elif mode == "floor":
        idx = np.floor(x)
    elif mode == "ceil":
        idx = np.ceil(x)
    else:
        idx = np.ceil(x) if shrinking else np.trunc(x)
    return idx.astype(np.int64)


def _kernel(t: np.ndarray, mode: str, a: float) -> np.ndarray:
    """The interpolation kernel: a triangle (linear) or Keys' cubic convolution."""
    t = np.abs(t)
    if mode == "linear":
        return np.maximum(1 - t, 0)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0))


def _taps(x: np.ndarray, in_len: int, scale: float, mode: str, cubic_coeff_a: float,
          exclude_outside: int, antialias: int):
    """(indices, weights), both [out_len, taps], of one axis.

    The taps sit at b + k around b = ceil(x) - 1. Antialiasing stretches the kernel by 1 / scale
    when the axis shrinks, so that every input pixel under the footprint contributes.
    """
    x = x.astype(np.float64)
    radius = 1 if mode == "linear" else 2
    stretch = min(scale, 1.0) if antialias else 1.0
    first = int(np.floor(-radius / stretch)) + 1
    offsets = np.arange(first, 2 - first)
    base = np.ceil(x).astype(np.int64) - 1
    ratio = x - base                                      # in (0, 1]
    idx = base[:, None] + offsets
    weights = _kernel((offsets - ratio[:, None]) * stretch, mode, cubic_coeff_a)
    if antialias:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    if exclude_outside:
        weights = np.where((idx < 0) | (idx >= in_len), 0.0, weights)
        total = weights.sum(axis=-1, keepdims=True)
        weights = weights / np.where(total == 0, 1.0, total)
    return np.clip(idx, 0, in_len - 1), weights


def _resize(x, scales, sizes, roi, mode, coordinate_transformation_mode, nearest_mode,
            cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, antialias=0):
    rank = x.ndim
    out = x if mode == "nearest" else x.astype(np.float64)
    outside = np.zeros((1,) * rank, dtype=bool)
    crop = coordinate_transformation_mode == "tf_crop_and_resize"
    # Shrinking axes first keeps the intermediate arrays small; the axes commute.
    order = sorted(range(rank), key=lambda a: sizes[a] / max(x.shape[a], 1))
    for axis in order:
        in_len, out_len = x.shape[axis], sizes[axis]
        axis_roi = (roi[axis], roi[rank + axis]) if crop else None
        if out_len == in_len and scales[axis] == 1.0 and (not crop or axis_roi == (0.0, 1.0)):
            continue
        if out_len == 0 or in_len == 0:
            shape = list(out.shape)
            shape[axis] = out_len
            out = np.zeros(shape, out.dtype)
            continue
        coords = _source_coords(coordinate_transformation_mode, out_len, in_len, scales[axis],
                                axis_roi)
        if crop:
            mask = (coords < 0) | (coords > in_len - 1)
            outside = outside | mask.reshape((1,) * axis + (-1,) + (1,) * (rank - axis - 1))
        if mode == "nearest":
            idx = _nearest_index(coords, nearest_mode, scales[axis] < 1)
            out = np.take(out, np.clip(idx, 0, in_len - 1), axis=axis)
            continue
        idx, weights = _taps(coords, in_len, scales[axis], mode, cubic_coeff_a, exclude_outside,
                             antialias)
        # One axis of interpolation is a matrix product; clamped taps add up in the matrix.
        matrix = np.zeros((out_len, in_len))
        np.add.at(matrix, (np.arange(out_len)[:, None], idx), weights)
        out = np.moveaxis(np.tensordot(matrix, out, axes=(1, axis)), 0, axis)
    if crop and outside.any():
        out = np.where(outside, np.asarray(extrapolation_value, dtype=out.dtype), out)
    if out.dtype != x.dtype:
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        out = out.astype(x.dtype)
    return out


def _resize_flops(input_types, output_types, mode, scales, sizes, antialias=0) -> int:
    """A multiply-add per tap, per resized axis, per output element (an upper bound: the
    separable reference does less)."""
    out = output_types[0]
    if not out.is_static or mode == "nearest":
        return 0
    radius = 1 if mode == "linear" else 2
    total = 0
    for axis, dim in enumerate(input_types[0].shape):
        if dim != sizes[axis] or scales[axis] != 1:
            stretch = min(scales[axis], 1.0) if antialias else 1.0
            total += 2 * (2 - 2 * (int(np.floor(-radius / stretch)) + 1))
    return out.size * total


@register
class Resize(Op):
    """Nearest, N-linear and N-cubic resizing with every coordinate transformation mode."""
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
             "nearest_mode": "round_prefer_floor", "cubic_coeff_a": -0.75, "exclude_outside": 0,
             "extrapolation_value": 0.0, "antialias": 0, "keep_aspect_ratio_policy": "stretch",
             "axes": None, "roi": None, "scales": None, "sizes": None}
    lift_inputs = {1: "roi", 2: "scales", 3: "sizes"}
    input_names = ("X", "roi", "scales", "sizes")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        if not input_types or input_types[0] is None:
            raise ModelError("Resize needs its input 'X'")
        x = input_types[0]
        rank = x.rank
        if opset < 11:
            # Resize-10 takes (X, scales): the lifted input 1 is the scales; it has no roi and
            # always maps coordinates asymmetrically.
            attrs.update(scales=attrs["roi"], roi=None, sizes=None,
                         coordinate_transformation_mode="asymmetric", nearest_mode="legacy")
        mode = attrs["mode"]
        ctm = attrs["coordinate_transformation_mode"]
        for name, value, allowed in (("mode", mode, MODES),
                                     ("coordinate_transformation_mode", ctm, COORDINATE_MODES),
                                     ("nearest_mode", attrs["nearest_mode"], NEAREST_MODES),
                                     ("keep_aspect_ratio_policy",
                                      attrs["keep_aspect_ratio_policy"], ASPECT_POLICIES)):
            if value not in allowed:
                raise ModelError(f"Resize {name} '{value}' is not one of {', '.join(allowed)}")
        antialias = int(bool(attrs["antialias"]))
        if antialias and mode == "nearest":
            raise ModelError("Resize antialias=1 applies to modes 'linear' and 'cubic' only")
        axes = _int_list(attrs["axes"], "Resize 'axes'")
        axes = list(range(rank)) if axes is None else [normalize_axis(a, rank, "Resize axes")
                                                       for a in axes]
        if len(set(axes)) != len(axes):
            raise ShapeError(f"Resize axes {axes} names an axis twice")
        scales = _float_list(attrs["scales"])
        sizes = _int_list(attrs["sizes"], "Resize 'sizes'")
        if (scales is None) == (sizes is None):
            raise ModelError("Resize needs exactly one of 'scales' and 'sizes' (non-empty), got "
                             + ("both" if scales is not None else "neither"))
        scales, sizes = _output_sizes(x, axes, scales, sizes, attrs["keep_aspect_ratio_policy"],
                                      "Resize")
        roi = None
        if ctm == "tf_crop_and_resize":
            given = _float_list(attrs["roi"])
            if given is None or len(given) != 2 * len(axes):
                raise ModelError(f"Resize with tf_crop_and_resize needs a 'roi' of "
                                 f"{2 * len(axes)} values (start and end per resized axis), got "
                                 f"{given}")
            roi = [0.0] * rank + [1.0] * rank
            for i, axis in enumerate(axes):
                roi[axis] = given[i]
                roi[rank + axis] = given[len(axes) + i]
        attrs.update(axes=None, roi=roi, scales=scales, sizes=sizes, antialias=antialias,
                     keep_aspect_ratio_policy="stretch",
                     cubic_coeff_a=float(attrs["cubic_coeff_a"]),
                     exclude_outside=int(attrs["exclude_outside"]),
                     extrapolation_value=float(attrs["extrapolation_value"]))
        return attrs

    @staticmethod
    def infer(x, sizes=None, **attrs):
        return x.with_shape(tuple(sizes))

    @staticmethod
    def reference(x, mode="nearest", coordinate_transformation_mode="half_pixel",
                  nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=0,
                  extrapolation_value=0.0, antialias=0, keep_aspect_ratio_policy="stretch",
                  axes=None, roi=None, scales=None, sizes=None):
        return _resize(x, scales, sizes, roi, mode, coordinate_transformation_mode, nearest_mode,
                       cubic_coeff_a, exclude_outside, extrapolation_value, antialias)

    @staticmethod
    def flops(input_types, output_types, mode="nearest", scales=None, sizes=None, antialias=0,
              **attrs):
        return _resize_flops(input_types, output_types, mode, scales, sizes, antialias)

    @staticmethod
    def gradient(g, node, grads):
        """The transpose of the per-axis interpolation (ResizeGrad), for every mode."""
        x = node.inputs[0]
        dx = g.op("ResizeGrad", [grads[0]], {**node.attrs, "shape": list(x.shape)})
        return [dx] + [None] * (len(node.inputs) - 1)


@register
class Upsample(Op):
    """Deprecated since opset 10: nearest or N-linear upsampling by ``scales`` >= 1 with
    asymmetric coordinates. Canonical ``sizes`` holds the output shape."""
    attrs = {"mode": "nearest", "scales": None, "sizes": None}
    lift_inputs = {1: "scales"}
    input_names = ("X", "scales")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        if not input_types or input_types[0] is None:
            raise ModelError("Upsample needs its input 'X'")
        x = input_types[0]
        mode = "linear" if attrs["mode"] == "bilinear" else attrs["mode"]
        if mode not in ("nearest", "linear"):
            raise ModelError(f"Upsample mode '{mode}' is not nearest or linear")
        scales = _float_list(attrs["scales"])
        if scales is None:
            raise ModelError("Upsample needs 'scales'")
        if any(s < 1 for s in scales):
            raise ShapeError(f"Upsample scales={scales} must all be >= 1 (use Resize to shrink)")
        scales, sizes = _output_sizes(x, list(range(x.rank)), scales, None, "stretch", "Upsample")
        attrs.update(mode=mode, scales=scales, sizes=sizes)
        return attrs

    @staticmethod
    def infer(x, mode="nearest", scales=None, sizes=None):
        return x.with_shape(tuple(sizes))

    @staticmethod
    def reference(x, mode="nearest", scales=None, sizes=None):
        return _resize(x, scales, sizes, None, mode, "asymmetric", "legacy")

    @staticmethod
    def flops(input_types, output_types, mode="nearest", scales=None, sizes=None):
        return _resize_flops(input_types, output_types, mode, scales, sizes)

    @staticmethod
    def gradient(g, node, grads):
        x = node.inputs[0]
        attrs = {**node.attrs, "coordinate_transformation_mode": "asymmetric",
                 "nearest_mode": "legacy", "shape": list(x.shape)}
        return [g.op("ResizeGrad", [grads[0]], attrs)] + [None] * (len(node.inputs) - 1)
