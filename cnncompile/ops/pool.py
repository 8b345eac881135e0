"""Pooling: MaxPool (with its Indices output), AveragePool, LpPool, their Global forms, MaxUnpool.

Canonical attributes, as for Conv: no ``auto_pad``; ``kernel_shape``, ``strides``, ``dilations`` and
``pads`` are explicit lists. ``ceil_mode`` is 0 after SAME padding, whose pads already give
ceil(size / stride) outputs. In ceil mode the last window must start inside the input or its left
padding (the onnxruntime / PyTorch rule). MaxUnpool's ``output_shape`` is always explicit.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..errors import ModelError, ShapeError
from ..ir.types import FLOAT_DTYPES, TensorType
from .base import Op, fill_defaults, register
from .conv import (int_list, out_size, out_spatial, pop_auto_pad, require_float,
                   resolve_pads, spatial_rank, static_spatial, windows, work_dtype)

MAXPOOL_DTYPES = FLOAT_DTYPES + (np.dtype(np.int8), np.dtype(np.uint8))


def _normalize_window(cls, attrs: dict, input_types) -> dict:
    """Shared by the windowed pools: resolve auto_pad and make every window attribute explicit."""
    attrs, auto_pad = pop_auto_pad(cls.name, attrs)
    attrs = fill_defaults(cls, attrs)
    x = input_types[0] if input_types else None
    rank = spatial_rank(cls.name, x)
    if attrs["kernel_shape"] is None:
        raise ModelError(f"{cls.name} needs the attribute kernel_shape")
    kernel = int_list(attrs["kernel_shape"], cls.name, "kernel_shape", rank, 1, 1)
    strides = int_list(attrs["strides"], cls.name, "strides", rank, 1, 1)
    dilations = int_list(attrs["dilations"], cls.name, "dilations", rank, 1, 1)
    pads = resolve_pads(cls.name, auto_pad, attrs["pads"], x, kernel, strides, dilations)
    ceil_mode = 0 if auto_pad.startswith("SAME") else int(bool(attrs["ceil_mode"]))
    attrs.update(kernel_shape=kernel, strides=strides, dilations=dilations, pads=pads,
                 ceil_mode=ceil_mode)
    return attrs


def _window_out(op: str, x: TensorType, kernel_shape, strides, dilations, pads,
                ceil_mode) -> tuple:
    rank = x.rank - 2
    dilations = dilations or [1] * rank
    out = out_spatial(op, x, kernel_shape, strides, dilations, pads, bool(ceil_mode))
    return (*x.shape[:2], *out)


def _geometry(x: np.ndarray, kernel_shape, strides, dilations, pads, ceil_mode):
    """Defaults filled, plus the output spatial shape, for a reference implementation."""
    rank = x.ndim - 2
    strides = strides or [1] * rank
    dilations = dilations or [1] * rank
    pads = pads or [0] * (2 * rank)
    out = [out_size(n, k, s, d, pads[i], pads[i + rank], bool(ceil_mode))
           for i, (n, k, s, d) in enumerate(zip(x.shape[2:], kernel_shape, strides, dilations))]
    return strides, dilations, pads, out


def _window_counts(sizes, kernel, strides, dilations, pads, out, include_pad) -> np.ndarray:
    """Per output position, how many window taps fall inside the input (or its pads)."""
    rank = len(sizes)
    per_axis = []
    for i, (n, k, s, d, o) in enumerate(zip(sizes, kernel, strides, dilations, out)):
        position = np.arange(o)[:, None] * s - pads[i] + np.arange(k)[None, :] * d
        low, high = (-pads[i], n + pads[i + rank]) if include_pad else (0, n)
        per_axis.append(((position >= low) & (position < high)).sum(axis=1))
    return functools.reduce(np.multiply.outer, per_axis)


WINDOW = ("ceil_mode", "dilations", "kernel_shape", "pads", "strides")


def _global_window(x) -> dict:
    """The window attributes under which a windowed pool computes the global one."""
    rank = x.type.rank - 2
    return {"ceil_mode": 0, "dilations": [1] * rank, "kernel_shape": list(x.shape[2:]),
            "pads": [0] * (2 * rank), "strides": [1] * rank}


def _window_flops(input_types, output_types, per_tap: int, **attrs) -> int:
    y = output_types[0]
    if not y.is_static:
        return 0
    return per_tap * y.size * math.prod(attrs.get("kernel_shape") or [1])


# ---- MaxPool -------------------------------------------------------------------------------------
@register
class MaxPool(Op):
    """Window maximum; the optional second output holds, for every maximum, its flat index into X
    (over N, C and the unpadded spatial axes; column-major spatial axes when storage_order=1)."""
    attrs = {"ceil_mode": 0, "dilations": None, "kernel_shape": None, "pads": None,
             "storage_order": 0, "strides": None}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = _normalize_window(cls, attrs, input_types)
        if attrs["storage_order"] not in (0, 1):
            raise ModelError(f"MaxPool: storage_order={attrs['storage_order']} must be 0 (row "
                             "major) or 1 (column major)")
        attrs["storage_order"] = int(attrs["storage_order"])
        return attrs

    @staticmethod
    def infer(x, ceil_mode=0, dilations=None, kernel_shape=None, pads=None, storage_order=0,
              strides=None):
        if x.dtype not in MAXPOOL_DTYPES:
            raise ShapeError(f"MaxPool: X must be float16/32/64, int8 or uint8, got {x}")
        shape = _window_out("MaxPool", x, kernel_shape, strides, dilations, pads, ceil_mode)
        return [TensorType(x.dtype, shape), TensorType(np.int64, shape)]

    @staticmethod
    def reference(x, ceil_mode=0, dilations=None, kernel_shape=None, pads=None, storage_order=0,
                  strides=None):
        rank = x.ndim - 2
        strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                                  ceil_mode)
        # pad with -inf so that padding never wins; float64 holds int8/uint8 exactly
        work = x if x.dtype in FLOAT_DTYPES else x.astype(np.float64)
        view = windows(work, kernel_shape, strides, dilations, pads, out, -np.inf)
        flat = view.reshape(*view.shape[:2 + rank], -1)
        best = flat.argmax(axis=-1)
        y = np.take_along_axis(flat, best[..., None], axis=-1)[..., 0].astype(x.dtype)

        sizes = x.shape[2:]
        taps = np.unravel_index(best, kernel_shape)
        spatial = np.zeros(best.shape, dtype=np.int64)
        scale = 1
        axes = range(rank) if storage_order else reversed(range(rank))
        for i in axes:
            grid = np.arange(out[i]).reshape([-1] + [1] * (rank - 1 - i))
            # an all-padding window has no true position; clipping keeps its index valid
            coord = np.clip(grid * strides[i] - pads[i] + taps[i] * dilations[i], 0, sizes[i] - 1)
            spatial += coord * scale
            scale *= sizes[i]
        planes = np.arange(x.shape[0] * x.shape[1], dtype=np.int64).reshape(x.shape[:2])
        indices = planes.reshape(*x.shape[:2], *[1] * rank) * scale + spatial
        return y, indices

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return _window_flops(input_types, output_types, 1, **attrs)

    @staticmethod
    def gradient(g, node, grads):
        """dY goes to each window's maximum; MaxPoolGrad finds it again in X (the first element
        equal to Y, the window's maximum, as the forward picks), so no Indices are kept."""
        window = {k: node.attrs[k] for k in WINDOW}
        return [g.op("MaxPoolGrad", [grads[0], node.inputs[0], node.outputs[0]], window)]


