"""Training-mode forward ops, the losses, and their backward ops.

ONNX files never contain these (all are internal): ``cnncompile.autodiff.training`` puts them into
the graph it trains. BatchNormTrain normalises with batch statistics and returns them, DropoutTrain
takes its keep-mask as an input (the training module draws it from a seeded generator), and
StochasticPool (Zeiler & Fergus 2013) samples one element per window with probability proportional
to its activation, from a uniform random input. The losses reduce to a 0-d mean.

Each forward op carries its reverse-mode rule, ``gradient(g, node, grads)`` (see
``cnncompile.autodiff``); the backward kernels that have no ONNX counterpart live here too.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError, ModelError, ShapeError
from ..ir.types import FLOAT_DTYPES, TensorType
from .base import OPS, Op, register
from .conv import out_spatial, require_float, spatial_rank, windows, work_dtype


def _channel_shape(p: np.ndarray, rank: int) -> np.ndarray:
    """A (C,) vector shaped to broadcast against a (N, C, D1, ..., Dn) tensor of ``rank``."""
    return p.reshape(p.shape + (1,) * (rank - 2))


def _check_per_channel(op: str, x: TensorType, named: dict) -> None:
    for what, t in named.items():
        require_float(op, t, what)
        if tuple(t.shape) != (x.shape[1],):
            raise ShapeError(f"{op}: {what} has shape {list(t.shape)}, expected [{x.shape[1]}] "
                             f"(one value per channel of X, shape {list(x.shape)})")


def _channel_sum(x: np.ndarray) -> np.ndarray:
    """Per-channel sum over N and the spatial axes, accumulated in float64."""
    return x.sum(axis=(0,) + tuple(range(2, x.ndim)), dtype=np.float64)


def _centered(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X - batch mean) in the working dtype, the mean and the biased variance (float64).

    Elementwise work stays in X's precision (float32 for float16) and only the sums are float64:
    a training step runs these on every activation, so they must cost a few passes, not a float64
    copy of everything; subtracting the mean first keeps the variance free of cancellation."""
    work = x.astype(work_dtype(x.dtype), copy=False)
    count = x.size // x.shape[1]
    mean = _channel_sum(work) / count
    centered = work - _channel_shape(mean.astype(work.dtype), x.ndim)
    var = _channel_sum(centered * centered) / count
    return centered, mean, var


# ---- BatchNormalization, training mode -----------------------------------------------------------
@register
class BatchNormTrain(Op):
    """Y = (X - mean) / sqrt(var + epsilon) * scale + B with the batch's mean and (biased) variance
    over N and the spatial axes; returns [Y, batch_mean, batch_var]. ``momentum`` is the ONNX node's
    (running = momentum * running + (1 - momentum) * batch); the training module applies it."""
    attrs = {"epsilon": 1e-5, "momentum": 0.9}
    input_names = ("X", "scale", "B")
    internal = True

    @staticmethod
    def infer(x, scale, b, epsilon=1e-5, momentum=0.9):
        require_float("BatchNormTrain", x)
        if x.rank < 2:
            raise ShapeError(f"BatchNormTrain takes a tensor (N, C, D1, ...) of rank 2 or more, "
                             f"got shape {list(x.shape)}")
        _check_per_channel("BatchNormTrain", x, {"scale": scale, "B": b})
        stats = TensorType(x.dtype, (x.shape[1],))
        return [x, stats, stats]

    @staticmethod
    def reference(x, scale, b, epsilon=1e-5, momentum=0.9):
        centered, mean, var = _centered(x)
        gain = _channel_shape(scale / np.sqrt(var + epsilon), x.ndim).astype(centered.dtype)
        centered *= gain
        centered += _channel_shape(b, x.ndim).astype(centered.dtype)
        return centered.astype(x.dtype, copy=False), mean.astype(x.dtype), var.astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        # mean (add), variance (subtract, multiply-add), normalise (multiply-add)
        return 6 * input_types[0].size if input_types[0].is_static else 0

    @staticmethod
    def gradient(g, node, grads):
        dy, dmean, dvar = (list(grads) + [None, None])[:3]
        if dy is None and dmean is None and dvar is None:
            return [None, None, None]
        x, scale, _ = node.inputs
        mean, var = node.outputs[1], node.outputs[2]
        if dy is None:
            dy = g.constant(np.zeros(x.shape, x.dtype), "zero")
        inputs = [dy, x, scale, mean, var]
        if dmean is not None or dvar is not None:
            zeros = g.constant(np.zeros(mean.shape, x.dtype), "zero")
            inputs += [dmean if dmean is not None else zeros, dvar if dvar is not None else zeros]
        dx, dscale, db = g.op("BatchNormTrainGrad", inputs, {"epsilon": node.attrs["epsilon"]},
                              outputs=3)
        return [dx, dscale, db]


