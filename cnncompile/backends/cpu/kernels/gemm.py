"""Gemm / MatMul: the product in column blocks, one task each of a parallel Numba loop that calls
NumPy's OpenBLAS (blas.sgemm, single-threaded) straight into the destination and applies the
epilogue (alpha, beta * C, the activation) to its block. float64 goes through np.matmul.

Weights are prepared once at compile time by the emitter: alpha folded into a constant B, beta
folded into a constant C, which then becomes a row of biases when it broadcasts along M (the
fully connected layer's case). Either operand may be a transposed view (a Linear layer's (N, K)
weight read as B.T): sgemm takes the orientation as a flag, so nothing is copied.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..threads import serial_blas, threads
from .blas import sgemm, sgemv
from .epilogue import NONE, activation_row

#: cold compile seconds of the parallel driver (with its helpers), for backend.precompile
COMPILE_WEIGHTS = {"_gemm_columns": 1.5}

#: products with fewer multiply-adds run as one task
MIN_SPLIT_MACS = 1 << 21
#: matrix-vector products (one row of A, memory-bound) with more weights than this are split
MIN_SPLIT_GEMV = 1 << 16
#: column blocks are multiples of this many columns
COLUMN_ALIGN = 64

_NO_C = np.zeros((0, 0), dtype=np.float32)
_NO_PARAMS = np.zeros(2, dtype=np.float64)


@njit(cache=True)
def gemm_epilogue(y, c, alpha, beta, code, params):
    """y = act(alpha * y + beta * c) in place; c is 2-D and broadcasts to y (shape (0, 0): no
    C). Serial: it runs between two BLAS calls, whose threads must not compete with Numba's."""
    m, n = y.shape
    rows, cols = c.shape
    for i in range(m):
        row = y[i]
        if alpha != 1:
            for j in range(n):
                row[j] *= alpha
        if rows != 0:
            ci = i if rows > 1 else 0
            if cols > 1:
                for j in range(n):
                    row[j] += beta * c[ci, j]
            else:
                bias = beta * c[ci, 0]
                for j in range(n):
                    row[j] += bias
        activation_row(row, code, params)


def operand(a: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(array, transposed, row pitch) of a 2-D float32 operand as sgemm reads it: a itself when
    its rows or its columns are contiguous, else a contiguous copy."""
    rows, cols = a.shape
    item = a.itemsize
    if a.strides[1] == item and a.strides[0] >= max(1, cols) * item:
        return a, 0, a.strides[0] // item
    if a.strides[0] == item and a.strides[1] >= max(1, rows) * item:
        return a, 1, a.strides[1] // item
    a = np.ascontiguousarray(a)
    return a, 0, max(1, cols)


@njit(nogil=True, parallel=True, cache=True)
def _gemm_columns(a, trans_a, lda, b, trans_b, ldb, out, ldc, k, c, alpha, beta, code, params,
                  step):
    m, n = out.shape
    for q in prange((n + step - 1) // step):
        j0 = q * step
        j1 = min(n, j0 + step)
        b_at = j0 * ldb if trans_b else j0
        if m == 1:  # a matrix-vector product: OpenBLAS's sgemm is slow at one row
            sgemv(1 - trans_b, k if trans_b == 0 else j1 - j0, j1 - j0 if trans_b == 0 else k,
                  b, b_at, ldb, a, 0, lda if trans_a else 1, 0.0, out, j0, 1)
        else:
            sgemm(trans_a, trans_b, m, j1 - j0, k, a, 0, lda, b, b_at, ldb, 0.0, out, j0, ldc)
        if c.shape[0] != 0 or alpha != 1 or code != NONE:
            gemm_epilogue(out[:, j0:j1], c[:, j0:j1] if c.shape[1] > 1 else c, alpha, beta,
                          code, params)


def gemm(a, b, out, c=None, alpha=1.0, beta=1.0, code=NONE, params=None):
    """out = act(alpha * a @ b + beta * c) for 2-D a, b (either may be a transposed view) and a
    2-D c that broadcasts to out (or None)."""
    if out.dtype != np.float32:
        np.matmul(a, b, out=out)
        if c is not None or alpha != 1.0 or code != NONE:
            gemm_epilogue(out, _NO_C.astype(out.dtype) if c is None else c, alpha, beta, code,
                          _NO_PARAMS if params is None else params)
        return out
    m, n = out.shape
    k = a.shape[1]
    count = 1
    workers = threads()
    if workers > 1 and m * k * n >= (MIN_SPLIT_GEMV if m == 1 else MIN_SPLIT_MACS):
        count = max(1, min(2 * workers, n // COLUMN_ALIGN))
    step = -(-n // count)
    step = -(-step // COLUMN_ALIGN) * COLUMN_ALIGN if count > 1 else max(1, n)
    a, trans_a, lda = operand(a)
    b, trans_b, ldb = operand(b)
    target = out if out.strides[1] == 4 and out.strides[0] >= 4 * n else np.empty_like(out)
    with serial_blas():
        _gemm_columns(a, trans_a, lda, b, trans_b, ldb, target, target.strides[0] // 4, k,
                      _NO_C if c is None else c, alpha, beta, code,
                      _NO_PARAMS if params is None else params, step)
    if target is not out:
        out[...] = target
    return out
