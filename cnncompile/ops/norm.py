"""Normalisation: BatchNormalization (inference), InstanceNormalization and LRN.

Statistics and normalisation are computed in float64; results come back in the input dtype. Every op
here takes a channels-first tensor (N, C, D1, ..., Dn) of any spatial rank.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError, ShapeError, UnsupportedOperatorError
from ..ir.types import FLOAT_DTYPES, TensorType
from .base import Op, fill_defaults, register


def _require_float(op: str, what: str, t: TensorType) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{op}: {what} must be a floating-point tensor, got {t}")


def _require_channels_first(op: str, x: TensorType, min_rank: int) -> None:
    _require_float(op, "X", x)
    if x.rank < min_rank:
        raise ShapeError(f"{op} takes a tensor (N, C, D1, ...) of rank {min_rank} or more, got "
                         f"shape {list(x.shape)}")


def _per_channel(p: np.ndarray, rank: int) -> np.ndarray:
    """A (C,) parameter as float64, shaped to broadcast against a (N, C, ...) tensor of ``rank``."""
    p = p.astype(np.float64)
    if p.ndim == 1:
        return p.reshape(p.shape + (1,) * (rank - 2))
    return p  # (C, D1, ..., Dn): the non-spatial form of opsets 7-8, broadcasts as is


@register
class BatchNormalization(Op):
    """Inference form: Y = (X - mean) / sqrt(var + epsilon) * scale + B, with the running
    statistics given as inputs. Training mode is not supported."""
    attrs = {"epsilon": 1e-5, "momentum": 0.9, "training_mode": False}
    legacy_attrs = ("spatial", "is_test", "consumed_inputs")
    input_names = ("X", "scale", "B", "input_mean", "input_var")
    #: the importer puts the node's output count here (read and dropped by normalize)
    output_count_attr = "node_outputs"

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = dict(attrs)
        outputs = attrs.pop(cls.output_count_attr, None) or 1
        attrs = fill_defaults(cls, attrs)
        # Before opset 14 there is no flag: a node with the statistics outputs is in training mode.
        if opset < 14 and outputs > 1:
            raise UnsupportedOperatorError(
                "BatchNormalization", opset=opset,
                reason=f"the node has {outputs} outputs, which before opset 14 means training "
                "mode (batch statistics); only inference is supported. Export the model in eval "
                "mode, or drop the outputs mean, var, saved_mean, saved_var")
        if attrs["training_mode"]:
            raise UnsupportedOperatorError(
                "BatchNormalization", opset=opset,
                reason="training_mode=1 computes batch statistics; only inference "
                "(training_mode=0) is supported. Export the model in eval mode")
        attrs["training_mode"] = False
        attrs["epsilon"] = float(attrs["epsilon"])
        attrs["momentum"] = float(attrs["momentum"])
        return attrs

    @staticmethod
    def infer(x, scale, b, mean, var, epsilon=1e-5, momentum=0.9, training_mode=False):
        _require_channels_first("BatchNormalization", x, 2)
        per_channel = (x.shape[1],)
        per_activation = tuple(x.shape[1:])
        for what, t in zip(BatchNormalization.input_names[1:], (scale, b, mean, var)):
            _require_float("BatchNormalization", what, t)
            if tuple(t.shape) not in (per_channel, per_activation):
                raise ShapeError(f"BatchNormalization: {what} has shape {list(t.shape)}, expected "
                                 f"{list(per_channel)} (one value per channel of X, shape "
                                 f"{list(x.shape)}) or {list(per_activation)} (non-spatial)")
        return x

    @staticmethod
    def reference(x, scale, b, mean, var, epsilon=1e-5, momentum=0.9, training_mode=False):
        rank = x.ndim
        inv_std = 1.0 / np.sqrt(_per_channel(var, rank) + epsilon)
        centered = x.astype(np.float64) - _per_channel(mean, rank)
        y = centered * (inv_std * _per_channel(scale, rank)) + _per_channel(b, rank)
        return y.astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        # With the statistics folded into one scale and shift: a multiply-add per element.
        return 2 * sum(t.size for t in output_types if t.is_static)

    @staticmethod
    def gradient(g, node, grads):
        """Inference form: fixed statistics make Y affine in X, so dX = dY * scale / sqrt(var +
        epsilon), with dscale and dB (BatchNormGrad); the statistics, when asked for, get
        dmean = -dB * scale / sqrt(var + eps) and dvar = -dscale * scale / (2 (var + eps)).
        Training mode is training_ops.BatchNormTrain, with its own rule."""
        x, scale, _, mean, var = node.inputs
        epsilon = node.attrs["epsilon"]
        dx, dscale, db = g.op("BatchNormGrad", [grads[0], x, scale, mean, var],
                              {"epsilon": epsilon}, outputs=3)
        dmean = dvar = None
        if g.needs(node, 3) or g.needs(node, 4):
            shifted = g.op("Add", [var, g.constant(np.asarray(epsilon, var.dtype), "epsilon")])
            gain = g.op("Div", [scale, g.op("Sqrt", [shifted])])
            dmean = g.op("Neg", [g.op("Mul", [db, gain])])
            half = g.op("Div", [scale, g.scale(shifted, -2.0)])
            dvar = g.op("Mul", [dscale, half])
        return [dx, dscale, db, dmean, dvar]


@register
class InstanceNormalization(Op):
    """Y = (X - mean) / sqrt(var + epsilon) * scale + B, statistics per (n, c) over D1..Dn."""
    attrs = {"epsilon": 1e-5}
    input_names = ("input", "scale", "B")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        attrs["epsilon"] = float(attrs["epsilon"])
        return attrs

    @staticmethod
    def infer(x, scale, b, epsilon=1e-5):
        _require_channels_first("InstanceNormalization", x, 3)
        for what, t in (("scale", scale), ("B", b)):
            _require_float("InstanceNormalization", what, t)
            if tuple(t.shape) != (x.shape[1],):
                raise ShapeError(f"InstanceNormalization: {what} has shape {list(t.shape)}, "
                                 f"expected [{x.shape[1]}] (one value per channel of input, shape "
                                 f"{list(x.shape)})")
        return x

    @staticmethod
    def reference(x, scale, b, epsilon=1e-5):
        axes = tuple(range(2, x.ndim))
        x64 = x.astype(np.float64)
        centered = x64 - x64.mean(axis=axes, keepdims=True)
        var = np.mean(centered * centered, axis=axes, keepdims=True)
        y = centered / np.sqrt(var + epsilon) * _per_channel(scale, x.ndim)
        return (y + _per_channel(b, x.ndim)).astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        # mean (add), variance (subtract, multiply-add), normalise (multiply-add)
        return 6 * sum(t.size for t in output_types if t.is_static)

    @staticmethod
    def gradient(g, node, grads):
        """The statistics are X's own, so dX carries their dependence on X (InstanceNormGrad)."""
        x, scale, _ = node.inputs
        dx, dscale, db = g.op("InstanceNormGrad", [grads[0], x, scale], dict(node.attrs),
                              outputs=3)
        return [dx, dscale, db]


