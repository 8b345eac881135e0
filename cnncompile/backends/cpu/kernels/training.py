"""Training kernels: convolutions whose weights arrive at run time, the gradient ops of the joint
forward + backward graph, and the fused optimizer updates.

In a training graph the weights are graph inputs (they change every step), so nothing can be
re-laid out at compile time. The convolution drivers take W itself: an im2col GEMM reads W through
a free reshape view; the transforms that are not free (Winograd's filter transform for
winograd.conv_winograd, the flipped kernel of a stride-1 input gradient) are Numba passes over W,
small next to the convolution. The im2col drivers put the whole batch's columns side by side, so
that one wide GEMM serves every image (7x7 and 4x4 images give BLAS too narrow a product
otherwise), and the weight gradient is one GEMM over the batch, not a sum of per-image ones.

Each convolution driver is one parallel Numba call in rounds of ``prange`` tasks: the columns (a
task per image), the GEMMs (blas.sgemm on blocks of rows, single-threaded OpenBLAS on each of
OpenMP's threads), the scatter back into the images. The memory-bound kernels (normalisation,
pooling, activation gradients, optimizer updates) are Numba parallel loops too.

Shapes go through 5-D (N, C, D, H, W) views and conv.py's 15-int geometry tuple, so each kernel
compiles once for 1-D, 2-D and 3-D.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numba
import numpy as np
from numba import njit, prange

from .blas import sgemm
from .conv import (_EMPTY5, _gemm_conv, _valid_range, col2im, im2col_image, padded_shape,
                   row_blocks, serial_blas, threads)
from .conv import scratch_size as conv_scratch_size
from .pool import REDUCE_MATH
from .winograd import conv_winograd, input_f2, input_f4
from .winograd import scratch_size as winograd_scratch

NO_ACT = (0, 0.0, 0.0)
NO_BIAS = np.zeros(0, dtype=np.float32)
#: Winograd's filter transform matrices G, as winograd.py's input and output transforms expect
_F2_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_F4_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
#: G kron G: row i * alpha + j, column p * 3 + q holds G[i, p] G[j, q], so that (G kron G) @ the
#: filter's 9 taps is G w G^T as alpha^2 values
_F2_GG = np.kron(_F2_G, _F2_G).astype(np.float32)
_F4_GG = np.kron(_F4_G, _F4_G).astype(np.float32)


# ---- shape helpers (conv.py's conventions, kept here so that its internals may change) ----------
def as5(a: np.ndarray) -> np.ndarray:
    """(N, C, spatial...) -> (N, C, D, H, W) view with unit leading spatial axes."""
    return a.reshape(a.shape[:2] + (1,) * (5 - a.ndim) + a.shape[2:])


def contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class Target:
    """Where a kernel writes ``out``: out itself when contiguous, else a temporary that ``done``
    copies back."""

    def __init__(self, out: np.ndarray):
        self.block = out
        self.array = out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)

    def done(self):
        if self.array is not self.block:
            self.block[...] = self.array


# ---- work sharing --------------------------------------------------------------------------------
#: channels of a task's block (its rows of the product: channels x taps; thinner starve BLAS)
MIN_TASK_CHANNELS = 4


def _channel_blocks(channels: int, group: int) -> np.ndarray:
    """conv.row_blocks over the channels of each group as the kernels take them: about two
    blocks per thread, (first, end) absolute channel numbers (cached: once per layer shape)."""
    return _blocks_of(channels, group, threads())


@lru_cache(maxsize=1024)
def _blocks_of(channels: int, group: int, workers: int) -> np.ndarray:
    return np.array(row_blocks(channels, group, workers, 2, MIN_TASK_CHANNELS),
                    dtype=np.int64).reshape(-1, 2)


def columns_scratch(x_shape, g) -> int:
    """float32 elements of the padded images im2col_image needs: one per possible thread."""
    return numba.config.NUMBA_NUM_THREADS * x_shape[1] * int(np.prod(padded_shape(g)))


@njit(inline="always", cache=True)
def padded_slot(buf, channels, g):
    """The calling thread's padded-image buffer (C, Dp, Hp, Wp) from the head of buf."""
    dp = (g[12] - 1) * g[3] + (g[0] - 1) * g[6] + 1
    hp = (g[13] - 1) * g[4] + (g[1] - 1) * g[7] + 1
    wp = (g[14] - 1) * g[5] + (g[2] - 1) * g[8] + 1
    size = channels * dp * hp * wp
    slot = numba.get_thread_id()
    return buf[slot * size:(slot + 1) * size].reshape((channels, dp, hp, wp))


@njit(nogil=True, cache=True)
def columns_from(y, out, start):
    """out[:, start:start + S] = y (C, S): one image's channels as column blocks."""
    positions = y.shape[1]
    for c in range(y.shape[0]):
        out[c, start:start + positions] = y[c]


# ---- convolution with run-time weights -----------------------------------------------------------
@njit(nogil=True, parallel=True, cache=True)
def winograd_filter(w, gg, u, parts):
    """u (alpha^2, K, C) = G w[k, c] G^T for 3x3 weights w (K, C, 3, 3): u's rows are
    (G kron G) (alpha^2, 9) @ w (K * C, 9)^T, one product per block of filters (``parts``).
    As scalar loops per filter (float64) it took ~0.26 ms per 128 x 128 layer, ~4 ms a step."""
    k_out, channels = w.shape[0], w.shape[1]
    for part in prange(parts):
        k0, k1 = part * k_out // parts, (part + 1) * k_out // parts
        sgemm(0, 1, gg.shape[0], (k1 - k0) * channels, 9, gg, 0, 9, w, k0 * channels * 9, 9,
              0.0, u, k0 * channels, k_out * channels)


def winograd_runtime_size(n_batch, channels, k_out, out_h, out_w, m) -> int:
    """Scratch of conv_winograd_runtime: the transformed filter, then conv_winograd's own."""
    return (m + 2) ** 2 * k_out * channels + winograd_scratch(n_batch, channels, k_out, out_h,
                                                              out_w, m)