# ---- AveragePool ---------------------------------------------------------------------------------
@register
class AveragePool(Op):
    """Window mean. count_include_pad=1 counts the pads (not the extra room ceil_mode adds)."""
    attrs = {"ceil_mode": 0, "count_include_pad": 0, "dilations": None, "kernel_shape": None,
             "pads": None, "strides": None}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = _normalize_window(cls, attrs, input_types)
        attrs["count_include_pad"] = int(bool(attrs["count_include_pad"]))
        return attrs

    @staticmethod
    def infer(x, ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape=None, pads=None,
              strides=None):
        require_float("AveragePool", x)
        shape = _window_out("AveragePool", x, kernel_shape, strides, dilations, pads, ceil_mode)
        return TensorType(x.dtype, shape)

    @staticmethod
    def reference(x, ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape=None,
                  pads=None, strides=None):
        rank = x.ndim - 2
        strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                                  ceil_mode)
        work = work_dtype(x.dtype)
        view = windows(x.astype(work, copy=False), kernel_shape, strides, dilations, pads, out)
        total = view.sum(axis=tuple(range(-rank, 0)))
        counts = _window_counts(x.shape[2:], kernel_shape, strides, dilations, pads, out,
                                count_include_pad)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (total / counts.astype(work)).astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return _window_flops(input_types, output_types, 1, **attrs)

    @staticmethod
    def gradient(g, node, grads):
        """Each dY element, divided by its window's count, spreads over the window."""
        attrs = {k: node.attrs[k] for k in (*WINDOW, "count_include_pad")}
        return [g.op("AveragePoolGrad", [grads[0]],
                     {**attrs, "shape": list(node.inputs[0].shape)})]


