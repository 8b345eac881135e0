"""sgemm inside Numba kernels: NumPy's own OpenBLAS, called from the threads of a parallel loop.

A convolution driver written in Python pays for every BLAS call, every task handed to a helper
thread and every epilogue call (tens of microseconds each, measured), which is most of a small
layer's time. Calling ``cblas_sgemm`` from inside ``prange`` instead keeps a whole convolution in
one Numba call: OpenMP's threads each run a single-threaded GEMM on their tile and apply the
epilogue while the tile is in their cache.

The kernels call the symbol ``cnncompile_sgemm``, not an address, so Numba's disk cache stays
valid across processes: this module registers the symbol with LLVM at import (before any kernel
that calls it is compiled or loaded from the cache). It points at NumPy's OpenBLAS
``cblas_sgemm`` (64-bit integers, the ``scipy_openblas64_`` build NumPy's wheels ship), found in
the running process; where NumPy uses another BLAS it points at ``_fallback_sgemm``, a plain
loop with the same signature (correct, slow: ``BLAS_NAME`` says which one runs).

OpenBLAS must be single-threaded while the kernels run (``threads.thread_limit`` makes it so for
a module run; ``threads.serial_blas`` for a direct call): several OpenMP threads calling into one
multi-threaded OpenBLAS would share its thread pool.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..threads import openblas_library

SYMBOL = "cnncompile_sgemm"
GEMV_SYMBOL = "cnncompile_sgemv"
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

_I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
_ARGS = [_I32, _I32, _I32, _I64, _I64, _I64, _F32, _F32.as_pointer(), _I64,
         _F32.as_pointer(), _I64, _F32, _F32.as_pointer(), _I64]
_SGEMM_TYPE = ir.FunctionType(ir.VoidType(), _ARGS)
_SGEMV_TYPE = ir.FunctionType(ir.VoidType(), [_I32, _I32, _I64, _I64, _F32, _F32.as_pointer(),
                                              _I64, _F32.as_pointer(), _I64, _F32,
                                              _F32.as_pointer(), _I64])

_P32 = types.CPointer(types.float32)
_fallback_gemv_sig = types.void(types.int32, types.int32, types.int64, types.int64, types.float32,
                                _P32, types.int64, _P32, types.int64, types.float32, _P32,
                                types.int64)
_fallback_sig = types.void(types.int32, types.int32, types.int32, types.int64, types.int64,
                           types.int64, types.float32, types.CPointer(types.float32), types.int64,
                           types.CPointer(types.float32), types.int64, types.float32,
                           types.CPointer(types.float32), types.int64)


@cfunc(_fallback_sig, cache=True)
def _fallback_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Row-major C = alpha * op(A) @ op(B) + beta * C, for a NumPy without OpenBLAS."""
    for i in range(m):
        for j in range(n):
            c[i * ldc + j] = beta * c[i * ldc + j] if beta != 0 else np.float32(0)
        for p in range(k):
            av = alpha * (a[p * lda + i] if trans_a == TRANS else a[i * lda + p])
            for j in range(n):
                c[i * ldc + j] += av * (b[j * ldb + p] if trans_b == TRANS else b[p * ldb + j])


@cfunc(_fallback_gemv_sig, cache=True)
def _fallback_sgemv(order, trans, m, n, alpha, a, lda, x, incx, beta, y, incy):
    """Row-major y = alpha * op(A) @ x + beta * y, A (m, n), for a NumPy without OpenBLAS."""
    rows = n if trans == TRANS else m
    cols = m if trans == TRANS else n
    for i in range(rows):
        total = np.float32(0)
        for j in range(cols):
            total += (a[j * lda + i] if trans == TRANS else a[i * lda + j]) * x[j * incx]
        y[i * incy] = alpha * total + (beta * y[i * incy] if beta != 0 else np.float32(0))


