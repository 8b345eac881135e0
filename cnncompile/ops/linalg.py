"""Matrix products: Gemm and MatMul (NumPy matmul semantics, batched, with 1-D operands).

Floating-point products accumulate in float64; integer ones in their own dtype (wrapping, as C
does).
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..ir.types import FLOAT_DTYPES, SUPPORTED_DTYPES, TensorType
from .base import Op, broadcast_shapes, fill_defaults, register, require_rank

NUMERIC_DTYPES = tuple(d for d in SUPPORTED_DTYPES if d != np.bool_)


def _check_dtypes(op: str, types: dict) -> np.dtype:
    dtypes = {t.dtype for t in types.values()}
    if len(dtypes) != 1:
        raise ShapeError(f"{op} needs inputs of one dtype, got "
                         + ", ".join(f"{k} {t}" for k, t in types.items()))
    dtype = dtypes.pop()
    if dtype not in NUMERIC_DTYPES:
        raise ShapeError(f"{op} takes numeric tensors, got {dtype}")
    return dtype


def _differ(a, b) -> bool:
    # A symbolic dimension (data-dependent size) cannot be checked at compile time.
    return isinstance(a, int) and isinstance(b, int) and a != b


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype in FLOAT_DTYPES else dtype


@register
class Gemm(Op):
    """Y = alpha * A' @ B' + beta * C, where A' and B' are A and B, transposed if transA/transB,
    and the optional C broadcasts to (M, N) (unidirectional broadcasting)."""
    attrs = {"alpha": 1.0, "beta": 1.0, "transA": False, "transB": False}
    legacy_attrs = ("broadcast",)
    input_names = ("A", "B", "C")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        attrs["alpha"] = float(attrs["alpha"])
        attrs["beta"] = float(attrs["beta"])
        attrs["transA"] = bool(attrs["transA"])
        attrs["transB"] = bool(attrs["transB"])
        return attrs

    @staticmethod
    def infer(a, b, c=None, alpha=1.0, beta=1.0, transA=False, transB=False):
        types = {"A": a, "B": b} if c is None else {"A": a, "B": b, "C": c}
        dtype = _check_dtypes("Gemm", types)
        require_rank(a, (2,), "Gemm A")
        require_rank(b, (2,), "Gemm B")
        m, k = a.shape[::-1] if transA else a.shape
        k_b, n = b.shape[::-1] if transB else b.shape
        if _differ(k, k_b):
            raise ShapeError(f"Gemm: inner dimensions differ: A of shape {list(a.shape)} "
                             f"(transA={int(transA)}) gives K={k}, B of shape {list(b.shape)} "
                             f"(transB={int(transB)}) gives K={k_b}")
        if c is not None:
            try:
                ok = broadcast_shapes(c.shape, (m, n)) == (m, n) and c.rank <= 2
            except ShapeError:
                ok = False
            if not ok:
                raise ShapeError(f"Gemm: C of shape {list(c.shape)} does not broadcast to the "
                                 f"product's shape [{m}, {n}] (A {list(a.shape)}, B "
                                 f"{list(b.shape)})")
        return TensorType(dtype, (m, n))

    @staticmethod
    def reference(a, b, c=None, alpha=1.0, beta=1.0, transA=False, transB=False):
        work = _compute_dtype(a.dtype)
        a = a.T if transA else a
        b = b.T if transB else b
        y = a.astype(work) @ b.astype(work)
        if alpha != 1.0:
            y = alpha * y
        if c is not None and beta != 0.0:
            c = c.astype(work)
            y = y + (c if beta == 1.0 else beta * c)
        return y.astype(a.dtype)

    @staticmethod
    def flops(input_types, output_types, alpha=1.0, beta=1.0, transA=False, transB=False):
        a = input_types[0]
        k = a.shape[0] if transA else a.shape[1]
        out = output_types[0].size
        bias = out if len(input_types) > 2 and input_types[2] is not None else 0
        return 2 * out * k + bias

    @staticmethod
    def gradient(g, node, grads):
        """With A' = op(A), B' = op(B): dA' = alpha dY B'^T and dB' = alpha A'^T dY, each one Gemm
        whose trans flags give dA and dB directly; dC = beta dY summed to C's shape."""
        a, b = node.inputs[:2]
        dy = grads[0]
        alpha, beta = node.attrs["alpha"], node.attrs["beta"]
        trans_a, trans_b = node.attrs["transA"], node.attrs["transB"]
        da = db = dc = None
        if g.needs(node, 0):
            da = (g.op("Gemm", [b, dy], {"alpha": alpha, "transA": trans_b, "transB": True})
                  if trans_a else
                  g.op("Gemm", [dy, b], {"alpha": alpha, "transB": not trans_b}))
        if g.needs(node, 1):
            db = (g.op("Gemm", [dy, a], {"alpha": alpha, "transA": True, "transB": trans_a})
                  if trans_b else
                  g.op("Gemm", [a, dy], {"alpha": alpha, "transA": not trans_a}))
        if g.needs(node, 2):
            dc = g.sum_to(g.scale(dy, beta), node.inputs[2])
        return [da, db, dc][:len(node.inputs)]