# ---- LpPool --------------------------------------------------------------------------------------
def _lp_norm(values: np.ndarray, p, axis) -> np.ndarray:
    """(sum |v|^p)^(1/p) over axis; values are already absolute."""
    if p == 1:
        return values.sum(axis=axis)
    if p == 2:
        return np.sqrt((values * values).sum(axis=axis))
    return np.power(np.power(values, p).sum(axis=axis), 1.0 / p)


@register
class LpPool(Op):
    """Window Lp norm, (sum |x|^p)^(1/p); pads count as zeros."""
    attrs = {"ceil_mode": 0, "dilations": None, "kernel_shape": None, "p": 2, "pads": None,
             "strides": None}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = _normalize_window(cls, attrs, input_types)
        attrs["p"] = _lp_exponent(cls.name, attrs["p"])
        return attrs

    @staticmethod
    def infer(x, ceil_mode=0, dilations=None, kernel_shape=None, p=2, pads=None, strides=None):
        require_float("LpPool", x)
        return TensorType(x.dtype, _window_out("LpPool", x, kernel_shape, strides, dilations,
                                               pads, ceil_mode))

    @staticmethod
    def reference(x, ceil_mode=0, dilations=None, kernel_shape=None, p=2, pads=None,
                  strides=None):
        rank = x.ndim - 2
        strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                                  ceil_mode)
        magnitude = np.abs(x.astype(work_dtype(x.dtype), copy=False))
        view = windows(magnitude, kernel_shape, strides, dilations, pads, out)
        return _lp_norm(view, p, tuple(range(-rank, 0))).astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return _window_flops(input_types, output_types, 2, **attrs)

    @staticmethod
    def gradient(g, node, grads):
        """dX = sign(x) |x|^(p-1) / y^(p-1) * dY, summed over the windows x is in."""
        attrs = {k: node.attrs[k] for k in (*WINDOW, "p")}
        return [g.op("LpPoolGrad", [grads[0], node.inputs[0]], attrs)]


def _lp_exponent(op: str, p) -> int:
    if p is None or int(p) != p or p < 1:
        raise ModelError(f"{op}: p={p!r} must be a positive integer")
    return int(p)


# ---- global pools --------------------------------------------------------------------------------
def _global_infer(op: str, x: TensorType) -> TensorType:
    spatial_rank(op, x)
    require_float(op, x)
    return TensorType(x.dtype, (*x.shape[:2], *[1] * (x.rank - 2)))


def _global_flops(input_types, output_types, per_element: int = 1) -> int:
    x = input_types[0]
    return per_element * x.size if x.is_static else 0


@register
class GlobalAveragePool(Op):
    """Mean over all spatial axes: N x C x 1 x ... x 1."""
    input_names = ("X",)

    @staticmethod
    def infer(x):
        return _global_infer("GlobalAveragePool", x)

    @staticmethod
    def reference(x):
        axes = tuple(range(2, x.ndim))
        return x.astype(work_dtype(x.dtype), copy=False).mean(axis=axes, keepdims=True) \
            .astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return _global_flops(input_types, output_types)

    @staticmethod
    def gradient(g, node, grads):
        x = node.inputs[0]
        return [g.op("AveragePoolGrad", [grads[0]],
                     {**_global_window(x), "count_include_pad": 0, "shape": list(x.shape)})]


@register
class GlobalMaxPool(Op):
    """Maximum over all spatial axes: N x C x 1 x ... x 1."""
    input_names = ("X",)

    @staticmethod
    def infer(x):
        return _global_infer("GlobalMaxPool", x)

    @staticmethod
    def reference(x):
        return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return _global_flops(input_types, output_types)

    @staticmethod
    def gradient(g, node, grads):
        x = node.inputs[0]
        return [g.op("MaxPoolGrad", [grads[0], x, node.outputs[0]], _global_window(x))]


