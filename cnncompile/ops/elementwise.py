"""Elementwise arithmetic with ONNX (NumPy) broadcasting, variadic Sum/Max/Min/Mean, Identity,
Dropout (inference) and Cast."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from ..errors import ModelError, ShapeError, UnsupportedOperatorError
from ..ir.types import FLOAT8_DTYPES, FLOAT_DTYPES, SUPPORTED_DTYPES, TensorType
from .base import Op, broadcast_shapes, fill_defaults, register


def _same_dtype(op: str, types) -> np.dtype:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise ShapeError(f"{op} needs inputs of one dtype, got "
                         + ", ".join(f"{t}" for t in types))
    return dtypes.pop()


def _broadcast_infer(op: str, types) -> TensorType:
    return TensorType(_same_dtype(op, types), broadcast_shapes(*[t.shape for t in types]))


def _binary(name: str, fn, doc: str):
    def infer(a, b):
        return _broadcast_infer(name, [a, b])

    def reference(a, b):
        return np.asarray(fn(a, b)).astype(a.dtype, copy=False)

    cls = type(name, (Op,), {"name": name, "__doc__": doc, "input_names": ("A", "B"),
                             "infer": staticmethod(infer), "reference": staticmethod(reference)})
    return register(cls)


def _int_div(a, b):
    if not np.issubdtype(a.dtype, np.integer):
        return np.divide(a, b)
    # ONNX integer Div truncates toward zero (C semantics), NumPy floors: round the floored
    # quotient up where the division is inexact and the signs differ. Staying in integers keeps
    # int64 exact beyond 2**53.
    with np.errstate(all="ignore"):  # x / 0 and INT_MIN / -1 are undefined in ONNX too
        quotient = np.floor_divide(a, b)
        inexact = np.remainder(a, b) != 0
    if np.issubdtype(a.dtype, np.signedinteger):
        quotient = np.where(inexact & ((a < 0) != (b < 0)), quotient + 1, quotient)
    return quotient.astype(a.dtype)


Add = _binary("Add", np.add, "A + B")
Sub = _binary("Sub", np.subtract, "A - B")
Mul = _binary("Mul", np.multiply, "A * B")
Div = _binary("Div", _int_div, "A / B (integers truncate toward zero)")


# ---- gradient rules (cnncompile/autodiff/grad.py walks them; docs/AUTODIFF.md) -------------------
def pointwise_rule(at: str = "X"):
    """The rule of a pointwise unary op: dX = dY * f'(V), by grad_ops.ActivationGrad, whose table
    writes f' in terms of the op's input X or its output Y (``at``, fixed per op there)."""
    def gradient(g, node, grads):
        value = g.input_value(node, 0) if at == "X" else g.output_value(node, 0)
        return [g.op("ActivationGrad", [grads[0], value],
                     {"activation": node.op, "activation_attrs": dict(node.attrs), "at": at})]
    return staticmethod(gradient)


def _add_gradient(g, node, grads):
    a, b = node.inputs
    return [g.sum_to(grads[0], a), g.sum_to(grads[0], b)]


def _sub_gradient(g, node, grads):
    a, b = node.inputs
    negated = g.op("Neg", [grads[0]]) if g.needs(node, 1) else None
    return [g.sum_to(grads[0], a), g.sum_to(negated, b) if negated is not None else None]


def _mul_gradient(g, node, grads):
    a, b = node.inputs
    da = g.sum_to(g.op("Mul", [grads[0], b]), a) if g.needs(node, 0) else None
    db = g.sum_to(g.op("Mul", [grads[0], a]), b) if g.needs(node, 1) else None
    return [da, db]


def _div_gradient(g, node, grads):
    # d(a / b)/db = -(a / b) / b: the output stands in for a
    a, b = node.inputs
    da = g.sum_to(g.op("Div", [grads[0], b]), a) if g.needs(node, 0) else None
    db = None
    if g.needs(node, 1):
        quotient = g.op("Div", [g.op("Mul", [grads[0], node.outputs[0]]), b])
        db = g.sum_to(g.op("Neg", [quotient]), b)
    return [da, db]


Add.gradient = staticmethod(_add_gradient)
Sub.gradient = staticmethod(_sub_gradient)
Mul.gradient = staticmethod(_mul_gradient)
Div.gradient = staticmethod(_div_gradient)


@register
class Pow(Op):
    """X ** Y; Y may have another dtype than X (opset 12+). The result has X's dtype."""
    input_names = ("X", "Y")

    @staticmethod
    def infer(x, y):
        return TensorType(x.dtype, broadcast_shapes(x.shape, y.shape))

    @staticmethod
    def reference(x, y):
        if np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer):
            return np.power(x, y).astype(x.dtype)
        return np.power(x.astype(np.float64), y.astype(np.float64)).astype(x.dtype)

    @staticmethod
    def gradient(g, node, grads):
        """dX = dZ Y X^(Y-1), dY = dZ X^Y log X, each summed to its input's shape (PowGrad)."""
        dx, dy = g.op("PowGrad", [grads[0], *node.inputs], outputs=2)
        return [dx, dy]