def _matmul_shape(a: TensorType, b: TensorType) -> tuple:
    if a.rank == 0 or b.rank == 0:
        raise ShapeError(f"MatMul takes tensors of rank 1 or more, got shapes {list(a.shape)} "
                         f"and {list(b.shape)}")
    # NumPy rules: a 1-D A is a row vector, a 1-D B a column vector; the added axis is dropped.
    a_shape = (1,) + a.shape if a.rank == 1 else a.shape
    b_shape = b.shape + (1,) if b.rank == 1 else b.shape
    if _differ(a_shape[-1], b_shape[-2]):
        raise ShapeError(f"MatMul: inner dimensions differ: A has shape {list(a.shape)} "
                         f"(K={a_shape[-1]}), B has shape {list(b.shape)} (K={b_shape[-2]})")
    try:
        batch = broadcast_shapes(a_shape[:-2], b_shape[:-2])
    except ShapeError:
        raise ShapeError(f"MatMul: the batch dimensions of A (shape {list(a.shape)}) and B "
                         f"(shape {list(b.shape)}) cannot be broadcast together") from None
    rows = (a_shape[-2],) if a.rank > 1 else ()
    cols = (b_shape[-1],) if b.rank > 1 else ()
    return batch + rows + cols


@register
class MatMul(Op):
    """NumPy matmul: batched over leading axes with broadcasting; 1-D operands are vectors."""
    input_names = ("A", "B")

    @staticmethod
    def infer(a, b):
        dtype = _check_dtypes("MatMul", {"A": a, "B": b})
        return TensorType(dtype, _matmul_shape(a, b))

    @staticmethod
    def reference(a, b):
        work = _compute_dtype(a.dtype)
        return np.matmul(a.astype(work), b.astype(work)).astype(a.dtype)

    @staticmethod
    def flops(input_types, output_types, **attrs):
        k = input_types[0].shape[-1]
        return 2 * output_types[0].size * k

    @staticmethod
    def gradient(g, node, grads):
        """dA = dY @ B^T and dB = A^T @ dY over the broadcast batch axes, summed back to each
        operand's shape; a 1-D A is a row and a 1-D B a column for the products."""
        a, b = node.inputs
        a2 = g.reshape(a, (1,) + a.shape) if a.type.rank == 1 else a
        b2 = g.reshape(b, b.shape + (1,)) if b.type.rank == 1 else b
        product = _matmul_shape(a2.type, b2.type)
        dy = g.reshape(grads[0], product)
        da = db = None
        if g.needs(node, 0):
            da = g.sum_to(g.op("MatMul", [dy, _swap_last(g, b2)]), a2)
            da = g.reshape(da, a.shape)
        if g.needs(node, 1):
            db = g.sum_to(g.op("MatMul", [_swap_last(g, a2), dy]), b2)
            db = g.reshape(db, b.shape)
        return [da, db]


def _swap_last(g, value):
    rank = value.type.rank
    return g.op("Transpose", [value], {"perm": [*range(rank - 2), rank - 1, rank - 2]})
