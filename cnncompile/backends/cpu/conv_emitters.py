"""CPU emitters for Conv, FusedConv and ConvTranspose: one kernel call per node, chosen by
``node.annotations["algorithm"]`` (passes/lowering.py; im2col_gemm when absent, as at opt_level
0/1). Weights are re-laid out (or Winograd-transformed) once here, at compile time, and the
generated module allocates one float32 scratch buffer shared by all its convolutions.

An emitter declines (returns False, so the node runs its NumPy reference) for what the kernels do
not cover: dtypes other than float32, dynamic shapes, weights that are not constants, and
epilogue activations without a Numba encoding.
"""

from __future__ import annotations

import math

import numpy as np

from ...ir.graph import Node
from .codegen import Codegen
from .emitters import emits, literal
from .kernels.conv import geometry, scratch_size
from .kernels.epilogue import UnsupportedActivation, activation_code
from .kernels import winograd
from .kernels.microkernel import pack_weights
from .kernels.misc import PARALLEL_MIN_WORK

KERNELS = "cnncompile.backends.cpu.kernels.conv"
WINOGRAD = "cnncompile.backends.cpu.kernels.winograd"
DEPTHWISE = "cnncompile.backends.cpu.kernels.depthwise"
FLOAT32 = np.dtype(np.float32)
WINOGRAD_TILES = {"winograd_f2x2_3x3": 2, "winograd_f4x4_3x3": 4}
#: grouped convs with at most this many input channels per group run the direct kernel: their
#: per-group GEMMs are too small for BLAS (measured 1.4-1.9x faster direct at 4-8 channels per
#: group, 1.5-2x slower at 32)
GROUPED_DIRECT_MAX_CHANNELS = 8


def _act(name: str, attrs: dict | None) -> tuple:
    code, params = activation_code(name, attrs)
    return (code, float(params[0]), float(params[1]))


def workspace(cg: Codegen, elements: int) -> str:
    """The module's conv scratch buffer, grown to at least ``elements`` float32 values. It is
    module-level (allocated once at load time); runs of one module never overlap."""
    state = getattr(cg, "_conv_scratch", None)
    if state is None:
        state = [cg.fresh("_conv_scratch"), len(cg.header), 0]
        cg.header.append("")
        cg._conv_scratch = state
    name, index, size = state
    if elements > size:
        state[2] = elements
        cg.header[index] = (f"{name} = np.empty({elements}, dtype=np.float32)  # conv scratch "
                            "(im2col columns, Winograd tiles), shared by every conv")
    return name


def choose_algorithm(node: Node, channels: int, k_out: int) -> str:
    """The annotated algorithm when the kernels can run it on this node, else the general one."""
    attrs = node.attrs
    kernel = list(attrs["kernel_shape"])
    group = attrs["group"]
    default = "grouped" if group > 1 else "im2col_gemm"
    algorithm = node.annotations.get("algorithm") or default
    if algorithm == "direct":
        return algorithm
    if group > 1:
        if algorithm == "depthwise" and group == channels == k_out:
            return algorithm
        return "direct" if channels // group <= GROUPED_DIRECT_MAX_CHANNELS else "grouped"
    if algorithm == "gemm_1x1":
        if set(kernel) == {1} and not any(attrs["pads"]) and set(attrs["strides"]) == {1}:
            return algorithm
        return "im2col_gemm"
    if algorithm in WINOGRAD_TILES:
        fits = (kernel == [3, 3] and attrs["strides"] == [1, 1] and attrs["dilations"] == [1, 1])
        return algorithm if fits else "im2col_gemm"
    if algorithm == "depthwise" and channels == k_out == 1:
        return algorithm
    return "im2col_gemm"


#: GEMM convolutions run microkernel.gemm_packed on weights packed at compile time; False: the
#: unpacked weights through OpenBLAS (to compare the two)
PACKED_GEMM = True


def _gemm_weights(cg: Codegen, wmat: np.ndarray, name: str) -> tuple[str, str]:
    """(the wmat argument, the ``, packed=...`` keyword) of a GEMM convolution's call."""
    if PACKED_GEMM:
        return "None", f", packed={cg.constant(pack_weights(wmat), name + '_packed')}"
    return cg.constant(wmat, name), ""


