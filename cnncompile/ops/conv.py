"""Convolution: Conv and ConvTranspose, 1D/2D/3D, with groups, dilations and every padding mode.

Also the window arithmetic that the pooling family (pool.py) shares: auto_pad resolution, output
sizes under ceil_mode, and the strided window view that the references reduce over.

Canonical attributes: ``auto_pad`` is gone (normalize resolves it into ``pads``), and ``pads``,
``strides``, ``dilations`` and ``kernel_shape`` are always explicit lists of ints, one entry per
spatial axis (``pads``: all begins, then all ends).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ModelError, ShapeError
from ..ir.types import FLOAT_DTYPES, TensorType
from .base import Op, fill_defaults, register

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
#: grouped convs with at most this many input channels per group take the tap-loop path
GROUPED_TAP_LOOP_MAX = 32


# ---- attribute helpers shared with pool.py -------------------------------------------------------
def int_list(value, op: str, name: str, length: int, default: int, minimum: int) -> list[int]:
    """An attribute as a list of ``length`` ints >= minimum; None gives the default everywhere."""
    if value is None:
        return [default] * length
    values = np.asarray(value).reshape(-1).tolist()
    if len(values) != length:
        raise ModelError(f"{op}: '{name}' = {values} needs {length} values for "
                         f"{length // (2 if name == 'pads' else 1)} spatial axes")
    if any(int(v) != v for v in values):
        raise ModelError(f"{op}: '{name}' = {values} must hold integers")
    values = [int(v) for v in values]
    if any(v < minimum for v in values):
        raise ModelError(f"{op}: '{name}' = {values} must be >= {minimum}")
    return values


def pop_auto_pad(op: str, attrs: dict) -> tuple[dict, str]:
    attrs = dict(attrs)
    auto_pad = attrs.pop("auto_pad", "NOTSET") or "NOTSET"  # some exporters write ""
    if auto_pad not in AUTO_PADS:
        raise ModelError(f"{op}: auto_pad='{auto_pad}' is not one of {', '.join(AUTO_PADS)}")
    return attrs, auto_pad


def spatial_rank(op: str, x: TensorType | None, what: str = "X") -> int:
    if x is None:
        raise ModelError(f"{op} needs the input {what}")
    if x.rank < 3:
        raise ShapeError(f"{op}: {what} has shape {list(x.shape)} (rank {x.rank}); expected "
                         "N x C x D1 x ... (rank >= 3)")
    return x.rank - 2


def static_spatial(op: str, x: TensorType, why: str) -> list[int]:
    dims = list(x.shape[2:])
    if not all(isinstance(d, int) for d in dims):
        raise ShapeError(f"{op}: {why} needs static spatial dimensions, but X has shape "
                         f"{list(x.shape)}")
    return dims


def extent(kernel: int, dilation: int) -> int:
    """Span of a dilated kernel."""
    return (kernel - 1) * dilation + 1


def same_pads(auto_pad: str, sizes, kernel, strides, dilations) -> list[int]:
    """Explicit pads for SAME_UPPER / SAME_LOWER: output = ceil(size / stride) on every axis.

    The padding is clipped at zero (as in the spec's reference and TensorFlow) when a stride longer
    than the kernel would need a negative one.
    """
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + extent(k, d) - size)
        begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def resolve_pads(op: str, auto_pad: str, pads, x: TensorType, kernel, strides,
                 dilations) -> list[int]:
    rank = len(kernel)
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        sizes = static_spatial(op, x, f"auto_pad={auto_pad}")
        return same_pads(auto_pad, sizes, kernel, strides, dilations)
    return int_list(pads, op, "pads", 2 * rank, 0, 0)


def out_size(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int,
             ceil_mode: bool = False) -> int:
    """Output length of a sliding window; in ceil mode the last window must start inside the input
    or its left padding (the onnxruntime / PyTorch rule)."""
    span = size + begin + end - extent(kernel, dilation)
    if span < 0:
        return 0
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + begin:
        out -= 1
    return out


def out_spatial(op: str, x: TensorType, kernel, strides, dilations, pads,
                ceil_mode: bool = False) -> list[int]:
    rank = len(kernel)
    sizes = static_spatial(op, x, "the shape rule")
    out = [out_size(n, k, s, d, pads[i], pads[i + rank], ceil_mode)
           for i, (n, k, s, d) in enumerate(zip(sizes, kernel, strides, dilations))]
    if min(out, default=1) <= 0:
        raise ShapeError(f"{op}: the input spatial shape {sizes} is too small for kernel_shape="
                         f"{list(kernel)} with dilations={list(dilations)}, pads={list(pads)}, "
                         f"strides={list(strides)}: the output would have shape {out}")
    return out


def windows(x: np.ndarray, kernel, strides, dilations, pads, out, value=0) -> np.ndarray:
    """A view of shape (N, C, *out, *kernel): the (padded) input under every window tap."""
    rank = len(kernel)
    widths = [(0, 0), (0, 0)]
    for i, (n, k, s, d) in enumerate(zip(x.shape[2:], kernel, strides, dilations)):
        # ceil mode may need more room than pads give; a large end pad may need less
        needed = (out[i] - 1) * s + extent(k, d) - n - pads[i]
        widths.append((pads[i], max(needed, 0)))
    if any(w != (0, 0) for w in widths):
        x = np.pad(x, widths, constant_values=value)
    spans = [extent(k, d) for k, d in zip(kernel, dilations)]
    view = sliding_window_view(x, spans, axis=tuple(range(2, 2 + rank)))
    index = (slice(None), slice(None))
    index += tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(out, strides))
    index += tuple(slice(None, None, d) for d in dilations)
    return view[index]


def work_dtype(dtype: np.dtype) -> np.dtype:
    """float16 is computed in float32 and rounded once at the end."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def require_float(op: str, t: TensorType, what: str = "X") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{op}: {what} must be a floating-point tensor, got {t}")