def _register() -> str:
    library = openblas_library()
    if library is not None:
        for prefix, suffix in (("scipy_cblas_", "64_"), ("cblas_", "64_")):
            gemm = getattr(library, f"{prefix}sgemm{suffix}", None)
            gemv = getattr(library, f"{prefix}sgemv{suffix}", None)
            if gemm is not None and gemv is not None:
                llvm.add_symbol(SYMBOL, ctypes.cast(gemm, ctypes.c_void_p).value)
                llvm.add_symbol(GEMV_SYMBOL, ctypes.cast(gemv, ctypes.c_void_p).value)
                return f"OpenBLAS {prefix}sgemm{suffix}"
    llvm.add_symbol(SYMBOL, _fallback_sgemm.address)
    llvm.add_symbol(GEMV_SYMBOL, _fallback_sgemv.address)
    return "a plain loop (NumPy's BLAS is not a 64-bit-integer OpenBLAS)"


BLAS_NAME = _register()


class _Args:
    """An intrinsic's arguments as the BLAS calls take them: 64-bit integers, float32 scalars,
    pointers to an array's element ``at``, trans flags as CBLAS enums."""

    def __init__(self, context, builder, signature, args):
        self.context, self.builder = context, builder
        self.types, self.values = signature.args, args

    def cast(self, index, to):
        return self.context.cast(self.builder, self.values[index], self.types[index], to)

    def i64(self, index):
        return self.cast(index, types.int64)

    def f32(self, index):
        return self.cast(index, types.float32)

    def data(self, index):
        """The array argument's data pointer (its first element)."""
        array = self.context.make_array(self.types[index])(self.context, self.builder,
                                                           self.values[index])
        return array.data

    def pointer(self, index, at_index):
        return self.builder.gep(self.data(index), [self.i64(at_index)])

    def trans(self, index):
        return self.builder.add(self.cast(index, types.int32), ir.Constant(_I32, NO_TRANS))


@intrinsic
def _sgemm(typingctx, trans_a, trans_b, m, n, k, a, a_at, lda, b, b_at, ldb, beta, c, c_at,
           ldc):
    sig = types.void(trans_a, trans_b, m, n, k, a, a_at, lda, b, b_at, ldb, beta, c, c_at, ldc)

    def codegen(context, builder, signature, args):
        v = _Args(context, builder, signature, args)
        function = cgutils.get_or_insert_function(builder.module, _SGEMM_TYPE, SYMBOL)
        builder.call(function, [
            ir.Constant(_I32, ROW_MAJOR), v.trans(0), v.trans(1), v.i64(2), v.i64(3), v.i64(4),
            ir.Constant(_F32, 1.0), v.pointer(5, 6), v.i64(7), v.pointer(8, 9), v.i64(10),
            v.f32(11), v.pointer(12, 13), v.i64(14)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _sgemv(typingctx, trans, m, n, a, a_at, lda, x, x_at, incx, beta, y, y_at, incy):
    sig = types.void(trans, m, n, a, a_at, lda, x, x_at, incx, beta, y, y_at, incy)

    def codegen(context, builder, signature, args):
        v = _Args(context, builder, signature, args)
        function = cgutils.get_or_insert_function(builder.module, _SGEMV_TYPE, GEMV_SYMBOL)
        builder.call(function, [
            ir.Constant(_I32, ROW_MAJOR), v.trans(0), v.i64(1), v.i64(2), ir.Constant(_F32, 1.0),
            v.pointer(3, 4), v.i64(5), v.pointer(6, 7), v.i64(8), v.f32(9), v.pointer(10, 11),
            v.i64(12)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def sgemv(trans, m, n, a, a_at, lda, x, x_at, incx, beta, y, y_at, incy):
    """Row-major y = op(A) @ x + beta * y for A (m, n) at element a_at of a with row pitch lda
    (op transposes when trans is 1), x and y strided by incx, incy; as sgemm, no checks."""
    _sgemv(trans, m, n, a, a_at, lda, x, x_at, incx, beta, y, y_at, incy)


@njit(inline="always", cache=True)
def sgemm(trans_a, trans_b, m, n, k, a, a_at, lda, b, b_at, ldb, beta, c, c_at, ldc):
    """Row-major C[m, n] = op(A)[m, k] @ op(B)[k, n] + beta * C, where A, B and C start at
    element ``*_at`` of the float32 arrays a, b, c (their memory, whatever their shape) and have
    row pitches lda, ldb, ldc; op transposes when trans_* is 1. No bounds checks: the callers
    own their offsets."""
    _sgemm(trans_a, trans_b, m, n, k, a, a_at, lda, b, b_at, ldb, beta, c, c_at, ldc)