@emits("Conv", "FusedConv", "ConvTranspose")
def emit_conv(node: Node, cg: Codegen):
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    r = node.inputs[3] if len(node.inputs) > 3 else None
    y = node.outputs[0]
    values = [v for v in (x, w, b, r, y) if v is not None]
    if any(v.type.dtype != FLOAT32 or not v.type.is_static for v in values):
        return False
    try:
        act = _act(node.attrs.get("activation", ""), node.attrs.get("activation_attrs"))
        post = _act(node.attrs.get("post_activation", ""),
                    node.attrs.get("post_activation_attrs"))
    except UnsupportedActivation:
        return False
    if not w.is_constant:
        from .grad_emitters import emit_runtime_conv
        return emit_runtime_conv(node, cg, act, post)
    weights = np.asarray(w.data, dtype=np.float32)
    bias = "None" if b is None else (
        cg.constant(np.asarray(b.data, np.float32), f"{node.name}_bias") if b.is_constant
        else cg.arg(b))
    attrs = node.attrs
    g = geometry(attrs["kernel_shape"], attrs["strides"], attrs["dilations"], attrs["pads"],
                 y.type.shape[2:])
    if node.op == "ConvTranspose":
        return _emit_transposed(node, cg, weights, bias, g)
    channels, k_out = x.type.shape[1], y.type.shape[1]
    algorithm = choose_algorithm(node, channels, k_out)
    epilogue = f"act={literal(act)}, residual={cg.arg(r)}, post={literal(post)}"
    args = f"{cg.arg(x)}, {{w}}, {bias}, {cg.dest(y)}"
    group = attrs["group"]
    if algorithm == "gemm_1x1":
        wmat, packed = _gemm_weights(cg, weights.reshape(1, k_out, channels),
                                     f"{node.name}_w1x1")
        size = scratch_size("gemm_1x1", x.type.shape, weights.shape, g)
        ws = f", ws={workspace(cg, size)}" if size else ""  # only small images need scratch
        call = cg.kernel(KERNELS, "conv_gemm_1x1")
        cg.line(f"{call}({args.format(w=wmat)}, {epilogue}{ws}{packed})")
    elif algorithm in WINOGRAD_TILES:
        m = WINOGRAD_TILES[algorithm]
        u = cg.constant(winograd.transform_weights(weights, m, packed=PACKED_GEMM),
                       f"{node.name}_winograd{m}")
        out_h, out_w = y.type.shape[2:]
        ws = workspace(cg, winograd.scratch_size(x.type.shape[0], channels, k_out, out_h,
                                                 out_w, m))
        call = cg.kernel(WINOGRAD, "conv_winograd")
        pads = tuple(attrs["pads"])
        cg.line(f"{call}({args.format(w=u)}, {ws}, {m}, {pads!r}, {epilogue})")
    elif algorithm in ("direct", "depthwise") and group == channels and weights.shape[1] == 1:
        # one input channel per group (a channel multiplier K / C allowed): the depthwise kernel
        wflat = cg.constant(weights.reshape(k_out, -1), f"{node.name}_wdw")
        call = cg.kernel(DEPTHWISE, "conv_depthwise")
        parallel = y.type.size * weights.shape[1] * math.prod(g[0:3]) >= PARALLEL_MIN_WORK
        cg.line(f"{call}({args.format(w=wflat)}, {g!r}, {epilogue}, parallel={parallel})")
    elif algorithm in ("direct", "depthwise"):
        w5 = cg.constant(weights.reshape(weights.shape[:2] + g[0:3]), f"{node.name}_w")
        ws = workspace(cg, scratch_size("direct", x.type.shape, weights.shape, g))
        call = cg.kernel(KERNELS, "conv_direct")
        cg.line(f"{call}({args.format(w=w5)}, {ws}, {g!r}, group={group}, {epilogue})")
    else:  # im2col_gemm, grouped
        wmat, packed = _gemm_weights(cg, weights.reshape(group, k_out // group, -1),
                                     f"{node.name}_wcol")
        ws = workspace(cg, scratch_size("im2col_gemm", x.type.shape, weights.shape, g))
        call = cg.kernel(KERNELS, "conv_im2col")
        cg.line(f"{call}({args.format(w=wmat)}, {ws}, {g!r}, group={group}, {epilogue}"
                f"{packed})")
    return None


def _emit_transposed(node: Node, cg: Codegen, weights: np.ndarray, bias: str, g) -> None:
    x, y = node.inputs[0], node.outputs[0]
    group = node.attrs["group"]
    channels = weights.shape[0]
    taps = math.prod(weights.shape[2:])
    # W is C x K/group x taps...; per group the GEMM needs W_g^T: (K/group * taps) x C/group
    wt = weights.reshape(group, channels // group, weights.shape[1] * taps).transpose(0, 2, 1)
    wt = cg.constant(np.ascontiguousarray(wt), f"{node.name}_wT")
    ws = workspace(cg, scratch_size("transposed", x.type.shape, weights.shape, g, group))
    call = cg.kernel(KERNELS, "conv_transpose")
    cg.line(f"{call}({cg.arg(x)}, {wt}, {bias}, {cg.dest(y)}, {ws}, {g!r}, group={group})")