@register
class BatchNormTrainGrad(Op):
    """The backward of BatchNormTrain: (dY, X, scale, mean, var[, dmean, dvar]) -> dX, dscale, dB.

    With xhat = (X - mean) / sqrt(var + eps) and M elements per channel:
    dB = sum dY, dscale = sum dY * xhat, dX = scale / sqrt(var + eps) * (dY - dB / M - xhat *
    dscale / M), plus dmean / M + dvar * 2 (X - mean) / M when the statistics get gradients.

    With ``activation`` (set by fuse_activation_grad), dY is first taken through that pointwise
    op's gradient as ActivationGrad(dY, V) would (``activation_attrs``, ``at`` as there): the
    BatchNorm -> ReLU of a training graph computes its gradients in one pass."""
    attrs = {"epsilon": 1e-5, "activation": "", "activation_attrs": None, "at": "X"}
    input_names = ("dY", "X", "scale", "mean", "var", "dmean", "dvar", "V")
    internal = True

    @staticmethod
    def infer(dy, x, scale, mean, var, dmean=None, dvar=None, v=None, epsilon=1e-5,
              activation="", activation_attrs=None, at="X"):
        require_float("BatchNormTrainGrad", x)
        if dy.shape != x.shape or dy.dtype != x.dtype:
            raise ShapeError(f"BatchNormTrainGrad: dY is {dy}, X is {x}; they must agree")
        if activation:
            if v is None:
                raise ShapeError(f"BatchNormTrainGrad: activation {activation} needs its V input")
            OPS["ActivationGrad"].infer(dy, v, activation, activation_attrs, at)
        named = {"scale": scale, "mean": mean, "var": var}
        named.update({k: t for k, t in (("dmean", dmean), ("dvar", dvar)) if t is not None})
        _check_per_channel("BatchNormTrainGrad", x, named)
        return [x, scale, scale]

    @staticmethod
    def reference(dy, x, scale, mean, var, dmean=None, dvar=None, v=None, epsilon=1e-5,
                  activation="", activation_attrs=None, at="X"):
        if activation:
            dy = OPS["ActivationGrad"].reference(dy, v, activation, activation_attrs, at)
        rank = x.ndim
        work = work_dtype(x.dtype)
        count = x.size // x.shape[1]
        inv_std = 1.0 / np.sqrt(var.astype(np.float64) + epsilon)
        centered = x.astype(work) - _channel_shape(mean.astype(work), rank)
        d = dy.astype(work, copy=False)
        db = _channel_sum(d)
        dscale = _channel_sum(d * centered) * inv_std
        # dX = gain * (dY - dB / M - xhat * dscale / M), xhat = centered * inv_std, written as
        # dY * gain + centered * k + c per channel: three passes over the tensor
        gain = scale.astype(np.float64) * inv_std
        k = -gain * dscale * inv_std / count
        c = -gain * db / count
        if dmean is not None:
            c = c + dmean.astype(np.float64) / count
        if dvar is not None:
            k = k + 2.0 * dvar.astype(np.float64) / count
        dx = d * _channel_shape(gain.astype(work), rank)
        centered *= _channel_shape(k.astype(work), rank)
        dx += centered
        dx += _channel_shape(c.astype(work), rank)
        return dx.astype(x.dtype, copy=False), dscale.astype(scale.dtype), db.astype(scale.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        # xhat (2), two reductions (1 + 2), the input gradient (4) per element
        return 9 * input_types[1].size if input_types[1].is_static else 0


# ---- Dropout, training mode ----------------------------------------------------------------------
def _keep_scale(ratio: float) -> float:
    # ratio 1 drops everything; PyTorch returns zeros then rather than dividing by zero
    return 0.0 if ratio >= 1.0 else 1.0 / (1.0 - ratio)


@register
class DropoutTrain(Op):
    """Y = X * mask / (1 - ratio): the keep-mask (bool, X's shape) is an input, so a run is
    deterministic and the training module owns the random generator."""
    attrs = {"ratio": 0.5}
    input_names = ("X", "mask")
    internal = True
    foldable = False

    @staticmethod
    def infer(x, mask, ratio=0.5):
        require_float("DropoutTrain", x)
        if mask.dtype != np.bool_ or tuple(mask.shape) != tuple(x.shape):
            raise ShapeError(f"DropoutTrain: mask is {mask}; it must be a bool tensor of X's shape "
                             f"{list(x.shape)}")
        if not 0.0 <= ratio <= 1.0:
            raise ModelError(f"DropoutTrain: ratio={ratio} must lie in [0, 1]")
        return x

    @staticmethod
    def reference(x, mask, ratio=0.5):
        return (x * mask * x.dtype.type(_keep_scale(ratio))).astype(x.dtype, copy=False)

    @staticmethod
    def gradient(g, node, grads):
        if grads[0] is None:
            return [None, None]
        # linear in X with the same mask: the backward is the same op
        return [g.op("DropoutTrain", [grads[0], node.inputs[1]], dict(node.attrs)), None]


# ---- stochastic pooling --------------------------------------------------------------------------
def _pool_geometry(x_shape, kernel_shape, strides, dilations, pads, ceil_mode):
    rank = len(x_shape) - 2
    strides = strides or [1] * rank
    dilations = dilations or [1] * rank
    pads = pads or [0] * (2 * rank)
    out = out_spatial("StochasticPool", TensorType(np.float32, x_shape), kernel_shape, strides,
                      dilations, pads, bool(ceil_mode))
    return strides, dilations, pads, out


def _tap_indices(x_shape, kernel_shape, strides, dilations, pads, out) -> np.ndarray:
    """(N, C, *out, prod(kernel)): the flat index into X of every window tap, -1 on padding."""
    flat = np.arange(math.prod(x_shape), dtype=np.int64).reshape(x_shape)
    taps = windows(flat, kernel_shape, strides, dilations, pads, out, value=-1)
    return taps.reshape(*taps.shape[:len(x_shape)], -1)


def _window_weights(x, kernel_shape, strides, dilations, pads, out):
    """Per window tap, max(X, 0) in float64 (the sampling weights) and X itself."""
    x64 = x.astype(np.float64)
    view = windows(x64, kernel_shape, strides, dilations, pads, out)
    values = view.reshape(*view.shape[:x.ndim], -1)
    return np.maximum(values, 0.0), values


class _StochasticPoolBase(Op):
    attrs = {"kernel_shape": None, "strides": None, "pads": None, "dilations": None,
             "ceil_mode": 0, "training": True}
    internal = True
    foldable = False

    @staticmethod
    def flops(input_types, output_types, **attrs):
        # per tap: a weight, a running sum and a compare (or a multiply-add at inference)
        y = output_types[0]
        return 3 * y.size * math.prod(attrs.get("kernel_shape") or [1]) if y.is_static else 0


@register
class StochasticPool(_StochasticPoolBase):
    """Stochastic pooling (Zeiler & Fergus 2013) over windows given as MaxPool's attributes.

    The weights of a window are max(X, 0). Training: U (uniform in [0, 1), Y's shape) picks tap k
    with probability weight_k / sum(weights); returns [Y, Indices] with Indices the flat index into
    X of the picked element. Inference: Y = sum(weight_k * X_k) / sum(weights), the expectation.
    A window without a positive activation gives 0 (Indices -1) and passes no gradient."""
    input_names = ("X", "U")

    @staticmethod
    def infer(x, u=None, kernel_shape=None, strides=None, pads=None, dilations=None, ceil_mode=0,
              training=True):
        require_float("StochasticPool", x)
        rank = spatial_rank("StochasticPool", x)
        if kernel_shape is None or len(kernel_shape) != rank:
            raise ModelError(f"StochasticPool: kernel_shape={kernel_shape} needs {rank} values "
                             f"for X of shape {list(x.shape)}")
        _, _, _, out = _pool_geometry(x.shape, kernel_shape, strides, dilations, pads, ceil_mode)
        y = TensorType(x.dtype, (*x.shape[:2], *out))
        if not training:
            return y
        if u is None or u.dtype not in FLOAT_DTYPES or tuple(u.shape) != tuple(y.shape):
            raise ShapeError(f"StochasticPool (training): U is {u}; it must be a float tensor of "
                             f"the output's shape {list(y.shape)} (X has shape {list(x.shape)})")
        return [y, TensorType(np.int64, y.shape)]

    @staticmethod
    def reference(x, u=None, kernel_shape=None, strides=None, pads=None, dilations=None,
                  ceil_mode=0, training=True):
        strides, dilations, pads, out = _pool_geometry(x.shape, kernel_shape, strides, dilations,
                                                       pads, ceil_mode)
        weights, values = _window_weights(x, kernel_shape, strides, dilations, pads, out)
        total = weights.sum(axis=-1)
        if not training:
            with np.errstate(invalid="ignore", divide="ignore"):
                y = np.where(total > 0, (weights * values).sum(axis=-1) / total, 0.0)
            return y.astype(x.dtype)
        cumulative = np.cumsum(weights, axis=-1)
        threshold = u.astype(np.float64) * total
        # the first tap whose cumulative weight exceeds u * total; zero-weight taps never qualify
        pick = (cumulative <= threshold[..., None]).sum(axis=-1)
        pick = np.minimum(pick, weights.shape[-1] - 1)[..., None]
        taps = _tap_indices(x.shape, kernel_shape, strides, dilations, pads, out)
        found = total > 0
        indices = np.where(found, np.take_along_axis(taps, pick, axis=-1)[..., 0], -1)
        y = np.where(found, np.take_along_axis(values, pick, axis=-1)[..., 0], 0.0)
        return y.astype(x.dtype), indices

    @staticmethod
    def gradient(g, node, grads):
        dy = grads[0]
        if dy is None:
            return [None] * len(node.inputs)
        attrs = dict(node.attrs)
        inputs = [dy, node.inputs[0]]
        if attrs["training"]:
            inputs.append(node.outputs[1])
        return [g.op("StochasticPoolGrad", inputs, attrs)] + [None] * (len(node.inputs) - 1)


@register
class StochasticPoolGrad(_StochasticPoolBase):
    """The backward of StochasticPool: (dY, X[, Indices]) -> dX. Training routes dY to the sampled
    element; inference differentiates y = sum(w^2) / sum(w), w = max(X, 0):
    dy/dx_k = (2 w_k - y) / sum(w) where x_k > 0, 0 elsewhere."""
    input_names = ("dY", "X", "Indices")

    @staticmethod
    def infer(dy, x, indices=None, kernel_shape=None, strides=None, pads=None, dilations=None,
              ceil_mode=0, training=True):
        y = StochasticPool.infer(x, None, kernel_shape, strides, pads, dilations, ceil_mode,
                                 training=False)
        if dy.dtype != x.dtype or tuple(dy.shape) != tuple(y.shape):
            raise ShapeError(f"StochasticPoolGrad: dY is {dy}, expected {y} for X {x}")
        if training and (indices is None or indices.dtype != np.int64
                         or tuple(indices.shape) != tuple(y.shape)):
            raise ShapeError(f"StochasticPoolGrad (training): Indices is {indices}, expected "
                             f"int64 of shape {list(y.shape)}")
        return x

    @staticmethod
    def reference(dy, x, indices=None, kernel_shape=None, strides=None, pads=None, dilations=None,
                  ceil_mode=0, training=True):
        dy64 = dy.astype(np.float64)
        if training:
            keep = indices >= 0
            dx = np.bincount(indices[keep], weights=dy64[keep], minlength=x.size)
            return dx.reshape(x.shape).astype(x.dtype)
        strides, dilations, pads, out = _pool_geometry(x.shape, kernel_shape, strides, dilations,
                                                       pads, ceil_mode)
        weights, _ = _window_weights(x, kernel_shape, strides, dilations, pads, out)
        total = weights.sum(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            y = (weights * weights).sum(axis=-1, keepdims=True) / total
            per_tap = np.where(weights > 0, (2.0 * weights - y) / total, 0.0) * dy64[..., None]
        taps = _tap_indices(x.shape, kernel_shape, strides, dilations, pads, out)
        keep = taps >= 0
        dx = np.bincount(taps[keep], weights=per_tap[keep], minlength=x.size)
        return dx.reshape(x.shape).astype(x.dtype)


# ---- losses --------------------------------------------------------------------------------------
def _scalar(dtype) -> TensorType:
    return TensorType(dtype, ())


def _check_pair(op: str, pred: TensorType, target: TensorType) -> None:
    require_float(op, pred, "prediction")
    if target.dtype != pred.dtype or tuple(target.shape) != tuple(pred.shape):
        raise ShapeError(f"{op}: target is {target}, expected {pred} (the prediction's dtype and "
                         "shape)")


def _count(shape) -> int:
    return max(math.prod(shape), 1)


def _check_labels(scores: np.ndarray, labels: np.ndarray) -> None:
    classes = scores.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise InputError(f"class labels must lie in [0, {classes}) for scores of shape "
                         f"{list(scores.shape)}; got values from {labels.min()} to {labels.max()}")


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    s64 = scores.astype(np.float64)
    shifted = s64 - s64.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@register
class SoftmaxCrossEntropy(Op):
    """Mean over N (and any spatial axes) of -log softmax(scores)[label], softmax over axis 1:
    scores (N, C, D1, ...) float, labels (N, D1, ...) integer class indices. A 0-d result."""
    input_names = ("scores", "labels")
    internal = True

    @staticmethod
    def infer(scores, labels):
        require_float("SoftmaxCrossEntropy", scores, "scores")
        want = (scores.shape[0],) + tuple(scores.shape[2:]) if scores.rank >= 2 else None
        if want is None or labels.dtype.kind not in "iu" or tuple(labels.shape) != want:
            raise ShapeError(f"SoftmaxCrossEntropy: scores {scores} need integer labels of shape "
                             f"{list(want) if want else '(N, ...)'}, got {labels}")
        return _scalar(scores.dtype)

    @staticmethod
    def reference(scores, labels):
        _check_labels(scores, labels)
        logp = _log_softmax(scores)
        picked = np.take_along_axis(logp, labels.astype(np.int64)[:, None], axis=1)
        return np.asarray(-picked.mean(), dtype=scores.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 5 * input_types[0].size if input_types[0].is_static else 0

    @staticmethod
    def gradient(g, node, grads):
        if grads[0] is None:
            return [None, None]
        scores, labels = node.inputs
        return [g.op("SoftmaxCrossEntropyGrad", [grads[0], scores, labels]), None]


@register
class SoftmaxCrossEntropyGrad(Op):
    """(dLoss, scores, labels) -> dscores = (softmax(scores) - onehot(labels)) * dLoss / count."""
    input_names = ("dLoss", "scores", "labels")
    internal = True

    @staticmethod
    def infer(dloss, scores, labels):
        SoftmaxCrossEntropy.infer(scores, labels)
        if dloss.rank != 0:
            raise ShapeError(f"SoftmaxCrossEntropyGrad: dLoss must be 0-d, got {dloss}")
        return scores

    @staticmethod
    def reference(dloss, scores, labels):
        _check_labels(scores, labels)
        grad = np.exp(_log_softmax(scores))
        onehot = np.take_along_axis(grad, labels.astype(np.int64)[:, None], axis=1) - 1.0
        np.put_along_axis(grad, labels.astype(np.int64)[:, None], onehot, axis=1)
        scale = float(dloss) / _count(labels.shape)
        return (grad * scale).astype(scores.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 6 * output_types[0].size if output_types[0].is_static else 0


@register
class MeanSquaredError(Op):
    """mean((prediction - target) ** 2) over every element; a 0-d result."""
    input_names = ("prediction", "target")
    internal = True

    @staticmethod
    def infer(pred, target):
        _check_pair("MeanSquaredError", pred, target)
        return _scalar(pred.dtype)

    @staticmethod
    def reference(pred, target):
        diff = pred.astype(np.float64) - target.astype(np.float64)
        return np.asarray(np.mean(diff * diff), dtype=pred.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 3 * input_types[0].size if input_types[0].is_static else 0

    @staticmethod
    def gradient(g, node, grads):
        if grads[0] is None:
            return [None, None]
        pred, target = node.inputs
        scale = g.constant(np.asarray(2.0 / _count(pred.shape), pred.dtype), "mse.scale")
        # the target is data (the labels input): it gets no gradient
        return [g.op("Mul", [g.op("Sub", [pred, target]), g.op("Mul", [grads[0], scale])]), None]


@register
class BinaryCrossEntropyWithLogits(Op):
    """mean(max(x, 0) - x * t + log(1 + exp(-|x|))) over every element, the numerically stable
    form of -t log sigmoid(x) - (1 - t) log(1 - sigmoid(x)); a 0-d result."""
    input_names = ("logits", "target")
    internal = True

    @staticmethod
    def infer(logits, target):
        _check_pair("BinaryCrossEntropyWithLogits", logits, target)
        return _scalar(logits.dtype)

    @staticmethod
    def reference(logits, target):
        x = logits.astype(np.float64)
        t = target.astype(np.float64)
        loss = np.maximum(x, 0.0) - x * t + np.log1p(np.exp(-np.abs(x)))
        return np.asarray(loss.mean(), dtype=logits.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 6 * input_types[0].size if input_types[0].is_static else 0

    @staticmethod
    def gradient(g, node, grads):
        if grads[0] is None:
            return [None, None]
        logits, target = node.inputs
        scale = g.constant(np.asarray(1.0 / _count(logits.shape), logits.dtype), "bce.scale")
        diff = g.op("Sub", [g.op("Sigmoid", [logits]), target])
        return [g.op("Mul", [diff, g.op("Mul", [grads[0], scale])]), None]


__all__ = ["BatchNormTrain", "BatchNormTrainGrad", "DropoutTrain", "StochasticPool",
           "StochasticPoolGrad", "SoftmaxCrossEntropy", "SoftmaxCrossEntropyGrad",
           "MeanSquaredError", "BinaryCrossEntropyWithLogits"]
