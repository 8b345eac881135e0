"""Gradient-only ops: the backward kernels that no ONNX op computes.

Reverse-mode rules (the ``gradient`` staticmethods of the op classes, see docs/AUTODIFF.md) build
the backward graph from ordinary ops where one fits (a Conv's input gradient is a ConvTranspose)
and from these where none does. Each is an internal op with infer, reference and flops like any
other, so the verifier, the reference executor, the passes and every backend's reference fallback
handle the joint forward + backward graph without knowing it is one.

References compute in float64 (float32 for the conv-sized products) and return the dtype of the
tensor they are the gradient of.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ModelError, ShapeError
from ..ir.types import FLOAT_DTYPES, TensorType
from .activation import _sigmoid, _softmax_axes, _softplus
from .base import Op, broadcast_shapes, register
from .conv import GROUPED_TAP_LOOP_MAX, extent, out_size, windows, work_dtype
from .elementwise import _erf
from .pool import _window_counts
from .resize import _nearest_index, _source_coords, _taps


def _require_float(op: str, t: TensorType, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{op}: {what} must be a floating-point tensor, got {t}")


def _same_shape(op: str, a: TensorType, b: TensorType, what: str) -> None:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        raise ShapeError(f"{op}: {what} is {a} but must be {b}")


def sum_to(x: np.ndarray, shape) -> np.ndarray:
    """Sum ``x`` down to ``shape``, which broadcasts to x's shape (aligned on the right)."""
    shape = tuple(shape)
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape)
                                      if d == 1 and x.shape[lead + i] != 1)
    return (x.sum(axis=axes, keepdims=True) if axes else x).reshape(shape)


def _window_geometry(shape, out, strides, dilations, pads):
    rank = len(shape) - 2
    return (strides or [1] * rank, dilations or [1] * rank, pads or [0] * (2 * rank),
            list(shape[2:]), list(out))


def col2im(contrib: np.ndarray, sizes, kernel, strides, dilations, pads) -> np.ndarray:
    """The adjoint of ``conv.windows``: add every window tap of ``contrib`` (N, C, *out, *kernel)
    back to its input position; returns (N, C, *sizes). Taps on padding are dropped."""
    rank = len(sizes)
    out = contrib.shape[2:2 + rank]
    full = [max((o - 1) * s + extent(k, d), p + n)
            for o, s, k, d, p, n in zip(out, strides, kernel, dilations, pads, sizes)]
    padded = np.zeros((*contrib.shape[:2], *full), dtype=contrib.dtype)
    lead = (slice(None),) * (2 + rank)
    # one strided add per kernel tap, as ConvTranspose's col2im
    for tap in np.ndindex(*kernel):
        target = tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                       for t, d, s, o in zip(tap, dilations, strides, out))
        padded[(slice(None), slice(None)) + target] += contrib[lead + tap]
    return padded[(slice(None), slice(None)) + tuple(slice(p, p + n) for p, n in zip(pads, sizes))]


# ---- broadcasting --------------------------------------------------------------------------------
@register
class SumTo(Op):
    """Sum X down to ``shape`` (which broadcasts to X's shape): the adjoint of broadcasting."""
    attrs = {"shape": None}
    input_names = ("X",)
    internal = True

    @staticmethod
    def infer(x, shape=None):
        try:
            ok = shape is not None and broadcast_shapes(tuple(shape), x.shape) == tuple(x.shape)
        except ShapeError:
            ok = False
        if not ok or len(shape) > x.rank:
            raise ShapeError(f"SumTo: shape {shape} does not broadcast to X's shape "
                             f"{list(x.shape)}")
        return x.with_shape(tuple(shape))

    @staticmethod
    def reference(x, shape=None):
        return sum_to(x, shape).astype(x.dtype, copy=False)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return input_types[0].size if input_types[0].is_static else 0