@register
class LRN(Op):
    """Local response normalisation across channels:
    Y = X / (bias + alpha / size * square_sum) ** beta, where square_sum[n, c] sums X[n, i] ** 2
    over max(0, c - floor((size-1)/2)) <= i <= min(C-1, c + ceil((size-1)/2))."""
    attrs = {"size": None, "alpha": 1e-4, "beta": 0.75, "bias": 1.0}
    input_names = ("X",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        if attrs["size"] is None:
            raise ModelError("LRN needs the attribute 'size'")
        if int(attrs["size"]) < 1:
            raise ModelError(f"LRN: size={attrs['size']} must be positive")
        attrs["size"] = int(attrs["size"])
        for key in ("alpha", "beta", "bias"):
            attrs[key] = float(attrs[key])
        return attrs

    @staticmethod
    def infer(x, size=None, alpha=1e-4, beta=0.75, bias=1.0):
        _require_channels_first("LRN", x, 3)
        return x

    @staticmethod
    def reference(x, size=None, alpha=1e-4, beta=0.75, bias=1.0):
        x64 = x.astype(np.float64)
        before = (size - 1) // 2
        after = size - 1 - before  # ceil((size - 1) / 2)
        pads = [(0, 0)] * x.ndim
        pads[1] = (before, after)
        padded = np.pad(x64 * x64, pads)
        square_sum = np.lib.stride_tricks.sliding_window_view(padded, size, axis=1).sum(axis=-1)
        return (x64 / (bias + (alpha / size) * square_sum) ** beta).astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, size=1, **attrs):
        # a square and size-1 adds for the window, then scale, bias, power and divide
        return (size + 4) * sum(t.size for t in output_types if t.is_static)

    @staticmethod
    def gradient(g, node, grads):
        return [g.op("LRNGrad", [grads[0], node.inputs[0]], dict(node.attrs))]
