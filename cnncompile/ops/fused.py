"""Ops of cnncompile's own that passes create: fused convolutions and elementwise chains.

Each one is defined by composing registered ops, so its reference is bit-for-bit the reference of
the ops it replaces, evaluated in the same order:

* FusedConv:  y = post(act(Conv(X, W, B)) + R)   (R and post only with ``residual``)
* FusedGemm:  y = act(Gemm(A, B, C))
* FusedElementwise: a straight-line ``program`` of elementwise ops over the node's inputs.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError, ShapeError
from ..ir.types import TensorType
from .base import OPS, Op, fill_defaults, register
from .conv import Conv
from .linalg import Gemm

#: unary ops that act on each element alone and keep the type: what a FusedConv / FusedGemm
#: epilogue may apply (only the registered ones count)
POINTWISE_UNARY = frozenset({
    "Relu", "Relu6", "Clip", "LeakyRelu", "Sigmoid", "Silu", "HardSwish", "HardSigmoid", "Tanh",
    "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Abs", "Neg",
    "Exp", "Log", "Sqrt", "Erf", "Reciprocal", "Floor", "Ceil", "Round", "Sign"})
#: ops with several inputs that combine them element by element under broadcasting
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean",
                          "PRelu"})
#: what a FusedElementwise program may contain
ELEMENTWISE = POINTWISE_UNARY | BROADCASTING

CONV_ATTRS = tuple(Conv.attrs)
GEMM_ATTRS = tuple(Gemm.attrs)


def activation_ops() -> tuple[str, ...]:
    """The pointwise unary ops registered now (Relu6 and Silu come with the activation module)."""
    return tuple(sorted(name for name in POINTWISE_UNARY if name in OPS))


def _activation_type(op: str, slot: str, name: str, attrs: dict | None,
                     y: TensorType) -> TensorType:
    """Check that ``name`` may be applied to ``y`` in place; returns y's type."""
    if not name:
        return y
    if name not in POINTWISE_UNARY or name not in OPS:
        raise ModelError(f"{op}: {slot}='{name}' is not a registered pointwise unary op (one of "
                         f"{', '.join(activation_ops())})")
    out = OPS[name].infer(y, **(attrs or {}))
    if out != y:
        raise ShapeError(f"{op}: {slot} {name} turns {y} into {out}; it must keep the type")
    return y


def _apply(name: str, attrs: dict | None, y: np.ndarray) -> np.ndarray:
    if not name:
        return y
    return np.asarray(OPS[name].reference(y, **(attrs or {})))


def _activation_flops(name: str, attrs: dict | None, y: TensorType) -> int:
    if not name:
        return 0
    return int(OPS[name].flops([y], [y], **(attrs or {})))


def _normalize_activations(op: str, attrs: dict, slots: tuple[str, ...]) -> dict:
    for slot in slots:
        attrs[slot] = attrs[slot] or ""
        attrs[f"{slot}_attrs"] = dict(attrs[f"{slot}_attrs"] or {})
        name = attrs[slot]
        if name and (name not in POINTWISE_UNARY or name not in OPS):
            raise ModelError(f"{op}: {slot}='{name}' is not a registered pointwise unary op")
        if name:
            # the epilogue op's own canonical form (defaults filled, values typed)
            attrs[f"{slot}_attrs"] = fill_defaults(OPS[name], attrs[f"{slot}_attrs"])
    return attrs


# ---- FusedConv -----------------------------------------------------------------------------------
@register
class FusedConv(Op):
    """Conv with an epilogue: y = post(act(Conv(X, W, B)) + R). Inputs (X, W, B or None, R); R is
    present exactly when ``residual`` and must have the conv output's type (no broadcasting)."""
    internal = True
    attrs = {**Conv.attrs, "activation": "", "activation_attrs": None, "residual": False,
             "post_activation": "", "post_activation_attrs": None}
    input_names = ("X", "W", "B", "R")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        conv = Conv.normalize({k: attrs[k] for k in CONV_ATTRS}, input_types[:3], opset)
        attrs.update(conv)
        attrs["residual"] = bool(attrs["residual"])
        return _normalize_activations(cls.name, attrs, ("activation", "post_activation"))

    @staticmethod
    def infer(x, w, b=None, r=None, dilations=None, group=1, kernel_shape=None, pads=None,
              strides=None, activation="", activation_attrs=None, residual=False,
              post_activation="", post_activation_attrs=None):
        y = Conv.infer(x, w, b, dilations=dilations, group=group, kernel_shape=kernel_shape,
                       pads=pads, strides=strides)
        _activation_type("FusedConv", "activation", activation, activation_attrs, y)
        if residual and r is None:
            raise ModelError("FusedConv: residual=True needs the input R")
        if not residual and r is not None:
            raise ModelError(f"FusedConv: R {r} is given but residual=False")
        if residual and r != y:
            raise ShapeError(f"FusedConv: R {r} must have the conv output's type {y} (X "
                             f"{list(x.shape)}, W {list(w.shape)}); it is added without "
                             "broadcasting")
        _activation_type("FusedConv", "post_activation", post_activation, post_activation_attrs,
                         y)
        return y

    @staticmethod
    def reference(x, w, b=None, r=None, dilations=None, group=1, kernel_shape=None, pads=None,
                  strides=None, activation="", activation_attrs=None, residual=False,
                  post_activation="", post_activation_attrs=None):
        y = Conv.reference(x, w, b, dilations=dilations, group=group, kernel_shape=kernel_shape,
                           pads=pads, strides=strides)
        y = _apply(activation, activation_attrs, y)
        if residual:
            y = OPS["Add"].reference(y, r)
        return _apply(post_activation, post_activation_attrs, y)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        y = output_types[0]
        conv_attrs = {k: attrs[k] for k in CONV_ATTRS if k in attrs}
        total = Conv.flops(input_types[:3], output_types, **conv_attrs)
        total += _activation_flops(attrs.get("activation", ""), attrs.get("activation_attrs"), y)
        if attrs.get("residual"):
            total += y.size
        total += _activation_flops(attrs.get("post_activation", ""),
                                   attrs.get("post_activation_attrs"), y)
        return total