# ---- convolution ---------------------------------------------------------------------------------
@register
class ConvGradWeight(Op):
    """dW of Conv(X, W): the correlation of X with dY over the batch and every output position;
    M x C/group x kernel.

    dY may have fewer positions than X's windows give: ConvTranspose's weight gradient is this op
    with its output gradient as X, and an output_padding of a stride or more appends elements
    that no window of that correlation reaches."""
    attrs = {"dilations": None, "group": 1, "kernel_shape": None, "pads": None, "strides": None}
    input_names = ("X", "dY")
    internal = True

    @staticmethod
    def infer(x, dy, dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
        _require_float("ConvGradWeight", x, "X")
        if dy.dtype != x.dtype or dy.rank != x.rank or dy.shape[0] != x.shape[0]:
            raise ShapeError(f"ConvGradWeight: dY {dy} does not fit X {x}")
        channels, out_channels = x.shape[1], dy.shape[1]
        if channels % group or out_channels % group:
            raise ShapeError(f"ConvGradWeight: group={group} must divide X's {channels} and dY's "
                             f"{out_channels} channels (X {list(x.shape)}, dY {list(dy.shape)})")
        rank = x.rank - 2
        most = [out_size(n, k, s, d, pads[i], pads[i + rank])
                for i, (n, k, s, d) in enumerate(zip(x.shape[2:], kernel_shape, strides,
                                                     dilations))]
        if any(o > m for o, m in zip(dy.shape[2:], most)):
            raise ShapeError(f"ConvGradWeight: dY has shape {list(dy.shape)}, but X of shape "
                             f"{list(x.shape)} gives at most {most} output positions")
        return TensorType(x.dtype, (out_channels, channels // group, *kernel_shape))

    @staticmethod
    def reference(x, dy, dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
        rank = x.ndim - 2
        strides, dilations, pads, _, out = _window_geometry(x.shape, dy.shape[2:], strides,
                                                            dilations, pads)
        work = work_dtype(x.dtype)
        n, channels = x.shape[:2]
        out_channels = dy.shape[1]
        per_group, out_per_group = channels // group, out_channels // group
        positions = math.prod(out)
        view = windows(x.astype(work, copy=False), kernel_shape, strides, dilations, pads, out)
        view = view.reshape(n, group, per_group, *out, *kernel_shape)
        d = dy.astype(work, copy=False).reshape(n, group, out_per_group, positions)
        if group > 1 and per_group <= GROUPED_TAP_LOOP_MAX:
            # narrow groups (depthwise): one small contraction per tap beats copying windows
            w = np.empty((group, out_per_group, per_group, *kernel_shape), dtype=work)
            for tap in np.ndindex(*kernel_shape):
                at = (Ellipsis, *tap)
                taps = view[at].reshape(n, group, per_group, positions)
                w[at] = np.einsum("ngcp,ngmp->gmc", taps, d)
        else:
            # im2col: (group, C/group*taps, N*positions) @ (group, N*positions, M/group)
            order = (1, 2, *range(3 + rank, 3 + 2 * rank), 0, *range(3, 3 + rank))
            cols = view.transpose(order).reshape(group, -1, n * positions)
            w = np.matmul(cols, d.transpose(1, 0, 3, 2).reshape(group, n * positions, -1))
            w = w.reshape(group, per_group, *kernel_shape, out_per_group)
            w = w.transpose(0, 2 + rank, 1, *range(2, 2 + rank))
        return np.ascontiguousarray(w).reshape(out_channels, per_group, *kernel_shape) \
            .astype(x.dtype, copy=False)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        dy, w = input_types[1], output_types[0]
        if not dy.is_static:
            return 0
        return 2 * dy.size * w.shape[1] * math.prod(w.shape[2:])


# ---- pooling -------------------------------------------------------------------------------------
_POOL_ATTRS = {"ceil_mode": 0, "dilations": None, "kernel_shape": None, "pads": None,
               "strides": None}


def _check_pool_grad(op: str, dy: TensorType, x_shape, kernel_shape, strides, dilations, pads,
                     ceil_mode) -> None:
    rank = len(x_shape) - 2
    strides, dilations, pads, sizes, _ = _window_geometry(x_shape, (), strides, dilations, pads)
    out = [out_size(n, k, s, d, pads[i], pads[i + rank], bool(ceil_mode))
           for i, (n, k, s, d) in enumerate(zip(sizes, kernel_shape, strides, dilations))]
    if tuple(dy.shape) != (*x_shape[:2], *out):
        raise ShapeError(f"{op}: dY has shape {list(dy.shape)}; pooling an input of shape "
                         f"{list(x_shape)} gives {[*x_shape[:2], *out]}")


@register
class MaxPoolGrad(Op):
    """dX of MaxPool: each dY element goes to the first maximum of its window (the element the
    forward picked; found again in X rather than stored as indices). The optional Y, the
    forward's output, lets a kernel find it by comparing each element with its window's
    maximum; the result is the same."""
    attrs = dict(_POOL_ATTRS)
    input_names = ("dY", "X", "Y")
    internal = True

    @staticmethod
    def infer(dy, x, y=None, **attrs):
        _require_float("MaxPoolGrad", x, "X")
        _check_pool_grad("MaxPoolGrad", dy, x.shape, **attrs)
        if y is not None and (y.shape != dy.shape or y.dtype != x.dtype):
            raise ShapeError(f"MaxPoolGrad: Y (the forward's output) is {y}; it must have dY's "
                             f"shape {list(dy.shape)} and X's dtype {x.dtype}")
        return x

    @staticmethod
    def reference(dy, x, y=None, ceil_mode=0, dilations=None, kernel_shape=None, pads=None,
                  strides=None):
        rank = x.ndim - 2
        strides, dilations, pads, sizes, out = _window_geometry(x.shape, dy.shape[2:], strides,
                                                                dilations, pads)
        view = windows(x, kernel_shape, strides, dilations, pads, out, -np.inf)
        best = view.reshape(*view.shape[:2 + rank], -1).argmax(axis=-1)
        taps = np.unravel_index(best, kernel_shape)
        index = np.zeros(best.shape, dtype=np.int64)
        inside = np.ones(best.shape, dtype=bool)
        for i in range(rank):
            grid = np.arange(out[i]).reshape([-1] + [1] * (rank - 1 - i))
            coord = grid * strides[i] - pads[i] + taps[i] * dilations[i]
            # a window wholly in the padding picked a pad: nothing to route back
            inside &= (coord >= 0) & (coord < sizes[i])
            index = index * sizes[i] + np.clip(coord, 0, sizes[i] - 1)
        planes = np.arange(x.shape[0] * x.shape[1], dtype=np.int64).reshape(*x.shape[:2],
                                                                            *[1] * rank)
        flat = (planes * math.prod(sizes) + index)[inside]
        dx = np.bincount(flat, weights=dy[inside].astype(np.float64), minlength=x.size)
        return dx.reshape(x.shape).astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        dy = input_types[0]
        return dy.size * math.prod(attrs.get("kernel_shape") or [1]) if dy.is_static else 0


@register
class AveragePoolGrad(Op):
    """dX of AveragePool: each dY element divided by its window's count, spread over the window.
    ``shape`` is X's shape (X itself is not needed)."""
    attrs = {**_POOL_ATTRS, "count_include_pad": 0, "shape": None}
    input_names = ("dY",)
    internal = True

    @staticmethod
    def infer(dy, shape=None, count_include_pad=0, **attrs):
        _require_float("AveragePoolGrad", dy, "dY")
        _check_pool_grad("AveragePoolGrad", dy, tuple(shape), **attrs)
        return dy.with_shape(tuple(shape))

    @staticmethod
    def reference(dy, shape=None, count_include_pad=0, ceil_mode=0, dilations=None,
                  kernel_shape=None, pads=None, strides=None):
        rank = dy.ndim - 2
        strides, dilations, pads, sizes, out = _window_geometry(shape, dy.shape[2:], strides,
                                                                dilations, pads)
        counts = _window_counts(sizes, kernel_shape, strides, dilations, pads, out,
                                count_include_pad)
        share = dy.astype(np.float64) / np.maximum(counts, 1)
        contrib = np.broadcast_to(share[(Ellipsis,) + (None,) * rank],
                                  (*share.shape, *kernel_shape))
        return col2im(contrib, sizes, kernel_shape, strides, dilations, pads).astype(dy.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        dy = input_types[0]
        return dy.size * math.prod(attrs.get("kernel_shape") or [1]) if dy.is_static else 0


@register
class LpPoolGrad(Op):
    """dX of LpPool: y = (sum |x|^p)^(1/p), so dy/dx = sign(x) |x|^(p-1) / y^(p-1), summed over
    the windows x belongs to; zero where y is zero."""
    attrs = {**_POOL_ATTRS, "p": 2}
    input_names = ("dY", "X")
    internal = True

    @staticmethod
    def infer(dy, x, p=2, **attrs):
        _require_float("LpPoolGrad", x, "X")
        _check_pool_grad("LpPoolGrad", dy, x.shape, **attrs)
        return x

    @staticmethod
    def reference(dy, x, p=2, ceil_mode=0, dilations=None, kernel_shape=None, pads=None,
                  strides=None):
        rank = x.ndim - 2
        strides, dilations, pads, sizes, out = _window_geometry(x.shape, dy.shape[2:], strides,
                                                                dilations, pads)
        view = windows(x.astype(np.float64), kernel_shape, strides, dilations, pads, out)
        spatial = tuple(range(-rank, 0))
        magnitude = np.abs(view)
        y = np.power((magnitude ** p).sum(axis=spatial), 1.0 / p)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(y > 0, dy / y ** (p - 1), 0.0)
        contrib = np.sign(view) * magnitude ** (p - 1) * scale[(Ellipsis,) + (None,) * rank]
        return col2im(contrib, sizes, kernel_shape, strides, dilations, pads).astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        dy = input_types[0]
        return 4 * dy.size * math.prod(attrs.get("kernel_shape") or [1]) if dy.is_static else 0


# ---- normalisation -------------------------------------------------------------------------------
def _as_broadcast(p: np.ndarray, rank: int) -> np.ndarray:
    """A (C,) or (C, D1, ..., Dn) parameter in float64, shaped to broadcast against N x C x ..."""
    p = p.astype(np.float64)
    return p.reshape(p.shape + (1,) * (rank - 2)) if p.ndim == 1 else p


def _normalized_backward(d, xhat, inv_std, gain, axes):
    """dX of y = xhat * gain + b when xhat = (x - mean(x)) * inv_std over ``axes`` (statistics
    of x itself): inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))."""
    dxhat = d * gain
    return inv_std * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                      - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))


@register
class BatchNormGrad(Op):
    """Inference BatchNormalization's backward, (dY, X, scale, mean, var) -> dX, dscale, dB: the
    statistics are fixed, so dX = dY * scale / sqrt(var + epsilon). Statistics of shape (C,) or
    (C, D1, ..., Dn), as in the forward op."""
    attrs = {"epsilon": 1e-5}
    input_names = ("dY", "X", "scale", "mean", "var")
    internal = True

    @staticmethod
    def infer(dy, x, scale, mean, var, epsilon=1e-5):
        _require_float("BatchNormGrad", x, "X")
        _same_shape("BatchNormGrad", dy, x, "dY")
        for what, t in (("mean", mean), ("var", var)):
            _same_shape("BatchNormGrad", t.with_dtype(scale.dtype), scale, what)
        return [x, scale, scale]

    @staticmethod
    def reference(dy, x, scale, mean, var, epsilon=1e-5):
        rank = x.ndim
        axes = (0,) + tuple(range(2, rank)) if scale.ndim == 1 else (0,)
        inv_std = 1.0 / np.sqrt(_as_broadcast(var, rank) + epsilon)
        xhat = (x.astype(np.float64) - _as_broadcast(mean, rank)) * inv_std
        d = dy.astype(np.float64)
        dx = d * (_as_broadcast(scale, rank) * inv_std)
        dscale = (d * xhat).sum(axis=axes).reshape(scale.shape)
        db = d.sum(axis=axes).reshape(scale.shape)
        return dx.astype(x.dtype), dscale.astype(scale.dtype), db.astype(scale.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 5 * input_types[1].size if input_types[1].is_static else 0


@register
class InstanceNormGrad(Op):
    """InstanceNormalization's backward, (dY, X, scale) -> dX, dscale, dB; the statistics are
    X's own per (n, c), so dX carries their dependence on X."""
    attrs = {"epsilon": 1e-5}
    input_names = ("dY", "X", "scale")
    internal = True

    @staticmethod
    def infer(dy, x, scale, epsilon=1e-5):
        _require_float("InstanceNormGrad", x, "X")
        _same_shape("InstanceNormGrad", dy, x, "dY")
        if tuple(scale.shape) != (x.shape[1],):
            raise ShapeError(f"InstanceNormGrad: scale has shape {list(scale.shape)}, expected "
                             f"[{x.shape[1]}] for X {list(x.shape)}")
        return [x, scale, scale]

    @staticmethod
    def reference(dy, x, scale, epsilon=1e-5):
        axes = tuple(range(2, x.ndim))
        x64 = x.astype(np.float64)
        centered = x64 - x64.mean(axis=axes, keepdims=True)
        inv_std = 1.0 / np.sqrt((centered * centered).mean(axis=axes, keepdims=True) + epsilon)
        xhat = centered * inv_std
        d = dy.astype(np.float64)
        dx = _normalized_backward(d, xhat, inv_std, _as_broadcast(scale, x.ndim), axes)
        batch = (0,) + axes
        return (dx.astype(x.dtype), (d * xhat).sum(axis=batch).astype(scale.dtype),
                d.sum(axis=batch).astype(scale.dtype))

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 10 * input_types[1].size if input_types[1].is_static else 0


def _channel_window_sum(v: np.ndarray, before: int, after: int) -> np.ndarray:
    pads = [(0, 0)] * v.ndim
    pads[1] = (before, after)
    return np.lib.stride_tricks.sliding_window_view(np.pad(v, pads), before + after + 1,
                                                    axis=1).sum(axis=-1)


@register
class LRNGrad(Op):
    """LRN's backward. With d = bias + alpha / size * (window sum of x^2) and y = x * d^-beta:
    dx_i = dy_i d_i^-beta - 2 beta alpha / size * x_i * sum over the windows j holding i of
    dy_j x_j d_j^(-beta-1); those j form the window around i mirrored."""
    attrs = {"size": None, "alpha": 1e-4, "beta": 0.75, "bias": 1.0}
    input_names = ("dY", "X")
    internal = True

    @staticmethod
    def infer(dy, x, **attrs):
        _require_float("LRNGrad", x, "X")
        _same_shape("LRNGrad", dy, x, "dY")
        return x

    @staticmethod
    def reference(dy, x, size=None, alpha=1e-4, beta=0.75, bias=1.0):
        x64, d = x.astype(np.float64), dy.astype(np.float64)
        before = (size - 1) // 2
        after = size - 1 - before
        denom = bias + (alpha / size) * _channel_window_sum(x64 * x64, before, after)
        spread = _channel_window_sum(d * x64 * denom ** (-beta - 1), after, before)
        dx = d * denom ** -beta - (2.0 * beta * alpha / size) * x64 * spread
        return dx.astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, size=1, **attrs):
        return (2 * size + 8) * input_types[1].size if input_types[1].is_static else 0


# ---- activations ---------------------------------------------------------------------------------
def _gelu_derivative(x, approximate="none"):
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = np.tanh(c * (x + 0.044715 * x ** 3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    density = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * density


def _mish_derivative(x):
    t = np.tanh(_softplus(x))
    return t + x * (1.0 - t * t) * _sigmoid(x)


def _clip_derivative(x, min=None, max=None):
    # inclusive bounds, as torch.clamp's backward
    keep = np.ones(x.shape, dtype=bool)
    if min is not None:
        keep &= x >= min
    if max is not None:
        keep &= x <= max
    return keep.astype(np.float64)


def _hard_swish_derivative(x):
    return np.where(x < -3.0, 0.0, np.where(x <= 3.0, x / 3.0 + 0.5, 1.0))


def _hard_sigmoid_derivative(x, alpha=0.2, beta=0.5):
    z = alpha * x + beta
    return np.where((z > 0.0) & (z < 1.0), alpha, 0.0)


def _selu_derivative(x, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return gamma * np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0.0)))


#: op -> (the forward value f' is written in, "X" or "Y"; f' of that value in float64). Writing f'
#: in terms of the output where possible lets the backward pass keep Y alone, which the next layer
#: keeps alive anyway.
DERIVATIVES = {
    "Relu": ("Y", lambda y: (y > 0).astype(np.float64)),
    "Relu6": ("X", lambda x: ((x > 0) & (x < 6)).astype(np.float64)),
    "Clip": ("X", _clip_derivative),
    "LeakyRelu": ("X", lambda x, alpha=0.01: np.where(x > 0, 1.0, alpha)),
    "Elu": ("X", lambda x, alpha=1.0: np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0.0)))),
    "Selu": ("X", _selu_derivative),
    "Gelu": ("X", _gelu_derivative),
    "Sigmoid": ("Y", lambda y: y * (1.0 - y)),
    "HardSigmoid": ("X", _hard_sigmoid_derivative),
    "HardSwish": ("X", _hard_swish_derivative),
    "Tanh": ("Y", lambda y: 1.0 - y * y),
    "Softplus": ("X", _sigmoid),
    "Mish": ("X", _mish_derivative),
    "Silu": ("X", lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x)))),
    "Abs": ("X", np.sign),
    "Erf": ("X", lambda x: 2.0 / math.sqrt(math.pi) * np.exp(-x * x)),
    "Sqrt": ("Y", lambda y: 0.5 / y),
    "Exp": ("Y", lambda y: y),
    "Reciprocal": ("Y", lambda y: -y * y),
}