def conv_winograd_runtime(x, w, bias, out, ws, m, pads, act=NO_ACT, residual=None, post=NO_ACT):
    """Winograd F(m x m, 3x3) (winograd.conv_winograd) with the filter transformed now, into the
    head of ``ws``."""
    k_out, channels = w.shape[0], w.shape[1]
    size = (m + 2) ** 2 * k_out * channels
    u = ws[:size].reshape((m + 2) ** 2, k_out, channels)
    with serial_blas():
        winograd_filter(contiguous(w), _F4_GG if m == 4 else _F2_GG, u,
                        min(k_out, 2 * threads()))
    return conv_winograd(x, u, bias, out, ws[size:], m, pads, act, residual, post)


def batched_size(x_shape, k_out, g, group: int = 1) -> int:
    """float32 scratch elements of conv_batched: conv.py's im2col driver's."""
    return conv_scratch_size("im2col_gemm", x_shape, (k_out,), g, group)


def conv_batched(x, w, bias, out, ws, g, group=1, act=NO_ACT, residual=None, post=NO_ACT):
    """A Conv whose weights W (K, C/group, kernel...) are an array of this call: conv.py's
    im2col + GEMM driver with W as a free reshape view (group, K/group, C/group * taps): blocks
    of output positions with the epilogue on each while it is in cache, or for small images the
    columns of several images side by side in one wide product."""
    k_out = w.shape[0]
    wmat = contiguous(w).reshape(group, k_out // group, -1)
    _gemm_conv(as5(x), wmat, bias, as5(out), ws, g, act, residual, post, pack=True)
    return out


@njit(parallel=True, cache=True)
def flip_transpose(w, out, group):
    """out (K', C', taps) = W (C, K/group, taps) regrouped: for group q, out[q*Kg + k, c', t] =
    W[q*Cg + c', k, taps - 1 - t] -- ConvTranspose's weights as a Conv's (flipped kernel)."""
    channels, k_group, taps = w.shape
    c_group = channels // group
    for job in prange(group * k_group):
        q = job // k_group
        k = job % k_group
        for c in range(c_group):
            src = w[q * c_group + c, k]
            dst = out[job, c]
            for t in range(taps):
                dst[t] = src[taps - 1 - t]


def transpose_as_conv_pads(kernel, dilations, pads, output_padding) -> list[int] | None:
    """The pads of the stride-1 Conv that equals a stride-1 ConvTranspose (flipped kernel):
    begin (k-1)d - p_begin, end (k-1)d - p_end + output_padding; None when one is negative."""
    rank = len(kernel)
    begin = [(k - 1) * d - p for k, d, p in zip(kernel, dilations, pads[:rank])]
    end = [(k - 1) * d - p + o for k, d, p, o in zip(kernel, dilations, pads[rank:],
                                                     output_padding)]
    return None if min(begin + end) < 0 else begin + end


def transpose_batched_size(x_shape, w_shape, g, group: int = 1) -> int:
    """float32 scratch elements of conv_transpose_batched (X as columns, the product)."""
    positions = x_shape[0] * int(np.prod(x_shape[2:]))
    rows = w_shape[1] * group * g[0] * g[1] * g[2]
    return (x_shape[1] + rows) * positions


@njit(nogil=True, parallel=True, cache=True)
def _transpose_batched_tasks(x5, wmat, xt, cols, out5, bias, g, blocks):
    """conv_transpose_batched's tasks: X's images side by side in xt, then per block of output
    channels [k0, k1) of one group (``blocks``) the rows of cols = W_q^T @ X_q for them and
    their col2im into every image while the rows are in cache (col2im per image after all the
    products: 4x4 layers of 512 channels at batch 8 0.5 ms slower)."""
    n_batch, channels = x5.shape[0], x5.shape[1]
    r_group = wmat.shape[1]
    taps = g[0] * g[1] * g[2]
    k_out = out5.shape[1]
    group = k_out * taps // r_group
    c_group = channels // group
    k_group = k_out // group
    total = xt.shape[1]
    positions = total // n_batch
    in_spatial = (x5.shape[2], x5.shape[3], x5.shape[4])
    has_bias = bias.shape[0] != 0
    for n in prange(n_batch):
        columns_from(x5[n].reshape((channels, positions)), xt, n * positions)
    for b in prange(blocks.shape[0]):
        k0, k1 = blocks[b, 0], blocks[b, 1]
        q = k0 // k_group
        r0 = (k0 - q * k_group) * taps  # first row of W_q^T
        rows = (k1 - k0) * taps
        block = cols[k0 * taps * total:k1 * taps * total].reshape((rows, total))
        # W_q's columns r0.., read transposed where they lie
        sgemm(1, 0, rows, total, c_group, wmat, q * c_group * r_group + r0, r_group, xt,
              q * c_group * total, total, 0.0, block, 0, total)
        for n in range(n_batch):
            col2im(block, out5[n, k0:k1], g, in_spatial, bias[k0:k1] if has_bias else bias,
                   n * positions)


def conv_transpose_batched(x, w, bias, out, ws, g, group=1):
    """ConvTranspose with W (C, K/group, kernel...) of this call, the whole batch at once:
    cols (K * taps, N * S_in) = W_g^T @ X_g (C/group, N * S_in) per group, in blocks of output
    channels (BLAS reads the transposed view of W as is), each block's col2im into every image
    with the bias."""
    x5, out5 = contiguous(as5(x)), as5(out)
    n_batch, channels = x5.shape[:2]
    in_spatial = x5.shape[2:]
    positions = int(np.prod(in_spatial))
    total = n_batch * positions
    k_group = w.shape[1]
    rows = k_group * g[0] * g[1] * g[2] * group
    r_group = rows // group
    xt = ws[:channels * total].reshape(channels, total)
    cols = ws[xt.size:xt.size + rows * total]
    wmat = contiguous(w).reshape(channels, r_group)
    bias = NO_BIAS if bias is None else bias
    target = Target(out5)
    with serial_blas():
        _transpose_batched_tasks(x5, wmat, xt, cols, target.array, bias, g,
                                 _channel_blocks(k_group, group))
    target.done()
    return out


def conv_transpose_as_conv(x, w, bias, out, ws, g, group=1, winograd=0, pads=None):
    """A stride-1 ConvTranspose as the Conv of x with the flipped, transposed W (built in ``ws``),
    by conv_batched or (``winograd`` = m, 3x3) Winograd F(m x m, 3x3)."""
    channels, k_group = w.shape[0], w.shape[1]
    taps = g[0] * g[1] * g[2]
    k_out = k_group * group
    flipped = ws[:k_out * (channels // group) * taps].reshape(k_out, channels // group, taps)
    flip_transpose(contiguous(w).reshape(channels, k_group, taps), flipped, group)
    rest = ws[flipped.size:]
    if winograd:
        return conv_winograd_runtime(x, flipped.reshape(k_out, channels, 3, 3), bias, out, rest,
                                     winograd, pads)
    return conv_batched(x, flipped, bias, out, rest, g, group)


# ---- weight gradient -----------------------------------------------------------------------------
@njit(nogil=True, parallel=True, cache=True)
def _grad_weight_tasks(x5, dy5, xp_buf, col_buf, dyt, dw, g, blocks):
    """conv_grad_weight's whole-batch plan: dY's images side by side in dyt (K, N * S), then a
    task per block of input channels [c0, c1) of one group (``blocks``): their im2col rows of
    all images, and the product of the group's dY rows with them, which is dW's block of
    columns. Each task reads its own columns while they are in cache; blocks of dW's rows would
    each read all of them (ResNet-18's 256-channel 7x7 layer at batch 8: 2.3 ms against
    3.4)."""
    n_batch, channels = x5.shape[0], x5.shape[1]
    k_out, r_group = dw.shape
    taps = g[0] * g[1] * g[2]
    positions = g[12] * g[13] * g[14]
    total = n_batch * positions
    group = channels * taps // r_group
    c_group = channels // group
    k_group = k_out // group
    for n in prange(n_batch):
        columns_from(dy5[n].reshape((k_out, positions)), dyt, n * positions)
    for b in prange(blocks.shape[0]):
        c0, c1 = blocks[b, 0], blocks[b, 1]
        q = c0 // c_group
        col = col_buf[c0 * taps * total:c1 * taps * total].reshape(((c1 - c0) * taps, total))
        xp = padded_slot(xp_buf, c1 - c0, g)
        for n in range(n_batch):
            im2col_image(x5[n, c0:c1], xp, col, g, n * positions)
        sgemm(0, 1, k_group, (c1 - c0) * taps, total, dyt, q * k_group * total, total, col, 0,
              total, 0.0, dw, q * k_group * r_group + (c0 - q * c_group) * taps, r_group)


@njit(nogil=True, parallel=True, cache=True)
def _grad_weight_images(x5, dy5, xp_buf, col_buf, partial, dw, g):
    """conv_grad_weight's per-image plan: each thread sums cols_n @ dY_n^T, i.e. dW^T, over its
    images into its own partial (slot, group, C/group * taps, K/group) (sgemm with beta 1, the
    image's columns in its slot of col_buf), then the partials are added into dw (K,
    C/group * taps). dW^T rather than dW: OpenBLAS runs the product with the long side first
    faster (64 x 576 from 784 positions, one thread: 0.49 ms against 0.66)."""
    n_batch, channels = x5.shape[0], x5.shape[1]
    slots, group, r_group, k_group = partial.shape
    positions = dy5.shape[2] * dy5.shape[3] * dy5.shape[4]
    rows = channels * g[0] * g[1] * g[2]
    dy_pitch = dy5.strides[0] // 4
    for n in prange(n_batch):
        slot = numba.get_thread_id()
        col = col_buf[slot * rows * positions:(slot + 1) * rows * positions].reshape(
            (rows, positions))
        im2col_image(x5[n], padded_slot(xp_buf, channels, g), col, g, 0)
        for q in range(group):
            sgemm(0, 1, r_group, k_group, positions, col, q * r_group * positions, positions,
                  dy5, n * dy_pitch + q * k_group * positions, positions, 1.0, partial,
                  (slot * group + q) * r_group * k_group, k_group)
    for k in prange(group * k_group):
        q, kk = k // k_group, k % k_group
        row = dw[k]
        for j in range(r_group):
            total = partial[0, q, j, kk]
            for t in range(1, slots):
                total += partial[t, q, j, kk]
            row[j] = total


# Winograd weight gradient, F(2x2,3x3) or F(4x4,3x3). The forward is Y_t = A^T [U * V_t] A per
# m x m output tile t (U = G w G^T, V_t = B^T d_t B), so dL/dU = sum_t (A dY_t A^T) * V_t and
# dW = G^T (dL/dU) G: alpha^2 products of K x C over the tiles, 16 for F(2x2), 36 for F(4x4),
# instead of 9 m^2 multiply-adds per tile and filter pair. Only dW carries the rounding: no
# forward value depends on it, so F(4x4)'s ~5x larger error is not amplified downstream.
@njit(inline="always", cache=True)
def _tile_rows_f2(z, at, k, t0, rows, c0, c1):
    """z[at + j, k, t0 + tx], j = 0..3: one row of A dY_t (c0 dY's top row + c1 its bottom
    row, per tile), times A^T (A = [[1, 0], [1, 1], [1, -1], [0, -1]]). Few output streams at a
    time: the planes of z lie a multiple of 4 KiB apart for some shapes, and sixteen such
    streams thrash L1 (28x28 64-channel maps: 2.4 ms against 0.2)."""
    z0, z1, z2, z3 = z[at, k], z[at + 1, k], z[at + 2, k], z[at + 3, k]
    top, bottom = rows[0], rows[1]
    for tx in range(top.shape[0] // 2):
        p = c0 * top[2 * tx] + c1 * bottom[2 * tx]
        q = c0 * top[2 * tx + 1] + c1 * bottom[2 * tx + 1]
        z0[t0 + tx] = p
        z1[t0 + tx] = p + q
        z2[t0 + tx] = p - q
        z3[t0 + tx] = -q


@njit(inline="always", cache=True)
def _tile_rows_f4(z, at, k, t0, rows, c0, c1, c2, c3):
    """_tile_rows_f2 for F(4x4): the row sum_a c_a dY_a of A dY_t, times A^T, whose rows are
    [1, 0, 0, 0], [1, 1, 1, 1], [1, -1, 1, -1], [1, 2, 4, 8], [1, -2, 4, -8], [0, 0, 0, 1]."""
    z0, z1, z2 = z[at, k], z[at + 1, k], z[at + 2, k]
    z3, z4, z5 = z[at + 3, k], z[at + 4, k], z[at + 5, k]
    r0, r1, r2, r3 = rows[0], rows[1], rows[2], rows[3]
    two, four, eight = np.float32(2), np.float32(4), np.float32(8)
    for tx in range(r0.shape[0] // 4):
        q = 4 * tx
        p0 = c0 * r0[q] + c1 * r1[q] + c2 * r2[q] + c3 * r3[q]
        p1 = c0 * r0[q + 1] + c1 * r1[q + 1] + c2 * r2[q + 1] + c3 * r3[q + 1]
        p2 = c0 * r0[q + 2] + c1 * r1[q + 2] + c2 * r2[q + 2] + c3 * r3[q + 2]
        p3 = c0 * r0[q + 3] + c1 * r1[q + 3] + c2 * r2[q + 3] + c3 * r3[q + 3]
        even, odd = p0 + p2, p1 + p3
        even4, odd4 = p0 + four * p2, two * p1 + eight * p3
        z0[t0 + tx] = p0
        z1[t0 + tx] = even + odd
        z2[t0 + tx] = even - odd
        z3[t0 + tx] = even4 + odd4
        z4[t0 + tx] = even4 - odd4
        z5[t0 + tx] = p3


@njit(nogil=True, cache=True)
def grad_output(dy, z, n, ty0, ty1, t0, m):
    """Z[alpha^2, k, t0 + tiles] = A dY_t A^T for the m x m tiles of dy[n] (K, OH, OW) in tile
    rows [ty0, ty1), zeros past the map's edges; index alpha i + j as winograd.input_f2 / f4's
    V."""
    k_out, out_h, out_w = dy.shape[1], dy.shape[2], dy.shape[3]
    tw = (out_w + m - 1) // m
    rows = np.zeros((m, m * tw), np.float32)
    one, zero = np.float32(1), np.float32(0)
    two, four, eight = np.float32(2), np.float32(4), np.float32(8)
    for k in range(k_out):
        plane = dy[n, k]
        t = t0
        for ty in range(ty0, ty1):
            for r in range(m):
                y = m * ty + r
                dst = rows[r]
                if y < out_h:
                    src = plane[y]
                    for i in range(out_w):
                        dst[i] = src[i]
                else:
                    for i in range(out_w):
                        dst[i] = 0
            if m == 2:
                _tile_rows_f2(z, 0, k, t, rows, one, zero)
                _tile_rows_f2(z, 4, k, t, rows, one, one)
                _tile_rows_f2(z, 8, k, t, rows, one, -one)
                _tile_rows_f2(z, 12, k, t, rows, zero, -one)
            else:
                _tile_rows_f4(z, 0, k, t, rows, one, zero, zero, zero)
                _tile_rows_f4(z, 6, k, t, rows, one, one, one, one)
                _tile_rows_f4(z, 12, k, t, rows, one, -one, one, -one)
                _tile_rows_f4(z, 18, k, t, rows, one, two, four, eight)
                _tile_rows_f4(z, 24, k, t, rows, one, -two, four, -eight)
                _tile_rows_f4(z, 30, k, t, rows, zero, zero, zero, one)
            t += tw


@njit(nogil=True, parallel=True, cache=True)
def _grad_weight_winograd(x, dy, vbuf, zbuf, partial, gg, dw, m, rows_per_task, top, left):
    """conv_grad_weight's Winograd plan: a task per range of tile rows of the batch (images
    side by side; ``rows_per_task``, about an L2 of V and Z): V and Z of its tiles, then the
    alpha^2 products Z[p] V[p]^T added into its thread's partial (slot, alpha^2, K, C); then
    dW (K * C, 9) = the partials' sum through G^T . G, i.e. (G kron G)^T (gg)."""
    n_batch, channels = x.shape[0], x.shape[1]
    k_out, out_h, out_w = dy.shape[1], dy.shape[2], dy.shape[3]
    th, tw = (out_h + m - 1) // m, (out_w + m - 1) // m
    slots, alpha2 = partial.shape[0], partial.shape[1]
    capacity = vbuf.shape[3]
    total_rows = n_batch * th
    tasks = (total_rows + rows_per_task - 1) // rows_per_task
    for task in prange(tasks):
        slot = numba.get_thread_id()
        v, z = vbuf[slot], zbuf[slot]
        r, r1 = task * rows_per_task, min(total_rows, (task + 1) * rows_per_task)
        t0 = 0
        while r < r1:
            n, ty0 = r // th, r % th
            ty1 = min(th, ty0 + r1 - r)
            if m == 4:
                input_f4(x[n:n + 1], v, ty1 - ty0, tw, top - 4 * ty0, left, 0, t0)
            else:
                input_f2(x[n:n + 1], v, ty1 - ty0, tw, top - 2 * ty0, left, 0, t0)
            grad_output(dy, z, n, ty0, ty1, t0, m)
            t0 += (ty1 - ty0) * tw
            r += ty1 - ty0
        for p in range(alpha2):
            sgemm(0, 1, k_out, channels, t0, z, p * k_out * capacity, capacity, v,
                  p * channels * capacity, capacity, 1.0, partial,
                  (slot * alpha2 + p) * k_out * channels, channels)
    pairs = k_out * channels
    flat = dw.reshape((pairs, 9))
    sums = partial.reshape((slots, alpha2, pairs))
    chunks = (pairs + GRAD_CHUNK - 1) // GRAD_CHUNK
    for chunk in prange(chunks):
        a, b = chunk * GRAD_CHUNK, min(pairs, (chunk + 1) * GRAD_CHUNK)
        row = np.empty(b - a, np.float32)
        out = np.zeros((9, b - a), np.float32)
        for p in range(alpha2):
            row[:] = sums[0, p, a:b]
            for s in range(1, slots):
                part = sums[s, p, a:b]
                for i in range(b - a):
                    row[i] += part[i]
            for tap in range(9):
                weight = gg[p, tap]
                if weight != 0:
                    dst = out[tap]
                    for i in range(b - a):
                        dst[i] += weight * row[i]
        for i in range(b - a):
            for tap in range(9):
                flat[a + i, tap] = out[tap, i]


#: pairs of channels per task of _grad_weight_winograd's final sum
GRAD_CHUNK = 1024
#: bytes of one Winograd weight-gradient task's V and Z (alpha^2 (C + K) floats a tile): half a
#: core's L2
WINOGRAD_GRAD_BYTES = 1 << 20


def winograd_grad_plan(n_batch, channels, k_out, out_h, out_w, m,
                       workers) -> tuple[int, int, int]:
    """(tile rows per task, tiles per task, float32 scratch) of _grad_weight_winograd with
    F(m x m, 3x3): tasks of about WINOGRAD_GRAD_BYTES, as many as a multiple of the workers."""
    alpha2 = (m + 2) ** 2
    th, tw = -(-out_h // m), -(-out_w // m)
    rows = max(1, WINOGRAD_GRAD_BYTES // (4 * alpha2 * (channels + k_out) * tw))
    total = n_batch * th
    tasks = -(-total // rows)
    tasks = -(-tasks // workers) * workers
    rows = -(-total // tasks)
    slots = numba.config.NUMBA_NUM_THREADS
    # an odd capacity keeps the planes of V and Z from lying a multiple of 4 KiB apart, where
    # their write streams evict each other from L1 (64-channel 28x28 maps: Z 0.42 -> 0.29 ms)
    capacity = rows * tw | 1
    return rows, capacity, slots * alpha2 * ((channels + k_out) * capacity + k_out * channels)


def conv_grad_weight_winograd(x, dy, out, ws, m, pads):
    """ConvGradWeight of a 2-D 3x3 stride-1 group-1 Conv by Winograd F(m x m, 3x3)
    (_grad_weight_winograd); pads (top, left, ...) as ONNX orders them."""
    x, dy = contiguous(x), contiguous(dy)
    n_batch, channels = x.shape[:2]
    k_out, out_h, out_w = dy.shape[1:]
    rows, capacity, _ = winograd_grad_plan(n_batch, channels, k_out, out_h, out_w, m, threads())
    slots, alpha2 = numba.config.NUMBA_NUM_THREADS, (m + 2) ** 2
    size_v, size_z = slots * alpha2 * channels * capacity, slots * alpha2 * k_out * capacity
    vbuf = ws[:size_v].reshape(slots, alpha2, channels, capacity)
    zbuf = ws[size_v:size_v + size_z].reshape(slots, alpha2, k_out, capacity)
    partial = ws[size_v + size_z:size_v + size_z + slots * alpha2 * k_out * channels].reshape(
        slots, alpha2, k_out, channels)
    partial[:] = 0
    target = Target(out)
    with serial_blas():
        _grad_weight_winograd(x, dy, vbuf, zbuf, partial, _F4_GG if m == 4 else _F2_GG,
                              target.array, m, rows, pads[0], pads[1])
    target.done()
    return out


#: weight gradients up to this many elements are summed per image into per-thread partials:
#: short products per image, but their columns stay in cache and no thread waits for a share
#: of a few channels. In ResNet-18's training step at batch 8 (ms per image / whole batch in
#: blocks of channels): 64 -> 64 3x3 at 28x28 2.7 / 3.2, 128 -> 128 3x3 at 14x14 2.4 / 3.0-3.5
#: (alone, with its inputs in cache, the whole batch read 2.7 against 2.9: time these in the
#: model), 256 -> 512 1x1 s2 0.42 / 0.48; 4x4 and 7x7 layers of 256-512 channels take the
#: whole batch.
PER_IMAGE_MAX_WEIGHTS = 1 << 19
PER_IMAGE_MIN_POSITIONS = 100


def grad_weight_size(x_shape, dy_shape, g) -> int:
    """float32 scratch elements of conv_grad_weight."""
    positions = g[12] * g[13] * g[14]
    rows = x_shape[1] * g[0] * g[1] * g[2]
    whole = (rows + dy_shape[1]) * x_shape[0] * positions
    slots = numba.config.NUMBA_NUM_THREADS
    per_image = slots * (rows * positions + dy_shape[1] * rows)
    return max(whole, per_image) + columns_scratch(x_shape, g)


def conv_grad_weight(x, dy, out, ws, g, group=1):
    """ConvGradWeight: dW (K, C/group * taps) = dY (K, N * S) @ cols (C/group * taps, N * S)^T per
    group. Small dW: per image, summed in per-thread partials (PER_IMAGE_MAX_WEIGHTS); else the
    whole batch's columns in one product, in blocks of dW's columns, i.e. of input channels
    (_grad_weight_tasks; BLAS reads the transposed view as is)."""
    x5, dy5 = contiguous(as5(x)), contiguous(as5(dy))
    n_batch, channels = x5.shape[:2]
    k_out = dy5.shape[1]
    rows = channels * g[0] * g[1] * g[2]
    positions = g[12] * g[13] * g[14]
    total = n_batch * positions
    target = Target(out)
    dw = target.array.reshape(k_out, rows // group)
    pads = columns_scratch(x5.shape, g)
    if dw.size <= PER_IMAGE_MAX_WEIGHTS and n_batch > 1 and positions >= PER_IMAGE_MIN_POSITIONS:
        slots = numba.config.NUMBA_NUM_THREADS
        cols = ws[pads:pads + slots * rows * positions]
        partial = ws[pads + cols.size:pads + cols.size + slots * dw.size].reshape(
            (slots, group, rows // group, k_out // group))
        partial[:] = 0
        with serial_blas():
            _grad_weight_images(x5, dy5, ws[:pads], cols, partial, dw, g)
    else:
        col = ws[pads:pads + rows * total]
        dyt = ws[pads + col.size:pads + col.size + k_out * total].reshape(k_out, total)
        with serial_blas():
            _grad_weight_tasks(x5, dy5, ws[:pads], col, dyt, dw, g,
                               _channel_blocks(channels // group, group))
    target.done()
    return out


# ---- pooling gradients ---------------------------------------------------------------------------
@njit(inline="always", cache=True)
def _running_max(best, pick, plane, base, lo, hi, stride, first):
    """best[o], pick[o] for o in [lo, hi) updated with the tap plane[base + (o - lo) * stride]:
    the tap wins when larger, or when it is a NaN and the running maximum is not (np.argmax's
    first NaN). Unsigned indices and no views: a view per tap costs reference counting, and a
    signed index Numba's wraparound check, which measured more than the loop itself."""
    at = np.uint64(base)
    step = np.uint64(stride)
    if first:
        for o in range(lo, hi):
            i = at + np.uint64(o - lo) * step
            best[o] = plane[i]
            pick[o] = np.int32(i)
        return
    for o in range(lo, hi):
        i = at + np.uint64(o - lo) * step
        v = plane[i]
        m = best[o]
        take = (v > m) | ((v != v) & (m == m))
        best[o] = v if take else m
        pick[o] = np.int32(i) if take else pick[o]


@njit(inline="always", cache=True)
def _first_equal(plane, top, g, depth, height, width, z, yy, o):
    """Flat index in plane of the first tap (in window order) of output (z, yy, o) that equals
    top, the window's maximum; -1 if none (only padding can be it: never, for a finite top)."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw = g[:12]
    for a in range(kd):
        iz = z * sd - pd + a * dd
        if iz < 0 or iz >= depth:
            continue
        for b in range(kh):
            iy = yy * sh - ph + b * dh
            if iy < 0 or iy >= height:
                continue
            for e in range(kw):
                ix = o * sw - pw + e * dw
                if ix >= 0 and ix < width:
                    at = (iz * height + iy) * width + ix
                    if plane[at] == top:
                        return at
    return -1


@njit(parallel=True, cache=True)
def max_pool_grad(dy, x, y, dx, g):
    """dx (N, C, D, H, W) = each dY element added at the first maximum of its window of x, as
    np.argmax over the window's taps in order picks it (padding is -inf, a NaN wins); a window
    whose pick is padding passes nothing. dy (N, C, od, oh, ow).

    With y, the forward's window maxima (same shape as dy; empty when not kept): per output,
    the first tap equal to its window's maximum takes the gradient, the search ending there
    (ResNet-18's 3x3 stride-2 pool at batch 8, 112x112: 2.6 ms against 5.7). Rows whose maxima
    hold a NaN or -inf (where padding or a NaN decides) and calls without y keep the running
    maximum and flat index of every window, tap by tap (scalar code: the NaN rule and the
    index select keep it from vectorising), then scatter. Vectorising the search across a
    row (compare and select per tap) measured slower: 129K loops of 28 per call."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow = g
    n_batch, channels, depth, height, width = x.shape
    have_max = y.shape[0] != 0
    # each tap column's valid outputs, once: two divisions per tap and row cost more than the
    # row's comparisons on ResNet's 28-wide rows
    valid = np.empty((kw, 2), np.int64)
    for e in range(kw):
        valid[e, 0], valid[e, 1] = _valid_range(ow, sw, e * dw - pw, width)
    for job in prange(n_batch * channels):
        n = job // channels
        c = job % channels
        plane = x[n, c].reshape(-1)
        grad = dx[n, c].reshape(-1)
        grad[:] = 0
        best = np.empty(ow, np.float32)
        pick = np.empty(ow, np.int32)
        for z in range(od):
            for yy in range(oh):
                row = dy[n, c, z, yy]
                fast = have_max
                if have_max:
                    top = y[n, c, z, yy]
                    for o in range(ow):
                        if top[o] != top[o] or top[o] == -np.inf:
                            fast = False
                if fast:
                    for o in range(ow):
                        at = _first_equal(plane, top[o], g, depth, height, width, z, yy, o)
                        if at >= 0:
                            grad[at] += row[o]
                    continue
                best[:] = -np.inf
                pick[:] = -1
                first = True
                for a in range(kd):
                    iz = z * sd - pd + a * dd
                    for b in range(kh):
                        iy = yy * sh - ph + b * dh
                        inside = 0 <= iz < depth and 0 <= iy < height
                        for e in range(kw):
                            if inside:
                                off = e * dw - pw
                                lo, hi = valid[e, 0], valid[e, 1]
                                base = (iz * height + iy) * width + lo * sw + off
                                if sw == 1:
                                    _running_max(best, pick, plane, base, lo, hi, 1, first)
                                elif sw == 2:
                                    _running_max(best, pick, plane, base, lo, hi, 2, first)
                                else:
                                    _running_max(best, pick, plane, base, lo, hi, sw, first)
                            first = False
                for o in range(ow):
                    if pick[o] >= 0:
                        grad[pick[o]] += row[o]


@njit(parallel=True, cache=True)
def avg_pool_grad(dy, scale, dx, g):
    """dx (N, C, D, H, W) = every dY element times scale (1 / its window's count, per output
    position) added to each in-bounds tap of its window."""
    kd, kh, kw, sd, sh, sw, dd, dh, dw, pd, ph, pw, od, oh, ow = g
    n_batch, channels, depth, height, width = dx.shape
    for job in prange(n_batch * channels):
        n = job // channels
        c = job % channels
        grad = dx[n, c]
        grad[:] = 0
        for z in range(od):
            for y in range(oh):
                for o in range(ow):
                    share = dy[n, c, z, y, o] * scale[z, y, o]
                    for a in range(kd):
                        iz = z * sd - pd + a * dd
                        if iz < 0 or iz >= depth:
                            continue
                        for b in range(kh):
                            iy = y * sh - ph + b * dh
                            if iy < 0 or iy >= height:
                                continue
                            row = grad[iz, iy]
                            for e in range(kw):
                                ix = o * sw - pw + e * dw
                                if 0 <= ix < width:
                                    row[ix] += share


def pool_grad_into(kernel, dy, dx, g, *inputs):
    """Run a pooling-gradient kernel(dy, *inputs, dx, g) on 5-D views; a strided dx gets a
    temporary."""
    target = Target(as5(dx))
    kernel(contiguous(as5(dy)), *inputs, target.array, g)
    target.done()
    return dx


def max_pool_backward(dy, x, dx, g, y=None):
    """MaxPoolGrad; y: the forward's output, when the graph kept it for the gradient."""
    y5 = _EMPTY5 if y is None else contiguous(as5(y))
    return pool_grad_into(max_pool_grad, dy, dx, g, contiguous(as5(x)), y5)


def avg_pool_backward(dy, scale, dx, g):
    return pool_grad_into(avg_pool_grad, dy, dx, g, scale)


# ---- batch normalisation (training mode) ---------------------------------------------------------
def planes(a: np.ndarray) -> np.ndarray:
    """(N, C, S) view of an (N, C, spatial...) array; a contiguous copy only if no view exists."""
    try:
        return a.reshape(a.shape[0], a.shape[1], -1, copy=False)
    except ValueError:
        return np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1)


def out_planes(a: np.ndarray) -> np.ndarray:
    """(N, C, S) view an output is written through; raises if none exists (the emitters only
    hand over arena views, whose images are contiguous)."""
    return a.reshape(a.shape[0], a.shape[1], -1, copy=False)


@njit(parallel=True, cache=True, fastmath=REDUCE_MATH)
def batchnorm_train(x, scale, bias, y, mean, var, epsilon):
    """Per channel of x (N, C, S): the batch mean and biased variance (two passes, float64 sums
    of float32 rows) and y = (x - mean) * (scale / sqrt(var + epsilon)) + bias. The sums may be
    reassociated, so that they vectorise (as ordered scalar adds they took 2/3 of the time)."""
    n_batch, channels, positions = x.shape
    count = n_batch * positions
    for c in prange(channels):
        total = 0.0
        for n in range(n_batch):
            row = x[n, c]
            for i in range(positions):
                total += row[i]
        mu = np.float32(total / count)
        square = 0.0
        for n in range(n_batch):
            row = x[n, c]
            for i in range(positions):
                d = row[i] - mu
                square += d * d
        sigma2 = square / count
        gain = np.float32(scale[c] / math.sqrt(sigma2 + epsilon))
        shift = np.float32(bias[c])
        for n in range(n_batch):
            row = x[n, c]
            dst = y[n, c]
            for i in range(positions):
                dst[i] = (row[i] - mu) * gain + shift
        mean[c] = total / count
        var[c] = sigma2


@njit(nogil=True, cache=True, fastmath=REDUCE_MATH)
def _batchnorm_grad_channel(d, dc, x, c, scale, mean, var, dmean, dvar, dx, dscale, dbias,
                            epsilon):
    """batchnorm_train_grad of channel c, its dY the planes d[:, dc] (dY's own, or the rows
    taken through an activation's gradient); a function of its own, so that each form compiles
    with its own array layouts and the loops stay vectorised."""
    n_batch, positions = x.shape[0], x.shape[2]
    count = n_batch * positions
    mu = np.float32(mean[c])
    total = 0.0
    cross = 0.0
    for n in range(n_batch):
        d_row = d[n, dc]
        x_row = x[n, c]
        part = np.float32(0)
        part_cross = np.float32(0)
        for i in range(positions):
            part += d_row[i]
            part_cross += d_row[i] * (x_row[i] - mu)
        total += part
        cross += part_cross
    inv_std = 1.0 / math.sqrt(var[c] + epsilon)
    gain = scale[c] * inv_std
    k = -gain * cross * inv_std * inv_std / count
    shift = -gain * total / count
    if dmean.shape[0] != 0:
        shift += dmean[c] / count
    if dvar.shape[0] != 0:
        k += 2.0 * dvar[c] / count
    g32, k32, c32 = np.float32(gain), np.float32(k), np.float32(shift)
    for n in range(n_batch):
        d_row = d[n, dc]
        x_row = x[n, c]
        dst = dx[n, c]
        for i in range(positions):
            dst[i] = d_row[i] * g32 + (x_row[i] - mu) * k32 + c32
    dscale[c] = cross * inv_std
    dbias[c] = total


@njit(parallel=True, cache=True)
def batchnorm_train_grad(dy, x, scale, mean, var, dmean, dvar, dx, dscale, dbias, epsilon, v,
                         code, p0, p1):
    """BatchNormTrainGrad per channel of (N, C, S) arrays: dB = sum dY, dscale = sum dY * xhat,
    dX = dY * gain + (x - mean) * k + c (see the op); dmean / dvar of size 0 mean none. With an
    activation ``code`` (not NO_ACTIVATION), dY is first the gradient through it, dY * f'(v),
    into a per-channel buffer that stays in cache: the activation's gradient is not written out
    and read back (fuse_activation_grad)."""
    n_batch, channels, positions = x.shape
    a, b = np.float32(p0), np.float32(p1)
    for c in prange(channels):
        if code == NO_ACTIVATION:
            _batchnorm_grad_channel(dy, c, x, c, scale, mean, var, dmean, dvar, dx, dscale,
                                    dbias, epsilon)
        else:
            rows = np.empty((n_batch, 1, positions), np.float32)
            for n in range(n_batch):
                d_row, v_row, dst = dy[n, c], v[n, c], rows[n, 0]
                if code == RELU:
                    for i in range(positions):
                        dst[i] = d_row[i] if v_row[i] > 0 else np.float32(0)
                else:
                    for i in range(positions):
                        dst[i] = d_row[i] * _slope(v_row[i], code, a, b)
            _batchnorm_grad_channel(rows, 0, x, c, scale, mean, var, dmean, dvar, dx, dscale,
                                    dbias, epsilon)


_NO_STATS = np.zeros(0, dtype=np.float32)
_NO_PLANES = np.zeros((0, 0, 0), dtype=np.float32)


def batchnorm_train_forward(x, scale, bias, y, mean, var, epsilon):
    batchnorm_train(planes(x), scale, bias, out_planes(y), mean, var, epsilon)
    return y


def batchnorm_train_backward(dy, x, scale, mean, var, dmean, dvar, dx, dscale, dbias, epsilon,
                             v=None, code=-1, p0=0.0, p1=0.0):
    """BatchNormTrainGrad; with ``v`` and an activation code (ACTIVATION_GRADS), of dY taken
    through that activation's gradient first."""
    batchnorm_train_grad(planes(dy), planes(x), scale, mean, var,
                         _NO_STATS if dmean is None else dmean,
                         _NO_STATS if dvar is None else dvar,
                         out_planes(dx), dscale, dbias, epsilon,
                         _NO_PLANES if v is None else planes(v), code, p0, p1)
    return dx


# ---- activation gradients ------------------------------------------------------------------------
RELU, RELU6, CLIP, LEAKY_RELU, SIGMOID, TANH, ELU, HARD_SWISH, SILU, HARD_SIGMOID = range(10)
NO_ACTIVATION = -1


@njit(inline="always", cache=True)
def _slope(v, code, p0, p1):
    """f'(v) for the activation ``code``; v is X or Y as ActivationGrad's ``at`` says."""
    one = np.float32(1)
    zero = np.float32(0)
    if code == RELU:
        return one if v > 0 else zero
    if code == RELU6:
        return one if v > 0 and v < 6 else zero
    if code == CLIP:
        return one if v >= p0 and v <= p1 else zero
    if code == LEAKY_RELU:
        return one if v > 0 else p0
    if code == SIGMOID:
        return v * (one - v)
    if code == TANH:
        return one - v * v
    if code == ELU:
        return one if v > 0 else p0 * np.exp(v)
    if code == HARD_SWISH:
        if v < -3:
            return zero
        return v / np.float32(3) + np.float32(0.5) if v <= 3 else one
    if code == SILU:
        s = one / (one + np.exp(-v))
        return s * (one + v * (one - s))
    # HARD_SIGMOID: alpha inside (0, 1)
    z = p0 * v + p1
    return p0 if z > 0 and z < 1 else zero


@njit(parallel=True, cache=True)
def activation_grad(dy, v, dx, code, p0, p1):
    """dx = dy * f'(v) over flat float32 arrays."""
    a = np.float32(p0)
    b = np.float32(p1)
    size = dx.shape[0]
    chunk = 16384
    for job in prange((size + chunk - 1) // chunk):
        lo = job * chunk
        hi = min(size, lo + chunk)
        if code == RELU:
            for i in range(lo, hi):
                dx[i] = dy[i] if v[i] > 0 else np.float32(0)
        else:
            for i in range(lo, hi):
                dx[i] = dy[i] * _slope(v[i], code, a, b)


def flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)


def activation_backward(dy, v, dx, code, p0, p1):
    if dx.flags.c_contiguous:
        activation_grad(flat(dy), flat(v), dx.reshape(-1), code, p0, p1)
    else:
        tmp = np.empty(dx.shape, np.float32)
        activation_grad(flat(dy), flat(v), tmp.reshape(-1), code, p0, p1)
        dx[...] = tmp
    return dx


# ---- optimizer updates ---------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def sgd_update(param, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """torch.optim.SGD on flat arrays in place: d = g + wd * p; buf = d on the first step (buf
    must hold zeros then), else momentum * buf + (1 - dampening) * d; p -= lr * (d + momentum *
    buf if nesterov else buf). buf of size 0: no momentum. One plain loop per case, so that each
    vectorises (a single loop with the cases inside ran 2.5x slower)."""
    size = param.shape[0]
    lr32, mom32 = np.float32(lr), np.float32(momentum)
    keep = np.float32(0.0 if first else momentum)
    damp32 = np.float32(1.0 if first else 1.0 - dampening)
    wd32 = np.float32(weight_decay)
    if buf.shape[0] == 0:
        for i in prange(size):
            param[i] -= lr32 * (grad[i] + wd32 * param[i])
    elif nesterov:
        for i in prange(size):
            d = grad[i] + wd32 * param[i]
            b = keep * buf[i] + damp32 * d
            buf[i] = b
            param[i] -= lr32 * (d + mom32 * b)
    else:
        for i in prange(size):
            b = keep * buf[i] + damp32 * (grad[i] + wd32 * param[i])
            buf[i] = b
            param[i] -= lr32 * b


@njit(parallel=True, cache=True)
def adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                step_size, bias2_sqrt):
    """torch.optim.Adam (amsgrad off) on flat arrays in place."""
    b1, b2 = np.float32(beta1), np.float32(beta2)
    c1, c2 = np.float32(1.0 - beta1), np.float32(1.0 - beta2)
    wd32, eps32 = np.float32(weight_decay), np.float32(eps)
    step32, root32 = np.float32(step_size), np.float32(bias2_sqrt)
    for i in prange(param.shape[0]):
        d = grad[i] + wd32 * param[i]
        m = b1 * exp_avg[i] + c1 * d
        v = b2 * exp_avg_sq[i] + c2 * d * d
        exp_avg[i] = m
        exp_avg_sq[i] = v
        param[i] -= step32 * (m / (np.sqrt(v) / root32 + eps32))