@register
class GlobalLpPool(Op):
    """Lp norm over all spatial axes: N x C x 1 x ... x 1."""
    attrs = {"p": 2}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        attrs["p"] = _lp_exponent(cls.name, attrs["p"])
        return attrs

    @staticmethod
    def infer(x, p=2):
        return _global_infer("GlobalLpPool", x)

    @staticmethod
    def reference(x, p=2):
        magnitude = np.abs(x.astype(work_dtype(x.dtype), copy=False))
        axes = tuple(range(2, x.ndim))
        norm = _lp_norm(magnitude, p, axes)
        return norm.reshape(*x.shape[:2], *[1] * len(axes)).astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return _global_flops(input_types, output_types, 2)

    @staticmethod
    def gradient(g, node, grads):
        x = node.inputs[0]
        return [g.op("LpPoolGrad", [grads[0], x], {**_global_window(x), "p": node.attrs["p"]})]


# ---- MaxUnpool -----------------------------------------------------------------------------------
@register
class MaxUnpool(Op):
    """Scatter X into zeros at the flat indices I (MaxPool's second output).

    ``output_shape`` (the optional third input, lifted to an attribute) is the full N x C x D...
    shape; normalize fills it from the pooling geometry when absent.
    """
    attrs = {"kernel_shape": None, "output_shape": None, "pads": None, "strides": None}
    lift_inputs = {2: "output_shape"}
    input_names = ("X", "I", "output_shape")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = input_types[0] if input_types else None
        rank = spatial_rank(cls.name, x)
        if attrs["kernel_shape"] is None:
            raise ModelError("MaxUnpool needs the attribute kernel_shape")
        kernel = int_list(attrs["kernel_shape"], cls.name, "kernel_shape", rank, 1, 1)
        strides = int_list(attrs["strides"], cls.name, "strides", rank, 1, 1)
        pads = int_list(attrs["pads"], cls.name, "pads", 2 * rank, 0, 0)
        shape = attrs["output_shape"]
        if shape is None:
            sizes = static_spatial(cls.name, x, "the default output shape")
            spatial = [(n - 1) * s + k - pads[i] - pads[i + rank]
                       for i, (n, k, s) in enumerate(zip(sizes, kernel, strides))]
            shape = [*x.shape[:2], *spatial]
        else:
            shape = np.asarray(shape).reshape(-1).tolist()
            if len(shape) != rank + 2:
                raise ShapeError(f"MaxUnpool: output_shape={shape} must be the full shape of "
                                 f"rank {rank + 2} (X has shape {list(x.shape)})")
        return {"kernel_shape": kernel, "output_shape": [d if isinstance(d, str) else int(d)
                                                         for d in shape],
                "pads": pads, "strides": strides}

    @staticmethod
    def infer(x, i=None, kernel_shape=None, output_shape=None, pads=None, strides=None):
        require_float("MaxUnpool", x)
        if i is None or i.dtype != np.int64:
            raise ShapeError(f"MaxUnpool: I must be an int64 tensor of indices, got {i}")
        if i.shape != x.shape:
            raise ShapeError(f"MaxUnpool: I has shape {list(i.shape)} but X has shape "
                             f"{list(x.shape)}; they must be equal")
        if list(output_shape[:2]) != list(x.shape[:2]) or min(output_shape[2:]) < 1:
            raise ShapeError(f"MaxUnpool: output_shape={list(output_shape)} must keep X's batch "
                             f"and channel sizes (X has shape {list(x.shape)}) and have positive "
                             "spatial sizes")
        return TensorType(x.dtype, tuple(output_shape))

    @staticmethod
    def reference(x, i, kernel_shape=None, output_shape=None, pads=None, strides=None):
        y = np.zeros(math.prod(output_shape), dtype=x.dtype)
        flat = i.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= y.size):
            bad = flat[(flat < 0) | (flat >= y.size)][0]
            raise ShapeError(f"MaxUnpool: index {bad} in I (shape {list(i.shape)}) is out of "
                             f"range for the output shape {list(output_shape)} ({y.size} "
                             "elements)")
        y[flat] = x.reshape(-1)
        return y.reshape(output_shape)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 0

    @staticmethod
    def gradient(g, node, grads):
        """Each X element was written to one position: dX gathers dY there."""
        flat = g.reshape(grads[0], [node.outputs[0].type.size])
        return [g.op("Gather", [flat, node.inputs[1]], {"axis": 0}), None]
