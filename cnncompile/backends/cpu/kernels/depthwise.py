"""Depthwise convolution: one input channel per group (group == C), K = C * multiplier.

Rank-generic on 5-D arrays (N, C, D, H, W) with the 15-int geometry ``g`` of ``conv.py``. A job
is a group of input channels of one image (one channel for large planes, several for small ones,
so that each loop is long). It copies its planes once into a small private buffer, zero-padded
and split by stride phase: sub-volume (pz, py, px) holds the padded input at
(z * sd + pz, y * sh + py, x * sw + px). Tap (a, b, e) of output (z, y, x) then sits at
(z + a * dd // sd, y + b * dh // sh, x + e * dw // sw) of sub-volume
(a * dd % sd, b * dh % sh, e * dw % sw): at a fixed offset from the output's flat index in the
sub-volume's pitch. So every stride and dilation runs the same flat, unit-stride loops over the
whole plane (long loops that vectorise, no bounds checks; the few columns past the output width
are computed and dropped), 3x3 taps fused into one pass and 3- or 5-wide kernel rows into one
pass each. The output rows are then copied out with the bias, and the rest of the epilogue
(``epilogue_plane``) applied while the planes are in cache. Indices are unsigned (``_u``), which
lets the loops index one buffer without views (a view costs reference counting, which measured
more than a small plane's arithmetic) and without Numba's wraparound of negative indices (which
would keep them from vectorising).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .conv import (NO_ACT, NO_BIAS, Target, _EMPTY5, _valid_range, as5, batch_step, contiguous,
                   epilogue_args)
from .epilogue import epilogue_plane

#: cold compile seconds of the parallel kernel, for backend.precompile (the slowest first)
COMPILE_WEIGHTS = {"depthwise_conv": 13}
#: a job takes several small planes, so that its buffer allocation is paid once
JOB_ELEMENTS = 4096
#: multiply-adds may fuse (FMA); nothing else is relaxed
FMA = {"contract"}


@njit(inline="always", cache=True)
def _u(i):
    """An unsigned index: Numba skips the wraparound of negative indices for it, which keeps the
    loops free of selects (they vectorise) and needs no view (views cost reference counting)."""
    return np.uint64(i)


@njit(inline="always", cache=True)
def _zero(buf, at, count):
    """buf[at:at + count] = 0."""
    for j in range(count):
        buf[_u(at) + _u(j)] = 0


@njit(inline="always", cache=True)
def _ranges(count, stride, pad, size):
    """(lo0, hi0, lo1, hi1): the j in [0, count) whose padded position j * stride + phase lies
    inside [0, size), for the phases 0 and 1 (hoisted out of the loops: its divisions cost more
    than a short row's copy)."""
    lo0, hi0 = _valid_range(count, stride, -pad, size)
    lo1, hi1 = _valid_range(count, stride, 1 - pad, size)
    return lo0, hi0, lo1, hi1


@njit(inline="always", cache=True)
def _phase_range(ranges, phase, count, stride, pad, size):
    """_valid_range of one phase, from the hoisted ``ranges`` for phases 0 and 1."""
    if phase < 2:
        return ranges[2 * phase], ranges[2 * phase + 1]
    return _valid_range(count, stride, phase - pad, size)


@njit(cache=True, fastmath=FMA)
def _fill(src, plane, shape, buf, at0, g, dq, hq, wq, phase_size, zr, yr, cols):
    """The padded plane at src[plane:] (flat, of ``shape`` (D, H, W)) split into its stride-phase
    sub-volumes: phase p's copy of the plane at buf[p * phase_size + at0:]. Only the input's
    elements are written: buf is zeroed beforehand, once per job (a per-row zeroing of the
    pads cost more than the copy on small planes). zr, yr, cols: _ranges of depth, height and
    width."""
    sd, sh, sw, pd, ph, pw = g[3], g[4], g[5], g[9], g[10], g[11]
    depth, height, width = shape
    for pz in range(sd):
        zlo, zhi = _phase_range(zr, pz, dq, sd, pd, depth)
        for py in range(sh):
            ylo, yhi = _phase_range(yr, py, hq, sh, ph, height)
            base = (pz * sh + py) * sw * phase_size + at0
            for z in range(zlo, zhi):
                iz = z * sd + pz - pd
                for y in range(ylo, yhi):
                    _fill_row(src, plane + (iz * height + y * sh + py - ph) * width, width, buf,
                              base + (z * hq + y) * wq, sw, pw, wq, phase_size, cols)


@njit(inline="always", cache=True)
def _fill_row(src, row, width, buf, at, sw, pw, wq, phase_size, cols):
    """Columns j * sw + px of the padded input row src[row:row + width] into
    buf[at + px * phase_size + j] for every phase px; stride 2 splits both phases in one pass
    (one read of the row). cols: the valid [lo, hi) of phases 0 and 1 (see _ranges)."""
    lo0, hi0, lo1, hi1 = cols
    if sw == 1:
        first = _u(row + lo0 - pw)
        out = _u(at + lo0)
        for j in range(hi0 - lo0):
            buf[out + _u(j)] = src[first + _u(j)]
        return
    if sw == 2:
        odd = at + phase_size
        lo, hi = max(lo0, lo1), min(hi0, hi1)
        for j in range(lo0, min(lo, hi0)):
            buf[_u(at + j)] = src[_u(row + 2 * j - pw)]
        for j in range(max(hi, lo0), hi0):
            buf[_u(at + j)] = src[_u(row + 2 * j - pw)]
        for j in range(lo1, min(lo, hi1)):
            buf[_u(odd + j)] = src[_u(row + 2 * j + 1 - pw)]
        for j in range(max(hi, lo1), hi1):
            buf[_u(odd + j)] = src[_u(row + 2 * j + 1 - pw)]
        first = _u(row + 2 * lo - pw)
        even_at, odd_at = _u(at + lo), _u(odd + lo)
        for j in range(max(hi - lo, 0)):
            buf[even_at + _u(j)] = src[first + _u(2 * j)]
            buf[odd_at + _u(j)] = src[first + _u(2 * j + 1)]
        return
    for px in range(sw):
        offset = px - pw
        lo, hi = _valid_range(wq, sw, offset, width)
        dst = at + px * phase_size
        first = _u(row + lo * sw + offset)
        out = _u(dst + lo)
        if sw == 1:
            for j in range(hi - lo):
                buf[out + _u(j)] = src[first + _u(j)]
        else:
            for j in range(hi - lo):
                buf[out + _u(j)] = src[first + _u(j * sw)]


@njit(inline="always", cache=True)
def _tap(buf, g, a, b, e, hq, wq, volume):
    """The view of buf whose element i is tap (a, b, e) of the output at flat index i (phases
    ``volume`` apart)."""
    sd, sh, sw, dd, dh, dw = g[3], g[4], g[5], g[6], g[7], g[8]
    za, yb, xe = a * dd, b * dh, e * dw
    phase = ((za % sd) * sh + yb % sh) * sw + xe % sw
    return buf[phase * volume + ((za // sd) * hq + yb // sh) * wq + xe // sw:]


@njit(cache=True, fastmath=FMA)
def _taps(acc, buf, w, k0, k_step, planes, volume, length, g, hq, wq, phase_size):
    """acc[p * volume + i] = sum over taps t of w[k0 + p * k_step, t] * tap_t[p * volume + i]
    for i < length, for each of the group's planes p. Indices are unsigned: Numba then skips
    the wraparound of negative indices, and LLVM vectorises the loops."""
    kd, kh, kw = g[0], g[1], g[2]
    for p in range(planes):
        base = np.uint64(p * volume)
        for i in range(length):
            acc[base + np.uint64(i)] = 0
    for a in range(kd):
        t0 = a * kh * kw
        if kh == 3 and kw == 3:
            s0 = _tap(buf, g, a, 0, 0, hq, wq, phase_size)
            s1 = _tap(buf, g, a, 0, 1, hq, wq, phase_size)
            s2 = _tap(buf, g, a, 0, 2, hq, wq, phase_size)
            s3 = _tap(buf, g, a, 1, 0, hq, wq, phase_size)
            s4 = _tap(buf, g, a, 1, 1, hq, wq, phase_size)
            s5 = _tap(buf, g, a, 1, 2, hq, wq, phase_size)
            s6 = _tap(buf, g, a, 2, 0, hq, wq, phase_size)
            s7 = _tap(buf, g, a, 2, 1, hq, wq, phase_size)
            s8 = _tap(buf, g, a, 2, 2, hq, wq, phase_size)
            for p in range(planes):
                k = k0 + p * k_step
                w0, w1, w2 = w[k, t0], w[k, t0 + 1], w[k, t0 + 2]
                w3, w4, w5 = w[k, t0 + 3], w[k, t0 + 4], w[k, t0 + 5]
                w6, w7, w8 = w[k, t0 + 6], w[k, t0 + 7], w[k, t0 + 8]
                base = np.uint64(p * volume)
                for i in range(length):
                    j = base + np.uint64(i)
                    acc[j] += (w0 * s0[j] + w1 * s1[j] + w2 * s2[j] + w3 * s3[j] + w4 * s4[j]
                               + w5 * s5[j] + w6 * s6[j] + w7 * s7[j] + w8 * s8[j])
            continue
        for b in range(kh):
            t = t0 + b * kw
            if kw == 3:
                s0 = _tap(buf, g, a, b, 0, hq, wq, phase_size)
                s1 = _tap(buf, g, a, b, 1, hq, wq, phase_size)
                s2 = _tap(buf, g, a, b, 2, hq, wq, phase_size)
                for p in range(planes):
                    k = k0 + p * k_step
                    w0, w1, w2 = w[k, t], w[k, t + 1], w[k, t + 2]
                    base = np.uint64(p * volume)
                    for i in range(length):
                        j = base + np.uint64(i)
                        acc[j] += w0 * s0[j] + w1 * s1[j] + w2 * s2[j]
            elif kw == 5:
                s0 = _tap(buf, g, a, b, 0, hq, wq, phase_size)
                s1 = _tap(buf, g, a, b, 1, hq, wq, phase_size)
                s2 = _tap(buf, g, a, b, 2, hq, wq, phase_size)
                s3 = _tap(buf, g, a, b, 3, hq, wq, phase_size)
                s4 = _tap(buf, g, a, b, 4, hq, wq, phase_size)
                for p in range(planes):
                    k = k0 + p * k_step
                    w0, w1, w2, w3, w4 = (w[k, t], w[k, t + 1], w[k, t + 2], w[k, t + 3],
                                          w[k, t + 4])
                    base = np.uint64(p * volume)
                    for i in range(length):
                        j = base + np.uint64(i)
                        acc[j] += (w0 * s0[j] + w1 * s1[j] + w2 * s2[j] + w3 * s3[j]
                                   + w4 * s4[j])
            else:
                for e in range(kw):
                    s = _tap(buf, g, a, b, e, hq, wq, phase_size)
                    for p in range(planes):
                        wv = w[k0 + p * k_step, t + e]
                        base = np.uint64(p * volume)
                        for i in range(length):
                            j = base + np.uint64(i)
                            acc[j] += wv * s[j]


@njit(inline="always", cache=True)
def _sizes(g):
    """(Dq, Hq, Wq): the extent of one stride-phase sub-volume of a padded plane, and the
    flat output length in its pitch."""
    od, oh, ow = g[12], g[13], g[14]
    dq = -(-((od - 1) * g[3] + (g[0] - 1) * g[6] + 1) // g[3])
    hq = -(-((oh - 1) * g[4] + (g[1] - 1) * g[7] + 1) // g[4])
    wq = -(-((ow - 1) * g[5] + (g[2] - 1) * g[8] + 1) // g[5])
    return dq, hq, wq, ((od - 1) * hq + (oh - 1)) * wq + ow


@njit(cache=True, fastmath=FMA)  # not inlined into the prange body: that took 30 s to compile
def _job(job, per_job, x, w, bias, out, g, code, params, res, post_code, post_params):
    """Channels [c0, c0 + per_job) of one image: their planes are filled side by side (each
    phase holds the group's planes back to back), so that one flat loop per tap pass covers the
    whole group (small planes would otherwise pay a pass's set-up per plane)."""
    od, oh, ow = g[12], g[13], g[14]
    phases = g[3] * g[4] * g[5]
    channels = x.shape[1]
    multiplier = out.shape[1] // channels
    groups = -(-channels // per_job)
    n = job // groups
    c0 = (job - n * groups) * per_job
    count = min(per_job, channels - c0)
    dq, hq, wq, length = _sizes(g)
    volume = dq * hq * wq
    phase_size = count * volume
    buf = np.empty(phases * phase_size + (count - 1) * volume + length, np.float32)
    filled = buf[:phases * phase_size]
    acc = buf[phases * phase_size:]
    plane_size = od * oh * ow
    has_res = res.shape[0] != 0
    plane_in = x.shape[2] * x.shape[3] * x.shape[4]
    source = x[n].reshape(-1)
    zr = _ranges(dq, g[3], g[9], x.shape[2])
    yr = _ranges(hq, g[4], g[10], x.shape[3])
    cols = _ranges(wq, g[5], g[11], x.shape[4])
    _zero(filled, 0, phases * phase_size)
    for p in range(count):
        _fill(source, (c0 + p) * plane_in, x.shape[2:], filled, p * volume, g, dq, hq, wq,
              phase_size, zr, yr, cols)
    target = out[n].reshape(-1)
    for m in range(multiplier):
        _taps(acc, filled, w, c0 * multiplier + m, multiplier, count, volume, length, g, hq, wq,
              phase_size)
        for p in range(count):
            k = (c0 + p) * multiplier + m
            b = bias[k] if bias.shape[0] != 0 else np.float32(0)
            for z in range(od):
                for y in range(oh):
                    dst = _u(((k * od + z) * oh + y) * ow)
                    src = _u(p * volume + (z * hq + y) * wq)
                    for o in range(ow):
                        target[dst + _u(o)] = acc[src + _u(o)] + b
    if code != 0 or has_res:
        # the job's output planes (every multiple of its channels) are contiguous: one epilogue
        # call, so that the activation dispatch is compiled once
        lo, hi = c0 * multiplier * plane_size, (c0 + count) * multiplier * plane_size
        block = target[lo:hi]
        added = res[n].reshape(-1)[lo:hi] if has_res else block
        epilogue_plane(block, np.float32(0), code, params, added, has_res, post_code,
                       post_params)


@njit(inline="always", cache=True)
def _jobs(x, out, g):
    """(job count, channels per job): groups of about JOB_ELEMENTS outputs, 16 jobs at least."""
    channels = x.shape[1]
    size = out.shape[2] * out.shape[3] * out.shape[4] * (out.shape[1] // channels)
    per_job = max(1, min(-(-JOB_ELEMENTS // size), -(-x.shape[0] * channels // 16), channels))
    return x.shape[0] * -(-channels // per_job), per_job


@njit(parallel=True, cache=True, fastmath=FMA)
def depthwise_conv(x, w, bias, out, g, code, params, res, post_code, post_params):
    """out (N, C * m, od, oh, ow) = epilogue(depthwise conv of x (N, C, D, H, W)); w (C * m,
    taps); bias of size 0 means none, res with shape[0] == 0 no residual."""
    count, per_job = _jobs(x, out, g)
    for job in prange(count):
        _job(job, per_job, x, w, bias, out, g, code, params, res, post_code, post_params)


def conv_depthwise(x, w, bias, out, g, act=NO_ACT, residual=None, post=NO_ACT, parallel=True):
    """Depthwise convolution (group == C) into ``out`` (possibly a strided view); w (K, taps).
    parallel=False runs the kernel on the calling thread alone, for work too small to pay for
    a parallel launch. (The same parallel kernel with one thread, not a serial twin: Numba
    compiles the loops measurably slower outside a prange body, 1.5-3x on small planes.)"""
    x5, out5 = as5(x), as5(out)
    code, params = epilogue_args(act)
    post_code, post_params = epilogue_args(post)
    bias = NO_BIAS if bias is None else bias
    res5 = None if residual is None else as5(residual)
    step = batch_step(out5)
    with one_thread(not parallel):
        for n0 in range(0, x5.shape[0], step):
            n1 = min(x5.shape[0], n0 + step)
            target = Target(out5, n0, n1)
            res = _EMPTY5 if res5 is None else contiguous(res5[n0:n1])
            depthwise_conv(contiguous(x5[n0:n1]), w, bias, target.array, g, code, params, res,
                           post_code, post_params)
            target.done()
    return out


class one_thread:
    """Numba's parallel regions on the calling thread alone while inside (when ``active``)."""

    def __init__(self, active: bool):
        self.saved = numba.get_num_threads() if active else 1

    def __enter__(self):
        if self.saved > 1:
            numba.set_num_threads(1)

    def __exit__(self, *exc):
        if self.saved > 1:
            numba.set_num_threads(self.saved)
        return False
