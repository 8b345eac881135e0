"""Pooling kernels: windowed max / average / Lp pooling and the global pools.

Every windowed kernel works on 5-D arrays (N, C, D, H, W): 1-D and 2-D pools reach them through
views with leading spatial axes of size 1 (``spatial3``), so one compiled kernel serves every rank.
Window geometry (kernel, strides, dilations, pads) arrives as 3-tuples and the output shape
carries ceil_mode, so a kernel compiles once per dtype and layout. Work is split over the N*C
planes; each kernel has a ``_serial`` twin that the emitter picks for small work, where a
parallel launch costs more than it saves (and compiles three times slower).

The value kernels are separable, per output row: first the window's (depth, height) taps are
reduced row against row into a line buffer (unit-stride loops over whole input rows), then the
window along the line gives the output row (3-wide windows with strides 1 and 2, and 2x2/s2,
spelled out). The line is padded on both sides with what never wins (-inf or the integer minimum
for max, 0 for sums), wide enough for pads and ceil_mode's extra room, so no loop needs a bounds
check; indices are unsigned, which spares Numba's wraparound of negative indices (the loops then
vectorise without views). Sums run in float64; average pooling's divisor is counted per axis.
MaxPool's Indices output has its own element-wise kernel (``max_pool_indices``), compiled only
by the models that ask for it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: cold compile seconds of the parallel kernels, for backend.precompile (3 when not listed)
COMPILE_WEIGHTS = {"max_pool": 2.2, "global_pool": 1.1}


def spatial3(shape) -> tuple:
    """(N, C, D, H, W) for an (N, C, *spatial) shape of 1 to 3 spatial axes."""
    return (*shape[:2], *(1,) * (5 - len(shape)), *shape[2:])


def geometry3(values, fill: int) -> tuple:
    """A per-spatial-axis attribute padded at the front to three axes."""
    return (fill,) * (3 - len(values)) + tuple(int(v) for v in values)


@njit(cache=True, inline="always")
def _tap_range(start, size, kernel, dilation):
    """Taps k with 0 <= start + k * dilation < size, as the half-open range [lo, hi)."""
    lo = 0
    if start < 0:
        lo = (-start + dilation - 1) // dilation
    hi = (size - start + dilation - 1) // dilation
    if hi > kernel:
        hi = kernel
    return lo, max(hi, lo)


@njit(cache=True, inline="always")
def _clip(value, size):
    return min(max(value, 0), size - 1)


# ---- max ---------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _take_max(best, v):
    """The larger one; a NaN wins and then sticks (np.maximum's rule, order-independent)."""
    return v if (v > best or v != v) else best


@njit(cache=True, inline="always")
def _u(i):
    """An unsigned index: Numba skips the wraparound of negative indices for it, so the loops
    need no views (views cost reference counting) and stay free of selects (they vectorise)."""
    return np.uint64(i)


@njit(cache=True, inline="always")
def _line_length(w_in, w_out, kernel, stride, dilation, pad):
    """Length of the padded line the column pass reads: input, pads, and ceil_mode's room."""
    return max((w_out - 1) * stride + (kernel - 1) * dilation + 1, pad + w_in)


@njit(cache=True, inline="always")
def _columns_max(line, out, w_out, kernel, stride, dilation):
    """out[o] = max over taps e of line[o * stride + e * dilation] (line padded: no borders);
    3-wide windows with strides 1 and 2 in one pass, the rest one pass per tap."""
    if kernel == 3 and dilation == 1 and stride == 2:
        for o in range(w_out):
            j = _u(2 * o)
            out[o] = _take_max(_take_max(line[j], line[j + _u(1)]), line[j + _u(2)])
    elif kernel == 3 and dilation == 1 and stride == 1:
        for o in range(w_out):
            j = _u(o)
            out[o] = _take_max(_take_max(line[j], line[j + _u(1)]), line[j + _u(2)])
    elif kernel == 2 and dilation == 1 and stride == 2:
        for o in range(w_out):
            j = _u(2 * o)
            out[o] = _take_max(line[j], line[j + _u(1)])
    else:
        for o in range(w_out):
            out[o] = line[_u(o * stride)]
        for e in range(1, kernel):
            for o in range(w_out):
                out[o] = _take_max(out[o], line[_u(o * stride + e * dilation)])


# the plane functions are calls, not inlined into the prange bodies: max_pool took 4.6 s to compile
# with _max_plane inlined, 2.7 s without (and max_pool_serial 1.7 s, 0.4), at the same speed
@njit(cache=True, error_model="numpy")
def _max_plane(x, y, plane, kernel, strides, dilations, pads, lowest, line):
    """One (n, c) plane of max_pool, separably: per output row, the maximum over the window's
    (depth, height) rows into ``line`` (a row padded with ``lowest`` on both sides, unit-stride
    loops), then the window maximum along it into the output row."""
    channels, d_in, h_in, w_in = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    d_out, h_out, w_out = y.shape[2], y.shape[3], y.shape[4]
    n = plane // channels
    c = plane - n * channels
    pw = pads[2]
    for j in range(line.shape[0]):
        line[j] = lowest
    for od in range(d_out):
        d0 = od * strides[0] - pads[0]
        dlo, dhi = _tap_range(d0, d_in, kernel[0], dilations[0])
        for oh in range(h_out):
            h0 = oh * strides[1] - pads[1]
            hlo, hhi = _tap_range(h0, h_in, kernel[1], dilations[1])
            if dhi <= dlo or hhi <= hlo:
                for j in range(w_in):
                    line[_u(pw + j)] = lowest
            first = True
            for kd in range(dlo, dhi):
                for kh in range(hlo, hhi):
                    row = x[n, c, d0 + kd * dilations[0], h0 + kh * dilations[1]]
                    if first:
                        for j in range(w_in):
                            line[_u(pw + j)] = row[j]
                        first = False
                    else:
                        for j in range(w_in):
                            at = _u(pw + j)
                            line[at] = _take_max(line[at], row[j])
            _columns_max(line, y[n, c, od, oh], w_out, kernel[2], strides[2], dilations[2])


@njit(parallel=True, cache=True, error_model="numpy")
def max_pool(x, y, kernel, strides, dilations, pads, lowest):
    """y = window maximum over 5-D x (NaN wins); ``lowest`` (-inf in x's dtype, or the dtype's
    minimum for integers) is what an all-padding window gives."""
    size = _line_length(x.shape[4], y.shape[4], kernel[2], strides[2], dilations[2], pads[2])
    planes = x.shape[0] * x.shape[1]
    per_job = max(1, min(-(-4096 // (y.shape[2] * y.shape[3] * y.shape[4])), -(-planes // 16)))
    for job in prange(-(-planes // per_job)):
        line = np.empty(size, x.dtype)
        for plane in range(job * per_job, min(planes, (job + 1) * per_job)):
            _max_plane(x, y, plane, kernel, strides, dilations, pads, lowest, line)


@njit(cache=True, error_model="numpy")
def max_pool_serial(x, y, kernel, strides, dilations, pads, lowest):
    """max_pool on one thread, for work too small to pay for a parallel launch."""
    line = np.empty(_line_length(x.shape[4], y.shape[4], kernel[2], strides[2], dilations[2],
                                 pads[2]), x.dtype)
    for plane in range(x.shape[0] * x.shape[1]):
        _max_plane(x, y, plane, kernel, strides, dilations, pads, lowest, line)


@njit(cache=True, error_model="numpy")
def max_pool_indices(x, y, indices, kernel, strides, dilations, pads, storage_order):
    """max_pool plus the flat index into X of each maximum (its first occurrence in window
    order, like argmax), row-major or, with storage_order=1, column-major over spatial axes.
    Serial: only MaxUnpool-style models ask for indices."""
    batch, channels, d_in, h_in, w_in = x.shape
    d_out, h_out, w_out = y.shape[2], y.shape[3], y.shape[4]
    plane_size = d_in * h_in * w_in
    for plane in range(batch * channels):
        n = plane // channels
        c = plane - n * channels
        for od in range(d_out):
            d0 = od * strides[0] - pads[0]
            dlo, dhi = _tap_range(d0, d_in, kernel[0], dilations[0])
            for oh in range(h_out):
                h0 = oh * strides[1] - pads[1]
                hlo, hhi = _tap_range(h0, h_in, kernel[1], dilations[1])
                for ow in range(w_out):
                    w0 = ow * strides[2] - pads[2]
                    wlo, whi = _tap_range(w0, w_in, kernel[2], dilations[2])
                    best = -np.inf
                    bd, bh, bw = _clip(d0, d_in), _clip(h0, h_in), _clip(w0, w_in)
                    found = False
                    for kd in range(dlo, dhi):
                        d = d0 + kd * dilations[0]
                        for kh in range(hlo, hhi):
                            h = h0 + kh * dilations[1]
                            for kw in range(wlo, whi):
                                w = w0 + kw * dilations[2]
                                v = x[n, c, d, h, w]
                                # the first NaN sticks; otherwise the first strict maximum
                                if not found or (best == best and (v > best or v != v)):
                                    best = v
                                    bd, bh, bw = d, h, w
                                    found = True
                    if found and best == -np.inf:
                        # all -inf: the reference's argmax picks tap 0, padding or not
                        bd, bh, bw = _clip(d0, d_in), _clip(h0, h_in), _clip(w0, w_in)
                    y[n, c, od, oh, ow] = best
                    if storage_order == 0:
                        spatial = (bd * h_in + bh) * w_in + bw
                    else:
                        spatial = bd + d_in * (bh + h_in * bw)
                    indices[n, c, od, oh, ow] = plane * plane_size + spatial


# ---- average / Lp ------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _power(v, p):
    """|v| ** p for the Lp sums (p = 0: v itself, for averages)."""
    if p == 0:
        return v
    if p == 1:
        return abs(v)
    if p == 2:
        return v * v
    return abs(v) ** p


@njit(cache=True, inline="always")
def _counted(start, size, kernel, dilation, pad_begin, pad_end, include_pad):
    """Taps that average pooling divides by along one axis: those inside the input, or inside
    input and pads (not the room ceil_mode adds) with count_include_pad."""
    if include_pad:
        lo, hi = _tap_range(start + pad_begin, size + pad_begin + pad_end, kernel, dilation)
    else:
        lo, hi = _tap_range(start, size, kernel, dilation)
    return hi - lo


@njit(cache=True, inline="always")
def _columns_sum(line, acc, w_out, kernel, stride, dilation):
    """acc[o] = sum over taps e of line[o * stride + e * dilation] (line zero-padded)."""
    if kernel == 3 and dilation == 1 and stride == 1:
        for o in range(w_out):
            j = _u(o)
            acc[o] = line[j] + line[j + _u(1)] + line[j + _u(2)]
    elif kernel == 3 and dilation == 1 and stride == 2:
        for o in range(w_out):
            j = _u(2 * o)
            acc[o] = line[j] + line[j + _u(1)] + line[j + _u(2)]
    elif kernel == 2 and dilation == 1 and stride == 2:
        for o in range(w_out):
            j = _u(2 * o)
            acc[o] = line[j] + line[j + _u(1)]
    else:
        for o in range(w_out):
            acc[o] = line[_u(o * stride)]
        for e in range(1, kernel):
            for o in range(w_out):
                acc[o] += line[_u(o * stride + e * dilation)]


@njit(cache=True, error_model="numpy")
def _sum_plane(x, y, plane, kernel, strides, dilations, pads, pad_ends, p, include_pad, counts,
               line, acc):
    """One (n, c) plane of sum_pool, separably as _max_plane: per output row the sum of |x|^p
    over the window's (depth, height) rows into the zero-padded float64 ``line``, then the
    window sums along it into ``acc`` (w_out), scaled (averages) or rooted (Lp) into y."""
    channels, d_in, h_in, w_in = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    d_out, h_out, w_out = y.shape[2], y.shape[3], y.shape[4]
    n = plane // channels
    c = plane - n * channels
    pw = pads[2]
    for j in range(line.shape[0]):
        line[j] = 0.0
    for od in range(d_out):
        d0 = od * strides[0] - pads[0]
        dlo, dhi = _tap_range(d0, d_in, kernel[0], dilations[0])
        dcount = _counted(d0, d_in, kernel[0], dilations[0], pads[0], pad_ends[0], include_pad)
        for oh in range(h_out):
            h0 = oh * strides[1] - pads[1]
            hlo, hhi = _tap_range(h0, h_in, kernel[1], dilations[1])
            hcount = _counted(h0, h_in, kernel[1], dilations[1], pads[1], pad_ends[1],
                              include_pad)
            for j in range(w_in):
                line[_u(pw + j)] = 0.0
            for kd in range(dlo, dhi):
                for kh in range(hlo, hhi):
                    row = x[n, c, d0 + kd * dilations[0], h0 + kh * dilations[1]]
                    if p == 0:
                        for j in range(w_in):
                            line[_u(pw + j)] += row[j]
                    elif p == 2:
                        for j in range(w_in):
                            v = np.float64(row[j])
                            line[_u(pw + j)] += v * v
                    else:
                        for j in range(w_in):
                            line[_u(pw + j)] += _power(np.float64(row[j]), p)
            _columns_sum(line, acc, w_out, kernel[2], strides[2], dilations[2])
            out = y[n, c, od, oh]
            if p == 0:
                scale = 1.0 / (dcount * hcount)
                for ow in range(w_out):
                    out[ow] = acc[ow] * scale / counts[ow]
            else:
                for ow in range(w_out):
                    out[ow] = _root(acc[ow], p)


@njit(cache=True)
def _column_counts(w_in, w_out, kernel, stride, dilation, pad, pad_end, include_pad):
    counts = np.empty(w_out)
    for ow in range(w_out):
        counts[ow] = _counted(ow * stride - pad, w_in, kernel, dilation, pad, pad_end,
                              include_pad)
    return counts


@njit(parallel=True, cache=True, error_model="numpy")
def sum_pool(x, y, kernel, strides, dilations, pads, pad_ends, p, include_pad):
    """p = 0: average pooling (divisor per count_include_pad); p >= 1: Lp pooling,
    (sum |x|^p)^(1/p). Sums run in float64; padding adds nothing."""
    counts = _column_counts(x.shape[4], y.shape[4], kernel[2], strides[2], dilations[2],
                            pads[2], pad_ends[2], include_pad)
    size = _line_length(x.shape[4], y.shape[4], kernel[2], strides[2], dilations[2], pads[2])
    planes = x.shape[0] * x.shape[1]
    per_job = max(1, min(-(-4096 // (y.shape[2] * y.shape[3] * y.shape[4])), -(-planes // 16)))
    for job in prange(-(-planes // per_job)):
        line = np.empty(size)
        acc = np.empty(y.shape[4])
        for plane in range(job * per_job, min(planes, (job + 1) * per_job)):
            _sum_plane(x, y, plane, kernel, strides, dilations, pads, pad_ends, p, include_pad,
                       counts, line, acc)


@njit(cache=True, error_model="numpy")
def sum_pool_serial(x, y, kernel, strides, dilations, pads, pad_ends, p, include_pad):
    """sum_pool on one thread."""
    counts = _column_counts(x.shape[4], y.shape[4], kernel[2], strides[2], dilations[2],
                            pads[2], pad_ends[2], include_pad)
    line = np.empty(_line_length(x.shape[4], y.shape[4], kernel[2], strides[2], dilations[2],
                                 pads[2]))
    acc = np.empty(y.shape[4])
    for plane in range(x.shape[0] * x.shape[1]):
        _sum_plane(x, y, plane, kernel, strides, dilations, pads, pad_ends, p, include_pad,
                   counts, line, acc)


@njit(cache=True, inline="always")
def _root(total, p):
    if p == 1:
        return total
    if p == 2:
        return np.sqrt(total)
    return total ** (1.0 / p)


# ---- global ------------------------------------------------------------------------------------
#: float sums may be reassociated (and vectorised); nothing else is relaxed, so NaN and inf
#: behave as in the reference
REDUCE_MATH = {"reassoc", "contract"}


@njit(cache=True, error_model="numpy", fastmath=REDUCE_MATH)
def _global_plane(x, y, plane, mode, p):
    channels, size = x.shape[1], x.shape[2]
    n = plane // channels
    c = plane - n * channels
    row = x[n, c]
    if mode == 1:
        best = row[0]
        for i in range(1, size):
            best = _take_max(best, row[i])
        y[n, c] = best
    elif mode == 0 or p == 1:
        total = 0.0
        for i in range(size):
            total += abs(np.float64(row[i])) if mode else np.float64(row[i])
        y[n, c] = total / size if mode == 0 else total
    elif p == 2:
        total = 0.0
        for i in range(size):
            v = np.float64(row[i])
            total += v * v
        y[n, c] = np.sqrt(total)
    else:
        total = 0.0
        for i in range(size):
            total += abs(np.float64(row[i])) ** p
        y[n, c] = _root(total, p)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=REDUCE_MATH)
def global_pool(x, y, mode, p):
    """Over the flattened spatial axis of x (N, C, S) into y (N, C): mode 0 mean, 1 max (NaN
    wins), 2 Lp norm. Sums run in float64."""
    for plane in prange(x.shape[0] * x.shape[1]):
        _global_plane(x, y, plane, mode, p)


@njit(cache=True, error_model="numpy", fastmath=REDUCE_MATH)
def global_pool_serial(x, y, mode, p):
    """global_pool on one thread."""
    for plane in range(x.shape[0] * x.shape[1]):
        _global_plane(x, y, plane, mode, p)
