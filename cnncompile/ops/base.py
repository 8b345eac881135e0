"""What an op is, and the registry of them.

An op is one class that holds everything cnncompile knows about one ONNX operator:

* ``attrs``: the canonical attributes and their defaults (after ``normalize``, every node carries all
  of them, so later stages never look up a default);
* ``lift_inputs``: inputs that newer opsets pass as tensors but that must be compile-time constants
  (Reshape's shape, Clip's min/max, Resize's scales...). The frontend moves them into attributes, so one
  canonical form serves every opset;
* ``normalize``: opset- and shape-dependent attribute rewriting (auto_pad -> explicit pads, ...);
* ``infer``: the shape and dtype rule;
* ``reference``: the NumPy reference implementation, the semantics every backend is tested against;
* ``flops``: the arithmetic cost, for ``cnncompile info`` and the cost models;
* later, ``gradient``: the reverse-mode rule.

Adding an op means writing one such class in the family module under ``ops/`` and decorating it with
``@register``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import ModelError, ShapeError, UnsupportedOperatorError
from ..ir.types import TensorType

OPS: dict[str, type["Op"]] = {}


class Op:
    name: str = ""
    domain: str = ""
    #: canonical attribute name -> default value (None: absent / computed by normalize)
    attrs: dict[str, Any] = {}
    #: attributes of older opsets that carry no meaning any more; accepted and dropped
    legacy_attrs: tuple[str, ...] = ()
    #: ONNX input position -> canonical attribute name, for inputs that must be constants
    lift_inputs: dict[int, str] = {}
    #: names of the ONNX inputs, for messages (optional)
    input_names: tuple[str, ...] = ()
    #: False for ops whose result must not be computed at compile time even if inputs are constant
    foldable: bool = True
    #: True for cnncompile's own ops (fused kernels, Relu6...): passes create them, ONNX files cannot
    internal: bool = False

    @classmethod
    def normalize(cls, attrs: dict, input_types: Sequence[TensorType | None], opset: int) -> dict:
        """Return the canonical attributes. The default fills defaults and rejects unknown names."""
        return fill_defaults(cls, attrs)

    @staticmethod
    def infer(*input_types: TensorType, **attrs) -> TensorType | list[TensorType]:
        raise NotImplementedError

    @staticmethod
    def reference(*inputs: np.ndarray, **attrs) -> np.ndarray | tuple[np.ndarray, ...]:
        raise NotImplementedError

    @staticmethod
    def flops(input_types: Sequence[TensorType], output_types: Sequence[TensorType], **attrs) -> int:
        """Floating-point operations (a multiply-add counts 2). Default: one per output element."""
        return sum(t.size for t in output_types if t.is_static)


def register(cls: type[Op]) -> type[Op]:
    name = cls.name or cls.__name__
    cls.name = name
    if name in OPS:
        raise RuntimeError(f"op {name} registered twice")
    OPS[name] = cls
    return cls


def supported_ops() -> list[str]:
    """The ONNX operators the frontend accepts (cnncompile's internal ops are not among them)."""
    return sorted(name for name, op in OPS.items() if not op.internal)


def get_op(op_type: str, domain: str = "", node: str = "", opset: int | None = None) -> type[Op]:
    if domain not in ("", "ai.onnx") or op_type not in OPS or OPS[op_type].internal:
        raise UnsupportedOperatorError(op_type, node=node, domain=domain, opset=opset,
                                       supported=supported_ops())
    return OPS[op_type]


# ---- helpers shared by the op families ---------------------------------------------------------
def fill_defaults(cls: type[Op], attrs: dict) -> dict:
    out = {}
    for key, value in attrs.items():
        if key in cls.attrs:
            out[key] = value
        elif key not in cls.legacy_attrs:
            known = ", ".join(sorted(cls.attrs)) or "none"
            raise ModelError(f"{cls.name}: unknown attribute '{key}' (known: {known})")
    for key, default in cls.attrs.items():
        out.setdefault(key, default)
    return out


def normalize_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"{what}={axis} is out of range for a tensor of rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(*shapes) -> tuple:
    """NumPy/ONNX multidirectional broadcasting, with a message naming every shape."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            ints = {d for d in dims if isinstance(d, int)}
            if len(ints) > 1 or not ints:
                raise ShapeError("shapes " + ", ".join(str(list(s)) for s in shapes)
                                 + " cannot be broadcast together")
            dims = ints
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def require_rank(t: TensorType, ranks, what: str = "input") -> None:
    if t.rank not in ranks:
        raise ShapeError(f"{what} has shape {list(t.shape)} (rank {t.rank}); expected rank "
                         + " or ".join(str(r) for r in ranks))


def same_type(t: TensorType) -> TensorType:
    return t
