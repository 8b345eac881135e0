"""Activations: elementwise nonlinearities (Relu ... Mish, and the project ops Relu6 and Silu),
Clip, and Softmax / LogSoftmax.

Floating-point activations are evaluated in float64 and rounded once to the input dtype, so the
reference is at least as accurate as any backend it is compared with.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ModelError, ShapeError
from ..ir.types import FLOAT_DTYPES, TensorType
from .base import Op, broadcast_shapes, fill_defaults, normalize_axis, register
from .elementwise import _erf, pointwise_rule

SIGNED_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64))


def _require_float(op: str, x: TensorType) -> TensorType:
    if x.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{op} takes a floating-point tensor, got {x}")
    return x


def _sigmoid(x):
    # exp(-|x|) never overflows, so both branches stay finite for any x.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def _per_element(cost: int):
    def flops(input_types, output_types, **attrs):
        return cost * sum(t.size for t in output_types if t.is_static)
    return staticmethod(flops)


def _activation(name: str, fn, doc: str, cost: int = 1):
    """A float-only activation without attributes; ``fn`` works on float64."""
    def infer(x):
        return _require_float(name, x)

    def reference(x):
        return fn(x.astype(np.float64)).astype(x.dtype)

    cls = type(name, (Op,), {"name": name, "__doc__": doc, "input_names": ("X",),
                             "infer": staticmethod(infer), "reference": staticmethod(reference),
                             "flops": _per_element(cost)})
    return register(cls)


Sigmoid = _activation("Sigmoid", _sigmoid, "1 / (1 + exp(-x))", cost=4)
Tanh = _activation("Tanh", np.tanh, "tanh(x)", cost=4)
Softplus = _activation("Softplus", _softplus, "log(1 + exp(x))", cost=4)
Mish = _activation("Mish", lambda x: x * np.tanh(_softplus(x)), "x * tanh(softplus(x))", cost=8)
HardSwish = _activation("HardSwish", lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
                        "x * max(0, min(1, x / 6 + 1 / 2))", cost=4)
# Project ops (not ONNX): the canonical forms that canonicalize gives Clip(0, 6) and x * Sigmoid(x),
# so that fusion passes and backends see one name per activation.
Silu = _activation("Silu", lambda x: x * _sigmoid(x), "x * sigmoid(x) (SiLU, swish)", cost=5)
Silu.internal = True
Sigmoid.gradient = pointwise_rule("Y")
Tanh.gradient = pointwise_rule("Y")
Softplus.gradient = pointwise_rule("X")
Mish.gradient = pointwise_rule("X")
HardSwish.gradient = pointwise_rule("X")
Silu.gradient = pointwise_rule("X")


@register
class Relu(Op):
    """max(x, 0); signed integers too (opset 14)."""
    input_names = ("X",)

    @staticmethod
    def infer(x):
        if x.dtype not in FLOAT_DTYPES + SIGNED_DTYPES:
            raise ShapeError(f"Relu takes a floating-point or signed integer tensor, got {x}")
        return x

    @staticmethod
    def reference(x):
        return np.maximum(x, np.zeros((), x.dtype))

    gradient = pointwise_rule("Y")


@register
class Relu6(Op):
    """min(max(x, 0), 6), exactly what Clip(x, 0, 6) computes; a project op, not ONNX."""
    input_names = ("X",)
    internal = True

    @staticmethod
    def infer(x):
        if x.dtype not in FLOAT_DTYPES + SIGNED_DTYPES:
            raise ShapeError(f"Relu6 takes a floating-point or signed integer tensor, got {x}")
        return x

    @staticmethod
    def reference(x):
        return np.minimum(np.maximum(x, np.zeros((), x.dtype)), np.full((), 6, x.dtype))

    flops = _per_element(2)
    gradient = pointwise_rule("X")


@register
class LeakyRelu(Op):
    attrs = {"alpha": 0.01}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        attrs["alpha"] = float(attrs["alpha"])
        return attrs

    @staticmethod
    def infer(x, alpha=0.01):
        return _require_float("LeakyRelu", x)

    @staticmethod
    def reference(x, alpha=0.01):
        x64 = x.astype(np.float64)
        return np.where(x64 < 0, alpha * x64, x64).astype(x.dtype)

    flops = _per_element(2)
    gradient = pointwise_rule("X")


@register
class PRelu(Op):
    """x < 0 ? slope * x : x, where slope broadcasts to x's shape (unidirectional broadcasting):
    a per-channel slope of an NCHW tensor has the shape (C, 1, 1)."""
    input_names = ("X", "slope")

    @staticmethod
    def infer(x, slope):
        if x.dtype != slope.dtype:
            raise ShapeError(f"PRelu needs X and slope of one dtype, got X {x} and slope {slope}")
        if x.dtype == np.bool_:
            raise ShapeError(f"PRelu takes a numeric tensor, got {x}")
        hint = ""
        if slope.rank == 1 and x.rank > 2 and slope.shape[0] == x.shape[1]:
            shape = (slope.shape[0],) + (1,) * (x.rank - 2)
            hint = f"; a per-channel slope must have the shape {list(shape)}"
        try:
            shape = broadcast_shapes(x.shape, slope.shape)
        except ShapeError:
            shape = None
        if shape != tuple(x.shape):
            raise ShapeError(f"PRelu: slope of shape {list(slope.shape)} does not broadcast to X "
                             f"of shape {list(x.shape)}{hint}")
        return x

    @staticmethod
    def reference(x, slope):
        if x.dtype in FLOAT_DTYPES:
            x64 = x.astype(np.float64)
            return np.where(x64 < 0, slope.astype(np.float64) * x64, x64).astype(x.dtype)
        return np.where(x < 0, slope * x, x).astype(x.dtype)

    flops = _per_element(2)

    @staticmethod
    def gradient(g, node, grads):
        """dX = dY where X >= 0, dY * slope elsewhere; dslope = dY * X where X < 0, summed to
        slope's shape (PReluGrad)."""
        dx, dslope = g.op("PReluGrad", [grads[0], *node.inputs], outputs=2)
        return [dx, dslope]