def _unary(name: str, fn, doc: str, floats_only: bool = True):
    def infer(x):
        if floats_only and x.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"{name} takes a floating-point tensor, got {x}")
        return x

    def reference(x):
        return np.asarray(fn(x)).astype(x.dtype, copy=False)

    cls = type(name, (Op,), {"name": name, "__doc__": doc, "input_names": ("X",),
                             "infer": staticmethod(infer), "reference": staticmethod(reference)})
    return register(cls)


def _erf(x):
    # math.erf is exact to double precision; vectorise it (scipy is not a dependency).
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))


Sqrt = _unary("Sqrt", np.sqrt, "square root")
Exp = _unary("Exp", np.exp, "e ** x")
Erf = _unary("Erf", _erf, "the error function")
Reciprocal = _unary("Reciprocal", np.reciprocal, "1 / x")
Floor = _unary("Floor", np.floor, "round down")
Ceil = _unary("Ceil", np.ceil, "round up")
Neg = _unary("Neg", np.negative, "-x", floats_only=False)
Abs = _unary("Abs", np.abs, "|x|", floats_only=False)
Sqrt.gradient = pointwise_rule("Y")
Exp.gradient = pointwise_rule("Y")
Erf.gradient = pointwise_rule("X")
Reciprocal.gradient = pointwise_rule("Y")
Abs.gradient = pointwise_rule("X")
# Floor and Ceil are flat almost everywhere: no gradient flows through them.
Floor.gradient = Ceil.gradient = staticmethod(lambda g, node, grads: [None])
Neg.gradient = staticmethod(lambda g, node, grads: [g.op("Neg", [grads[0]])])


def _variadic(name: str, fn, doc: str):
    def infer(*types):
        if not types:
            raise ModelError(f"{name} needs at least one input")
        return _broadcast_infer(name, types)

    def reference(*arrays):
        out = arrays[0]
        for a in arrays[1:]:
            out = fn(out, a)
        if name == "Mean":
            out = out / len(arrays)
        return np.asarray(out).astype(arrays[0].dtype, copy=False)

    cls = type(name, (Op,), {"name": name, "__doc__": doc, "infer": staticmethod(infer),
                             "reference": staticmethod(reference)})
    return register(cls)


Sum = _variadic("Sum", np.add, "elementwise sum of all inputs")
Max = _variadic("Max", np.maximum, "elementwise maximum of all inputs")
Min = _variadic("Min", np.minimum, "elementwise minimum of all inputs")
Mean = _variadic("Mean", np.add, "elementwise mean of all inputs")


def _sum_gradient(g, node, grads):
    return [g.sum_to(grads[0], x) for x in node.inputs]


def _mean_gradient(g, node, grads):
    share = g.scale(grads[0], 1.0 / len(node.inputs))
    return [g.sum_to(share, x) for x in node.inputs]


