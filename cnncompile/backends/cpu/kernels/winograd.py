"""Winograd F(2x2,3x3) and F(4x4,3x3) convolution (2-D, stride 1, dilation 1, group 1).

The math is ``cnncompile/ops/winograd.py``'s (Lavin & Gray): Y = A^T [U * (B^T d B)] A per
m x m output tile. The filter transform U is done at compile time (``transform_weights``, float64,
laid out [alpha^2, K, C] for the GEMM, or each U[p] packed for the microkernel). A call runs three steps on a set of tiles:

1. ``input_f2`` / ``input_f4``: V[alpha^2, C, tiles] = B^T d B. Per channel, each input row
   gets its pads (partial edge tiles read zeros) and the transform along x; the pass along y then
   runs as long flat loops over all tiles;
2. alpha^2 GEMMs M[alpha^2, K, tiles] = U @ V: microkernel.gemm_packed on U packed at compile
   time (inference), or NumPy's OpenBLAS on U transformed per call (training's run-time
   weights);
3. ``output_f2`` / ``output_f4``: Y = A^T M A on blocks of output channels (flat loops again),
   interleaved back into the output rows, cropped at the edges, with the epilogue (bias,
   activation, residual, post activation) while the rows are in cache.

The transforms are serial functions; ``conv_winograd`` runs them as the tasks of parallel Numba
calls (``_winograd_bands``, or ``_winograd_inputs`` then ``_winograd_products``; the GEMMs as
blas.sgemm from inside), in one of two ways (``plan``): large images in bands of tile rows,
each band all three steps in its thread's own L2-sized scratch (U-Net's 256x256 layers ran
1.3-2.2x faster single-threaded than with the whole image's V and M at once); small images
(14x14, 7x7) in blocks of images, step 1 split by channels, then steps 2-3 by ranges of output
channels, so that each thread reads only its part of U.

Flat loops matter: Numba's loops over a 7..14-tile row barely vectorise, and every call that
passes arrays to a function Numba does not inline costs reference counting; both were measured.

Measured float32 error (relative L2 against a float64 convolution, ResNet layer shapes with
He-scaled weights, benchmarks/conv_kernels.py): F(2x2) 2.6e-7 .. 5.0e-7, as accurate as im2col
(3.0e-7 .. 3.6e-7); F(4x4) 1.7e-6 .. 2.9e-6, its matrices holding 4, 5 and 8. Both are far
inside the 1e-4 the CPU target is held to.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from ....ops.winograd import matrices
from .blas import sgemm
from .microkernel import MR, gemm_packed, pack_weights
from .conv import NO_ACT, NO_BIAS, epilogue_args, scratch, serial_blas, threads
from .epilogue import NONE, RELU, activation_row

_EMPTY4 = np.zeros((0, 0, 0, 0), dtype=np.float32)
#: cold compile seconds of the drivers (both tiles' transforms in each), for backend.precompile
COMPILE_WEIGHTS = {"_winograd_inputs": 3.8, "_winograd_products": 6.7, "_winograd_bands": 10}
#: bytes of one band's transformed input and GEMM result (V and M): most of a core's L2
BAND_BYTES = 3 << 19
#: bands of fewer tiles than this make GEMMs too short: such images go whole, in image blocks
#: (single-threaded, 56x56 64-channel F(4x4) layers ran 25% slower in bands of 70 tiles)
MIN_BAND_TILES = 128
#: images of an image block: about this many tiles, so that the GEMMs have enough columns
BLOCK_TILES = 128


def transform_weights(w: np.ndarray, m: int, packed: bool = False) -> np.ndarray:
    """U = G g G^T for K x C x 3 x 3 weights, as a contiguous [alpha^2, K, C] float32 array:
    ops/winograd.py's transform as one float64 GEMM, (G kron G) @ g, since VGG's weights made
    the two-pass version a second of every compile. ``packed``: each U[p] packed for
    microkernel.gemm_packed instead, (alpha^2, K / MR panels, C, MR), as inference modules
    hold it."""
    _, g, _ = matrices(m)
    k_out, channels = w.shape[:2]
    alpha = g.shape[0]
    u = np.kron(g, g) @ np.asarray(w, np.float64).reshape(k_out * channels, 9).T
    u = np.ascontiguousarray(u.reshape(alpha * alpha, k_out, channels), dtype=np.float32)
    return pack_weights(u) if packed else u


def tiles(out_h: int, out_w: int, m: int) -> tuple[int, int]:
    return -(-out_h // m), -(-out_w // m)


def plan(n_batch: int, channels: int, k_out: int, out_h: int, out_w: int, m: int,
         workers: int) -> tuple:
    """How conv_winograd splits a call, and the float32 scratch it needs:

    * ("bands", band_rows, bands, size): each task one band of tile rows of one image: its
      input transform, GEMMs and output transform in the task's own scratch, sized to stay in
      its core's L2 (U-Net's 256x256 layers: 16K tiles an image);
    * ("blocks", nb, kparts, size): for images with few tiles (14x14, 7x7 outputs), blocks of nb
      images: the input transform (a task per image and channel range), then one task per
      range of output channels: its GEMMs (the weights read once for the block) and output
      transform."""
    alpha2 = (m + 2) ** 2
    th, tw = tiles(out_h, out_w, m)
    budget = max(1, BAND_BYTES // (4 * alpha2 * (channels + k_out)))
    band_rows = max(1, min(th, round(budget / tw)))
    bands = -(-th // band_rows)
    if n_batch * bands < workers:
        bands = min(th, -(-workers // n_batch))
    band_rows = -(-th // bands)
    bands = -(-th // band_rows)
    if band_rows * tw >= MIN_BAND_TILES:
        return "bands", band_rows, bands, workers * alpha2 * (channels + k_out) * band_rows * tw
    nb = max(1, min(n_batch, -(-BLOCK_TILES // (th * tw))))
    kparts = max(1, min(workers, k_out // 8))
    k_block = -(-(-(-k_out // kparts)) // MR) * MR
    count = nb * th * tw
    return "blocks", nb, kparts, alpha2 * count * (channels + workers * k_block)


def scratch_size(n_batch: int, channels: int, k_out: int, out_h: int, out_w: int, m: int) -> int:
    """float32 elements of scratch for ``conv_winograd``."""
    return plan(n_batch, channels, k_out, out_h, out_w, m, numba.config.NUMBA_NUM_THREADS)[3]


@njit(inline="always", cache=True)
def _padded_row(row, x, n, c, iy, left):
    """row = the input row iy with its left pad and zeros after it."""
    width = x.shape[3]
    stop = min(row.shape[0], left + width)
    for i in range(left):
        row[i] = 0
    src = x[n, c, iy]
    inner = row[left:stop]
    for i in range(stop - left):
        inner[i] = src[i]
    for i in range(stop, row.shape[0]):
        row[i] = 0


@njit(nogil=True, cache=True)
def input_f4(x, v, th, tw, top, left, c0, t0):
    """V[36, c0 + c, t0 + tiles] = B^T d B for F(4x4,3x3) of x (nb, C, H, W) with its pads
