"""A packed single-precision GEMM for the convolution drivers, its inner tile written as LLVM IR.

``gemm_packed`` takes blas.sgemm's arguments (row-major, no transposes, beta 0 or 1), A packed,
and runs on the calling thread, so the drivers' parallel tasks call it where they call OpenBLAS.
It is the classic Goto/BLIS scheme:

* A, a convolution's weights, is packed once at compile time into MR-high panels per block
  of KC rows ([block][panel][kc][MR], ``pack_weights``); B is packed per block of KC rows and NC columns into
  NR-wide panels ([panel][k][NR]), zeros past the edges;
* the microkernel (``_tile``) computes one MR x NR tile of C from one panel of each: MR * NR / 16
  accumulators of 16 floats that live in registers for the whole k loop, one fused multiply-add
  of a broadcast A element with a B vector per accumulator and k, then C = or += the tile.

Why IR: Numba's own loops cannot keep a 2-D accumulator tile in registers (a Numba microkernel
with a local 6 x 32 array ran at 9-10 GFLOP/s a core), while this one runs at 170-200 GFLOP/s on
one core of this machine with packed operands in cache, against ~140 for OpenBLAS's sgemm on
large products and ~100 on the 49- to 196-column products of ResNet's small maps. The IR needs
only LLVM's portable vector type and ``llvm.fma``: LLVM lowers them to AVX-512 here, to narrower
vectors elsewhere.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .blas import _Args

#: register tile: MR rows of C (output channels) by NR columns (positions); 8 x 32 is 16 vector
#: accumulators of 16 floats (one core, packed operands in cache: 8 x 32 ~200 GFLOP/s, 12 x 32
#: ~180-200, 24 x 16 ~175, 16 x 32 ~150: 32 accumulators leave no register for B)
MR, NR = 8, 32
#: depth of a packed block (a kc x NR panel of B is 32 KiB, in L1)
KC = 256
#: rows of A per block of the loops (MC x KC floats: 240 KiB, in L2)
MC = 240
#: columns of B per packed block
NC = 512
#: blocks at most this deep run row panel by row panel (each panel of A across every panel of
#: B) whatever their width: their tiles are short, so storing C (and reading a residual) row by
#: row matters more than keeping a B panel in L1 (ResNet-50's 56x56 1x1 layers, k = 64:
#: 3.9-4.1 -> 3.1-3.5 ms at batch 1)
IR_OUTER_DEPTH = 64

_LANES = 16
#: a tile's fused epilogue (_tile's flags): + bias, ReLU, + residual, ReLU
EPI_BIAS, EPI_RELU, EPI_RESIDUAL, EPI_POST_RELU = 1, 2, 4, 8
EPI_MASK = 15
#: gemm_packed_epilogue's flag for a B already in panels (pack_panels' layout, ldb the padded
#: width): a convolution's im2col writes its columns that way instead of row by row, so that they
#: are not copied a second time here
B_PANELS = 16
_F32, _I64, _I32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
_VEC = ir.VectorType(_F32, _LANES)


def _lane_masks(builder, width):
    """Per vector j of an NR-wide row, the mask of its lanes below ``width`` (an i64)."""
    lanes = ir.Constant(ir.VectorType(_I64, _LANES), list(range(_LANES)))
    masks = []
    for j in range(NR // _LANES):
        left = builder.sub(width, ir.Constant(_I64, j * _LANES))
        splat = builder.insert_element(ir.Constant(ir.VectorType(_I64, _LANES), ir.Undefined),
                                       left, ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(splat, ir.Constant(ir.VectorType(_I64, _LANES),
                                                          ir.Undefined),
                                       ir.Constant(ir.VectorType(_I32, _LANES), [0] * _LANES))
        masks.append(builder.icmp_signed("<", lanes, splat))
    return masks


def _masked(builder, kind):
    """llvm.masked.load / llvm.masked.store of a float vector."""
    mask_type = ir.VectorType(ir.IntType(1), _LANES)
    if kind == "load":
        fn_type = ir.FunctionType(_VEC, [_VEC.as_pointer(), _I32, mask_type, _VEC])
        name = "llvm.masked.load.v16f32.p0v16f32"
    else:
        fn_type = ir.FunctionType(ir.VoidType(), [_VEC, _VEC.as_pointer(), _I32, mask_type])
        name = "llvm.masked.store.v16f32.p0v16f32"
    return cgutils.get_or_insert_function(builder.module, fn_type, name)


@intrinsic
def _tile(typingctx, kc, a, a_at, b, b_at, c, c_at, ldc, accumulate, height, width, flags, bias,
          bias_at, res, res_at, ldr):
    """C[height, width] (row pitch ldc, from c[c_at]; height <= MR, width <= NR) = (or += when
    accumulate) the first rows and columns of A_panel @ B_panel, the panels packed k-major from
    a[a_at] (kc x MR) and b[b_at] (kc x NR). Edge tiles store through lane masks, so C is never
    touched past its edges. ``flags`` (EPI_*, 0: none) is a convolution's epilogue applied to the
    tile before it is stored: + bias[bias_at + row], ReLU, + the residual tile (res[res_at],
    row pitch ldr), ReLU, in that order, so that the output is written once."""
    sig = types.void(kc, a, a_at, b, b_at, c, c_at, ldc, accumulate, height, width, flags, bias,
                     bias_at, res, res_at, ldr)
    vectors = NR // _LANES

    def codegen(context, builder, signature, args):
        v = _Args(context, builder, signature, args)
        i64 = v.i64
        pa, pb, pc = v.pointer(1, 2), v.pointer(3, 4), v.pointer(5, 6)
        ldc, depth, add, height = i64(7), i64(0), i64(8), i64(9)
        fma = cgutils.get_or_insert_function(builder.module,
                                             ir.FunctionType(_VEC, [_VEC, _VEC, _VEC]),
                                             "llvm.fma.v16f32")
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32,
                                                             _I32, _I32]), "llvm.prefetch.p0i8")
        entry = builder.block
        loop = builder.append_basic_block("tile.loop")
        done = builder.append_basic_block("tile.done")
        zero = ir.Constant(_VEC, [0.0] * _LANES)
        builder.cbranch(builder.icmp_signed(">", depth, ir.Constant(_I64, 0)), loop, done)

        builder.position_at_end(loop)
        p = builder.phi(_I64)
        p.add_incoming(ir.Constant(_I64, 0), entry)
        accs = [[builder.phi(_VEC) for _ in range(vectors)] for _ in range(MR)]
        for row in accs:
            for acc in row:
                acc.add_incoming(zero, entry)
        b_row = builder.mul(p, ir.Constant(_I64, NR))
        a_row = builder.mul(p, ir.Constant(_I64, MR))
        # the next panel of A, which the following tile reads: weights stream from memory, and
        # the hardware prefetchers stop at every 4 KiB page
        ahead = builder.gep(pa, [builder.add(a_row, builder.mul(depth, ir.Constant(_I64, MR)))])
        builder.call(prefetch, [builder.bitcast(ahead, ir.IntType(8).as_pointer()),
                                ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                ir.Constant(_I32, 1)])
        b_vecs = []
        for j in range(vectors):
            at = builder.gep(pb, [builder.add(b_row, ir.Constant(_I64, j * _LANES))])
            b_vecs.append(builder.load(builder.bitcast(at, _VEC.as_pointer()), align=4))
        splat_mask = ir.Constant(ir.VectorType(_I32, _LANES), [0] * _LANES)
        sums = []
        for i in range(MR):
            element = builder.load(builder.gep(pa, [builder.add(a_row, ir.Constant(_I64, i))]))
            one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), element,
                                         ir.Constant(_I32, 0))
            splat = builder.shuffle_vector(one, ir.Constant(_VEC, ir.Undefined), splat_mask)
            sums.append([builder.call(fma, [splat, b_vecs[j], accs[i][j]])
                         for j in range(vectors)])
        p_next = builder.add(p, ir.Constant(_I64, 1))
        tail = builder.block
        p.add_incoming(p_next, tail)
        for i in range(MR):
            for j in range(vectors):
                accs[i][j].add_incoming(sums[i][j], tail)
        builder.cbranch(builder.icmp_signed("<", p_next, depth), loop, done)

        builder.position_at_end(done)
        finals = []
        for i in range(MR):
            row = []
            for j in range(vectors):
                final = builder.phi(_VEC)
                final.add_incoming(zero, entry)
                final.add_incoming(sums[i][j], tail)
                row.append(final)
            finals.append(row)
        load, store = _masked(builder, "load"), _masked(builder, "store")
        lane_masks = _lane_masks(builder, i64(10))
        none = ir.Constant(ir.VectorType(ir.IntType(1), _LANES), [0] * _LANES)
        align = ir.Constant(_I32, 4)
        targets = []
        for i in range(MR):
            row_at = builder.mul(ir.Constant(_I64, i), ldc)
            inside = builder.icmp_signed("<", ir.Constant(_I64, i), height)
            for j in range(vectors):
                mask = builder.select(inside, lane_masks[j], none)
                at = builder.gep(pc, [builder.add(row_at, ir.Constant(_I64, j * _LANES))])
                targets.append((builder.bitcast(at, _VEC.as_pointer()), mask, finals[i][j]))
        # C's old values where accumulating: a load through an all-false mask reads nothing
        accumulating = builder.icmp_signed("!=", add, ir.Constant(_I64, 0))
        values = []
        for at, mask, final in targets:
            old = builder.call(load, [at, align, builder.select(accumulating, mask, none), zero])
            values.append(builder.fadd(old, final))
        flags = i64(11)

        def stage(bit, apply):
            """values = apply(values) where flags has ``bit``: a branch per tile, not per
            element."""
            nonlocal values
            wanted = builder.icmp_signed("!=", builder.and_(flags, ir.Constant(_I64, bit)),
                                         ir.Constant(_I64, 0))
            before = builder.block
            with builder.if_then(wanted):
                changed = apply(values)
                after = builder.block
            merged = []
            for old, new in zip(values, changed):
                phi = builder.phi(_VEC)
                phi.add_incoming(old, before)
                phi.add_incoming(new, after)
                merged.append(phi)
            values = merged

        bias_data, res_data = v.pointer(12, 13), v.pointer(14, 15)
        ldr = i64(16)
        last_row = builder.sub(height, ir.Constant(_I64, 1))

        def add_bias(current):
            out = []
            for index, value in enumerate(current):
                i = index // vectors
                # rows past the tile's height are masked off: read a valid row's bias for them
                row = builder.select(builder.icmp_signed("<", ir.Constant(_I64, i), height),
                                     ir.Constant(_I64, i), last_row)
                element = builder.load(builder.gep(bias_data, [row]))
                one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), element,
                                             ir.Constant(_I32, 0))
                out.append(builder.fadd(value, builder.shuffle_vector(
                    one, ir.Constant(_VEC, ir.Undefined), splat_mask)))
            return out

        def relu(current):
            return [builder.select(builder.fcmp_ordered(">", value, zero), value, zero)
                    for value in current]

        def add_residual(current):
            out = []
            for index, value in enumerate(current):
                i, j = index // vectors, index % vectors
                at = builder.gep(res_data, [builder.add(builder.mul(ir.Constant(_I64, i), ldr),
                                                        ir.Constant(_I64, j * _LANES))])
                mask = targets[index][1]
                tile = builder.call(load, [builder.bitcast(at, _VEC.as_pointer()), align, mask,
                                           zero])
                out.append(builder.fadd(value, tile))
            return out

        stage(EPI_BIAS, add_bias)
        stage(EPI_RELU, relu)
        stage(EPI_RESIDUAL, add_residual)
        stage(EPI_POST_RELU, relu)
        for (at, mask, _), value in zip(targets, values):
            builder.call(store, [value, at, align, mask])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _copy_rows(typingctx, rows, width, src, src_at, pitch, dst, dst_at):
    """dst[dst_at + r * NR : + NR] = src[src_at + r * pitch : + width], zeros after, for
    r < rows: a panel of B packed by whole vectors through lane masks (Numba's loop of flat
    indices did not vectorise: its packing took as long as the products of a 64-row A)."""
    sig = types.void(rows, width, src, src_at, pitch, dst, dst_at)
    vectors = NR // _LANES

    def codegen(context, builder, signature, args):
        v = _Args(context, builder, signature, args)
        i64 = v.i64
        ps, pd = v.pointer(2, 3), v.pointer(5, 6)
        pitch, count = i64(4), i64(0)
        load = _masked(builder, "load")
        lane_masks = _lane_masks(builder, i64(1))
        zero = ir.Constant(_VEC, [0.0] * _LANES)
        entry = builder.block
        loop = builder.append_basic_block("copy.loop")
        done = builder.append_basic_block("copy.done")
        builder.cbranch(builder.icmp_signed(">", count, ir.Constant(_I64, 0)), loop, done)
        builder.position_at_end(loop)
        r = builder.phi(_I64)
        r.add_incoming(ir.Constant(_I64, 0), entry)
        src_row = builder.mul(r, pitch)
        dst_row = builder.mul(r, ir.Constant(_I64, NR))
        for j in range(vectors):
            offset = ir.Constant(_I64, j * _LANES)
            at = builder.bitcast(builder.gep(ps, [builder.add(src_row, offset)]),
                                 _VEC.as_pointer())
            value = builder.call(load, [at, ir.Constant(_I32, 4), lane_masks[j], zero])
            to = builder.gep(pd, [builder.add(dst_row, offset)])
            builder.store(value, builder.bitcast(to, _VEC.as_pointer()), align=4)
        r_next = builder.add(r, ir.Constant(_I64, 1))
        r.add_incoming(r_next, builder.block)
        builder.cbranch(builder.icmp_signed("<", r_next, count), loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def panel_at(row, column, rows, pitch):
    """Where element (row, column) of a (rows, pitch) B goes in panels (B_PANELS): per block of
    KC rows, per NR-wide panel of columns, the block's rows of the panel ([block][panel][kc]
    [NR]); pitch a multiple of NR. A block of B is then what gemm_packed would have packed."""
    block = row // KC * KC
    lane = column % NR
    return block * pitch + (column - lane) * min(KC, rows - block) + (row - block) * NR + lane


def panel_pitch(columns: int) -> int:
    """The row pitch of ``columns`` columns in panels (B_PANELS): rounded up to whole panels."""
    return -(-columns // NR) * NR


def pack_panels(bmat: np.ndarray) -> np.ndarray:
    """B (rows, n) in panels (B_PANELS) with pitch n rounded up to NR, flat (for tests)."""
    rows, n = bmat.shape
    pitch = panel_pitch(n)
    out = np.zeros(rows * pitch, np.float32)
    r, j = np.indices(bmat.shape)
    block = r // KC * KC
    out[block * pitch + (j - j % NR) * np.minimum(KC, rows - block) + (r - block) * NR
        + j % NR] = bmat
    return out


def pack_weights(wmat: np.ndarray) -> np.ndarray:
    """A convolution's weights (group, K/group, rows) as gemm_packed reads them, once at compile
    time: an array of shape (group, panels, rows, MR) whose memory holds, per group and block of
    KC rows (from p0, at p0 * panels * MR), each panel's MR output channels k-major ([panel][kc]
    [MR]), zero channels past K/group. Block-major: the panels a block of the loops reads lie
    one after another, one stream from memory (layer4 of ResNet-50 reads 9 MiB of weights a
    conv)."""
    group, k_group, rows = wmat.shape
    panels = -(-k_group // MR)
    padded = np.zeros((group, panels * MR, rows), np.float32)
    padded[:, :k_group] = wmat
    out = np.empty((group, panels * MR * rows), np.float32)
    for p0 in range(0, rows, KC):
        kc = min(KC, rows - p0)
        block = padded[:, :, p0:p0 + kc].reshape(group, panels, MR, kc).transpose(0, 1, 3, 2)
        out[:, p0 * panels * MR:(p0 + kc) * panels * MR] = block.reshape(group, -1)
    return out.reshape(group, panels, rows, MR)


@njit(nogil=True, cache=True)
def _gemm_packed_body(m, n, k, ap, a_at, row0, a_rows, b, b_at, ldb, beta, c, c_at, ldc, flags,
                      bias, bias_at, res, res_at, ldr):
    """gemm_packed's work, on 1-element arrays at the operands' memory (the intrinsics address
    them from their data pointers)."""
    if m <= 0 or n <= 0:
        return
    in_panels = flags & B_PANELS != 0
    b_pack = np.empty(1 if in_panels else KC * (min(n, NC) + NR), np.float32)
    for j0 in range(0, n, NC):
        nc = min(NC, n - j0)
        for p0 in range(0, max(k, 1), KC):
            kc = max(0, min(KC, k - p0))
            if in_panels:
                panels, at = b, b_at + p0 * ldb + j0 * kc
            else:
                panels, at = b_pack, 0
                for q in range((nc + NR - 1) // NR):
                    _copy_rows(kc, min(NR, nc - q * NR), b, b_at + p0 * ldb + j0 + q * NR, ldb,
                               b_pack, q * kc * NR)
            add = 1 if beta != 0 or p0 > 0 else 0
            # the epilogue on the last block's tiles only
            epilogue = flags & EPI_MASK if p0 + KC >= k else 0
            block = a_at + p0 * a_rows
            if nc <= 2 * NR or kc <= IR_OUTER_DEPTH:
                for ir_ in range(0, m, MR):
                    for jr in range(0, nc, NR):
                        _tile(kc, ap, block + (row0 + ir_) * kc, panels, at + jr * kc, c,
                              c_at + ir_ * ldc + j0 + jr, ldc, add, min(MR, m - ir_),
                              min(NR, nc - jr), epilogue, bias, bias_at + ir_, res,
                              res_at + ir_ * ldr + j0 + jr, ldr)
            else:
                for jr in range(0, nc, NR):
                    for ir_ in range(0, m, MR):
                        _tile(kc, ap, block + (row0 + ir_) * kc, panels, at + jr * kc, c,
                              c_at + ir_ * ldc + j0 + jr, ldc, add, min(MR, m - ir_),
                              min(NR, nc - jr), epilogue, bias, bias_at + ir_, res,
                              res_at + ir_ * ldr + j0 + jr, ldr)


_P32 = types.CPointer(types.float32)
_C_SIG = types.void(types.int64, types.int64, types.int64, _P32, types.int64, types.int64,
                    types.int64, _P32, types.int64, types.int64, types.float32, _P32,
                    types.int64, types.int64, types.int64, _P32, types.int64, _P32, types.int64,
                    types.int64)


@cfunc(_C_SIG, cache=True)
def _gemm_packed_c(m, n, k, ap, a_at, row0, a_rows, b, b_at, ldb, beta, c, c_at, ldc, flags,
                   bias, bias_at, res, res_at, ldr):
    _gemm_packed_body(m, n, k, carray(ap, 1), a_at, row0, a_rows, carray(b, 1), b_at, ldb, beta,
                      carray(c, 1), c_at, ldc, flags, carray(bias, 1), bias_at, carray(res, 1),
                      res_at, ldr)


# The kernels call the compiled GEMM through a symbol, as blas.py calls OpenBLAS: compiled once
# per process (from Numba's disk cache), not again inside every driver that calls it (linked
# into the drivers, it made ResNet-50's cold compile ~1 s longer)
SYMBOL = "cnncompile_gemm_packed"
llvm.add_symbol(SYMBOL, _gemm_packed_c.address)
_C_TYPE = ir.FunctionType(ir.VoidType(), [_I64, _I64, _I64, _F32.as_pointer(), _I64, _I64, _I64,
                                          _F32.as_pointer(), _I64, _I64, _F32,
                                          _F32.as_pointer(), _I64, _I64, _I64, _F32.as_pointer(),
                                          _I64, _F32.as_pointer(), _I64, _I64])


@intrinsic
def _call(typingctx, m, n, k, ap, a_at, row0, a_rows, b, b_at, ldb, beta, c, c_at, ldc, flags,
          bias, bias_at, res, res_at, ldr):
    sig = types.void(m, n, k, ap, a_at, row0, a_rows, b, b_at, ldb, beta, c, c_at, ldc, flags,
                     bias, bias_at, res, res_at, ldr)

    def codegen(context, builder, signature, args):
        v = _Args(context, builder, signature, args)
        i64, data = v.i64, v.data
        function = cgutils.get_or_insert_function(builder.module, _C_TYPE, SYMBOL)
        beta = v.f32(10)
        builder.call(function, [i64(0), i64(1), i64(2), data(3), i64(4), i64(5), i64(6),
                                data(7), i64(8), i64(9), beta, data(11), i64(12), i64(13),
                                i64(14), data(15), i64(16), data(17), i64(18), i64(19)])
        return context.get_dummy_value()

    return sig, codegen


_NONE = np.zeros(1, np.float32)


@njit(inline="always", cache=True)
def gemm_packed(m, n, k, ap, a_at, row0, a_rows, b, b_at, ldb, beta, c, c_at, ldc):
    """Row-major C[m, n] = A[row0:row0 + m, :k] @ B[k, n] + beta * C (beta 0 or 1), A packed by
    pack_weights from ap[a_at] with a_rows rows (a multiple of MR; row0 one too; rows past m
    read as zeros); B and C start at element ``*_at`` of float32 arrays of any shape (their
    memory is addressed as flat, as blas.sgemm does) with row pitches ldb, ldc. On the calling
    thread, no checks."""
    _call(m, n, k, ap, a_at, row0, a_rows, b, b_at, ldb, beta, c, c_at, ldc, 0, _NONE, 0,
          _NONE, 0, 0)


@njit(inline="always", cache=True)
def gemm_packed_epilogue(m, n, k, ap, a_at, row0, a_rows, b, b_at, ldb, c, c_at, ldc, flags,
                         bias, bias_at, res, res_at, ldr):
    """gemm_packed with beta 0 and a convolution's epilogue on the tiles as they are stored
    (``flags``: EPI_* bits): C = post(act(A @ B + bias[bias_at + row]) + res), res from
    res[res_at] with row pitch ldr, each of the four optional."""
    _call(m, n, k, ap, a_at, row0, a_rows, b, b_at, ldb, 0.0, c, c_at, ldc, flags, bias,
          bias_at, res, res_at, ldr)