def _extremum_gradient(g, node, grads):
    """dY goes to the inputs that equal the result (ExtremumGrad splits ties evenly)."""
    if len(node.inputs) == 1:
        return [grads[0]]
    return g.op("ExtremumGrad", [grads[0], node.outputs[0], *node.inputs],
                outputs=len(node.inputs))


Sum.gradient = staticmethod(_sum_gradient)
Mean.gradient = staticmethod(_mean_gradient)
Max.gradient = Min.gradient = staticmethod(_extremum_gradient)


@register
class Identity(Op):
    input_names = ("input",)

    @staticmethod
    def infer(x):
        return x

    @staticmethod
    def reference(x):
        return x

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 0

    @staticmethod
    def gradient(g, node, grads):
        return [grads[0]]


@register
class Dropout(Op):
    """Inference only: the output is the input, the mask all ones (nothing is dropped).

    The mask is bool from opset 10 on and has the input's dtype before (``mask_dtype``)."""
    attrs = {"ratio": 0.5, "training_mode": False, "seed": None, "mask_dtype": "bool"}
    legacy_attrs = ("is_test", "consumed_inputs")
    lift_inputs = {1: "ratio", 2: "training_mode"}
    input_names = ("data", "ratio", "training_mode")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        if attrs["training_mode"]:
            raise UnsupportedOperatorError("Dropout", reason="training_mode=True is a training "
                                           "op; export the model in eval/inference mode")
        attrs["training_mode"] = False
        attrs["ratio"] = float(attrs["ratio"])
        attrs["mask_dtype"] = "bool" if opset >= 10 else input_types[0].dtype.name
        return attrs

    @staticmethod
    def infer(x, ratio=0.5, training_mode=False, seed=None, mask_dtype="bool"):
        return [x, TensorType(np.dtype(mask_dtype), x.shape)]

    @staticmethod
    def reference(x, ratio=0.5, training_mode=False, seed=None, mask_dtype="bool"):
        return x, np.ones(x.shape, dtype=np.dtype(mask_dtype))

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 0

    @staticmethod
    def gradient(g, node, grads):
        """Inference Dropout passes X through (training uses training_ops.DropoutTrain)."""
        return [grads[0]] + [None] * (len(node.inputs) - 1)


@register
class Cast(Op):
    """Convert to the dtype named by ``to`` (canonical form: a NumPy dtype name, e.g. 'float32')."""
    attrs = {"to": None, "saturate": True}
    legacy_attrs = ("round_mode",)
    input_names = ("input",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        from ..frontend.onnx_import import onnx_dtype
        attrs = fill_defaults(cls, attrs)
        to = attrs["to"]
        if to is None:
            raise ModelError("Cast needs the attribute 'to'")
        if isinstance(to, str):
            dtype = np.dtype(to)
            if dtype not in SUPPORTED_DTYPES:
                raise ModelError(f"Cast to {to} is not supported")
        else:
            dtype = onnx_dtype(int(to), "Cast 'to'")
        attrs["to"] = dtype.name
        attrs["saturate"] = bool(attrs["saturate"])
        return attrs

    @staticmethod
    def infer(x, to, saturate=True):
        return TensorType(np.dtype(to), x.shape)

    @staticmethod
    def reference(x, to, saturate=True):
        dtype = np.dtype(to)
        if saturate and dtype in FLOAT8_DTYPES and x.dtype.kind == "f":
            # Saturation (the default since opset 19) clamps out-of-range values, infinities
            # included, to the largest finite float8; a plain conversion would give NaN or inf.
            top = float(ml_dtypes.finfo(dtype).max)
            x = np.where(np.isnan(x), x, np.clip(x.astype(np.float64), -top, top))
        return x.astype(dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 0

    @staticmethod
    def gradient(g, node, grads):
        """Float to float: the gradient cast back; a cast to or from integers passes none."""
        x = node.inputs[0]
        if grads[0] is None or x.dtype not in FLOAT_DTYPES:
            return [None]
        return [g.op("Cast", [grads[0]], {"to": x.dtype.name, "saturate": True})]
