"""The packed GEMM of the CPU convolutions (kernels/microkernel.py) against float64 NumPy: edge
tiles in both directions, several KC blocks, row blocks that start inside the packed weights,
accumulation (beta 1), operands addressed inside arrays of other ranks, and groups."""

from __future__ import annotations

import numpy as np
import pytest

from cnncompile.backends.cpu.kernels.microkernel import KC, MR, NR, gemm_packed, pack_weights
from helpers import rel_l2

SHAPES = [(1, 1, 1), (MR, NR, 3), (MR - 1, NR + 1, KC + 5), (3 * MR + 5, 49, 2 * KC + 17),
          (17, 2 * NR + 7, 20), (64, 196, KC)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm_packed_matches_numpy(m, n, k, beta):
    rng = np.random.default_rng(m * 1000 + n + k)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    want = a.astype(np.float64) @ b + beta * c
    packed = pack_weights(a[None])
    gemm_packed(m, n, k, packed, 0, 0, packed.shape[1] * MR, b, 0, n, beta, c, 0, n)
    assert rel_l2(c, want) <= 1e-6


def test_gemm_packed_row_blocks_pitches_and_groups():
    """Rows [row0, row0 + m) of group 1's packed weights, B a block inside a 4-D array with a
    longer row pitch, C a block inside a larger 2-D one: nothing outside C's block changes."""
    rng = np.random.default_rng(3)
    group, k_group, k = 2, 3 * MR + 2, 300
    w = rng.standard_normal((group, k_group, k)).astype(np.float32)
    packed = pack_weights(w)
    assert packed.shape == (group, 4, k, MR)
    x = rng.standard_normal((2, k, 5, 20)).astype(np.float32)  # B: x[1] as (k, 100), cols 7..
    n, ldb, b_at = 61, 100, x[0].size + 7
    c = rng.standard_normal((40, 90)).astype(np.float32)
    before = c.copy()
    row0, m = MR, 2 * MR + 1
    gemm_packed(m, n, k, packed, 1 * packed[0].size, row0, packed.shape[1] * MR, x, b_at, ldb,
                0.0, c, 3 * 90 + 5, 90)
    want = w[1, row0:row0 + m].astype(np.float64) @ x[1].reshape(k, ldb)[:, 7:7 + n]
    assert rel_l2(c[3:3 + m, 5:5 + n], want) <= 1e-6
    outside = np.ones(c.shape, bool)
    outside[3:3 + m, 5:5 + n] = False
    assert np.array_equal(c[outside], before[outside])


@pytest.mark.parametrize("flags", range(16))
@pytest.mark.parametrize("m,n,k", [(MR + 3, NR + 5, KC + 9), (2 * MR, 49, 40)])
def test_gemm_packed_fused_epilogue(flags, m, n, k):
    """Every combination of the tile epilogue (+ bias, ReLU, + residual, ReLU) against NumPy, with
    several KC blocks (applied on the last only) and edge tiles; the residual has its own row
    pitch."""
    from cnncompile.backends.cpu.kernels.microkernel import (EPI_BIAS, EPI_POST_RELU, EPI_RELU,
                                                             EPI_RESIDUAL, gemm_packed_epilogue)

    rng = np.random.default_rng(flags * 7 + m)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(m + 3).astype(np.float32)
    res = rng.standard_normal((m, n + 4)).astype(np.float32)
    want = a.astype(np.float64) @ b
    if flags & EPI_BIAS:
        want += bias[2:2 + m, None]
    if flags & EPI_RELU:
        want = np.maximum(want, 0)
    if flags & EPI_RESIDUAL:
        want += res[:, 1:1 + n]
    if flags & EPI_POST_RELU:
        want = np.maximum(want, 0)
    c = np.full((m, n), np.nan, np.float32)
    packed = pack_weights(a[None])
    gemm_packed_epilogue(m, n, k, packed, 0, 0, packed.shape[1] * MR, b, 0, n, c, 0, n, flags,
                         bias, 2, res, 1, n + 4)
    assert rel_l2(c, want) <= 1e-6


@pytest.mark.parametrize("m,n,k", [(MR, NR, 3), (MR + 3, NR + 5, KC + 9), (2 * MR, 49, 2 * KC + 40)])
def test_gemm_packed_reads_b_in_panels(m, n, k):
    """B_PANELS: B already in panels (pack_panels: per KC block, NR-wide panels), inside a
    larger array, with and without the epilogue."""
    from cnncompile.backends.cpu.kernels.microkernel import (B_PANELS, EPI_BIAS, EPI_RELU,
                                                             gemm_packed_epilogue, pack_panels)

    rng = np.random.default_rng(m + n + k)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    panels = pack_panels(b)
    pitch = panels.size // k
    assert pitch % NR == 0 and pitch >= n
    stored = np.concatenate([np.full(5, np.nan, np.float32), panels])
    packed = pack_weights(a[None])
    for flags, want in [(B_PANELS, a.astype(np.float64) @ b),
                        (B_PANELS | EPI_BIAS | EPI_RELU,
                         np.maximum(a.astype(np.float64) @ b + bias[:, None], 0))]:
        c = np.full((m, n), np.nan, np.float32)
        gemm_packed_epilogue(m, n, k, packed, 0, 0, packed.shape[1] * MR, stored, 5, pitch, c, 0,
                             n, flags, bias, 0, bias, 0, 0)
        assert rel_l2(c, want) <= 1e-6


@pytest.mark.parametrize("channels,size,kernel,stride,pad,dilation,group,p0,count", [
    (5, (9, 11), 3, 2, 1, 1, 1, 3, 40),       # stride 2, a block from inside the image
    (600, (7, 7), 3, 1, 1, 1, 1, 0, 49),      # 5400 rows: KC blocks, one short
    (6, (13, 8), 3, 1, 2, 2, 2, 5, 70),       # groups, dilation
    (3, (20, 20), 7, 2, 3, 1, 1, 0, 100),     # a stem
    (4, (1, 1), 1, 1, 0, 1, 1, 0, 1),         # a 1x1 image
])
def test_im2col_panels_match_packed_columns(channels, size, kernel, stride, pad, dilation, group,
                                            p0, count):
    """im2col_panels writes exactly what im2col_block's columns packed into panels
    (pack_panels, per group) would be, at a column offset inside the panels."""
    from cnncompile.backends.cpu.kernels.conv import im2col_block, im2col_panels, pad_image
    from cnncompile.backends.cpu.kernels.microkernel import pack_panels

    h, w = size
    span = dilation * (kernel - 1) + 1
    oh, ow = (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1
    g = np.array([1, kernel, kernel, 1, stride, stride, 1, dilation, dilation, 0, pad, pad, 1,
                  oh, ow], np.int64)
    rng = np.random.default_rng(channels + h)
    x = rng.standard_normal((channels, 1, h, w)).astype(np.float32)
    xp = np.zeros((channels, 1, h + 2 * pad, w + 2 * pad), np.float32)
    pad_image(x, xp, 0, pad, pad)
    rows, count = channels * kernel * kernel, min(count, oh * ow - p0)
    col = np.zeros((rows, count), np.float32)
    im2col_block(xp, col, g, 0, rows, p0, 0, count)
    j0 = 7
    full = np.zeros((rows, j0 + count), np.float32)
    full[:, j0:] = col
    rows_g = rows // group
    want = np.concatenate([pack_panels(full[q * rows_g:(q + 1) * rows_g]) for q in range(group)])
    got = np.zeros_like(want)
    im2col_panels(xp, got, g, rows_g, want.size // rows, 0, rows, 0, p0, count, j0)
    assert np.array_equal(got, want)
