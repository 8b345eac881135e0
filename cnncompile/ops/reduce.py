"""Reductions: ReduceMean.

Canonical attributes: ``axes``, an explicit sorted list of non-negative axes (an empty list means
no reduction: the identity), and ``keepdims``, a bool. Opsets before 18 give axes as an attribute,
later ones as an optional constant input; a missing or empty axes means every axis unless
``noop_with_empty_axes`` (opset 18) asks for the identity. ``normalize`` resolves that flag.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError, ShapeError
from ..ir.types import FLOAT_DTYPES, TensorType
from .base import Op, fill_defaults, normalize_axis, register


def _canonical_axes(op: str, axes, rank: int, noop_with_empty_axes: bool) -> list[int]:
    if axes is None:
        axes = []
    axes = np.asarray(axes)
    if axes.ndim > 1:
        raise ShapeError(f"{op}: axes must be a list of integers, got shape {list(axes.shape)}")
    if axes.size and not np.issubdtype(axes.dtype, np.integer):
        raise ModelError(f"{op}: axes must be integers, got {axes.tolist()}")
    axes = [int(a) for a in axes.reshape(-1)]
    if not axes:
        return [] if noop_with_empty_axes else list(range(rank))
    canonical = [normalize_axis(a, rank, f"{op} axis") for a in axes]
    if len(set(canonical)) != len(canonical):
        raise ModelError(f"{op}: axes {axes} name an axis twice (tensor of rank {rank})")
    return sorted(canonical)


def _reduced_shape(shape: tuple, axes: list, keepdims: bool) -> tuple:
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


@register
class ReduceMean(Op):
    attrs = {"axes": None, "keepdims": True}
    lift_inputs = {1: "axes"}
    input_names = ("data", "axes")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = dict(attrs)
        noop = bool(attrs.pop("noop_with_empty_axes", False))
        attrs = fill_defaults(cls, attrs)
        attrs["axes"] = _canonical_axes(cls.name, attrs["axes"], input_types[0].rank, noop)
        attrs["keepdims"] = bool(attrs["keepdims"])
        return attrs

    @staticmethod
    def infer(x, axes=None, keepdims=True):
        if x.dtype == np.bool_:
            raise ShapeError(f"ReduceMean takes a numeric tensor, got {x}")
        if axes is None:
            axes = list(range(x.rank))
        for axis in axes:
            normalize_axis(axis, x.rank, "ReduceMean axis")
        return TensorType(x.dtype, _reduced_shape(x.shape, axes, keepdims))

    @staticmethod
    def reference(x, axes=None, keepdims=True):
        axes = tuple(range(x.ndim)) if axes is None else tuple(axes)
        if x.dtype in FLOAT_DTYPES:
            return np.mean(x.astype(np.float64), axis=axes, keepdims=keepdims).astype(x.dtype)
        # Integers: an exact sum, then division truncated toward zero (onnxruntime's int mean).
        wide = np.int64 if np.issubdtype(x.dtype, np.signedinteger) else np.uint64
        total = np.sum(x, axis=axes, dtype=wide, keepdims=keepdims)
        count = max(int(np.prod([x.shape[a] for a in axes], dtype=np.int64)), 1)
        quotient = np.abs(total) // count
        return np.where(total < 0, -quotient, quotient).astype(x.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        # one add per input element, one divide per output element
        return sum(t.size for t in input_types[:1] if t.is_static) + output_types[0].size

    @staticmethod
    def gradient(g, node, grads):
        """Each input element gets dY / (the number of elements averaged), broadcast back."""
        x = node.inputs[0]
        axes = node.attrs["axes"]
        axes = range(x.type.rank) if axes is None else axes
        kept = [1 if i in axes else d for i, d in enumerate(x.shape)]
        count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
        share = g.scale(g.reshape(grads[0], kept), 1.0 / max(count, 1))
        return [g.broadcast_to(share, x.shape)]
