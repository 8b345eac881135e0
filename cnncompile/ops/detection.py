"""Detection heads: RoiAlign, MaxRoiPool, NonMaxSuppression.

Box geometry (bin sizes, sample positions, IoU) is computed in the input's precision (float32 for
float32 inputs) in onnxruntime's order of operations, so that sampling grids and threshold
comparisons come out the same; the interpolation itself accumulates in float64.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ModelError, ShapeError
from ..ir.types import FLOAT_DTYPES, TensorType
from .base import Op, fill_defaults, register, require_rank

ROI_ALIGN_COORDINATE_MODES = ("half_pixel", "output_half_pixel")


def _geometry_dtype(dtype) -> type:
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _required(op: str, input_types, names) -> None:
    if len(input_types) < len(names) or any(t is None for t in input_types[:len(names)]):
        raise ModelError(f"{op} needs the inputs {', '.join(names)}")


def _dims_match(a, b) -> bool:
    return isinstance(a, str) or isinstance(b, str) or a == b


# ---- RoiAlign ----------------------------------------------------------------------------------
def _bilinear_axis(pos: np.ndarray, size: int, t):
    """Per sample coordinate: low/high neighbour, their weights and whether the sample counts."""
    valid = (pos >= -1.0) & (pos <= size)
    pos = np.maximum(pos, t(0))
    low = pos.astype(np.int64)
    edge = low >= size - 1
    low = np.where(edge, size - 1, low)
    high = np.where(edge, size - 1, low + 1)
    frac = np.where(edge, t(0), pos - low.astype(t))
    return low, high, t(1) - frac, frac, valid


def _sample_positions(start, bin_size, bins: int, grid: int, t) -> np.ndarray:
    """[bins, grid] sample coordinates: grid points spread evenly inside every bin."""
    b = np.arange(bins, dtype=t)[:, None]
    g = (np.arange(grid, dtype=t) + t(0.5))[None, :]
    return start + b * bin_size + g * bin_size / t(grid)


def _roi_align_one(image, box, oh, ow, sampling_ratio, spatial_scale, half_pixel, mode, t):
    h, w = image.shape[1:]
    offset = t(0.5) if half_pixel else t(0)
    x1, y1, x2, y2 = (t(v) * t(spatial_scale) - offset for v in box)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not half_pixel:
        # Malformed boxes become 1 x 1 in the legacy mode.
        roi_w, roi_h = max(roi_w, t(1)), max(roi_h, t(1))
    bin_h, bin_w = roi_h / t(oh), roi_w / t(ow)
    grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(bin_h))
    grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(bin_w))
    if grid_h * grid_w == 0:
        return np.zeros((image.shape[0], oh, ow))
    ylo, yhi, hy, ly, vy = _bilinear_axis(_sample_positions(y1, bin_h, oh, grid_h, t), h, t)
    xlo, xhi, hx, lx, vx = _bilinear_axis(_sample_positions(x1, bin_w, ow, grid_w, t), w, t)
    if mode == "avg":
        # The weights factor into rows and columns: out = Wy @ image @ Wx^T, averaged.
        wy = np.zeros((oh, h))
        wx = np.zeros((ow, w))
        rows = np.broadcast_to(np.arange(oh)[:, None], ylo.shape)
        cols = np.broadcast_to(np.arange(ow)[:, None], xlo.shape)
        np.add.at(wy, (rows, ylo), np.where(vy, hy, 0))
        np.add.at(wy, (rows, yhi), np.where(vy, ly, 0))
        np.add.at(wx, (cols, xlo), np.where(vx, hx, 0))
        np.add.at(wx, (cols, xhi), np.where(vx, lx, 0))
        # Only the rows and columns under the box carry weight.
        h0, h1 = int(ylo.min()), int(yhi.max()) + 1
        w0, w1 = int(xlo.min()), int(xhi.max()) + 1
        window = image[:, h0:h1, w0:w1]
        out = np.einsum("ph,chw,qw->cpq", wy[:, h0:h1], window, wx[:, w0:w1], optimize=True)
        return out / (grid_h * grid_w)
    # max: ONNX takes, per sample, the largest of the four weighted corners, then the largest
    # over the samples of a bin. Samples outside the map count as 0.
    valid = vy[:, :, None, None] & vx[None, None, :, :]
    best = None
    for yi, wyv in ((ylo, hy), (yhi, ly)):
        rows = image[:, yi]                                # [c, oh, gh, w]
        for xi, wxv in ((xlo, hx), (xhi, lx)):
            weight = np.where(valid, wyv[:, :, None, None] * wxv[None, None, :, :], 0)
            corner = weight * rows[:, :, :, xi]            # [c, oh, gh, ow, gw]
            best = corner if best is None else np.maximum(best, corner)
    return best.max(axis=(2, 4))


@register
class RoiAlign(Op):
    """Bilinear-sampled average (or ONNX's max) pooling of boxes ``rois`` [R, 4] (x1, y1, x2, y2)
    from images ``batch_indices`` of X [N, C, H, W]."""
    attrs = {"mode": "avg", "output_height": 1, "output_width": 1, "sampling_ratio": 0,
             "spatial_scale": 1.0, "coordinate_transformation_mode": "half_pixel"}
    input_names = ("X", "rois", "batch_indices")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        _required("RoiAlign", input_types, cls.input_names)
        if opset < 16:
            # RoiAlign-10 had no such attribute and did not shift by half a pixel.
            attrs["coordinate_transformation_mode"] = "output_half_pixel"
        if attrs["coordinate_transformation_mode"] not in ROI_ALIGN_COORDINATE_MODES:
            raise ModelError(f"RoiAlign coordinate_transformation_mode "
                             f"'{attrs['coordinate_transformation_mode']}' is not one of "
                             f"{', '.join(ROI_ALIGN_COORDINATE_MODES)}")
        if attrs["mode"] not in ("avg", "max"):
            raise ModelError(f"RoiAlign mode '{attrs['mode']}' is not avg or max")
        for key in ("output_height", "output_width"):
            attrs[key] = int(attrs[key])
            if attrs[key] < 1:
                raise ModelError(f"RoiAlign {key}={attrs[key]} must be positive")
        attrs["sampling_ratio"] = max(int(attrs["sampling_ratio"]), 0)
        attrs["spatial_scale"] = float(attrs["spatial_scale"])
        return attrs

    @staticmethod
    def infer(x, rois, batch_indices, mode="avg", output_height=1, output_width=1,
              sampling_ratio=0, spatial_scale=1.0, coordinate_transformation_mode="half_pixel"):
        require_rank(x, (4,), "RoiAlign X")
        if x.dtype not in FLOAT_DTYPES or rois.dtype != x.dtype:
            raise ShapeError(f"RoiAlign needs floating X and rois of the same dtype, got X {x}, "
                             f"rois {rois}")
        if rois.rank != 2 or not _dims_match(rois.shape[1], 4):
            raise ShapeError(f"RoiAlign rois must be [num_rois, 4], got {rois}")
        if (batch_indices.rank != 1 or batch_indices.dtype != np.int64
                or not _dims_match(batch_indices.shape[0], rois.shape[0])):
            raise ShapeError(f"RoiAlign batch_indices must be int64 [num_rois] matching rois "
                             f"{rois}, got {batch_indices}")
        return x.with_shape((rois.shape[0], x.shape[1], output_height, output_width))

    @staticmethod
    def reference(x, rois, batch_indices, mode="avg", output_height=1, output_width=1,
                  sampling_ratio=0, spatial_scale=1.0, coordinate_transformation_mode="half_pixel"):
        t = _geometry_dtype(x.dtype)
        if batch_indices.size and (batch_indices.min() < 0 or batch_indices.max() >= x.shape[0]):
            raise ModelError(f"RoiAlign batch_indices {batch_indices.tolist()} fall outside the "
                             f"batch of X {list(x.shape)}")
        out = np.zeros((rois.shape[0], x.shape[1], output_height, output_width), x.dtype)
        half_pixel = coordinate_transformation_mode == "half_pixel"
        for r in range(rois.shape[0]):
            out[r] = _roi_align_one(x[batch_indices[r]], rois[r], output_height, output_width,
                                    sampling_ratio, spatial_scale, half_pixel, mode, t)
        return out

    @staticmethod
    def flops(input_types, output_types, sampling_ratio=0, **attrs):
        """Four multiply-adds per sample; adaptive grids (sampling_ratio=0) counted as 2 x 2."""
        out = output_types[0]
        if not out.is_static:
            return 0
        samples = sampling_ratio * sampling_ratio if sampling_ratio > 0 else 4
        return out.size * samples * 8


# ---- MaxRoiPool --------------------------------------------------------------------------------
def _round_away(x):
    return math.copysign(math.floor(abs(x) + 0.5), x)


@register
class MaxRoiPool(Op):
    """Max pooling of boxes ``rois`` [R, 5] (batch index, x1, y1, x2, y2) into ``pooled_shape``
    bins; box corners are rounded to whole pixels, empty bins give 0."""
    attrs = {"pooled_shape": None, "spatial_scale": 1.0}
    input_names = ("X", "rois")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        _required("MaxRoiPool", input_types, cls.input_names)
        shape = attrs["pooled_shape"]
        if shape is None or len(shape) != 2 or any(int(d) < 1 for d in shape):
            raise ModelError(f"MaxRoiPool needs 'pooled_shape' = [height, width] of positive "
                             f"sizes, got {shape}")
        attrs.update(pooled_shape=[int(d) for d in shape],
                     spatial_scale=float(attrs["spatial_scale"]))
        return attrs

    @staticmethod
    def infer(x, rois, pooled_shape=(1, 1), spatial_scale=1.0):
        require_rank(x, (4,), "MaxRoiPool X")
        if x.dtype not in FLOAT_DTYPES or rois.dtype != x.dtype:
            raise ShapeError(f"MaxRoiPool needs floating X and rois of the same dtype, got X "
                             f"{x}, rois {rois}")
        if rois.rank != 2 or not _dims_match(rois.shape[1], 5):
            raise ShapeError(f"MaxRoiPool rois must be [num_rois, 5] (batch index, x1, y1, x2, "
                             f"y2), got {rois}")
        return x.with_shape((rois.shape[0], x.shape[1], *pooled_shape))

    @staticmethod
    def reference(x, rois, pooled_shape=(1, 1), spatial_scale=1.0):
        t = _geometry_dtype(x.dtype)
        n, c, h, w = x.shape
        ph, pw = pooled_shape
        out = np.zeros((rois.shape[0], c, ph, pw), x.dtype)
        for r, roi in enumerate(rois):
            batch = int(roi[0])
            if not 0 <= batch < n:
                raise ModelError(f"MaxRoiPool roi {r} names batch index {roi[0]}, outside the "
                                 f"batch of X {list(x.shape)}")
            x1, y1, x2, y2 = (int(_round_away(float(t(v) * t(spatial_scale)))) for v in roi[1:])
            bin_h = t(max(y2 - y1 + 1, 1)) / t(ph)
            bin_w = t(max(x2 - x1 + 1, 1)) / t(pw)
            for i in range(ph):
                h0 = min(max(int(math.floor(t(i) * bin_h)) + y1, 0), h)
                h1 = min(max(int(math.ceil(t(i + 1) * bin_h)) + y1, 0), h)
                for j in range(pw):
                    w0 = min(max(int(math.floor(t(j) * bin_w)) + x1, 0), w)
                    w1 = min(max(int(math.ceil(t(j + 1) * bin_w)) + x1, 0), w)
                    if h1 > h0 and w1 > w0:
                        out[r, :, i, j] = x[batch, :, h0:h1, w0:w1].max(axis=(1, 2))
        return out


# ---- NonMaxSuppression -------------------------------------------------------------------------
def _corners(boxes: np.ndarray, center_point_box: int):
    """(x_min, y_min, x_max, y_max) columns of boxes [N, 4]."""
    if center_point_box:
        xc, yc, bw, bh = boxes.T
        return xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2
    y1, x1, y2, x2 = boxes.T
    return np.minimum(x1, x2), np.minimum(y1, y2), np.maximum(x1, x2), np.maximum(y1, y2)


def _suppressed(corners, chosen: list[int], candidate: int, iou_threshold) -> bool:
    if not chosen:
        return False
    x0, y0, x1, y1 = corners
    ix = np.minimum(x1[chosen], x1[candidate]) - np.maximum(x0[chosen], x0[candidate])
    iy = np.minimum(y1[chosen], y1[candidate]) - np.maximum(y0[chosen], y0[candidate])
    area_a = (x1[chosen] - x0[chosen]) * (y1[chosen] - y0[chosen])
    area_b = (x1[candidate] - x0[candidate]) * (y1[candidate] - y0[candidate])
    inter = ix * iy
    union = area_a + area_b - inter
    overlap = (ix > 0) & (iy > 0) & (inter > 0) & (area_a > 0) & (area_b > 0) & (union > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return bool(np.any(overlap & (iou > iou_threshold)))


@register
class NonMaxSuppression(Op):
    """Greedy per-class NMS. Output rows [batch, class, box], in batch, class, then descending
    score order; their number is known only at run time."""
    attrs = {"center_point_box": 0, "max_output_boxes_per_class": 0, "iou_threshold": 0.0,
             "score_threshold": None}
    lift_inputs = {2: "max_output_boxes_per_class", 3: "iou_threshold", 4: "score_threshold"}
    input_names = ("boxes", "scores", "max_output_boxes_per_class", "iou_threshold",
                   "score_threshold")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        _required("NonMaxSuppression", input_types, cls.input_names[:2])
        if attrs["center_point_box"] not in (0, 1):
            raise ModelError(f"NonMaxSuppression center_point_box must be 0 or 1, got "
                             f"{attrs['center_point_box']}")
        for key in ("max_output_boxes_per_class", "iou_threshold", "score_threshold"):
            value = attrs[key]
            if isinstance(value, (list, np.ndarray)):
                flat = np.asarray(value).reshape(-1)
                if flat.size > 1:
                    raise ModelError(f"NonMaxSuppression {key} must be a scalar, got "
                                     f"{flat.size} values")
                attrs[key] = flat[0].item() if flat.size else cls.attrs[key]
        attrs["max_output_boxes_per_class"] = max(int(attrs["max_output_boxes_per_class"]), 0)
        attrs["iou_threshold"] = float(attrs["iou_threshold"])
        if not 0.0 <= attrs["iou_threshold"] <= 1.0:
            raise ModelError(f"NonMaxSuppression iou_threshold={attrs['iou_threshold']} is not "
                             "in [0, 1]")
        if attrs["score_threshold"] is not None:
            attrs["score_threshold"] = float(attrs["score_threshold"])
        return attrs

    @staticmethod
    def infer(boxes, scores, center_point_box=0, max_output_boxes_per_class=0,
              iou_threshold=0.0, score_threshold=None):
        if boxes.rank != 3 or scores.rank != 3 or not _dims_match(boxes.shape[2], 4):
            raise ShapeError(f"NonMaxSuppression needs boxes [batch, boxes, 4] and scores "
                             f"[batch, classes, boxes], got boxes {boxes}, scores {scores}")
        if not (_dims_match(boxes.shape[0], scores.shape[0])
                and _dims_match(boxes.shape[1], scores.shape[2])):
            raise ShapeError(f"NonMaxSuppression boxes {boxes} and scores {scores} disagree on "
                             "the batch or box count")
        if boxes.dtype not in FLOAT_DTYPES or scores.dtype != boxes.dtype:
            raise ShapeError(f"NonMaxSuppression needs floating boxes and scores of one dtype, "
                             f"got {boxes}, {scores}")
        return TensorType(np.int64, ("?", 3))

    @staticmethod
    def reference(boxes, scores, center_point_box=0, max_output_boxes_per_class=0,
                  iou_threshold=0.0, score_threshold=None):
        t = _geometry_dtype(boxes.dtype)
        threshold = t(iou_threshold)
        rows = []
        if max_output_boxes_per_class > 0:
            for b in range(boxes.shape[0]):
                corners = _corners(boxes[b].astype(t), center_point_box)
                for c in range(scores.shape[1]):
                    class_scores = scores[b, c]
                    order = np.argsort(-class_scores.astype(np.float64), kind="stable")
                    if score_threshold is not None:
                        order = order[class_scores[order] > t(score_threshold)]
                    chosen: list[int] = []
                    for i in order:
                        if len(chosen) >= max_output_boxes_per_class:
                            break
                        if not _suppressed(corners, chosen, int(i), threshold):
                            chosen.append(int(i))
                    rows.extend((b, c, i) for i in chosen)
        return np.array(rows, dtype=np.int64).reshape(-1, 3)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        """An upper bound: about 12 operations per box pair of every class."""
        boxes, scores = input_types[:2]
        if not (boxes.is_static and scores.is_static):
            return 0
        batch, classes, count = scores.shape
        return batch * classes * count * (count - 1) // 2 * 12