@register
class ActivationGrad(Op):
    """dX = dY * f'(V) for the pointwise op ``activation`` (with its ``activation_attrs``); V is
    the op's input or output, as ``at`` says ("X" or "Y", fixed per op by DERIVATIVES)."""
    attrs = {"activation": None, "activation_attrs": None, "at": "X"}
    input_names = ("dY", "V")
    internal = True

    @staticmethod
    def infer(dy, v, activation=None, activation_attrs=None, at="X"):
        if activation not in DERIVATIVES:
            raise ModelError(f"ActivationGrad: no derivative for '{activation}'; known: "
                             f"{', '.join(sorted(DERIVATIVES))}")
        if DERIVATIVES[activation][0] != at:
            raise ModelError(f"ActivationGrad: the derivative of {activation} is written in "
                             f"terms of {DERIVATIVES[activation][0]}, not {at}")
        _require_float("ActivationGrad", v, "V")
        _same_shape("ActivationGrad", dy, v, "dY")
        return dy

    @staticmethod
    def reference(dy, v, activation=None, activation_attrs=None, at="X"):
        slope = DERIVATIVES[activation][1](v.astype(np.float64), **(activation_attrs or {}))
        return (dy.astype(np.float64) * slope).astype(dy.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 4 * output_types[0].size if output_types[0].is_static else 0


@register
class PReluGrad(Op):
    """PRelu's backward, (dY, X, slope) -> dX, dslope (summed to slope's shape)."""
    input_names = ("dY", "X", "slope")
    internal = True

    @staticmethod
    def infer(dy, x, slope):
        _require_float("PReluGrad", x, "X")
        _same_shape("PReluGrad", dy, x, "dY")
        return [x, slope]

    @staticmethod
    def reference(dy, x, slope):
        x64, d = x.astype(np.float64), dy.astype(np.float64)
        negative = x64 < 0
        dx = np.where(negative, d * slope.astype(np.float64), d)
        dslope = sum_to(np.where(negative, d * x64, 0.0), slope.shape)
        return dx.astype(x.dtype), dslope.astype(slope.dtype)


@register
class SoftmaxGrad(Op):
    """Softmax's backward from its output Y: dX = Y * (dY - sum(dY * Y)); with ``log`` (the
    LogSoftmax form) dX = dY - exp(Y) * sum(dY). Sums run over the op's normalised axes."""
    attrs = {"axis": -1, "legacy_flatten": False, "log": False}
    input_names = ("dY", "Y")
    internal = True

    @staticmethod
    def infer(dy, y, axis=-1, legacy_flatten=False, log=False):
        _require_float("SoftmaxGrad", y, "Y")
        _same_shape("SoftmaxGrad", dy, y, "dY")
        return y

    @staticmethod
    def reference(dy, y, axis=-1, legacy_flatten=False, log=False):
        axes = _softmax_axes(y.ndim, axis, legacy_flatten)
        d, y64 = dy.astype(np.float64), y.astype(np.float64)
        if log:
            dx = d - np.exp(y64) * d.sum(axis=axes, keepdims=True)
        else:
            dx = y64 * (d - (d * y64).sum(axis=axes, keepdims=True))
        return dx.astype(y.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 4 * output_types[0].size if output_types[0].is_static else 0


# ---- elementwise ---------------------------------------------------------------------------------
@register
class PowGrad(Op):
    """Pow's backward, (dZ, X, Y) -> dX, dY, each summed to its input's shape:
    dX = dZ * Y * X^(Y-1), dY = dZ * X^Y * log(X) (0 where X is 0, as PyTorch). dY is zero for an
    integer exponent, which has no gradient."""
    input_names = ("dZ", "X", "Y")
    internal = True

    @staticmethod
    def infer(dz, x, y):
        _require_float("PowGrad", x, "X")
        return [x, y]

    @staticmethod
    def reference(dz, x, y):
        x64, y64, d = x.astype(np.float64), y.astype(np.float64), dz.astype(np.float64)
        dx = sum_to(d * y64 * np.power(x64, y64 - 1.0), x.shape)
        if y.dtype not in FLOAT_DTYPES:
            return dx.astype(x.dtype), np.zeros(y.shape, y.dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            dexp = np.where(x64 == 0, 0.0, d * np.power(x64, y64) * np.log(x64))
        return dx.astype(x.dtype), sum_to(dexp, y.shape).astype(y.dtype)


@register
class ExtremumGrad(Op):
    """The backward of Max / Min over inputs X0..Xk with output Y: dY goes to the inputs equal to
    Y, split evenly among ties (as torch.maximum does), then summed to each input's shape."""
    input_names = ("dY", "Y", "X")
    internal = True

    @staticmethod
    def infer(dy, y, *xs):
        _require_float("ExtremumGrad", y, "Y")
        _same_shape("ExtremumGrad", dy, y, "dY")
        if not xs:
            raise ModelError("ExtremumGrad needs the inputs of the Max / Min")
        return list(xs)

    @staticmethod
    def reference(dy, y, *xs):
        hits = [np.broadcast_to(x, y.shape) == y for x in xs]
        share = dy.astype(np.float64) / np.maximum(sum(h.astype(np.int64) for h in hits), 1)
        return tuple(sum_to(np.where(h, share, 0.0), x.shape).astype(x.dtype)
                     for h, x in zip(hits, xs))


# ---- movement ------------------------------------------------------------------------------------
@register
class SliceGrad(Op):
    """Slice's backward: dY written into zeros of ``shape`` (the sliced input's) where the slice
    read; attributes as the forward Slice's."""
    attrs = {"shape": None, "starts": None, "ends": None, "axes": None, "steps": None}
    input_names = ("dY",)
    internal = True

    @staticmethod
    def infer(dy, shape=None, starts=(), ends=(), axes=(), steps=()):
        from .shape import Slice
        want = Slice.infer(dy.with_shape(tuple(shape)), starts, ends, axes, steps)
        if tuple(want.shape) != tuple(dy.shape):
            raise ShapeError(f"SliceGrad: dY has shape {list(dy.shape)}, the slice of "
                             f"{list(shape)} has shape {list(want.shape)}")
        return dy.with_shape(tuple(shape))

    @staticmethod
    def reference(dy, shape=None, starts=(), ends=(), axes=(), steps=()):
        from .shape import Slice
        dx = np.zeros(tuple(shape), dtype=dy.dtype)
        # the forward's view into dx: writing through it puts dY where the slice read
        Slice.reference(dx, starts, ends, axes, steps)[...] = dy
        return dx

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 0


def _pad_source(length: int, crop: tuple, width: tuple, mode: str) -> np.ndarray:
    """Per output position of one axis of Pad, the input index it copies (-1: the constant)."""
    kept = np.arange(crop[0], length - crop[1])
    if mode == "constant":
        return np.pad(kept, width, mode="constant", constant_values=-1)
    return np.pad(kept, width, mode=mode)


@register
class PadGrad(Op):
    """Pad's backward: each output element's gradient returns to the input element it copied
    (reflect / edge / wrap copy some several times, so those add up); ``shape`` is the input's."""
    attrs = {"shape": None, "pads": None, "mode": "constant"}
    input_names = ("dY",)
    internal = True

    @staticmethod
    def infer(dy, shape=None, pads=(), mode="constant"):
        rank = len(shape)
        want = [n + pads[a] + pads[rank + a] for a, n in enumerate(shape)]
        if list(dy.shape) != want:
            raise ShapeError(f"PadGrad: dY has shape {list(dy.shape)}; padding {list(shape)} by "
                             f"{list(pads)} gives {want}")
        return dy.with_shape(tuple(shape))

    @staticmethod
    def reference(dy, shape=None, pads=(), mode="constant"):
        rank = len(shape)
        out = dy.astype(np.float64)
        for axis in range(rank):
            begin, end = pads[axis], pads[rank + axis]
            if begin == end == 0:
                continue
            crop = (max(-begin, 0), max(-end, 0))
            source = _pad_source(shape[axis], crop, (max(begin, 0), max(end, 0)), mode)
            # one axis of Pad is a 0/1 matrix (output x input); its transpose adds copies back
            matrix = np.zeros((len(source), shape[axis]))
            copied = source >= 0
            np.add.at(matrix, (np.nonzero(copied)[0], source[copied]), 1.0)
            out = np.moveaxis(np.tensordot(matrix, out, axes=(0, axis)), 0, axis)
        return out.astype(dy.dtype)


@register
class GatherGrad(Op):
    """Gather's backward: dY scattered (added) into zeros of ``shape`` at the indices."""
    attrs = {"shape": None, "axis": 0}
    input_names = ("dY", "indices")
    internal = True

    @staticmethod
    def infer(dy, indices, shape=None, axis=0):
        want = tuple(shape[:axis]) + tuple(indices.shape) + tuple(shape[axis + 1:])
        if tuple(dy.shape) != want:
            raise ShapeError(f"GatherGrad: dY has shape {list(dy.shape)}, gathering "
                             f"{list(indices.shape)} indices from {list(shape)} gives {list(want)}")
        return dy.with_shape(tuple(shape))

    @staticmethod
    def reference(dy, indices, shape=None, axis=0):
        dx = np.zeros(tuple(shape), dtype=np.float64)
        idx = indices.astype(np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + shape[axis], idx)
        moved = np.moveaxis(dy.astype(np.float64), tuple(range(axis, axis + indices.ndim)),
                            tuple(range(indices.ndim)))
        np.add.at(np.moveaxis(dx, axis, 0), idx, moved.reshape(idx.size, *moved.shape[
            indices.ndim:]))
        return dx.astype(dy.dtype)


def _resize_matrix(mode, ctm, nearest_mode, in_len, out_len, scale, roi, cubic_coeff_a,
                   exclude_outside, antialias) -> np.ndarray:
    """One axis of Resize as an (out_len x in_len) matrix, built as the forward computes it."""
    coords = _source_coords(ctm, out_len, in_len, scale, roi)
    matrix = np.zeros((out_len, in_len))
    rows = np.arange(out_len)
    if mode == "nearest":
        idx = np.clip(_nearest_index(coords, nearest_mode, scale < 1), 0, in_len - 1)
        matrix[rows, idx] = 1.0
        return matrix
    idx, weights = _taps(coords, in_len, scale, mode, cubic_coeff_a, exclude_outside, antialias)
    np.add.at(matrix, (rows[:, None], idx), weights)
    return matrix


@register
class ResizeGrad(Op):
    """Resize's backward: the transpose of the separable per-axis interpolation, for every mode
    (nearest, linear, cubic); elements tf_crop_and_resize extrapolated get no gradient. ``shape``
    is the input's; the other attributes are the forward Resize's canonical ones."""
    attrs = {"shape": None, "mode": "nearest", "coordinate_transformation_mode": "half_pixel",
             "nearest_mode": "round_prefer_floor", "cubic_coeff_a": -0.75, "exclude_outside": 0,
             "extrapolation_value": 0.0, "antialias": 0, "keep_aspect_ratio_policy": "stretch",
             "axes": None, "roi": None, "scales": None, "sizes": None}
    input_names = ("dY",)
    internal = True

    @staticmethod
    def infer(dy, shape=None, sizes=None, **attrs):
        if list(dy.shape) != list(sizes):
            raise ShapeError(f"ResizeGrad: dY has shape {list(dy.shape)}, the resized output "
                             f"{list(sizes)}")
        return dy.with_shape(tuple(shape))

    @staticmethod
    def reference(dy, shape=None, mode="nearest", coordinate_transformation_mode="half_pixel",
                  nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=0,
                  extrapolation_value=0.0, antialias=0, keep_aspect_ratio_policy="stretch",
                  axes=None, roi=None, scales=None, sizes=None):
        rank = dy.ndim
        ctm = coordinate_transformation_mode
        crop = ctm == "tf_crop_and_resize"
        rois = [(roi[a], roi[rank + a]) if crop else None for a in range(rank)]
        out = dy.astype(np.float64)
        if crop:
            # an extrapolated element is a constant: it passes nothing back, on any axis
            outside = np.zeros((1,) * rank, dtype=bool)
            for axis in range(rank):
                coords = _source_coords(ctm, sizes[axis], shape[axis], scales[axis], rois[axis])
                mask = (coords < 0) | (coords > shape[axis] - 1)
                outside = outside | mask.reshape((1,) * axis + (-1,) + (1,) * (rank - axis - 1))
            out = np.where(outside, 0.0, out)
        for axis in range(rank):
            in_len, out_len = shape[axis], sizes[axis]
            if out_len == in_len and scales[axis] == 1.0 and (not crop or rois[axis] == (0, 1)):
                continue
            matrix = _resize_matrix(mode, ctm, nearest_mode, in_len, out_len, scales[axis],
                                    rois[axis], cubic_coeff_a, exclude_outside, antialias)
            out = np.moveaxis(np.tensordot(matrix, out, axes=(0, axis)), 0, axis)
        return out.astype(dy.dtype)


__all__ = ["SumTo", "ConvGradWeight", "MaxPoolGrad", "AveragePoolGrad", "LpPoolGrad",
           "BatchNormGrad", "InstanceNormGrad", "LRNGrad", "ActivationGrad", "PReluGrad",
           "SoftmaxGrad", "PowGrad", "ExtremumGrad", "SliceGrad", "PadGrad", "GatherGrad",
           "ResizeGrad", "DERIVATIVES", "sum_to", "col2im"]