def _kernel_from_w(op: str, attrs: dict, w: TensorType | None, rank: int) -> list[int]:
    if w is None:
        raise ModelError(f"{op} needs the weight input W")
    if w.rank != rank + 2:
        raise ShapeError(f"{op}: W has shape {list(w.shape)} (rank {w.rank}); for {rank} spatial "
                         f"axes it needs rank {rank + 2}")
    from_w = list(w.shape[2:])
    kernel = attrs.get("kernel_shape")
    if kernel is None:
        return from_w
    kernel = int_list(kernel, op, "kernel_shape", rank, 1, 1)
    if kernel != from_w:
        raise ShapeError(f"{op}: kernel_shape={kernel} does not match W's shape "
                         f"{list(w.shape)}")
    return kernel


def _check_bias(op: str, b: TensorType | None, x: TensorType, channels: int) -> None:
    if b is None:
        return
    if b.dtype != x.dtype:
        raise ShapeError(f"{op}: B {b} must have X's dtype ({x})")
    if b.shape != (channels,):
        raise ShapeError(f"{op}: B has shape {list(b.shape)}; expected [{channels}] (one value "
                         "per output channel)")


GEOMETRY = ("dilations", "group", "kernel_shape", "pads", "strides")


def _bias_gradient(g, dy):
    """dB of a convolution: dY summed over the batch and the spatial axes."""
    channels = dy.shape[1]
    summed = g.op("SumTo", [dy], {"shape": [channels] + [1] * (len(dy.shape) - 2)})
    return g.reshape(summed, [channels])


def _check_weight(op: str, x: TensorType, w: TensorType) -> None:
    require_float(op, x)
    if w.dtype != x.dtype:
        raise ShapeError(f"{op}: W {w} must have X's dtype ({x})")
    if w.rank != x.rank:
        raise ShapeError(f"{op}: X has shape {list(x.shape)} but W has shape {list(w.shape)}; "
                         "their ranks must be equal")
    if not isinstance(x.shape[1], int):
        raise ShapeError(f"{op}: X's channel axis must be static, X has shape {list(x.shape)}")


