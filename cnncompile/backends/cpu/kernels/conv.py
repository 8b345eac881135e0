"""Convolution kernels: im2col + GEMM, 1x1 GEMM, direct, depthwise, grouped and transposed.

Every kernel is rank-generic by working on 5-D arrays (N, C, D, H, W): 1-D and 2-D convolutions
are 3-D ones with unit leading spatial axes, so each Numba kernel compiles once for every rank.
The geometry travels as one tuple ``g`` of 15 ints, all for the 3 normalised axes::

    (kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow)

kernel, strides, dilations, begin pads and the output size (which implies the end pads).

Packing, im2col, col2im and the epilogue (``epilogue.py``: bias, activation, residual, post
activation) are Numba; the GEMMs are microkernel.py's packed GEMM where the weights were packed at
compile time (inference: im2col then writes its columns in that GEMM's panels, im2col_panels),
else NumPy's OpenBLAS called from inside the Numba kernels (``blas.sgemm``). The drivers write into ``out``, which may be a strided view (a channel slice of a
concat buffer with N > 1): each image of it is then contiguous (and is addressed as flat memory
with an image pitch, ``flat_images``), and a layout with no contiguous image is computed into a
temporary and copied. ``ws`` is a flat float32 scratch buffer that the generated module allocates
once (``scratch_size`` says how large; a smaller one makes a driver allocate).

Threads (im2col + GEMM, 1x1 GEMM, transposed, and Winograd in winograd.py): a driver is a few
lines of Python that pick a plan from the shapes (cached per shape), then one parallel Numba call
whose ``prange`` tasks each run im2col on their block into the thread's slot of ``ws``
(``numba.get_thread_id``), a single-threaded sgemm straight into out and the epilogue on the block
while it is in the core's cache.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..threads import serial_blas, threads
from .blas import sgemm
from .microkernel import (B_PANELS, EPI_BIAS, EPI_POST_RELU, EPI_RELU, EPI_RESIDUAL, KC, MR, NR,
                          gemm_packed_epilogue, panel_pitch)
from .epilogue import RELU, activation_row, bias_activation, epilogue_plane

NO_ACT = (0, 0.0, 0.0)
NO_BIAS = np.zeros(0, dtype=np.float32)
_EMPTY3 = np.zeros((0, 0, 0), dtype=np.float32)
_EMPTY5 = np.zeros((0, 0, 0, 0, 0), dtype=np.float32)
_EMPTY1 = np.zeros(0, dtype=np.float32)
_ONE = np.zeros(1, dtype=np.float32)


# ---- shape helpers (Python) ----------------------------------------------------------------------
def geometry(kernel, strides, dilations, pads, out_spatial) -> tuple[int, ...]:
    """The 15-int geometry tuple for a rank-1/2/3 convolution (pads: all begins, then ends)."""
    rank = len(kernel)
    lead = 3 - rank

    def three(values, fill):
        return (fill,) * lead + tuple(int(v) for v in values)

    return (three(kernel, 1) + three(strides, 1) + three(dilations, 1)
            + three(list(pads)[:rank], 0) + three(out_spatial, 1))


def as5(a: np.ndarray) -> np.ndarray:
    """(N, C, spatial...) -> (N, C, D, H, W) view with unit leading spatial axes."""
    return a.reshape(a.shape[:2] + (1,) * (5 - a.ndim) + a.shape[2:])


@lru_cache(maxsize=256)
def epilogue_args(act: tuple) -> tuple[int, np.ndarray]:
    """(code, params array) from the literal (code, p0, p1) the generated code passes."""
    return int(act[0]), np.array(act[1:3], dtype=np.float64)


def contiguous(a: np.ndarray) -> np.ndarray:
    """a itself when C-contiguous (the kernels' one signature), else a contiguous copy."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class Target:
    """Where a kernel writes an image block out[n0:n1]: the block itself when contiguous, else a
    temporary copied back by ``done``."""

    def __init__(self, out5: np.ndarray, n0: int, n1: int):
        self.block = out5[n0:n1]
        self.array = self.block if self.block.flags.c_contiguous else np.empty(
            self.block.shape, np.float32)

    def done(self):
        if self.array is not self.block:
            self.block[...] = self.array


def batch_step(out5: np.ndarray) -> int:
    """How many images a batched kernel may write at once: all of them, unless out is strided."""
    return out5.shape[0] if out5.flags.c_contiguous else 1


# ---- Numba helpers -------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def _valid_range(count, stride, offset, size):
    """[lo, hi): the o in [0, count) with 0 <= o * stride + offset < size."""
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    last = size - 1 - offset
    hi = last // stride + 1 if last >= 0 else 0
    hi = min(hi, count)
    return min(lo, hi), hi


# ---- padded input (im2col and direct read it: no bounds checks) ---------------------------------
def padded_shape(g) -> tuple[int, int, int]:
    """(Dp, Hp, Wp): the padded extent every output position's window reads."""
    return tuple((g[12 + i] - 1) * g[3 + i] + (g[i] - 1) * g[6 + i] + 1 for i in range(3))


@njit(parallel=True, cache=True)
def pad_planes(x, xp, g):
    """xp (N, C, Dp, Hp, Wp) = x shifted by its begin pads, zeros elsewhere (cropped at Dp...)."""
    pd, ph, pw = g[9], g[10], g[11]
    n_batch, channels, depth, height, width = x.shape
    dp, hp, wp = xp.shape[2], xp.shape[3], xp.shape[4]
    for job in prange(n_batch * channels):
        n = job // channels
        c = job % channels
        for z in range(dp):
            iz = z - pd
            for y in range(hp):
                iy = y - ph
                dst = xp[n, c, z, y]
                if iz < 0 or iz >= depth or iy < 0 or iy >= height:
                    for i in range(wp):
                        dst[i] = 0
                    continue
                src = x[n, c, iz, iy]
                hi = min(wp, pw + width)
                lo = min(pw, hi)
                for i in range(lo):
                    dst[i] = 0
                inner = dst[lo:hi]
                for i in range(hi - lo):
                    inner[i] = src[i]
                for i in range(hi, wp):
                    dst[i] = 0


def scratch(ws: np.ndarray, size: int) -> np.ndarray:
    """The first ``size`` elements of ``ws``, or a new buffer when ws is smaller."""
    return ws[:size] if ws is not None and ws.size >= size else np.empty(size, np.float32)


# ---- im2col --------------------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def pad_image(x, xp, pd, ph, pw):
    """xp (C, Dp, Hp, Wp) = x (C, D, H, W) placed at (pd, ph, pw), zeros around it, cropped at
    xp's end: pad_planes for one image, serial (a task of the drivers' threads)."""
    channels, depth, height, width = x.shape
    dp, hp, wp = xp.shape[1], xp.shape[2], xp.shape[3]
    hi = min(wp, pw + width)
    lo = min(pw, hi)
    for c in range(channels):
        for z in range(dp):
            for y in range(hp):
                dst = xp[c, z, y]
                iz = z - pd
                iy = y - ph
                if iz < 0 or iz >= depth or iy < 0 or iy >= height:
                    for i in range(wp):
                        dst[i] = 0
                    continue
                src = x[c, iz, iy]
                for i in range(lo):
                    dst[i] = 0
                inner = dst[lo:hi]
                for i in range(hi - lo):
                    inner[i] = src[i]
                for i in range(hi, wp):
                    dst[i] = 0


@njit(nogil=True, cache=True)
def im2col_block(xp, col, g, r0, r1, p0, j0, count):
    """col[row, j0:j0 + count] for rows [r0, r1) = the im2col columns of output positions
    [p0, p0 + count) of one padded image xp (C, Dp, Hp, Wp), its begin pads included (no bounds
    checks); rows are (channel, tap) channel-major. Bounds checks here instead of padding first
    measured 2-3x slower."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow = g
    taps = kd * kh * kw
    first = p0 // ow
    last = (p0 + count - 1) // ow
    for row in range(r0, r1):
        c = row // taps
        t = row % taps
        a = t // (kh * kw)
        b = (t // kw) % kh
        e = t % kw
        dst = col[row, j0:j0 + count]
        for line in range(first, last + 1):  # output rows (z, y) the block touches
            z = line // oh
            y = line - z * oh
            s0 = max(p0 - line * ow, 0)
            s1 = min(p0 + count - line * ow, ow)
            seg = dst[line * ow + s0 - p0:line * ow + s1 - p0]
            part = xp[c, z * sd + a * dd, y * sh + b * dh, s0 * sw + e * dw:]
            if sw == 1:
                for i in range(s1 - s0):
                    seg[i] = part[i]
            elif sw == 2:
                for i in range(s1 - s0):
                    seg[i] = part[2 * i]
            else:
                for i in range(s1 - s0):
                    seg[i] = part[i * sw]


@njit(nogil=True, cache=True)
def im2col_panels(xp, dst, g, rows_g, pitch, r0, r1, c0, p0, count, j0):
    """im2col_block's rows [r0, r1) (whole channels: multiples of the taps) of positions
    [p0, p0 + count) into columns j0... of dst (flat) in the packed GEMM's panels
    (microkernel.panel_at: per group of rows_g rows, pitch floats a row): what gemm_packed reads
    with B_PANELS, so that the columns are written once rather than written row by row and then
    packed. xp (C-contiguous) holds the image's channels from c0. Panel by panel: each row's NR
    floats of a panel are stored together, gathered through a table of the panel's window
    offsets."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow = g
    taps = kd * kh * kw
    hp, wp = xp.shape[2], xp.shape[3]
    plane = xp.shape[1] * hp * wp
    src = xp.reshape(-1)
    # per row: its (channel, tap) offset in xp, where its floats of panel 0 go, its block's
    # depth; counted up rather than divided out (a 4608-row 7x7 layer spent longer on the
    # divisions than on the copies)
    row_src = np.empty(r1 - r0, np.int64)
    row_dst = np.empty(r1 - r0, np.int64)
    row_kc = np.empty(r1 - r0, np.int64)
    q = r0 // rows_g
    rg = r0 - q * rows_g
    r = 0
    for c in range(r0 // taps - c0, r1 // taps - c0):
        for a in range(kd):
            for b in range(kh):
                for e in range(kw):
                    row_src[r] = c * plane + (a * dd * hp + b * dh) * wp + e * dw
                    block = rg // KC * KC
                    row_kc[r] = min(KC, rows_g - block)
                    row_dst[r] = (q * rows_g + block) * pitch + (rg - block) * NR
                    r += 1
                    rg += 1
                    if rg == rows_g:
                        rg = 0
                        q += 1
    offsets = np.empty(NR, np.int64)
    for panel in range(j0 // NR, (j0 + count - 1) // NR + 1):
        lo = max(j0, panel * NR)
        n = min(j0 + count, panel * NR + NR) - lo
        position = p0 + lo - j0
        line = position // ow
        z = line // oh
        y = line - z * oh
        x = position - line * ow
        for u in range(n):
            offsets[u] = (z * sd * hp + y * sh) * wp + x * sw
            x += 1
            if x == ow:
                x = 0
                y += 1
                if y == oh:
                    y = 0
                    z += 1
        for r in range(r1 - r0):
            at = row_dst[r] + panel * NR * row_kc[r] + lo - panel * NR
            base = row_src[r]
            for u in range(n):
                dst[np.uint64(at + u)] = src[np.uint64(base + offsets[u])]


#: im2col_image gathers through a table of source offsets on images narrower than this: rows of
#: 4-7 floats cost more in loop set-up than in copying (ResNet-18 at batch 8, 512 channels 4x4:
#: 0.36 ms against 0.79 by segments, 1.33 by slices); wider rows are copied segment by segment
GATHER_MAX_WIDTH = 8


@njit(nogil=True, cache=True)
def tap_offsets(g, depth, height, width, hp, wp):
    """table[t * S + p] (S = depth * height * width) = the flat offset, in a plane (.., hp, wp),
    of tap t of the window at position p = (z, y, x) of the grid: the window starts at
    (z, y, x) * stride, its taps step by the dilation. im2col gathers through it (windows of
    the output positions in the padded input), col2im scatters (input positions in the
    uncropped output)."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw = g[:9]
    taps = kd * kh * kw
    positions = depth * height * width
    table = np.empty(taps * positions, np.uint32)
    for t in range(taps):
        a, b, e = t // (kh * kw), (t // kw) % kh, t % kw
        for z in range(depth):
            for y in range(height):
                for x in range(width):
                    table[t * positions + (z * height + y) * width + x] = \
                        ((z * sd + a * dd) * hp + y * sh + b * dh) * wp + x * sw + e * dw
    return table


@njit(nogil=True, cache=True)
def im2col_image(x, xp, col, g, start):
    """col[:, start:start + S] = the im2col columns of one image x (C, D, H, W), rows
    channel-major: x is first copied into xp (C, Dp, Hp, Wp) with its pads (zeros), so that the
    copies below need no bounds checks (3-4x faster than checking per row). Flat indices on xp
    and col (unsigned: no wraparound checks), 1.7-3.7x faster than copying between slices."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow = g
    channels, depth, height, width = x.shape
    dp, hp, wp = xp.shape[1], xp.shape[2], xp.shape[3]
    plane = dp * hp * wp
    flat = xp.reshape(-1)
    flat[:] = 0
    lo, hi = max(0, pw), min(wp, pw + width)
    for c in range(channels):
        for z in range(max(0, pd), min(dp, pd + depth)):
            for y in range(max(0, ph), min(hp, ph + height)):
                src = x[c, z - pd, y - ph]
                at = np.uint64(c * plane + (z * hp + y) * wp)
                for i in range(lo, hi):
                    flat[at + np.uint64(i)] = src[i - pw]
    taps = kd * kh * kw
    positions = od * oh * ow
    pitch = col.shape[1]
    out = col.reshape(-1)
    if ow < GATHER_MAX_WIDTH:
        table = tap_offsets(g, od, oh, ow, hp, wp)
        for c in range(channels):
            src = flat[c * plane:(c + 1) * plane]
            for t in range(taps):
                at = np.uint64((c * taps + t) * pitch + start)
                first = np.uint64(t * positions)
                for p in range(positions):
                    out[at + np.uint64(p)] = src[table[first + np.uint64(p)]]
        return
    for row in range(channels * taps):
        c, t = row // taps, row % taps
        a, b, e = t // (kh * kw), (t // kw) % kh, t % kw
        for z in range(od):
            for y in range(oh):
                at = np.uint64(row * pitch + start + (z * oh + y) * ow)
                s = np.uint64(c * plane + ((z * sd + a * dd) * hp + y * sh + b * dh) * wp
                              + e * dw)
                if sw == 1:
                    for o in range(ow):
                        out[at + np.uint64(o)] = flat[s + np.uint64(o)]
                else:
                    for o in range(ow):
                        out[at + np.uint64(o)] = flat[s + np.uint64(o * sw)]


@njit(inline="always", cache=True)
def _copy_rows(src, src_at, src_pitch, dst, dst_at, dst_pitch, rows, length):
    """dst rows = src rows, on flat arrays (unsigned indices: no wraparound checks)."""
    for r in range(rows):
        s = np.uint64(src_at + r * src_pitch)
        d = np.uint64(dst_at + r * dst_pitch)
        for i in range(length):
            dst[d + np.uint64(i)] = src[s + np.uint64(i)]


@njit(nogil=True, cache=True)
def epilogue_rows(src, src_at, dst, dst_at, res, res_at, pitches, rows, length, bias, code,
                  params, post_code, post_params):
    """dst row r = post(act(src row r + bias[r]) + res row r) for r in range(rows), on flat
    arrays: row r of each starts at its ``*_at`` + r * its pitch (``pitches`` = (src, dst, res)),
    ``length`` long; an empty ``src`` means in place on dst. Each row is copied first and then
    updated in place: a loop that reads src and writes dst does not vectorise when they may be
    the same memory (measured 2x slower in place)."""
    src_pitch, dst_pitch, res_pitch = pitches
    has_src = src.shape[0] != 0
    has_bias = bias.shape[0] != 0
    has_res = res.shape[0] != 0
    zero = np.float32(0)
    for r in range(rows):
        d = dst[dst_at + r * dst_pitch:dst_at + r * dst_pitch + length]
        if has_src:
            s = src[src_at + r * src_pitch:src_at + r * src_pitch + length]
            for i in range(length):
                d[i] = s[i]
        b = bias[r] if has_bias else zero
        if code == RELU:
            for i in range(length):
                v = d[i] + b
                d[i] = v if v > zero else zero
        else:
            if has_bias:
                for i in range(length):
                    d[i] += b
            activation_row(d, code, params)
        if has_res:
            q = res[res_at + r * res_pitch:res_at + r * res_pitch + length]
            if post_code == RELU:
                for i in range(length):
                    v = d[i] + q[i]
                    d[i] = v if v > zero else zero
            else:
                for i in range(length):
                    d[i] += q[i]
                activation_row(d, post_code, post_params)


# ---- direct and depthwise -----------------------------------------------------------------------
# Both read a padded copy of the input (pad_planes), so no loop needs a bounds check. Helpers that
# take arrays are inlined: a call Numba does not inline costs reference counting on every array
# argument, which measured more than a short row's arithmetic.
@njit(inline="always", cache=True)
def _row_taps(acc, src, wr, kw, d):
    """acc[o] += sum_e wr[e] * src[o + e * d] (unit stride); kernel widths 3 and 5 in one fused
    pass, others one pass per tap. Every tap reads its own view: an index like o + d could be
    negative as far as Numba knows, and its wraparound check would keep the loop from
    vectorising."""
    count = acc.shape[0]
    if kw == 3:
        w0, w1, w2 = wr[0], wr[1], wr[2]
        s0, s1, s2 = src, src[d:], src[2 * d:]
        for o in range(count):
            acc[o] += w0 * s0[o] + w1 * s1[o] + w2 * s2[o]
    elif kw == 5:
        w0, w1, w2, w3, w4 = wr[0], wr[1], wr[2], wr[3], wr[4]
        s0, s1, s2, s3, s4 = src, src[d:], src[2 * d:], src[3 * d:], src[4 * d:]
        for o in range(count):
            acc[o] += w0 * s0[o] + w1 * s1[o] + w2 * s2[o] + w3 * s3[o] + w4 * s4[o]
    else:
        for e in range(kw):
            wv = wr[e]
            part = src[e * d:]
            for o in range(count):
                acc[o] += wv * part[o]


@njit(inline="always", cache=True)
def _row_taps_strided(acc, src, wr, kw, s, d):
    """acc[o] += sum_e wr[e] * src[o * s + e * d]: 3-wide kernels fused, stride 2 (the common
    one) as its own loop so that it vectorises, other cases one pass per tap."""
    count = acc.shape[0]
    if kw == 3 and s == 2:
        w0, w1, w2 = wr[0], wr[1], wr[2]
        s0, s1, s2 = src, src[d:], src[2 * d:]
        for o in range(count):
            acc[o] += w0 * s0[2 * o] + w1 * s1[2 * o] + w2 * s2[2 * o]
    else:
        for e in range(kw):
            wv = wr[e]
            part = src[e * d:]
            if s == 2:
                for o in range(count):
                    acc[o] += wv * part[2 * o]
            else:
                for o in range(count):
                    acc[o] += wv * part[o * s]


@njit(parallel=True, cache=True)
def direct_conv(xp, w, bias, out, g, group, code, params, res, post_code, post_params):
    """out = epilogue(conv(x, w)) from xp = pad_planes(x); w (K, C/group, kd, kh, kw), out
    (N, K, od, oh, ow); any group (depthwise too). One output plane per job. With unit strides
    the plane is computed as one flat loop per kernel row over the padded plane's pitch (long
    loops, and the same code for 1-D, 2-D and 3-D), then its rows are copied out."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow = g
    n_batch, channels, dp, hp, wp = xp.shape
    k_out = out.shape[1]
    c_group = channels // group
    k_group = k_out // group
    has_bias = bias.shape[0] != 0
    has_res = res.shape[0] != 0
    unit = sd == 1 and sh == 1 and sw == 1
    length = ((od - 1) * hp + (oh - 1)) * wp + ow
    planes = n_batch * k_out
    # several small planes per job, so that the scratch allocation is paid once per job
    per_job = max(1, min(-(-4096 // length), -(-planes // 8)))
    for job in prange(-(-planes // per_job)):
        acc = np.empty(length if unit else 0, np.float32)
        for index in range(job * per_job, min(planes, (job + 1) * per_job)):
            k = index % k_out
            n = index // k_out
            c0 = (k // k_group) * c_group
            if unit:
                for i in range(length):
                    acc[i] = 0
                for c in range(c_group):
                    plane = xp[n, c0 + c].reshape(-1)
                    for a in range(kd):
                        for b in range(kh):
                            off = (a * dd * hp + b * dh) * wp
                            _row_taps(acc, plane[off:], w[k, c, a, b], kw, dw)
                for z in range(od):
                    for y in range(oh):
                        row = out[n, k, z, y]
                        seg = acc[(z * hp + y) * wp:]
                        for o in range(ow):
                            row[o] = seg[o]
            else:
                for z in range(od):
                    for y in range(oh):
                        row = out[n, k, z, y]
                        for o in range(ow):
                            row[o] = 0
                        for c in range(c_group):
                            for a in range(kd):
                                for b in range(kh):
                                    src = xp[n, c0 + c, z * sd + a * dd, y * sh + b * dh]
                                    _row_taps_strided(row, src, w[k, c, a, b], kw, sw, dw)
            plane = out[n, k].reshape(-1)
            epilogue_plane(plane, bias[k] if has_bias else np.float32(0), code, params,
                           res[n, k].reshape(-1) if has_res else plane, has_res, post_code,
                           post_params)


# ---- ConvTranspose: col2im -----------------------------------------------------------------------
@njit(nogil=True, cache=True)
def col2im(cols, out, g, in_spatial, bias, start):
    """out (K, od, oh, ow) = bias + scatter of one image's columns cols[:, start:start + S_in]
    (K * taps rows, S_in = id * ih * iw input positions each; several images' columns may sit
    side by side): input position i and tap t land on output i * stride + t * dilation - pad.
    Per output channel, every tap's row is added into the uncropped output plane (flat indices,
    through a table of offsets on narrow images as im2col_image), which is then cropped into
    out with the bias; 1.5-2x faster than gathering per output row from slices. Serial (a task
    of its driver's threads)."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow = g
    depth, height, width = in_spatial
    fd = (depth - 1) * sd + (kd - 1) * dd + 1  # the uncropped output, pads included
    fh = (height - 1) * sh + (kh - 1) * dh + 1
    fw = (width - 1) * sw + (kw - 1) * dw + 1
    taps = kd * kh * kw
    positions = depth * height * width
    acc = np.empty(fd * fh * fw, np.float32)
    src = cols.reshape(-1)
    pitch = cols.shape[1]
    has_bias = bias.shape[0] != 0
    narrow = width < GATHER_MAX_WIDTH
    table = tap_offsets(g, depth, height, width, fh, fw) if narrow else np.empty(0, np.uint32)
    x_end = max(0, min(ow, fw - pw))
    for k in range(out.shape[0]):
        acc[:] = 0
        for t in range(taps):
            at = np.uint64((k * taps + t) * pitch + start)
            if narrow:
                first = np.uint64(t * positions)
                for p in range(positions):
                    acc[table[first + np.uint64(p)]] += src[at + np.uint64(p)]
                continue
            a, b, e = t // (kh * kw), (t // kw) % kh, t % kw
            for z in range(depth):
                for y in range(height):
                    d = np.uint64(((z * sd + a * dd) * fh + y * sh + b * dh) * fw + e * dw)
                    s = at + np.uint64((z * height + y) * width)
                    if sw == 1:
                        for x in range(width):
                            acc[d + np.uint64(x)] += src[s + np.uint64(x)]
                    else:
                        for x in range(width):
                            acc[d + np.uint64(x * sw)] += src[s + np.uint64(x)]
        value = bias[k] if has_bias else np.float32(0)
        for z in range(od):
            for y in range(oh):
                row = out[k, z, y]
                row[:] = value
                if z + pd < fd and y + ph < fh:
                    line = acc[((z + pd) * fh + y + ph) * fw + pw:]
                    for x in range(x_end):
                        row[x] += line[x]


# ---- im2col / 1x1 GEMM: one parallel Numba call per convolution ---------------------------------
#: bytes of one task's im2col columns plus GEMM result: most of a core's L2 (2 MiB here); 1x1
#: blocks have no columns, and a shorter row of positions per GEMM costs more (256x64 by 64x784
#: into out ran 15% slower than by 64x3136)
BLOCK_BYTES = 3 << 19
#: blocks of fewer output positions than this batch the images' columns instead (a GEMM's
#: short row of positions is slow: 512x4608 by 4608x25 ran at 65% of 512x4608 by 4608x49)
MIN_BLOCK = 128
#: bytes of the batched columns and GEMM result of one group of small images
BATCH_BYTES = 8 << 20
#: output rows of a block of weights, a multiple of OpenBLAS's register tile and of MR
ROW_ALIGN = 16
BLOCKS, BATCHED = 0, 1
#: the packed GEMM applies the epilogue as it stores the output, where it can (fused_flags)
FUSED_EPILOGUE = True
#: cold compile seconds of the parallel drivers (with their helpers), for backend.precompile
COMPILE_WEIGHTS = {"_gemm_conv_blocks": 3.5, "_padded_columns": 3, "_image_columns": 1.7,
                   "_batched_products": 2.7}


@lru_cache(maxsize=1024)
def gemm_plan(n_batch, rows, k_out, positions, workers, pad=0, pack=True, group=1):
    """How ``conv_im2col`` / ``conv_gemm_1x1`` split a call into the tasks of a parallel loop, and
    the float32 scratch it needs (``pad``: elements of one padded image, 0 when the columns need
    no padded copy; ``pack``: im2col columns, not views of x). Returns (mode, a, b, kb, size):

    * (BLOCKS, pb, nblocks, kb, size): every image padded (a task each), then each task one block
      of <= pb output positions and <= kb output rows of one image: its columns (im2col into the
      thread's own scratch, or a view of x for 1x1), a GEMM straight into out and the epilogue on
      the block while it is in cache. Few large blocks split their rows too, so that every
      thread has one (a 1x1 layer of 10M multiply-adds took 0.23 ms as one GEMM on one thread).
    * (BATCHED, nb, 0, 0, size): for few positions per image (7x7, 14x14 outputs), the columns
      of nb images side by side (a task per image), then one GEMM per block of output rows (a
      task each; the weights are read once, not once per image), the epilogue scattering each
      image's part into out. Splitting the weights' rows costs less than splitting a short row
      of positions (measured 3-7% against 17-40% single-threaded)."""
    slots = numba.config.NUMBA_NUM_THREADS  # thread ids index the scratch: size it for all
    per_position = 4 * (rows * pack + k_out)
    budget = max(1, BLOCK_BYTES // per_position)  # the block's columns and its output
    nblocks = max(-(-positions // budget), -(-workers // n_batch))
    pb = -(-positions // nblocks)
    if pb < MIN_BLOCK and positions < budget:
        nb = max(1, min(n_batch, BATCH_BYTES // (4 * (rows + k_out) * positions)))
        width = nb * positions
        columns = rows * panel_pitch(width) if pack or nb > 1 else 0
        return BATCHED, nb, 0, 0, slots * pad + columns + (k_out * width if nb > 1 else 0)
    nblocks = -(-positions // pb)
    kb = k_out
    tasks = n_batch * nblocks
    if group == 1 and tasks < workers:
        parts = -(-workers // tasks)
        kb = max(ROW_ALIGN, -(-k_out // parts // ROW_ALIGN) * ROW_ALIGN)
    elif tasks % workers and tasks < 4 * workers:  # equal shares: one more block each
        nblocks = -(-(-(-tasks // workers) * workers) // n_batch)
        pb = -(-positions // nblocks)
    pitch = panel_pitch(pb)  # the packed GEMM's panels
    return BLOCKS, pb, -(-positions // pb), kb, n_batch * pad + slots * rows * pitch * pack


def row_blocks(rows: int, group: int, workers: int, per_worker: int = 1,
               min_rows: int = 8, align: int = 1) -> list[tuple[int, int]]:
    """[(first, end)] rows of a (group * rows)-row product: whole groups, each split into about
    ``per_worker`` blocks per thread when there are fewer groups than that, none thinner than
    ``min_rows``, each starting at a multiple of ``align`` within its group."""
    parts = 1 if workers <= 1 else max(1, min(-(-per_worker * workers // group),
                                              rows // min_rows))
    step = -(-(-(-rows // parts)) // align) * align
    return [(q * rows + r, q * rows + min(rows, r + step)) for q in range(group)
            for r in range(0, rows, step)]


#: a batched product whose row blocks would be thinner than this is split by images instead
#: (64 x 576 by 576 x 6272 on two threads: 200 GF/s in row blocks, 250 in column blocks)
MIN_SPLIT_ROWS = 128


@lru_cache(maxsize=1024)
def _batched_blocks(k_group: int, group: int, workers: int, nb: int,
                    panels: bool = False) -> np.ndarray:
    """(first row, end row, first image, end image) of each task of the BATCHED plan's
    products: blocks of rows (row_blocks) over all nb images, or, where those would be thin
    and there are images enough, whole groups over blocks of images (not for columns in the
    packed GEMM's panels, which start a block at multiples of NR columns only)."""
    parts = -(-workers // group)
    if workers > 1 and group * k_group // workers < MIN_SPLIT_ROWS and nb >= workers \
            and parts > 1 and not panels:
        step = -(-nb // parts)
        blocks = [(q * k_group, (q + 1) * k_group, i, min(nb, i + step)) for q in range(group)
                  for i in range(0, nb, step)]
    else:
        blocks = [(k0, k1, 0, nb) for k0, k1 in row_blocks(k_group, group, workers,
                                                           align=MR)]
    return np.array(blocks, dtype=np.int64).reshape(-1, 4)


def scratch_size(algorithm: str, x_shape, w_shape, g, group: int = 1) -> int:
    """float32 elements of scratch an algorithm needs for one call (see the drivers)."""
    kd, kh, kw = g[0:3]
    od, oh, ow = g[12:15]
    channels = x_shape[1]
    workers = numba.config.NUMBA_NUM_THREADS
    if algorithm in ("im2col_gemm", "grouped", "gemm_1x1"):
        pad = 0 if algorithm == "gemm_1x1" else padded_size(g, x_shape)
        plan = gemm_plan(x_shape[0], channels * kd * kh * kw, w_shape[0], od * oh * ow,
                         workers, pad, algorithm != "gemm_1x1", group)
        return plan[4]
    if algorithm in ("direct", "depthwise"):
        batch = x_shape[0]  # whole batches at once (one image at a time when out is strided)
        return batch * channels * int(np.prod(padded_shape(g)))
    if algorithm == "transposed":
        spatial = int(np.prod(x_shape[2:]))
        k_out = w_shape[1] * group
        kparts = 1 if group > 1 else max(1, min(k_out, -(-workers // x_shape[0])))
        return workers * -(-k_out // kparts) * kd * kh * kw * spatial
    return 0


def padded_size(g, x_shape) -> int:
    """Elements of one image's padded copy for im2col, 0 when its windows read x as it is."""
    spatial = padded_shape(g)
    x_spatial = (1,) * (5 - len(x_shape)) + tuple(x_shape[2:])
    if not any(g[9:12]) and all(p <= s for p, s in zip(spatial, x_spatial)):
        return 0
    return x_shape[1] * int(np.prod(spatial))


def flat_images(a: np.ndarray) -> tuple[np.ndarray, int]:
    """(flat, pitch): a 1-D view of a's memory from its first element and the elements from one
    image to the next, for an array whose images are each contiguous (a channel slice of a
    concat buffer is; the memory between its images belongs to the other inputs)."""
    if a.flags.c_contiguous:
        return a.reshape(-1), a[0].size
    pitch = a.strides[0] // a.itemsize
    span = (a.shape[0] - 1) * pitch + a[0].size
    return np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(a.itemsize,)), pitch


@njit(inline="always", cache=True)
def _columns(x5, col, g, rows, j0, count, pack, panels):
    """Columns [j0, j0 + count) of col for a whole image x5 that needs no pads: its im2col (in
    panels where ``panels`` is (rows a group, pitch), see im2col_panels), or for 1x1 (not pack)
    x5's own rows copied."""
    if panels is not None:
        im2col_panels(x5, col.reshape(-1), g, panels[0], panels[1], 0, rows, 0, 0, count, j0)
    elif not pack:
        for c in range(rows):
            src = x5[c, 0, 0]
            dst = col[c, j0:j0 + count]
            for i in range(count):
                dst[i] = src[i]
    else:
        im2col_block(x5, col, g, 0, rows, 0, j0, count)


def _product(w, wp, dims, k0, k1, n, b, b_at, ldb, c, c_at, ldc, fused, bias, res, res_at,
             b_flags):
    """out rows [k0, k1) (one group's) = W's rows @ B (k = the group's rows), into C: by
    microkernel.gemm_packed from the packed weights wp where the module has them (inference:
    constants packed at compile time, k0 a multiple of MR within its group; w is None), else by
    sgemm from w (group, K/group, rows; wp is None). ``fused`` >= 0 (packed only): the
    epilogue's EPI_* flags, applied by the GEMM as it stores (bias from bias[k0], the residual
    from res[res_at] with C's row pitch); ``b_flags`` B_PANELS where B is in panels (packed
    only, ldb its pitch). A Numba overload: each form compiles only the GEMM it
    calls, so that inference drivers do not compile the OpenBLAS path nor training's the packed
    one."""
    raise NotImplementedError("only called from Numba kernels")


@overload(_product)
def _product_forms(w, wp, dims, k0, k1, n, b, b_at, ldb, c, c_at, ldc, fused, bias, res,
                   res_at, b_flags):
    if isinstance(wp, types.NoneType):
        def unpacked(w, wp, dims, k0, k1, n, b, b_at, ldb, c, c_at, ldc, fused, bias, res,
                     res_at, b_flags):
            rows_g = dims[2]
            sgemm(0, 0, k1 - k0, n, rows_g, w, k0 * rows_g, rows_g, b, b_at, ldb, 0.0, c,
                  c_at, ldc)
        return unpacked

    def packed(w, wp, dims, k0, k1, n, b, b_at, ldb, c, c_at, ldc, fused, bias, res, res_at,
               b_flags):
        k_group, rows_g = dims[1], dims[2]
        q = k0 // k_group
        padded = wp.shape[1] * MR
        gemm_packed_epilogue(k1 - k0, n, rows_g, wp, q * padded * rows_g, k0 - q * k_group,
                             padded, b, b_at, ldb, c, c_at, ldc, max(fused, 0) | b_flags,
                             bias if bias.shape[0] != 0 else _ONE, k0,
                             res if res.shape[0] != 0 else _ONE, res_at, ldc)
    return packed


def fused_flags(packed: bool, group: int, bias, code: int, res, post_code: int) -> int:
    """The EPI_* flags of a GEMM convolution's epilogue when the packed GEMM applies it as it
    stores (-1: epilogue_rows does, afterwards): bias, ReLU or none, residual, ReLU or none.
    Storing once saves a pass over the output (64 -> 256 channels at 56x56 with a residual:
    0.63 -> ~0.45 ms)."""
    if not packed or group != 1 or code not in (0, RELU):
        return -1
    has_res = res.shape[0] != 0
    if has_res and post_code not in (0, RELU):
        return -1
    flags = EPI_BIAS if bias.shape[0] != 0 else 0
    flags |= EPI_RELU if code == RELU else 0
    if has_res:
        flags |= EPI_RESIDUAL | (EPI_POST_RELU if post_code == RELU else 0)
    return flags


@njit(nogil=True, parallel=True, cache=True)
def _gemm_conv_blocks(x5, xps, w, wp, dims, bias, out, out_pitch, res, res_pitch, buf, g, pack,
                      pb, kb, code, params, post_code, post_params, fused, panels):
    """The BLOCKS plan (gemm_plan) in one parallel loop; out and res flat (flat_images); the
    columns in panels where ``panels`` is (rows a group, pitch), else rows of pitch pb."""
    n_batch = x5.shape[0]
    group, k_group, rows_g = dims
    rows = group * rows_g
    k_out = group * k_group
    positions = g[12] * g[13] * g[14]
    padded = xps.shape[0] != 0
    for n in prange(n_batch if padded else 0):
        pad_image(x5[n], xps[n], g[9], g[10], g[11])
    nblocks = (positions + pb - 1) // pb
    nk = (k_out + kb - 1) // kb
    has_epilogue = bias.shape[0] != 0 or code != 0 or res.shape[0] != 0
    x_pitch = x5.strides[0] // 4
    pitch = pb if panels is None else panels[1]
    b_flags = 0 if panels is None else B_PANELS
    per_slot = rows * pitch
    for task in prange(n_batch * nk * nblocks):
        n = task // (nk * nblocks)
        k0 = (task // nblocks) % nk * kb
        k1 = min(k_out, k0 + kb)
        p0 = task % nblocks * pb
        count = min(pb, positions - p0)
        at = n * out_pitch + k0 * positions + p0
        res_at = n * res_pitch + k0 * positions + p0
        if pack:
            slot = numba.get_thread_id()
            col = buf[slot * per_slot:(slot + 1) * per_slot]
            image = xps[n] if padded else x5[n]
            if panels is None:
                im2col_block(image, col.reshape((rows, pb)), g, 0, rows, p0, 0, count)
            else:
                im2col_panels(image, col, g, rows_g, pitch, 0, rows, 0, p0, count, 0)
            for q in range(group):
                r0 = q * k_group + k0
                _product(w, wp, dims, r0, r0 + (k1 - k0 if group == 1 else k_group), count,
                         col, q * rows_g * pitch, pitch, out, at + q * k_group * positions,
                         positions, fused, bias, res, res_at, b_flags)
        else:
            _product(w, wp, dims, k0, k1, count, x5, n * x_pitch + p0, positions, out, at,
                     positions, fused, bias, res, res_at, 0)
        if has_epilogue and fused < 0:
            epilogue_rows(_EMPTY1, 0, out, at, res, res_at, (0, positions, positions), k1 - k0,
                          count,
                          bias[k0:k1] if bias.shape[0] != 0 else bias, code, params,
                          post_code, post_params)


# The BATCHED plan (gemm_plan) is up to three parallel kernels, not one with three prange loops:
# Numba compiles each kernel with its helpers linked into every loop, a kernel compiles only where
# a model needs it, and separate kernels compile in separate processes (ResNet-50 waited ~8 s on
# the single driver)
@njit(nogil=True, parallel=True, cache=True)
def _padded_columns(x5, xp_buf, col, g, parts, panels):
    """im2col of the images of x5 (a block of nb) side by side in col_buf (rows, nb * S), each
    padded first: a task per block of channels (``parts`` blocks) over all images, so that a
    task writes whole rows of the columns (a task per image, on 4x4 images' rows of 16 floats,
    ran 3x slower). col: (rows, pitch), in panels where ``panels`` is (rows a group, pitch)."""
    n_images, channels = x5.shape[0], x5.shape[1]
    positions = g[12] * g[13] * g[14]
    taps = g[0] * g[1] * g[2]
    pad = xp_buf.shape[0] // numba.config.NUMBA_NUM_THREADS
    dp, hp, wp = (g[12] - 1) * g[3] + (g[0] - 1) * g[6] + 1, \
        (g[13] - 1) * g[4] + (g[1] - 1) * g[7] + 1, (g[14] - 1) * g[5] + (g[2] - 1) * g[8] + 1
    nparts = min(channels, parts)
    for part in prange(nparts):
        c0, c1 = part * channels // nparts, (part + 1) * channels // nparts
        slot = numba.get_thread_id()
        xp = xp_buf[slot * pad:slot * pad + (c1 - c0) * dp * hp * wp].reshape(
            (c1 - c0, dp, hp, wp))
        for j in range(n_images):
            if panels is None:
                pitch = col.shape[1]
                block = col.reshape(-1)[c0 * taps * pitch:c1 * taps * pitch].reshape(
                    ((c1 - c0) * taps, pitch))
                im2col_image(x5[j, c0:c1], xp, block, g, j * positions)
            else:
                pad_image(x5[j, c0:c1], xp, g[9], g[10], g[11])
                im2col_panels(xp, col.reshape(-1), g, panels[0], panels[1], c0 * taps,
                              c1 * taps, c0, 0, positions, j * positions)


@njit(nogil=True, parallel=True, cache=True)
def _image_columns(x5, col, g, pack, panels):
    """The columns of images that need no padded copy side by side in col, a task per image:
    their im2col (in panels where ``panels`` is (rows a group, pitch)), or (not pack: 1x1)
    their rows copied."""
    positions = g[12] * g[13] * g[14]
    for j in prange(x5.shape[0]):
        _columns(x5[j], col, g, col.shape[0], j * positions, positions, pack, panels)


@njit(nogil=True, parallel=True, cache=True)
def _batched_products(x5, w, wp, dims, bias, out, out_pitch, res, res_pitch, col, y_buf, g, pack,
                      n0, n1, blocks, code, params, post_code, post_params, fused, b_flags):
    """The products of images n0..n1 (their columns in col, rows of col.shape[1] floats or in
    panels as ``b_flags`` says; or for one 1x1 image x5 itself), a task per block of output
    rows and images (``blocks``, _batched_blocks): straight into out for one image, else into
    y_buf and scattered into out with the epilogue."""
    group, k_group, rows_g = dims
    positions = g[12] * g[13] * g[14]
    width = (n1 - n0) * positions
    pitch = col.shape[1]
    x_pitch = x5.strides[0] // 4
    has_epilogue = bias.shape[0] != 0 or code != 0 or res.shape[0] != 0
    direct = n1 - n0 == 1  # one image: every GEMM writes straight into out
    for b in prange(blocks.shape[0]):
        k0, k1 = blocks[b, 0], blocks[b, 1]
        i0, i1 = blocks[b, 2], min(blocks[b, 3], n1 - n0)
        r0 = k0 // k_group * rows_g
        bias_part = bias[k0:k1] if bias.shape[0] != 0 else bias
        if direct:
            if i0 != 0:
                continue
            at = n0 * out_pitch + k0 * positions
            res_at = n0 * res_pitch + k0 * positions
            if pack:
                _product(w, wp, dims, k0, k1, positions, col, r0 * pitch, pitch, out, at,
                         positions, fused, bias, res, res_at, b_flags)
            else:
                _product(w, wp, dims, k0, k1, positions, x5, n0 * x_pitch + r0 * positions,
                         positions, out, at, positions, fused, bias, res, res_at, 0)
            if has_epilogue and fused < 0:
                epilogue_rows(_EMPTY1, 0, out, at, res, n0 * res_pitch + k0 * positions,
                              (0, positions, positions), k1 - k0, positions, bias_part,
                              code, params, post_code, post_params)
            continue
        if i0 >= i1:
            continue
        _product(w, wp, dims, k0, k1, (i1 - i0) * positions, col, r0 * pitch + i0 * positions,
                 pitch, y_buf, k0 * width + i0 * positions, width, -1, bias, res, 0, b_flags)
        for j in range(i0, i1):
            n = n0 + j
            if has_epilogue:
                epilogue_rows(y_buf, k0 * width + j * positions, out,
                              n * out_pitch + k0 * positions, res,
                              n * res_pitch + k0 * positions, (width, positions, positions),
                              k1 - k0, positions, bias_part, code, params, post_code,
                              post_params)
            else:
                _copy_rows(y_buf, k0 * width + j * positions, width, out,
                           n * out_pitch + k0 * positions, positions, k1 - k0, positions)


def _gemm_conv_batched(x5, xp_buf, w, wp, dims, bias, out, out_pitch, res, res_pitch, col_buf,
                       y_buf, g, pack, nb, parts, blocks, code, params, post_code, post_params,
                       fused):
    """The BATCHED plan (gemm_plan): per group of nb images, their columns side by side
    (_padded_columns, a task per block of channels, ``parts`` of them; or _image_columns, a
    task per image), then their products (_batched_products). With packed weights (wp) the
    columns are laid out in the packed GEMM's panels, their pitch rounded up to NR."""
    n_batch = x5.shape[0]
    group, k_group, rows_g = dims
    rows = group * rows_g
    positions = g[12] * g[13] * g[14]
    for n0 in range(0, n_batch, nb):
        n1 = min(n_batch, n0 + nb)
        width = (n1 - n0) * positions
        pitch = width if wp is None else panel_pitch(width)
        panels = None if wp is None else (rows_g, pitch)
        filled = col_buf.shape[0] >= rows * pitch  # no columns: 1x1, one image at a time
        col = col_buf[:rows * pitch if filled else 0].reshape((rows if filled else 0, pitch))
        if xp_buf.shape[0]:
            _padded_columns(x5[n0:n1], xp_buf, col, g, parts, panels)
        elif pack or n1 - n0 > 1:
            _image_columns(x5[n0:n1], col, g, pack, panels)
        _batched_products(x5, w, wp, dims, bias, out, out_pitch, res, res_pitch, col, y_buf, g,
                          pack, n0, n1, blocks, code, params, post_code, post_params, fused,
                          0 if wp is None else B_PANELS)


@lru_cache(maxsize=1024)
def _call_plan(x_shape, w_shape, g, workers, pack, panels):
    """Everything _gemm_conv derives from the shapes alone, once per layer shape: (mode, a, kb,
    scratch size, padded elements, padded image shape, row blocks)."""
    group, k_group, rows_g = w_shape
    pad = padded_size(g, x_shape) if pack else 0
    mode, a, _, kb, need = gemm_plan(x_shape[0], group * rows_g, group * k_group,
                                     g[12] * g[13] * g[14], workers, pad, pack, group)
    blocks = _batched_blocks(k_group, group, workers, a, panels) if mode == BATCHED else None
    return mode, a, kb, need, pad, (x_shape[0], x_shape[1]) + padded_shape(g), blocks


def _gemm_conv(x5, wmat, bias, out5, ws, g, act, residual, post, pack, packed=None):
    """The shared driver of conv_im2col (pack: im2col columns) and conv_gemm_1x1 (the columns
    are x itself): a plan (gemm_plan), then one parallel Numba kernel calling a GEMM per task.
    ``packed``: the weights as microkernel.pack_weights laid them out (wmat is then None)."""
    code, params = epilogue_args(act)
    post_code, post_params = epilogue_args(post)
    bias = NO_BIAS if bias is None else bias
    if packed is not None:
        dims = (packed.shape[0], out5.shape[1] // packed.shape[0], packed.shape[2])
        wmat, wp = None, packed
    else:
        wmat = contiguous(wmat)
        dims, wp = wmat.shape, None
    mode, a, kb, need, pad, xp_shape, blocks = _call_plan(x5.shape, dims, g, threads(), pack,
                                                          wp is not None)
    buf = scratch(ws, need)
    if not x5[0].flags.c_contiguous or (wp is not None and not x5.flags.c_contiguous):
        x5 = np.ascontiguousarray(x5)  # im2col_panels reads images as flat arrays
    target = out5 if out5[0].flags.c_contiguous else np.empty(out5.shape, np.float32)
    out, out_pitch = flat_images(target)
    res, res_pitch = (_EMPTY1, 0) if residual is None else flat_images(contiguous_images(
        as5(residual)))
    fused = fused_flags(wp is not None and FUSED_EPILOGUE, dims[0], bias, code, res, post_code)
    with serial_blas():
        if mode == BLOCKS:
            n_pad = xp_shape[0] * pad
            xps = buf[:n_pad].reshape(xp_shape) if pad else _EMPTY5
            panels = None if wp is None else (dims[2], panel_pitch(a))
            _gemm_conv_blocks(x5, xps, wmat, wp, dims, bias, out, out_pitch, res, res_pitch,
                              buf[n_pad:], g, pack, a, kb, code, params, post_code, post_params,
                              fused, panels)
        else:
            group, k_group, rows_g = dims
            slot_pad = numba.config.NUMBA_NUM_THREADS * pad
            width = panel_pitch(a * g[12] * g[13] * g[14])  # room for panels' pitch
            columns = group * rows_g * width if pack or a > 1 else 0
            rest = buf[slot_pad:]
            _gemm_conv_batched(x5, buf[:slot_pad], wmat, wp, dims, bias, out, out_pitch, res,
                               res_pitch, rest[:columns], rest[columns:], g, pack, a,
                               2 * threads(), blocks, code, params, post_code, post_params,
                               fused)
    if target is not out5:
        out5[...] = target


def contiguous_images(a5: np.ndarray) -> np.ndarray:
    """a5 itself when each image is contiguous, else a contiguous copy."""
    return a5 if a5[0].flags.c_contiguous else np.ascontiguousarray(a5)


def _epilogue_block(y3, bias, code, params, res5, post_code, post_params):
    """The epilogue in place on y3 (N, K, S) (training.py's drivers use it)."""
    if code == 0 and post_code == 0 and res5.shape[0] == 0 and bias.shape[0] == 0:
        return
    res3 = _EMPTY3 if res5.shape[0] == 0 else res5.reshape(res5.shape[0], res5.shape[1], -1)
    bias_activation(y3, y3, bias, code, params, res3, post_code, post_params)


def conv_gemm_1x1(x, wmat, bias, out, act=NO_ACT, residual=None, post=NO_ACT, ws=None,
                  packed=None):
    """1x1, stride 1, unpadded: Y[K, S] = W[K, C] @ X[C, S] per image (blocks of S, or the
    columns of several small images side by side), the epilogue fused; ``ws`` as scratch_size
    ("gemm_1x1") says (None: allocated per call). ``packed``: W packed at compile time
    (microkernel.pack_weights of W as (1, K, C)), for wmat=None."""
    positions = math.prod(x.shape[2:])
    w3 = None if wmat is None else wmat.reshape(1, wmat.shape[-2], -1)
    _gemm_conv(x.reshape(x.shape[:2] + (1, 1, positions)), w3, bias, as5(out), ws,
               _geometry_1x1(positions), act, residual, post, pack=False, packed=packed)
    return out


@lru_cache(maxsize=256)
def _geometry_1x1(positions: int) -> tuple[int, ...]:
    return geometry((1,), (1,), (1,), (0, 0), (positions,))


def conv_im2col(x, wmat, bias, out, ws, g, group=1, act=NO_ACT, residual=None, post=NO_ACT,
                packed=None):
    """im2col + GEMM (batched over groups) with the epilogue fused, in cache-sized blocks of
    output positions (see gemm_plan). wmat: (group, K/group, C/group * taps), or None with
    ``packed``, its microkernel.pack_weights."""
    _gemm_conv(as5(x), wmat, bias, as5(out), ws, g, act, residual, post, pack=True,
               packed=packed)
    return out


def conv_direct(x, w, bias, out, ws, g, group=1, act=NO_ACT, residual=None, post=NO_ACT):
    """Direct convolution (any group, depthwise included) of the padded input in ``ws``;
    w: (K, C/group, kd, kh, kw)."""
    x5, out5 = as5(x), as5(out)
    code, params = epilogue_args(act)
    post_code, post_params = epilogue_args(post)
    bias = NO_BIAS if bias is None else bias
    res5 = None if residual is None else as5(residual)
    step = batch_step(out5)
    spatial = padded_shape(g)
    for n0 in range(0, x5.shape[0], step):
        n1 = min(x5.shape[0], n0 + step)
        xp = ws[:(n1 - n0) * x5.shape[1] * int(np.prod(spatial))].reshape(
            (n1 - n0, x5.shape[1]) + spatial)
        pad_planes(contiguous(x5[n0:n1]), xp, g)
        target = Target(out5, n0, n1)
        res = _EMPTY5 if res5 is None else contiguous(res5[n0:n1])
        direct_conv(xp, w, bias, target.array, g, group, code, params, res, post_code,
                    post_params)
        target.done()
    return out


@njit(nogil=True, parallel=True, cache=True)
def _transpose_tasks(x5, wt, bias, out5, buf, g, kparts):
    """conv_transpose's tasks: per image and block of output channels, the columns (sgemm per
    group into the thread's slot of buf), then col2im with the bias."""
    n_batch, channels = x5.shape[0], x5.shape[1]
    group, rows_g, c_group = wt.shape
    positions = x5.shape[2] * x5.shape[3] * x5.shape[4]
    taps = g[0] * g[1] * g[2]
    k_out = out5.shape[1]
    k_block = (k_out + kparts - 1) // kparts
    per_slot = k_block * taps * positions
    x_pitch = x5.strides[0] // 4
    for task in prange(n_batch * kparts):
        n = task // kparts
        k0 = task % kparts * k_block
        k1 = min(k_out, k0 + k_block)
        if k0 < k1:
            rows = (k1 - k0) * taps
            at = numba.get_thread_id() * per_slot
            cols = buf[at:at + rows * positions].reshape((rows, positions))
            if group > 1:  # kparts is 1: every group
                for q in range(group):
                    sgemm(0, 0, rows_g, positions, c_group, wt, q * rows_g * c_group, c_group,
                          x5, n * x_pitch + q * c_group * positions, positions, 0.0, cols,
                          q * rows_g * positions, positions)
            else:
                sgemm(0, 0, rows, positions, channels, wt, k0 * taps * channels, channels, x5,
                      n * x_pitch, positions, 0.0, cols, 0, positions)
            col2im(cols, out5[n, k0:k1], g, (x5.shape[2], x5.shape[3], x5.shape[4]),
                   bias[k0:k1] if bias.shape[0] != 0 else bias, 0)


def conv_transpose(x, wt, bias, out, ws, g, group=1):
    """ConvTranspose: per image cols[K/group * taps, S_in] = W_g^T @ X_g (a GEMM per group),
    then col2im with the bias. wt: (group, K/group * taps, C/group). One task per image and
    block of output channels (whole groups when group > 1)."""
    x5, out5 = contiguous_images(as5(x)), as5(out)
    n_batch = x5.shape[0]
    positions = int(np.prod(x5.shape[2:]))
    k_out = out5.shape[1]
    taps = g[0] * g[1] * g[2]
    bias = NO_BIAS if bias is None else bias
    workers = threads()
    kparts = 1 if group > 1 else max(1, min(k_out, -(-workers // n_batch)))
    buf = scratch(ws, workers * -(-k_out // kparts) * taps * positions)
    with serial_blas():
        _transpose_tasks(x5, contiguous(wt), bias, out5, buf, g, kparts)
    return out