# ---- FusedGemm -----------------------------------------------------------------------------------
@register
class FusedGemm(Op):
    """Gemm with an activation: y = act(alpha * A' @ B' + beta * C)."""
    internal = True
    attrs = {**Gemm.attrs, "activation": "", "activation_attrs": None}
    input_names = ("A", "B", "C")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        attrs.update(Gemm.normalize({k: attrs[k] for k in GEMM_ATTRS}, input_types, opset))
        return _normalize_activations(cls.name, attrs, ("activation",))

    @staticmethod
    def infer(a, b, c=None, alpha=1.0, beta=1.0, transA=False, transB=False, activation="",
              activation_attrs=None):
        y = Gemm.infer(a, b, c, alpha=alpha, beta=beta, transA=transA, transB=transB)
        return _activation_type("FusedGemm", "activation", activation, activation_attrs, y)

    @staticmethod
    def reference(a, b, c=None, alpha=1.0, beta=1.0, transA=False, transB=False, activation="",
                  activation_attrs=None):
        y = Gemm.reference(a, b, c, alpha=alpha, beta=beta, transA=transA, transB=transB)
        return _apply(activation, activation_attrs, y)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        gemm_attrs = {k: attrs[k] for k in GEMM_ATTRS if k in attrs}
        return (Gemm.flops(input_types, output_types, **gemm_attrs)
                + _activation_flops(attrs.get("activation", ""), attrs.get("activation_attrs"),
                                    output_types[0]))


# ---- FusedElementwise ----------------------------------------------------------------------------
def _operands(step: int, refs, inputs: list, temps: list) -> list:
    """Resolve a step's operand references: "in<i>" is node input i, "t<k>" step k's result."""
    out = []
    for ref in refs:
        ref = str(ref)
        kind, digits = ("in", ref[2:]) if ref.startswith("in") else (ref[:1], ref[1:])
        pool = {"in": inputs, "t": temps}.get(kind)
        if pool is None or not digits.isdigit() or int(digits) >= len(pool):
            raise ModelError(f"FusedElementwise: step {step} reads '{ref}'; operands are 'in0'.."
                             f"'in{len(inputs) - 1}' and results of earlier steps 't0'..")
        out.append(pool[int(digits)])
    return out


def _steps(program):
    if not program:
        raise ModelError("FusedElementwise needs a non-empty program")
    for index, step in enumerate(program):
        if len(step) != 3:
            raise ModelError(f"FusedElementwise: step {index} is {step!r}; expected "
                             "[op, [operands], attrs]")
        op, refs, attrs = step
        if op not in ELEMENTWISE or op not in OPS:
            raise ModelError(f"FusedElementwise: step {index} uses '{op}', which is not a "
                             "registered elementwise op")
        yield index, OPS[op], refs, attrs or {}


@register
class FusedElementwise(Op):
    """Runs ``program``, a list of steps [op, [operands], attrs]; each operand is "in<i>" (the
    node's i-th input) or "t<k>" (the result of step k); the last step's result is the output."""
    internal = True
    attrs = {"program": None}

    @staticmethod
    def infer(*types, program=None):
        temps: list[TensorType] = []
        for index, op, refs, attrs in _steps(program):
            out = op.infer(*_operands(index, refs, list(types), temps), **attrs)
            if not isinstance(out, TensorType):
                raise ModelError(f"FusedElementwise: step {index} ({op.name}) must give one "
                                 "output")
            temps.append(out)
        return temps[-1]

    @staticmethod
    def reference(*inputs, program=None):
        temps: list[np.ndarray] = []
        for index, op, refs, attrs in _steps(program):
            temps.append(np.asarray(op.reference(*_operands(index, refs, list(inputs), temps),
                                                 **attrs)))
        return temps[-1]

    @staticmethod
    def flops(input_types, output_types, program=None, **attrs):
        temps: list[TensorType] = []
        total = 0
        for index, op, refs, step_attrs in _steps(program):
            operands = _operands(index, refs, list(input_types), temps)
            out = op.infer(*operands, **step_attrs)
            total += int(op.flops(operands, [out], **step_attrs))
            temps.append(out)
        return total