@register
class Elu(Op):
    attrs = {"alpha": 1.0}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        attrs["alpha"] = float(attrs["alpha"])
        return attrs

    @staticmethod
    def infer(x, alpha=1.0):
        return _require_float("Elu", x)

    @staticmethod
    def reference(x, alpha=1.0):
        x64 = x.astype(np.float64)
        # expm1 of min(x, 0): the branch that is thrown away must not overflow either.
        return np.where(x64 > 0, x64, alpha * np.expm1(np.minimum(x64, 0.0))).astype(x.dtype)

    flops = _per_element(4)
    gradient = pointwise_rule("X")


@register
class Selu(Op):
    attrs = {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        attrs["alpha"] = float(attrs["alpha"])
        attrs["gamma"] = float(attrs["gamma"])
        return attrs

    @staticmethod
    def infer(x, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
        return _require_float("Selu", x)

    @staticmethod
    def reference(x, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
        x64 = x.astype(np.float64)
        neg = alpha * np.expm1(np.minimum(x64, 0.0))
        return (gamma * np.where(x64 > 0, x64, neg)).astype(x.dtype)

    flops = _per_element(5)
    gradient = pointwise_rule("X")


@register
class Gelu(Op):
    """x * Phi(x); approximate='tanh' uses the tanh formula of Hendrycks & Gimpel."""
    attrs = {"approximate": "none"}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        if attrs["approximate"] not in ("none", "tanh"):
            raise ModelError(f"Gelu: approximate='{attrs['approximate']}' is not one of "
                             "'none', 'tanh'")
        return attrs

    @staticmethod
    def infer(x, approximate="none"):
        return _require_float("Gelu", x)

    @staticmethod
    def reference(x, approximate="none"):
        x64 = x.astype(np.float64)
        if approximate == "tanh":
            inner = math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)
            return (0.5 * x64 * (1.0 + np.tanh(inner))).astype(x.dtype)
        return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(x.dtype)

    flops = _per_element(8)
    gradient = pointwise_rule("X")


@register
class HardSigmoid(Op):
    """max(0, min(1, alpha * x + beta))."""
    attrs = {"alpha": 0.2, "beta": 0.5}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        attrs["alpha"] = float(attrs["alpha"])
        attrs["beta"] = float(attrs["beta"])
        return attrs

    @staticmethod
    def infer(x, alpha=0.2, beta=0.5):
        return _require_float("HardSigmoid", x)

    @staticmethod
    def reference(x, alpha=0.2, beta=0.5):
        return np.clip(alpha * x.astype(np.float64) + beta, 0.0, 1.0).astype(x.dtype)

    flops = _per_element(4)
    gradient = pointwise_rule("X")


@register
class Clip(Op):
    """min(max(x, min), max). Canonical min/max: Python numbers, or None for no bound.

    Opsets before 11 give the bounds as attributes, later ones as optional constant inputs."""
    attrs = {"min": None, "max": None}
    lift_inputs = {1: "min", 2: "max"}
    input_names = ("input", "min", "max")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = input_types[0] if input_types else None
        integer = x is not None and x.dtype not in FLOAT_DTYPES
        for key in ("min", "max"):
            value = attrs[key]
            if value is None:
                continue
            array = np.asarray(value)
            if array.size != 1:
                raise ShapeError(f"Clip: '{key}' must be a scalar, got shape {list(array.shape)}")
            item = array.reshape(()).item()
            attrs[key] = int(item) if integer else float(item)
        return attrs

    @staticmethod
    def infer(x, min=None, max=None):
        if x.dtype == np.bool_:
            raise ShapeError(f"Clip takes a numeric tensor, got {x}")
        return x

    @staticmethod
    def reference(x, min=None, max=None):
        out = x
        # Max last: with min > max the result is max, as in ONNX and NumPy.
        if min is not None:
            out = np.maximum(out, np.asarray(min, dtype=x.dtype))
        if max is not None:
            out = np.minimum(out, np.asarray(max, dtype=x.dtype))
        return np.array(out, dtype=x.dtype)

    flops = _per_element(2)
    gradient = pointwise_rule("X")


class _SoftmaxFamily(Op):
    """Shared attribute handling of Softmax and LogSoftmax.

    Canonical attrs: ``axis`` (non-negative) and ``legacy_flatten``. Before opset 13 the input is
    viewed as 2-D [prod(shape[:axis]), prod(shape[axis:])] and normalised along the second axis,
    i.e. jointly over every axis from ``axis`` on; ``legacy_flatten`` is True only where that
    differs from normalising along ``axis`` alone (axis is not the last one)."""
    attrs = {"axis": None, "legacy_flatten": False}
    input_names = ("input",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        legacy = opset < 13
        axis = attrs["axis"]
        if axis is None:
            axis = 1 if legacy else -1
        rank = input_types[0].rank
        axis = normalize_axis(int(axis), rank, f"{cls.name} axis")
        attrs["axis"] = axis
        attrs["legacy_flatten"] = legacy and axis < rank - 1
        return attrs

    @classmethod
    def infer(cls, x, axis=-1, legacy_flatten=False):
        _require_float(cls.name, x)
        normalize_axis(axis, x.rank, f"{cls.name} axis")
        return x

    @staticmethod
    def flops(input_types, output_types, **attrs):
        # max, subtract, exp, sum, divide (or log and subtract) per element
        return 5 * sum(t.size for t in output_types if t.is_static)


def _softmax_axes(rank: int, axis: int, legacy_flatten: bool) -> tuple:
    axis = axis % rank
    return tuple(range(axis, rank)) if legacy_flatten else (axis,)


@register
class Softmax(_SoftmaxFamily):
    @staticmethod
    def reference(x, axis=-1, legacy_flatten=False):
        axes = _softmax_axes(x.ndim, axis, legacy_flatten)
        x64 = x.astype(np.float64)
        e = np.exp(x64 - x64.max(axis=axes, keepdims=True))
        return (e / e.sum(axis=axes, keepdims=True)).astype(x.dtype)

    @staticmethod
    def gradient(g, node, grads):
        """dX = Y * (dY - sum(dY * Y)) over the normalised axes (SoftmaxGrad, from the output)."""
        return [g.op("SoftmaxGrad", [grads[0], node.outputs[0]], dict(node.attrs))]


@register
class LogSoftmax(_SoftmaxFamily):
    @staticmethod
    def reference(x, axis=-1, legacy_flatten=False):
        axes = _softmax_axes(x.ndim, axis, legacy_flatten)
        x64 = x.astype(np.float64)
        shifted = x64 - x64.max(axis=axes, keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(axis=axes, keepdims=True))).astype(x.dtype)

    @staticmethod
    def gradient(g, node, grads):
        """dX = dY - exp(Y) * sum(dY) over the normalised axes (SoftmaxGrad with log)."""
        return [g.op("SoftmaxGrad", [grads[0], node.outputs[0]], {**node.attrs, "log": True})]
