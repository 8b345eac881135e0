"""Winograd convolution F(m x m, 3 x 3) in NumPy: the semantic model of the CPU backend's kernel.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016). A 3x3 convolution
that produces an m x m output tile reads an (m+2) x (m+2) input tile d and computes

    Y = A^T [ U * (B^T d B) ] A,   U = G g G^T   (* is elementwise; g is the 3x3 filter)

so a tile costs (m+2)^2 multiplies per (input channel, output channel) pair instead of 9 m^2:
16 instead of 36 for F(2x2,3x3), 36 instead of 144 for F(4x4,3x3). Summed over input channels
the elementwise step becomes (m+2)^2 independent GEMMs, which is where the time goes. U depends
only on the weights, so a compiler computes it once (``transform_filter``, in float64).

The same 1-D transforms applied along every spatial axis give F(m^d, 3^d) for any spatial rank;
``lower_convolutions`` only picks the 2-D ones, ``winograd_conv2d``.

Float32 accuracy: relative L2 error against a float64 convolution, standard-normal inputs and
He-scaled weights, "same" padding, batch 1, mean of 3 seeds (im2col is Conv.reference in float32):

    C = K   H = W    im2col    F(2x2,3x3)   F(4x4,3x3)
      16       8     7.7e-08    1.6e-07      1.0e-06
      64      16     3.0e-07    2.6e-07      1.7e-06
      64      56     3.0e-07    2.6e-07      1.7e-06
     256      14     3.5e-07    4.9e-07      2.9e-06
     512       7     3.5e-07    4.9e-07      2.5e-06

The error does not depend on the spatial size (tiles are independent) and grows slowly with the
channel count. F(2x2) is as accurate as im2col; F(4x4), whose matrices hold 1/6, 1/24 and 4, 5, 8,
is 5-7x worse: within the 1e-5 the project tests against, but with little room, which is why the
cost model keeps it for layers large enough to pay for it.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ShapeError
from .conv import work_dtype

KERNEL = 3

# (A^T, G, B^T) for F(m, 3), interpolation points 0, +-1 (and +-2 for m = 4) and infinity.
_MATRICES = {
    2: ([[1, 1, 1, 0],
         [0, 1, -1, -1]],
        [[1, 0, 0],
         [1 / 2, 1 / 2, 1 / 2],
         [1 / 2, -1 / 2, 1 / 2],
         [0, 0, 1]],
        [[1, 0, -1, 0],
         [0, 1, 1, 0],
         [0, -1, 1, 0],
         [0, 1, 0, -1]]),
    4: ([[1, 1, 1, 1, 1, 0],
         [0, 1, -1, 2, -2, 0],
         [0, 1, 1, 4, 4, 0],
         [0, 1, -1, 8, -8, 1]],
        [[1 / 4, 0, 0],
         [-1 / 6, -1 / 6, -1 / 6],
         [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6],
         [0, 0, 1]],
        [[4, 0, -5, 0, 1, 0],
         [0, -4, -4, 1, 1, 0],
         [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0],
         [0, 4, 0, -5, 0, 1]]),
}
TILE_SIZES = tuple(sorted(_MATRICES))


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T, G, B^T) of F(m, 3) as float64 arrays: m x (m+2), (m+2) x 3, (m+2) x (m+2)."""
    if m not in _MATRICES:
        raise ValueError(f"Winograd F({m},3) is not offered; tile sizes: {TILE_SIZES}")
    return tuple(np.array(rows, dtype=np.float64) for rows in _MATRICES[m])


def transform_ops(m: int, rank: int = 2) -> tuple[int, int]:
    """Arithmetic of the input and output transforms per tile and channel, for the cost model.

    A transform applies its matrix along one axis at a time; each nonzero entry is one multiply-
    add (or add, for entries +-1) per vector it is applied to.
    """
    at, _, bt = matrices(m)
    alpha = m + 2
    input_ops = rank * alpha ** (rank - 1) * np.count_nonzero(bt)
    # the output transform shrinks one axis from alpha to m at a time
    output_ops = sum(m ** axis * alpha ** (rank - 1 - axis) for axis in range(rank))
    return int(input_ops), int(output_ops * np.count_nonzero(at))


def _along_spatial(a: np.ndarray, matrix: np.ndarray, first: int) -> np.ndarray:
    """Multiply ``matrix`` into each of the trailing axes of ``a`` from ``first`` on."""
    for _ in range(first, a.ndim):
        # tensordot appends the new axis last, so after one pass per axis the order is restored
        a = np.tensordot(a, matrix, axes=([first], [1]))
    return a