# ---- Conv ----------------------------------------------------------------------------------------
@register
class Conv(Op):
    """Y = X (*) W + B; X: N x C x D..., W: M x C/group x k..., B: M."""
    attrs = {"dilations": None, "group": 1, "kernel_shape": None, "pads": None, "strides": None}
    input_names = ("X", "W", "B")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs, auto_pad = pop_auto_pad(cls.name, attrs)
        attrs = fill_defaults(cls, attrs)
        x = input_types[0] if input_types else None
        rank = spatial_rank(cls.name, x)
        w = input_types[1] if len(input_types) > 1 else None
        kernel = _kernel_from_w(cls.name, attrs, w, rank)
        strides = int_list(attrs["strides"], cls.name, "strides", rank, 1, 1)
        dilations = int_list(attrs["dilations"], cls.name, "dilations", rank, 1, 1)
        pads = resolve_pads(cls.name, auto_pad, attrs["pads"], x, kernel, strides, dilations)
        group = int(attrs["group"])
        if group < 1:
            raise ModelError(f"{cls.name}: group={group} must be >= 1")
        return {"dilations": dilations, "group": group, "kernel_shape": kernel, "pads": pads,
                "strides": strides}

    @staticmethod
    def infer(x, w, b=None, dilations=None, group=1, kernel_shape=None, pads=None,
              strides=None):
        _check_weight("Conv", x, w)
        channels, out_channels = x.shape[1], w.shape[0]
        if channels % group:
            raise ShapeError(f"Conv: X has shape {list(x.shape)} with {channels} channels, which "
                             f"group={group} does not divide")
        if channels != w.shape[1] * group:
            raise ShapeError(f"Conv: X has shape {list(x.shape)} ({channels} channels) but W has "
                             f"shape {list(w.shape)}: with group={group}, W's axis 1 must be "
                             f"{channels // group} (channels / group)")
        if out_channels % group:
            raise ShapeError(f"Conv: W has shape {list(w.shape)}; its {out_channels} output "
                             f"channels are not divisible by group={group}")
        _check_bias("Conv", b, x, out_channels)
        out = out_spatial("Conv", x, kernel_shape, strides, dilations, pads)
        return TensorType(x.dtype, (x.shape[0], out_channels, *out))

    @staticmethod
    def reference(x, w, b=None, dilations=None, group=1, kernel_shape=None, pads=None,
                  strides=None):
        rank = x.ndim - 2
        kernel = list(w.shape[2:])
        dilations = dilations or [1] * rank
        strides = strides or [1] * rank
        pads = pads or [0] * (2 * rank)
        work = work_dtype(x.dtype)
        n, channels = x.shape[:2]
        out_channels = w.shape[0]
        out = [out_size(size, k, s, d, pads[i], pads[i + rank])
               for i, (size, k, s, d) in enumerate(zip(x.shape[2:], kernel, strides, dilations))]
        taps = math.prod(kernel)
        positions = math.prod(out)
        view = windows(x.astype(work, copy=False), kernel, strides, dilations, pads, out)
        per_group, out_per_group = channels // group, out_channels // group
        view = view.reshape(n, group, per_group, *out, *kernel)
        weights = w.astype(work, copy=False).reshape(group, out_per_group, per_group, *kernel)
        if group > 1 and per_group <= GROUPED_TAP_LOOP_MAX:
            # Depthwise and narrow grouped convs: im2col would copy every window for many tiny
            # matmuls; accumulating one kernel tap at a time is several times faster.
            y = np.zeros((n, group, out_per_group, *out), dtype=work)
            for tap in np.ndindex(*kernel):
                at = (Ellipsis, *tap)
                y += np.einsum("ngc...,gmc->ngm...", view[at], weights[at])
        else:
            # im2col: (group, N*positions, C/group*taps), one batched matmul for all groups
            order = (1, 0, *range(3, 3 + rank), 2, *range(3 + rank, 3 + 2 * rank))
            cols = view.transpose(order).reshape(group, n * positions, per_group * taps)
            y = np.matmul(cols, weights.reshape(group, out_per_group, -1).transpose(0, 2, 1))
            y = y.reshape(group, n, *out, out_per_group)
            y = y.transpose(1, 0, 2 + rank, *range(2, 2 + rank))
        y = y.reshape(n, out_channels, *out)
        if b is not None:
            y = y + b.astype(work, copy=False).reshape(-1, *[1] * rank)
        return y.astype(x.dtype, copy=False)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        x, w = input_types[0], input_types[1]
        y = output_types[0]
        if not y.is_static:
            return 0
        group = attrs.get("group", 1)
        return 2 * y.size * (x.shape[1] // group) * math.prod(w.shape[2:])

    @staticmethod
    def gradient(g, node, grads):
        """dX: the transposed convolution of dY with the same W and geometry, output_padding
        restoring the input positions past the last window; dW: the correlation of X with dY
        (ConvGradWeight); dB: dY summed."""
        x, w = node.inputs[:2]
        dy = grads[0]
        geometry = {k: node.attrs[k] for k in GEOMETRY}
        dx = dw = db = None
        if g.needs(node, 0):
            rank, pads = x.type.rank - 2, geometry["pads"]
            reach = [(o - 1) * s + extent(k, d) - pads[i] - pads[i + rank] for i, (o, s, k, d)
                     in enumerate(zip(dy.shape[2:], geometry["strides"],
                                      geometry["kernel_shape"], geometry["dilations"]))]
            padding = [n - r for n, r in zip(x.shape[2:], reach)]
            dx = g.op("ConvTranspose", [dy, w], {**geometry, "output_padding": padding})
        if g.needs(node, 1):
            dw = g.op("ConvGradWeight", [x, dy], geometry)
        if g.needs(node, 2):
            db = _bias_gradient(g, dy)
        return [dx, dw, db][:len(node.inputs)]


# ---- ConvTranspose -------------------------------------------------------------------------------
@register
class ConvTranspose(Op):
    """The gradient of Conv with respect to its input; W: C x M/group x k..., B: M.

    Canonical form: ``output_shape`` and ``auto_pad`` are resolved into ``pads`` (never negative)
    and ``output_padding``. When a requested output is longer than the full result, the extra
    elements (zeros plus bias) become a larger ``output_padding``, which may then exceed the
    stride; so normalize accepts any output_padding >= 0 (it only appends elements) and stays
    idempotent.
    """
    attrs = {"dilations": None, "group": 1, "kernel_shape": None, "output_padding": None,
             "pads": None, "strides": None}
    input_names = ("X", "W", "B")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs, auto_pad = pop_auto_pad(cls.name, attrs)
        output_shape = attrs.pop("output_shape", None)
        attrs = fill_defaults(cls, attrs)
        x = input_types[0] if input_types else None
        rank = spatial_rank(cls.name, x)
        w = input_types[1] if len(input_types) > 1 else None
        kernel = _kernel_from_w(cls.name, attrs, w, rank)
        strides = int_list(attrs["strides"], cls.name, "strides", rank, 1, 1)
        dilations = int_list(attrs["dilations"], cls.name, "dilations", rank, 1, 1)
        padding = int_list(attrs["output_padding"], cls.name, "output_padding", rank, 0, 0)
        group = int(attrs["group"])
        if group < 1:
            raise ModelError(f"{cls.name}: group={group} must be >= 1")
        if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            sizes = static_spatial(cls.name, x, "output_shape / auto_pad=SAME_*")
            if output_shape is None:
                target = [n * s for n, s in zip(sizes, strides)]
            else:
                target = cls._spatial_output_shape(output_shape, x, rank)
            pads, padding = cls._pads_for(auto_pad, sizes, target, kernel, strides, dilations,
                                          padding)
        elif auto_pad == "VALID":
            pads = [0] * (2 * rank)
        else:
            pads = int_list(attrs["pads"], cls.name, "pads", 2 * rank, 0, 0)
        return {"dilations": dilations, "group": group, "kernel_shape": kernel,
                "output_padding": padding, "pads": pads, "strides": strides}

    @classmethod
    def _spatial_output_shape(cls, output_shape, x, rank) -> list[int]:
        dims = np.asarray(output_shape).reshape(-1).tolist()
        if len(dims) == rank + 2:
            dims = dims[2:]  # some exporters write the full N x C x D... shape
        if len(dims) != rank or any(int(d) != d or d < 1 for d in dims):
            raise ModelError(f"{cls.name}: output_shape={list(output_shape)} must list {rank} "
                             f"positive spatial sizes (X has shape {list(x.shape)})")
        return [int(d) for d in dims]

    @staticmethod
    def _pads_for(auto_pad, sizes, target, kernel, strides, dilations, padding):
        """Pads (and output_padding) that make the output ``target`` long on every axis."""
        begins, ends, extra = [], [], []
        for n, t, k, s, d, p in zip(sizes, target, kernel, strides, dilations, padding):
            total = s * (n - 1) + p + extent(k, d) - t
            if total < 0:
                # longer than the full result: extend at the end, as output_padding does
                begins.append(0)
                ends.append(0)
                extra.append(p - total)
                continue
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            begins.append(begin)
            ends.append(total - begin)
            extra.append(p)
        return begins + ends, extra

    @staticmethod
    def infer(x, w, b=None, dilations=None, group=1, kernel_shape=None, output_padding=None,
              pads=None, strides=None):
        _check_weight("ConvTranspose", x, w)
        channels = x.shape[1]
        if channels != w.shape[0]:
            raise ShapeError(f"ConvTranspose: X has shape {list(x.shape)} ({channels} channels) "
                             f"but W has shape {list(w.shape)}: W's axis 0 must be {channels}")
        if channels % group:
            raise ShapeError(f"ConvTranspose: X has shape {list(x.shape)} with {channels} "
                             f"channels, which group={group} does not divide")
        out_channels = w.shape[1] * group
        _check_bias("ConvTranspose", b, x, out_channels)
        rank = x.rank - 2
        sizes = static_spatial("ConvTranspose", x, "the shape rule")
        out = [s * (n - 1) + p + extent(k, d) - pads[i] - pads[i + rank]
               for i, (n, k, s, d, p) in enumerate(zip(sizes, kernel_shape, strides, dilations,
                                                       output_padding))]
        if min(out) <= 0:
            raise ShapeError(f"ConvTranspose: pads={list(pads)} leave nothing of the output "
                             f"(spatial shape {out}) for X {list(x.shape)}, W {list(w.shape)}, "
                             f"strides={list(strides)}, dilations={list(dilations)}")
        return TensorType(x.dtype, (x.shape[0], out_channels, *out))

    @staticmethod
    def reference(x, w, b=None, dilations=None, group=1, kernel_shape=None, output_padding=None,
                  pads=None, strides=None):
        rank = x.ndim - 2
        kernel = list(w.shape[2:])
        dilations = dilations or [1] * rank
        strides = strides or [1] * rank
        pads = pads or [0] * (2 * rank)
        output_padding = output_padding or [0] * rank
        work = work_dtype(x.dtype)
        n, channels = x.shape[:2]
        sizes = list(x.shape[2:])
        per_group = w.shape[1]
        positions = math.prod(sizes)
        # every input element times every tap: (group, N*positions, M/group*taps)
        order = (1, 0, *range(3, 3 + rank), 2)
        cols = x.astype(work, copy=False).reshape(n, group, channels // group, *sizes)
        cols = cols.transpose(order).reshape(group, n * positions, channels // group)
        weights = w.astype(work, copy=False).reshape(group, channels // group, -1)
        contrib = np.matmul(cols, weights).reshape(group, n, *sizes, per_group, *kernel)
        order = (1, 0, 2 + rank, *range(3 + rank, 3 + 2 * rank), *range(2, 2 + rank))
        contrib = np.ascontiguousarray(contrib.transpose(order))
        contrib = contrib.reshape(n, group * per_group, *kernel, *sizes)
        full = [(size - 1) * s + extent(k, d) + p
                for size, k, s, d, p in zip(sizes, kernel, strides, dilations, output_padding)]
        y = np.zeros((n, group * per_group, *full), dtype=work)
        # col2im: one strided scatter-add per kernel tap
        for tap in np.ndindex(*kernel):
            target = tuple(slice(t * d, t * d + (size - 1) * s + 1, s)
                           for t, d, s, size in zip(tap, dilations, strides, sizes))
            y[(slice(None), slice(None)) + target] += contrib[(slice(None), slice(None)) + tap]
        crop = tuple(slice(pads[i], f - pads[i + rank]) for i, f in enumerate(full))
        y = y[(slice(None), slice(None)) + crop]
        if b is not None:
            y = y + b.astype(work, copy=False).reshape(-1, *[1] * rank)
        return np.ascontiguousarray(y.astype(x.dtype, copy=False))

    @staticmethod
    def flops(input_types, output_types, **attrs):
        x, w = input_types[0], input_types[1]
        if not x.is_static:
            return 0
        return 2 * x.size * w.shape[1] * math.prod(w.shape[2:])

    @staticmethod
    def gradient(g, node, grads):
        """The Conv pair swapped. dX: Conv of dY with the same W and geometry (cropped when an
        output_padding of a stride or more made Y longer than X's windows reach); dW:
        ConvGradWeight with dY as the input and X as the output gradient; dB: dY summed."""
        x, w = node.inputs[:2]
        dy = grads[0]
        geometry = {k: node.attrs[k] for k in GEOMETRY}
        dx = dw = db = None
        if g.needs(node, 0):
            dx = g.op("Conv", [dy, w], geometry)
            if tuple(dx.shape) != tuple(x.shape):
                rank = x.type.rank - 2
                dx = g.op("Slice", [dx], {"starts": [0] * rank, "ends": list(x.shape[2:]),
                                          "axes": list(range(2, 2 + rank)), "steps": [1] * rank})
        if g.needs(node, 1):
            dw = g.op("ConvGradWeight", [dy, x], geometry)
        if g.needs(node, 2):
            db = _bias_gradient(g, dy)
        return [dx, dw, db][:len(node.inputs)]