(channel c, tiles n * th * tw + ...): th tile rows from input row -top on.

    Per channel: first along x for every padded input row (the strided, per-row part), written
    with rows split by phase (y = 4 qy + ry) so that the pass along y is one long flat loop per
    output column j over all tiles at once."""
    nb, channels, height = x.shape[0], x.shape[1], x.shape[2]
    hq = th + 1
    count = th * tw
    four, five = np.float32(4), np.float32(5)
    two = np.float32(2)
    row = np.empty(4 * tw + 2, np.float32)
    u = np.empty((6, 4, hq, tw), np.float32)
    for job in range(nb * channels):
        n = job // channels
        c = job % channels
        for y in range(4 * hq):
            ry = y % 4
            qy = y // 4
            u0, u1, u2 = u[0, ry, qy], u[1, ry, qy], u[2, ry, qy]
            u3, u4, u5 = u[3, ry, qy], u[4, ry, qy], u[5, ry, qy]
            iy = y - top
            if iy < 0 or iy >= height:
                for tx in range(tw):
                    u0[tx] = u1[tx] = u2[tx] = u3[tx] = u4[tx] = u5[tx] = 0
                continue
            _padded_row(row, x, n, c, iy, left)
            for tx in range(tw):
                q = 4 * tx
                e0, e1, e2, e3, e4, e5 = (row[q], row[q + 1], row[q + 2], row[q + 3],
                                          row[q + 4], row[q + 5])
                u0[tx] = four * e0 - five * e2 + e4
                u1[tx] = -four * (e1 + e2) + e3 + e4
                u2[tx] = four * (e1 - e2) - e3 + e4
                u3[tx] = two * (e3 - e1) - e2 + e4
                u4[tx] = two * (e1 - e3) - e2 + e4
                u5[tx] = four * e1 - five * e3 + e5
        base = t0 + n * count
        vc = c0 + c
        for j in range(6):
            p0, p1 = u[j, 0].reshape(-1), u[j, 1].reshape(-1)
            p2, p3 = u[j, 2].reshape(-1), u[j, 3].reshape(-1)
            d0, d1, d2, d3 = p0[:count], p1[:count], p2[:count], p3[:count]
            d4, d5 = p0[tw:tw + count], p1[tw:tw + count]
            v0, v1 = v[j, vc, base:base + count], v[6 + j, vc, base:base + count]
            v2, v3 = v[12 + j, vc, base:base + count], v[18 + j, vc, base:base + count]
            v4, v5 = v[24 + j, vc, base:base + count], v[30 + j, vc, base:base + count]
            for t in range(count):
                a0, a1, a2, a3, a4, a5 = d0[t], d1[t], d2[t], d3[t], d4[t], d5[t]
                v0[t] = four * a0 - five * a2 + a4
                v1[t] = -four * (a1 + a2) + a3 + a4
                v2[t] = four * (a1 - a2) - a3 + a4
                v3[t] = two * (a3 - a1) - a2 + a4
                v4[t] = two * (a1 - a3) - a2 + a4
                v5[t] = four * a1 - five * a3 + a5


@njit(nogil=True, cache=True)
def input_f2(x, v, th, tw, top, left, c0, t0):
    """V[16, c0 + c, t0 + tiles] = B^T d B for F(2x2,3x3); organised as input_f4."""
    nb, channels, height = x.shape[0], x.shape[1], x.shape[2]
    hq = th + 1
    count = th * tw
    row = np.empty(2 * tw + 2, np.float32)
    u = np.empty((4, 2, hq, tw), np.float32)
    for job in range(nb * channels):
        n = job // channels
        c = job % channels
        for y in range(2 * hq):
            ry = y % 2
            qy = y // 2
            u0, u1, u2, u3 = u[0, ry, qy], u[1, ry, qy], u[2, ry, qy], u[3, ry, qy]
            iy = y - top
            if iy < 0 or iy >= height:
                for tx in range(tw):
                    u0[tx] = u1[tx] = u2[tx] = u3[tx] = 0
                continue
            _padded_row(row, x, n, c, iy, left)
            for tx in range(tw):
                q = 2 * tx
                e0, e1, e2, e3 = row[q], row[q + 1], row[q + 2], row[q + 3]
                u0[tx] = e0 - e2
                u1[tx] = e1 + e2
                u2[tx] = e2 - e1
                u3[tx] = e1 - e3
        base = t0 + n * count
        vc = c0 + c
        for j in range(4):
            p0, p1 = u[j, 0].reshape(-1), u[j, 1].reshape(-1)
            d0, d1, d2, d3 = p0[:count], p1[:count], p0[tw:tw + count], p1[tw:tw + count]
            v0, v1 = v[j, vc, base:base + count], v[4 + j, vc, base:base + count]
            v2, v3 = v[8 + j, vc, base:base + count], v[12 + j, vc, base:base + count]
            for t in range(count):
                a0, a1, a2, a3 = d0[t], d1[t], d2[t], d3[t]
                v0[t] = a0 - a2
                v1[t] = a1 + a2
                v2[t] = a2 - a1
                v3[t] = a1 - a3


@njit(inline="always", cache=True)
def _interleave(dst, row, q0, q1, q2, q3, phases, b, relu):
    """dst = row + b (relu'd when asked), row[phases * tx + c] = q_c[tx]: a tile row put back
    together. Interleaving into a private buffer first measured 2x faster than writing the
    output view directly (and a version that applied the whole epilogue here, 2x slower)."""
    full = -(-dst.shape[0] // phases)
    if phases == 4:
        for tx in range(full):
            row[4 * tx] = q0[tx]
            row[4 * tx + 1] = q1[tx]
            row[4 * tx + 2] = q2[tx]
            row[4 * tx + 3] = q3[tx]
    else:
        for tx in range(full):
            row[2 * tx] = q0[tx]
            row[2 * tx + 1] = q1[tx]
    zero = np.float32(0)
    if relu:
        for i in range(dst.shape[0]):
            v = row[i] + b
            dst[i] = v if v > zero else zero
    else:
        for i in range(dst.shape[0]):
            dst[i] = row[i] + b


@njit(inline="always", cache=True)
def _row_rest(dst, code, params, res, has_res, post_code, post_params):
    """The rest of the epilogue on one output row after _interleave: an activation other than
    Relu (a call per row), the residual and the post activation."""
    if code != RELU and code != NONE:
        activation_row(dst, code, params)
    if has_res:
        zero = np.float32(0)
        if post_code == RELU:
            for i in range(dst.shape[0]):
                v = dst[i] + res[i]
                dst[i] = v if v > zero else zero
        else:
            for i in range(dst.shape[0]):
                dst[i] += res[i]
            activation_row(dst, post_code, post_params)


@njit(nogil=True, cache=True)
def output_f4(mm, out, bias, th, tw, kb, n0, k0, row0, code, params, res, post_code,
              post_params):
    """out[n0 + n, k0 + k, row0 + y] = epilogue(A^T M A) for F(4x4,3x3), for the nb images, kc
    output channels and th tile rows (from output row row0) of mm (36, kc, nb * th * tw).

    In blocks of kb output channels: M[p, k:k + kb, :] is contiguous, so both passes of the
    transform run as long flat loops (short per-tile-row loops would not vectorise); the result,
    one array per position in the tile, is interleaved into the output rows with the epilogue."""
    kc, count = mm.shape[1], mm.shape[2]
    nb = count // (th * tw)
    rows = min(4 * th, out.shape[2] - row0)
    flat = mm.reshape(36, kc * count)
    has_bias = bias.shape[0] != 0
    has_res = res.shape[0] != 0
    relu = code == RELU
    rest = has_res or not (relu or code == NONE)
    two, four, eight = np.float32(2), np.float32(4), np.float32(8)
    s = np.empty((4, 6, kb * count), np.float32)
    yq = np.empty((4, 4, kb * count), np.float32)
    row = np.empty(4 * tw, np.float32)
    for ka in range(0, kc, kb):
        kz = min(kc, ka + kb)
        lo = ka * count
        hi = kz * count
        for col in range(6):
            m0, m1, m2 = flat[col, lo:hi], flat[6 + col, lo:hi], flat[12 + col, lo:hi]
            m3, m4, m5 = flat[18 + col, lo:hi], flat[24 + col, lo:hi], flat[30 + col, lo:hi]
            s0, s1, s2, s3 = s[0, col], s[1, col], s[2, col], s[3, col]
            for j in range(hi - lo):
                a0, a1, a2, a3, a4, a5 = m0[j], m1[j], m2[j], m3[j], m4[j], m5[j]
                s0[j] = a0 + a1 + a2 + a3 + a4
                s1[j] = a1 - a2 + two * (a3 - a4)
                s2[j] = a1 + a2 + four * (a3 + a4)
                s3[j] = a1 - a2 + eight * (a3 - a4) + a5
        for r in range(4):
            b0, b1, b2, b3, b4, b5 = s[r, 0], s[r, 1], s[r, 2], s[r, 3], s[r, 4], s[r, 5]
            y0, y1, y2, y3 = yq[r, 0], yq[r, 1], yq[r, 2], yq[r, 3]
            for j in range(hi - lo):
                c0, c1, c2, c3, c4, c5 = b0[j], b1[j], b2[j], b3[j], b4[j], b5[j]
                y0[j] = c0 + c1 + c2 + c3 + c4
                y1[j] = c1 - c2 + two * (c3 - c4)
                y2[j] = c1 + c2 + four * (c3 + c4)
                y3[j] = c1 - c2 + eight * (c3 - c4) + c5
        for k in range(ka, kz):
            bk = bias[k0 + k] if has_bias else np.float32(0)
            for n in range(nb):
                for y in range(rows):
                    r = y % 4
                    at = (k - ka) * count + (n * th + y // 4) * tw
                    dst = out[n0 + n, k0 + k, row0 + y]
                    _interleave(dst, row, yq[r, 0, at:at + tw], yq[r, 1, at:at + tw],
                                yq[r, 2, at:at + tw], yq[r, 3, at:at + tw], 4, bk, relu)
                    if rest:
                        _row_rest(dst, code, params,
                                  res[n0 + n, k0 + k, row0 + y] if has_res else dst, has_res,
                                  post_code, post_params)


@njit(nogil=True, cache=True)
def output_f2(mm, out, bias, th, tw, kb, n0, k0, row0, code, params, res, post_code,
              post_params):
    """out[n0 + n, k0 + k, row0 + y] = epilogue(A^T M A) for F(2x2,3x3); mm (16, kc,
    nb * th * tw); organised as output_f4."""
    kc, count = mm.shape[1], mm.shape[2]
    nb = count // (th * tw)
    rows = min(2 * th, out.shape[2] - row0)
    flat = mm.reshape(16, kc * count)
    has_bias = bias.shape[0] != 0
    has_res = res.shape[0] != 0
    relu = code == RELU
    rest = has_res or not (relu or code == NONE)
    s = np.empty((2, 4, kb * count), np.float32)
    yq = np.empty((2, 2, kb * count), np.float32)
    row = np.empty(2 * tw, np.float32)
    for ka in range(0, kc, kb):
        kz = min(kc, ka + kb)
        lo = ka * count
        hi = kz * count
        for col in range(4):
            m0, m1 = flat[col, lo:hi], flat[4 + col, lo:hi]
            m2, m3 = flat[8 + col, lo:hi], flat[12 + col, lo:hi]
            s0, s1 = s[0, col], s[1, col]
            for j in range(hi - lo):
                a1, a2 = m1[j], m2[j]
                s0[j] = m0[j] + a1 + a2
                s1[j] = a1 - a2 - m3[j]
        for r in range(2):
            b0, b1, b2, b3 = s[r, 0], s[r, 1], s[r, 2], s[r, 3]
            y0, y1 = yq[r, 0], yq[r, 1]
            for j in range(hi - lo):
                c1, c2 = b1[j], b2[j]
                y0[j] = b0[j] + c1 + c2
                y1[j] = c1 - c2 - b3[j]
        for k in range(ka, kz):
            bk = bias[k0 + k] if has_bias else np.float32(0)
            for n in range(nb):
                for y in range(rows):
                    r = y % 2
                    at = (k - ka) * count + (n * th + y // 2) * tw
                    q0, q1 = yq[r, 0, at:at + tw], yq[r, 1, at:at + tw]
                    dst = out[n0 + n, k0 + k, row0 + y]
                    _interleave(dst, row, q0, q1, q1, q1, 2, bk, relu)
                    if rest:
                        _row_rest(dst, code, params,
                                  res[n0 + n, k0 + k, row0 + y] if has_res else dst, has_res,
                                  post_code, post_params)


@njit(inline="always", cache=True)
def _k_block(k_out, kparts):
    """Output channels per task of _winograd_products: a multiple of MR (packed U's panels)."""
    return ((k_out + kparts - 1) // kparts + MR - 1) // MR * MR


def _product(u, p, k0, kc, count, channels, k_out, v, v_at, mm, mm_at):
    """M[p] rows [0, kc) = U[p] rows [k0, k0 + kc) @ V[p] (channels x count), into mm: by
    microkernel.gemm_packed where U was packed at compile time (4-D, inference), else by sgemm
    (U (alpha^2, K, C), transformed per call in training). A Numba overload, so that each form
    compiles only the GEMM it calls."""
    raise NotImplementedError("only called from Numba kernels")


@overload(_product, inline="always")
def _product_forms(u, p, k0, kc, count, channels, k_out, v, v_at, mm, mm_at):
    if u.ndim == 3:
        def unpacked(u, p, k0, kc, count, channels, k_out, v, v_at, mm, mm_at):
            sgemm(0, 0, kc, count, channels, u, (p * k_out + k0) * channels, channels, v, v_at,
                  count, 0.0, mm, mm_at, count)
        return unpacked

    def packed(u, p, k0, kc, count, channels, k_out, v, v_at, mm, mm_at):
        rows = u.shape[1] * MR
        gemm_packed(kc, count, channels, u, p * rows * channels, k0, rows, v, v_at, count, 0.0,
                    mm, mm_at, count)
    return packed


@njit(cache=True)
def channel_block(k_out: int, count: int) -> int:
    """Output channels per output-transform job: loops of >= ~512 tiles, >= 4 jobs."""
    return max(1, min(-(-512 // max(count, 1)), -(-k_out // 4)))


@njit(inline="always", cache=True)
def _transforms(x, u, v, mm, bias, out, res, m, th, tw, top, left, k0, row0, code, params,
                post_code, post_params):
    """Input transform of x (its first row of tiles at input row -top) into v, the alpha^2
    GEMMs M = U[:, k0:k0 + kc] @ V (sgemm, single-threaded), the output transform into out's
    channels k0... from output row row0, with the epilogue."""
    alpha2, kc, count = mm.shape
    channels, k_out = v.shape[1], out.shape[1]
    if m == 4:
        input_f4(x, v, th, tw, top, left, 0, 0)
    else:
        input_f2(x, v, th, tw, top, left, 0, 0)
    for p in range(alpha2):
        _product(u, p, k0, kc, count, channels, k_out, v, p * channels * count, mm,
                 p * kc * count)
    kb = channel_block(kc, count)
    if m == 4:
        output_f4(mm, out, bias, th, tw, kb, 0, k0, row0, code, params, res, post_code,
                  post_params)
    else:
        output_f2(mm, out, bias, th, tw, kb, 0, k0, row0, code, params, res, post_code,
                  post_params)


@njit(nogil=True, parallel=True, cache=True)
def _winograd_bands(x, u, bias, out, res, buf, m, band_rows, top, left, code, params,
                    post_code, post_params):
    """plan's "bands": a task per band of tile rows of one image, all three steps in the
    thread's own slot of buf."""
    n_batch, channels = x.shape[0], x.shape[1]
    alpha2, k_out = u.shape[0], out.shape[1]
    th, tw = (out.shape[2] + m - 1) // m, (out.shape[3] + m - 1) // m
    bands = (th + band_rows - 1) // band_rows
    per_slot = alpha2 * (channels + k_out) * band_rows * tw
    has_res = res.shape[0] != 0
    for task in prange(n_batch * bands):
        n = task // bands
        ty0 = task % bands * band_rows
        rows = min(band_rows, th - ty0)
        count = rows * tw
        at = numba.get_thread_id() * per_slot
        v = buf[at:at + alpha2 * channels * count].reshape((alpha2, channels, count))
        at += alpha2 * channels * count
        mm = buf[at:at + alpha2 * k_out * count].reshape((alpha2, k_out, count))
        _transforms(x[n:n + 1], u, v, mm, bias, out[n:n + 1], res[n:n + 1] if has_res else res,
                    m, rows, tw, top - ty0 * m, left, 0, ty0 * m, code, params, post_code,
                    post_params)


# plan's "blocks" is two parallel kernels, not one with two prange loops: Numba compiles each
# kernel with its helpers linked into every loop, and two kernels compile in two processes
# (ResNet-50's cold compile waited ~12 s on the single driver)
@njit(nogil=True, parallel=True, cache=True)
def _winograd_inputs(x, v, m, th, tw, cparts, top, left):
    """The input transform of x's images (a block of nb) into v (alpha^2, C, nb * tiles), a
    task per image and range of channels (``cparts`` ranges)."""
    channels = x.shape[1]
    per_image = th * tw
    c_block = (channels + cparts - 1) // cparts
    for task in prange(x.shape[0] * cparts):
        n = task // cparts
        c0 = task % cparts * c_block
        c1 = min(channels, c0 + c_block)
        if c0 < c1:
            if m == 4:
                input_f4(x[n:n + 1, c0:c1], v, th, tw, top, left, c0, n * per_image)
            else:
                input_f2(x[n:n + 1, c0:c1], v, th, tw, top, left, c0, n * per_image)


@njit(nogil=True, parallel=True, cache=True)
def _winograd_products(u, v, bias, out, res, buf, m, th, tw, kparts, code, params, post_code,
                       post_params):
    """A task per range of output channels (``kparts`` ranges): the alpha^2 GEMMs of U's rows
    with v (from _winograd_inputs) into the thread's slot of buf, then the output transform with
    the epilogue into out (the block's images)."""
    alpha2, k_out, channels = u.shape[0], out.shape[1], v.shape[1]
    count = v.shape[2]
    k_block = _k_block(k_out, kparts)
    for part in prange(kparts):
        k0 = part * k_block
        k1 = min(k_out, k0 + k_block)
        if k0 < k1:
            at = numba.get_thread_id() * alpha2 * k_block * count
            mm = buf[at:at + alpha2 * (k1 - k0) * count].reshape((alpha2, k1 - k0, count))
            for p in range(alpha2):
                _product(u, p, k0, k1 - k0, count, channels, k_out, v, p * channels * count, mm,
                         p * (k1 - k0) * count)
            kb = channel_block(k1 - k0, count)
            if m == 4:
                output_f4(mm, out, bias, th, tw, kb, 0, k0, 0, code, params, res, post_code,
                          post_params)
            else:
                output_f2(mm, out, bias, th, tw, kb, 0, k0, 0, code, params, res, post_code,
                          post_params)


def _winograd_blocks(x, u, bias, out, res, buf, m, nb, kparts, workers, top, left, code, params,
                     post_code, post_params):
    """plan's "blocks": per block of nb images, the input transform into one shared V
    (_winograd_inputs), then a task per range of output channels (_winograd_products)."""
    n_batch, channels = x.shape[0], x.shape[1]
    alpha2 = u.shape[0]
    th, tw = (out.shape[2] + m - 1) // m, (out.shape[3] + m - 1) // m
    for n0 in range(0, n_batch, nb):
        n1 = min(n_batch, n0 + nb)
        count = (n1 - n0) * th * tw
        v = buf[:alpha2 * channels * count].reshape((alpha2, channels, count))
        cparts = min(channels, max(1, (2 * workers + n1 - n0 - 1) // (n1 - n0)))
        _winograd_inputs(x[n0:n1], v, m, th, tw, cparts, top, left)
        _winograd_products(u, v, bias, out[n0:n1], res[n0:n1] if res.shape[0] else res,
                           buf[v.size:], m, th, tw, kparts, code, params, post_code,
                           post_params)


def conv_winograd(x, u, bias, out, ws, m, pads, act=NO_ACT, residual=None, post=NO_ACT):
    """Winograd F(m x m, 3x3) of x (N, C, H, W) with u = transform_weights(w, m) into out
    (N, K, OH, OW); pads (top, left, bottom, right) as ONNX orders them: (top, left, ...). The
    work is split into the tasks of one parallel Numba call as ``plan`` says."""
    n_batch, channels = x.shape[0], x.shape[1]
    k_out, out_h, out_w = out.shape[1], out.shape[2], out.shape[3]
    code, params = epilogue_args(act)
    post_code, post_params = epilogue_args(post)
    bias = NO_BIAS if bias is None else bias
    res = _EMPTY4 if residual is None else residual
    workers = threads()
    mode, size, parts, need = plan(n_batch, channels, k_out, out_h, out_w, m, workers)
    buf = scratch(ws, need)
    with serial_blas():
        if mode == "bands":
            _winograd_bands(x, u, bias, out, res, buf, m, size, pads[0], pads[1], code, params,
                            post_code, post_params)
        else:
            _winograd_blocks(x, u, bias, out, res, buf, m, size, parts, workers, pads[0], pads[1],
                             code, params, post_code, post_params)
    return out