def transform_filter(w: np.ndarray, m: int) -> np.ndarray:
    """U = G g G^T for every (output, input) channel pair: K x C x 3... -> K x C x (m+2)...

    Computed in float64 and rounded once, as a compiler does it at compile time."""
    rank = w.ndim - 2
    if rank < 1 or list(w.shape[2:]) != [KERNEL] * rank:
        raise ShapeError(f"Winograd F({m},3): W has shape {list(w.shape)}; it needs a "
                         f"{'x'.join(['3'] * max(rank, 1))} kernel")
    _, g, _ = matrices(m)
    u = _along_spatial(w.astype(np.float64), g, 2)
    return u.astype(work_dtype(w.dtype))


def winograd_conv(x: np.ndarray, u: np.ndarray, pads, m: int,
                  b: np.ndarray | None = None) -> np.ndarray:
    """Conv(x, w, b, pads) for a 3x3... kernel, stride 1, dilation 1, group 1, given
    u = transform_filter(w, m). x: N x C x D..., pads: all begins then all ends."""
    at, _, bt = matrices(m)
    rank = x.ndim - 2
    alpha = m + KERNEL - 1
    if u.ndim != x.ndim or u.shape[1] != x.shape[1] or list(u.shape[2:]) != [alpha] * rank:
        raise ShapeError(f"Winograd F({m},3): X has shape {list(x.shape)} but the transformed "
                         f"filter has shape {list(u.shape)}; expected K x {x.shape[1]} x "
                         f"{' x '.join([str(alpha)] * rank)}")
    pads = list(pads)
    if len(pads) != 2 * rank:
        raise ShapeError(f"Winograd F({m},3): pads={pads} needs {2 * rank} values for X of "
                         f"shape {list(x.shape)}")
    work = work_dtype(x.dtype)
    n, channels = x.shape[:2]
    out_channels = u.shape[0]
    out = [size + pads[i] + pads[i + rank] - KERNEL + 1 for i, size in enumerate(x.shape[2:])]
    if min(out) <= 0:
        raise ShapeError(f"Winograd F({m},3): X of shape {list(x.shape)} with pads={pads} is "
                         f"smaller than the 3x3 kernel")
    tiles = [-(-o // m) for o in out]
    # pad the end further so that the last tile's window exists; the extra outputs are cropped
    widths = [(0, 0), (0, 0)] + [(pads[i], t * m + KERNEL - 1 - size - pads[i])
                                 for i, (size, t) in enumerate(zip(x.shape[2:], tiles))]
    padded = np.pad(x.astype(work, copy=False), widths)
    spatial = tuple(range(2, 2 + rank))
    view = sliding_window_view(padded, [alpha] * rank, axis=spatial)
    view = view[(slice(None), slice(None)) + (slice(None, None, m),) * rank]
    # input transform B^T d B: N x C x tiles... x alpha...
    v = _along_spatial(view, bt.astype(work), 2 + rank)
    positions = n * math.prod(tiles)
    points = alpha ** rank
    # one GEMM per transform point: (points, K, C) @ (points, C, N*tiles)
    v = np.moveaxis(v.reshape(n, channels, positions // n, points), (3, 1), (0, 1))
    v = v.reshape(points, channels, positions)
    y = np.matmul(np.moveaxis(u.reshape(out_channels, channels, points), 2, 0).astype(work), v)
    y = y.reshape(*[alpha] * rank, out_channels, n, *tiles)
    y = y.transpose(rank + 1, rank, *range(rank + 2, 2 * rank + 2), *range(rank))
    # output transform A^T M A: N x K x tiles... x m...
    y = _along_spatial(y, at.astype(work), 2 + rank)
    # interleave tiles and their m outputs back into the spatial axes, then crop
    order = [0, 1] + [a for axis in range(rank) for a in (2 + axis, 2 + rank + axis)]
    y = y.transpose(order).reshape(n, out_channels, *[t * m for t in tiles])
    y = y[(slice(None), slice(None)) + tuple(slice(0, o) for o in out)]
    if b is not None:
        y = y + b.astype(work, copy=False).reshape(-1, *[1] * rank)
    return np.ascontiguousarray(y.astype(x.dtype, copy=False))


def winograd_conv2d(x: np.ndarray, w: np.ndarray, pads=(0, 0, 0, 0), m: int = 2,
                    b: np.ndarray | None = None) -> np.ndarray:
    """Conv(x, w, b, pads) of an N x C x H x W input and a K x C x 3 x 3 filter (stride 1,
    dilation 1, group 1) by Winograd F(m x m, 3 x 3), m in (2, 4)."""
    if x.ndim != 4 or w.ndim != 4 or w.shape[1] != x.shape[1]:
        raise ShapeError(f"winograd_conv2d: X has shape {list(x.shape)} and W {list(w.shape)}; "
                         "expected N x C x H x W and K x C x 3 x 3")
    return winograd_conv(x, transform_filter(w, m), pads, m, b)
