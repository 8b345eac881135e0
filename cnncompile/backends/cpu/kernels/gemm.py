"""Gemm / MatMul: NumPy's BLAS (np.matmul, called from Python so that only one BLAS thread pool
exists) into the destination, then a Numba epilogue for alpha, beta * C and the activation. Large
products are split into column blocks shared by the calling thread and the drivers' helper threads
(``threads.run_tasks``; OpenBLAS itself runs single-threaded during a module run).

Weights are prepared once at compile time by the emitter: B transposed when transB, alpha folded
into a constant B, beta folded into a constant C, which then becomes a row of biases when it
broadcasts along M (the fully connected layer's case).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..threads import run_tasks, threads
from .epilogue import NONE, activation_row

#: products with fewer multiply-adds run in one BLAS call: a helper thread's wake-up costs more
MIN_SPLIT_MACS = 1 << 21
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


def gemm(a, b, out, c=None, alpha=1.0, beta=1.0, code=NONE, params=None, b_rows=False):
    """out = act(alpha * a @ b + beta * c) for 2-D a, b (already transposed as needed) and a 2-D
    c that broadcasts to out (or None). With b_rows, b holds B's columns as rows, (N, K), and the
    product is formed as (b @ a.T).T: for few rows of a and many columns of B, OpenBLAS runs that
    orientation up to 1.5x faster here (see rows_first)."""
    n = out.shape[1]
    workers = threads()
    count = 1
    if workers > 1 and a.shape[0] * a.shape[1] * n >= MIN_SPLIT_MACS:
        count = max(1, min(2 * workers, n // COLUMN_ALIGN))
    step = -(-n // count)
    step = -(-step // COLUMN_ALIGN) * COLUMN_ALIGN if count > 1 else n

    def block(slot, index):
        j0, j1 = index * step, min(n, (index + 1) * step)
        if b_rows:
            np.copyto(out[:, j0:j1], np.matmul(b[j0:j1], a.T).T)
        else:
            np.matmul(a, b[:, j0:j1], out=out[:, j0:j1])
    run_tasks(block, -(-n // step), workers)
    if c is None and alpha == 1.0 and code == NONE:
        return out
    gemm_epilogue(out, _NO_C if c is None else c, alpha, beta, code,
                  _NO_PARAMS if params is None else params)
    return out


def rows_first(m: int, n: int) -> bool:
    """Whether gemm should take B as (N, K) rows (b_rows=True) for an (m, k) @ (k, n) product:
    measured with OpenBLAS 0.3.31 on one core, (B @ A.T).T wins for 2 <= M <= 32 when N >= 1024
    (e.g. 8x9216 @ 9216x4096: 19.5 ms against 28.2 ms) and loses slightly elsewhere."""
    return 2 <= m <= 32 and n >= 1024
