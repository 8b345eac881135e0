"""Convolution kernels: im2col + GEMM, 1x1 GEMM, direct, depthwise, grouped and transposed.

Every kernel is rank-generic by working on 5-D arrays (N, C, D, H, W): 1-D and 2-D convolutions
are 3-D ones with unit leading spatial axes, so each Numba kernel compiles once for every rank.
The geometry travels as one tuple ``g`` of 15 ints, all for the 3 normalised axes::

    (kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow)

kernel, strides, dilations, begin pads and the output size (which implies the end pads).

GEMMs run through NumPy's BLAS (``np.matmul(..., out=)``) from the Python drivers; packing, im2col,
col2im and the epilogue (``epilogue.py``: bias, activation, residual, post activation) are Numba.
The drivers write into ``out``, which may be a strided view (a channel slice of a concat buffer
with N > 1): each image of it is then contiguous, and a layout with no contiguous image is
computed into a temporary and copied. ``ws`` is a flat float32 scratch buffer that the generated
module allocates once (``scratch_size`` says how large).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit, prange

from .epilogue import bias_activation, epilogue_plane

NO_ACT = (0, 0.0, 0.0)
NO_BIAS = np.zeros(0, dtype=np.float32)
_EMPTY3 = np.zeros((0, 0, 0), dtype=np.float32)
_EMPTY5 = np.zeros((0, 0, 0, 0, 0), dtype=np.float32)


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


# ---- im2col --------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def im2col(xp, col, g):
    """col (C * kd * kh * kw, od * oh * ow), rows channel-major, from one padded image xp
    (C, Dp, Hp, Wp) (see pad_planes): no bounds checks, one strided copy per output row."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow = g
    channels = xp.shape[0]
    taps = kd * kh * kw
    for row in prange(channels * taps):
        c = row // taps
        t = row % taps
        a = t // (kh * kw)
        b = (t // kw) % kh
        e = t % kw
        dst = col[row]
        for z in range(od):
            for y in range(oh):
                seg = dst[(z * oh + y) * ow:(z * oh + y + 1) * ow]
                part = xp[c, z * sd + a * dd, y * sh + b * dh, e * dw:]
                if sw == 1:
                    for o in range(ow):
                        seg[o] = part[o]
                elif sw == 2:
                    for o in range(ow):
                        seg[o] = part[2 * o]
                else:
                    for o in range(ow):
                        seg[o] = part[o * sw]


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
@njit(parallel=True, cache=True)
def col2im(cols, out, g, in_spatial, bias):
    """out (K, od, oh, ow) = bias + scatter of cols (K * taps, id, ih, iw): input position i and
    tap t land on output i * stride + t * dilation - pad. Gathered per output row (no races)."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow = g
    depth, height, width = in_spatial
    k_out = out.shape[0]
    taps = kd * kh * kw
    has_bias = bias.shape[0] != 0
    for job in prange(k_out * od * oh):
        y = job % oh
        z = (job // oh) % od
        k = job // (oh * od)
        row = out[k, z, y]
        row[:] = bias[k] if has_bias else np.float32(0)
        for a in range(kd):
            tz = z + pd - a * dd
            if tz < 0 or tz % sd != 0 or tz // sd >= depth:
                continue
            iz = tz // sd
            for b in range(kh):
                ty = y + ph - b * dh
                if ty < 0 or ty % sh != 0 or ty // sh >= height:
                    continue
                iy = ty // sh
                for e in range(kw):
                    src = cols[k * taps + (a * kh + b) * kw + e, iz, iy]
                    off = e * dw - pw
                    lo, hi = _valid_range(width, sw, off, ow)  # input columns that land
                    part = row[lo * sw + off:]
                    seg = src[lo:hi]
                    if sw == 1:
                        for i in range(hi - lo):
                            part[i] += seg[i]
                    else:
                        for i in range(hi - lo):
                            part[i * sw] += seg[i]


# ---- drivers (Python: BLAS calls between the Numba parts) ----------------------------------------
def scratch_size(algorithm: str, x_shape, w_shape, g, group: int = 1) -> int:
    """float32 elements of scratch an algorithm needs for one call (see the drivers)."""
    kd, kh, kw = g[0:3]
    od, oh, ow = g[12:15]
    channels = x_shape[1]
    if algorithm in ("im2col_gemm", "grouped"):
        return channels * (kd * kh * kw * od * oh * ow + int(np.prod(padded_shape(g))))
    if algorithm in ("direct", "depthwise"):
        batch = x_shape[0]  # whole batches at once (one image at a time when out is strided)
        return batch * channels * int(np.prod(padded_shape(g)))
    if algorithm == "transposed":
        spatial = int(np.prod(x_shape[2:]))
        return w_shape[1] * group * kd * kh * kw * spatial
    return 0


def conv_gemm_1x1(x, wmat, bias, out, act=NO_ACT, residual=None, post=NO_ACT):
    """1x1, stride 1, unpadded: per image Y[K, S] = W[K, C] @ X[C, S], then the epilogue."""
    x5, out5 = as5(x), as5(out)
    n_batch, channels = x5.shape[:2]
    k_out = out5.shape[1]
    code, params = epilogue_args(act)
    post_code, post_params = epilogue_args(post)
    bias = NO_BIAS if bias is None else bias
    res5 = None if residual is None else as5(residual)
    for n in range(n_batch):
        target = Target(out5, n, n + 1)
        y = target.array.reshape(1, k_out, -1)
        np.matmul(wmat, contiguous(x5[n]).reshape(channels, -1), out=y[0])
        res = _EMPTY5 if res5 is None else contiguous(res5[n:n + 1])
        _epilogue_block(y, bias, code, params, res, post_code, post_params)
        target.done()
    return out


def _epilogue_block(y3, bias, code, params, res5, post_code, post_params):
    if code == 0 and post_code == 0 and res5.shape[0] == 0 and bias.shape[0] == 0:
        return
    res3 = _EMPTY3 if res5.shape[0] == 0 else res5.reshape(res5.shape[0], res5.shape[1], -1)
    bias_activation(y3, y3, bias, code, params, res3, post_code, post_params)


def conv_im2col(x, wmat, bias, out, ws, g, group=1, act=NO_ACT, residual=None, post=NO_ACT):
    """Per image: the padded image and its im2col columns into ``ws``, one GEMM (batched over
    groups), the epilogue. wmat: (group, K/group, C/group * taps)."""
    x5, out5 = as5(x), as5(out)
    n_batch, channels = x5.shape[:2]
    k_out = out5.shape[1]
    rows = channels * g[0] * g[1] * g[2]
    positions = g[12] * g[13] * g[14]
    col = ws[:rows * positions].reshape(group, rows // group, positions)
    spatial = padded_shape(g)
    xp = ws[rows * positions:rows * positions + channels * int(np.prod(spatial))].reshape(
        (1, channels) + spatial)
    code, params = epilogue_args(act)
    post_code, post_params = epilogue_args(post)
    bias = NO_BIAS if bias is None else bias
    res5 = None if residual is None else as5(residual)
    for n in range(n_batch):
        pad_planes(contiguous(x5[n:n + 1]), xp, g)
        im2col(xp[0], col.reshape(rows, positions), g)
        target = Target(out5, n, n + 1)
        y = target.array.reshape(1, k_out, positions)
        np.matmul(wmat, col, out=y.reshape(group, k_out // group, positions))
        res = _EMPTY5 if res5 is None else contiguous(res5[n:n + 1])
        _epilogue_block(y, bias, code, params, res, post_code, post_params)
        target.done()
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


def conv_transpose(x, wt, bias, out, ws, g, group=1):
    """ConvTranspose: per image cols[K/group * taps, S_in] = W_g^T @ X_g (one batched GEMM over
    groups), then col2im with the bias. wt: (group, K/group * taps, C/group)."""
    x5, out5 = as5(x), as5(out)
    n_batch, channels = x5.shape[:2]
    in_spatial = x5.shape[2:]
    positions = int(np.prod(in_spatial))
    rows = wt.shape[0] * wt.shape[1]
    cols = ws[:rows * positions].reshape(group, rows // group, positions)
    bias = NO_BIAS if bias is None else bias
    for n in range(n_batch):
        xn = contiguous(x5[n]).reshape(group, channels // group, positions)
        np.matmul(wt, xn, out=cols)
        target = Target(out5, n, n + 1)
        col2im(cols.reshape(rows, *in_spatial), target.array[0], g, in_spatial, bias)
        target.done()
    return out
