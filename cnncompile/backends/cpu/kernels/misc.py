"""Softmax / LogSoftmax, Resize, constant Pad, and the view helper the emitters share.

Each parallel kernel has a ``_serial`` twin for small work (see ``parallel_variant``).

Resize works on 5-D views (leading axes of size 1 added) with per-axis tables computed at compile
time by the op's own reference code (ops/resize.py): an index per output position for nearest,
(index, weight) taps for linear and cubic. Every coordinate transformation the reference knows is
therefore handled by one gather kernel and one weighted-tap kernel.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


def view_as(array: np.ndarray, shape) -> np.ndarray:
    """``array`` seen with ``shape`` without copying (raises where its strides forbid that):
    writing through the result must reach the planned buffer."""
    return np.reshape(array, shape, copy=False)


#: below this many elements (times taps) of work a kernel runs its ``_serial`` twin: measured
#: here, a parallel launch costs 10-30 us and a parallel kernel compiles 2-3x slower (about 3 s
#: more for max_pool), which a 2-core speed-up repays only on large maps
PARALLEL_MIN_WORK = 1 << 18


def parallel_variant(name: str, work: int) -> str:
    """The kernel to call for ``work`` elements: ``name`` (parallel) or ``name + "_serial"``."""
    return name if work >= PARALLEL_MIN_WORK else name + "_serial"


# ---- softmax -----------------------------------------------------------------------------------
SUM_MATH = {"reassoc", "contract"}  # sums may be reassociated (vectorised); NaN/inf untouched


@njit(cache=True, inline="always")
def _softmax_row(x, y, r, log):
    """Softmax (or LogSoftmax) along axis 1 of x (outer, L, inner) at row r of outer * inner,
    numerically stable: the row maximum is subtracted before exp, the sum runs in float64."""
    length, inner = x.shape[1], x.shape[2]
    o = r // inner
    i = r - o * inner
    top = x[o, 0, i]
    for k in range(1, length):
        v = x[o, k, i]
        if v > top or v != v:
            top = v
    total = 0.0
    for k in range(length):
        e = np.exp(x[o, k, i] - top)
        total += e
        if not log:
            y[o, k, i] = e
    if log:
        shift = top + math.log(total)
        for k in range(length):
            y[o, k, i] = np.float64(x[o, k, i]) - shift
    else:
        scale = 1.0 / total
        for k in range(length):
            y[o, k, i] = y[o, k, i] * scale


@njit(parallel=True, cache=True, error_model="numpy", fastmath=SUM_MATH)
def softmax_rows(x, y, log):
    """Softmax of x (outer, L, inner) along L into y, rows in parallel."""
    for r in prange(x.shape[0] * x.shape[2]):
        _softmax_row(x, y, r, log)


@njit(cache=True, error_model="numpy", fastmath=SUM_MATH)
def softmax_rows_serial(x, y, log):
    for r in range(x.shape[0] * x.shape[2]):
        _softmax_row(x, y, r, log)


def softmax(x, out, shape3, log):
    """Softmax of x over the middle axis of shape3 = (outer, L, inner) into out."""
    if 0 in shape3:
        return out
    kernel = softmax_rows if x.size >= PARALLEL_MIN_WORK else softmax_rows_serial
    try:
        target = view_as(out, shape3)
    except ValueError:  # a strided destination: compute beside it, then copy
        target = np.empty(shape3, dtype=out.dtype)
        kernel(x.reshape(shape3), target, log)
        np.copyto(out, target.reshape(out.shape))
        return out
    kernel(x.reshape(shape3), target, log)
    return out


# ---- resize ------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _nearest_plane(x, y, p, i0, i1, i2, i3, i4):
    n1, n2, n3, n4 = y.shape[1], y.shape[2], y.shape[3], y.shape[4]
    a = p // n1
    b = p - a * n1
    sa = i0[a]
    sb = i1[b]
    for c in range(n2):
        sc = i2[c]
        for d in range(n3):
            out = y[a, b, c, d]
            if d > 0 and i3[d] == i3[d - 1]:
                done = y[a, b, c, d - 1]  # the same source row: copy the row just made
                for e in range(n4):
                    out[e] = done[e]
                continue
            src = x[sa, sb, sc, i3[d]]
            for e in range(n4):
                out[e] = src[i4[e]]


@njit(parallel=True, cache=True)
def resize_nearest(x, y, i0, i1, i2, i3, i4):
    """y[a, b, c, d, e] = x[i0[a], i1[b], i2[c], i3[d], i4[e]] over 5-D arrays."""
    for p in prange(y.shape[0] * y.shape[1]):
        _nearest_plane(x, y, p, i0, i1, i2, i3, i4)


@njit(cache=True)
def resize_nearest_serial(x, y, i0, i1, i2, i3, i4):
    for p in range(y.shape[0] * y.shape[1]):
        _nearest_plane(x, y, p, i0, i1, i2, i3, i4)


@njit(cache=True, inline="always")
def _taps_plane(x, y, p, i0, w0, i1, w1, i2, w2, i3, w3, i4, w4):
    n1, n2, n3, n4 = y.shape[1], y.shape[2], y.shape[3], y.shape[4]
    a = p // n1
    b = p - a * n1
    for c in range(n2):
        for d in range(n3):
            for e in range(n4):
                total = 0.0
                for ta in range(i0.shape[1]):
                    for tb in range(i1.shape[1]):
                        wab = w0[a, ta] * w1[b, tb]
                        for tc in range(i2.shape[1]):
                            wabc = wab * w2[c, tc]
                            for td in range(i3.shape[1]):
                                wabcd = wabc * w3[d, td]
                                for te in range(i4.shape[1]):
                                    total += wabcd * w4[e, te] * x[
                                        i0[a, ta], i1[b, tb], i2[c, tc], i3[d, td], i4[e, te]]
                y[a, b, c, d, e] = total


@njit(parallel=True, cache=True)
def resize_taps(x, y, i0, w0, i1, w1, i2, w2, i3, w3, i4, w4):
    """y = sum over taps of the product of per-axis weights times x at the tapped positions
    (separable interpolation over 5-D arrays); i_k, w_k are (out_len_k, taps_k); float64 sums.
    The general case; resize_separable covers the usual one."""
    for p in prange(y.shape[0] * y.shape[1]):
        _taps_plane(x, y, p, i0, w0, i1, w1, i2, w2, i3, w3, i4, w4)


@njit(cache=True)
def resize_taps_serial(x, y, i0, w0, i1, w1, i2, w2, i3, w3, i4, w4):
    for p in range(y.shape[0] * y.shape[1]):
        _taps_plane(x, y, p, i0, w0, i1, w1, i2, w2, i3, w3, i4, w4)


@njit(cache=True, inline="always")
def _separable_plane(x, y, p, ih, wh, iw, ww):
    n1, h_in = x.shape[1], x.shape[2]
    h_out, w_out = y.shape[2], y.shape[3]
    a = p // n1
    b = p - a * n1
    rows = np.empty((h_in, w_out))
    for h in range(h_in):
        src = x[a, b, h]
        dst = rows[h]
        for o in range(w_out):
            total = 0.0
            for k in range(iw.shape[1]):
                total += ww[o, k] * src[iw[o, k]]
            dst[o] = total
    acc = np.empty(w_out)
    for o in range(h_out):
        acc[:] = 0.0
        for k in range(ih.shape[1]):
            weight = wh[o, k]
            src = rows[ih[o, k]]
            for j in range(w_out):
                acc[j] += weight * src[j]
        out = y[a, b, o]
        for j in range(w_out):
            out[j] = acc[j]


@njit(parallel=True, cache=True)
def resize_separable(x, y, ih, wh, iw, ww):
    """Interpolation of the last two axes of 4-D arrays, one axis at a time: every input row
    along W into a float64 buffer, then the buffered rows along H. ih, wh: (H_out, taps); iw,
    ww: (W_out, taps)."""
    for p in prange(x.shape[0] * x.shape[1]):
        _separable_plane(x, y, p, ih, wh, iw, ww)


@njit(cache=True)
def resize_separable_serial(x, y, ih, wh, iw, ww):
    for p in range(x.shape[0] * x.shape[1]):
        _separable_plane(x, y, p, ih, wh, iw, ww)


def as5d(shape) -> tuple:
    """A shape of rank <= 5 with leading axes of size 1 added up to rank 5."""
    return (1,) * (5 - len(shape)) + tuple(shape)


# ---- pad ---------------------------------------------------------------------------------------
def pad_constant(x, out, pads, value):
    """Constant-mode Pad into out; negative pads crop (pads: all begins, then all ends)."""
    rank = x.ndim
    src, dst = [], []
    for a in range(rank):
        begin, end = pads[a], pads[rank + a]
        lo, hi = max(-begin, 0), x.shape[a] - max(-end, 0)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(max(begin, 0), max(begin, 0) + max(hi - lo, 0)))
    if any(p > 0 for p in pads):
        out.fill(value)
    out[tuple(dst)] = x[tuple(src)]
    return out
