"""CPU emitters for training graphs: convolutions whose weights are graph inputs (``emit_conv``
hands them here) and the gradient / training-mode ops (kernels/training.py).

Weights that change every step cannot be packed at compile time: the kernels take W itself and
use reshape views of it, or transform it at run time (Winograd's filter transform, the flipped
kernel of a stride-1 input gradient) into the module's conv scratch buffer. Each emitter declines
(returns False: the op's NumPy reference runs) what its kernel does not cover: dtypes other than
float32, dynamic shapes.
"""

from __future__ import annotations

import numpy as np

from ...ir.graph import Node
from ...ops.pool import _window_counts
from .codegen import Codegen
from .conv_emitters import WINOGRAD_TILES, choose_algorithm, workspace
from .emitters import emits, literal
from .kernels import training
from .kernels.conv import geometry, scratch_size

KERNELS = "cnncompile.backends.cpu.kernels.training"
CONV = "cnncompile.backends.cpu.kernels.conv"
FLOAT32 = np.dtype(np.float32)

#: Winograd with the filter transformed every call pays on images with many tiles per filter
#: element. Measured on ResNet-18's training layers at batch 8 (one thread, the machine shared):
#: forward 64ch 28x28 F(2x2) 3.4 ms, F(4x4) 3.0 ms, im2col 5.8 ms; 128ch 14x14 F(2x2) 3.7 ms,
#: F(4x4) 5.0 ms, im2col 6.5 ms; 256ch 7x7 im2col 4.0 ms, F(2x2) 7.1 ms; input gradients alike.
#: F(2x2) only: F(4x4)'s larger rounding error (~2e-6 relative per conv) moved ResNet-18's
#: batch-8 weight gradients by up to 1.4e-2 (relative L2; near-ties downstream amplify it),
#: F(2x2)'s by 3e-6, as PyTorch's own convolutions do.
WINOGRAD_MIN_POSITIONS = 14 * 14
#: Weight gradients of 3x3 stride-1 convs by Winograd (conv_grad_weight_winograd): F(4x4) on
#: maps of 28x28 or more, F(2x2) on 14x14 or more, else im2col. Alone, at batch 8 (ms, F(2x2) /
#: F(4x4) / im2col): 64ch 28x28 2.1 / 1.6 / 2.3; 128ch 28x28 6.0 / 4.9 / 8.0; 128ch 14x14
#: 1.6 / 2.2 / 2.5; 256ch 14x14 5.7 / 7.5 / 7.3; 64ch 14x14 0.61 / 0.76 / 0.80; 256ch 7x7
#: 2.5 / 3.5 / 1.9; 512ch 4x4 5.1 / 16 / 2.3. Smaller maps have too few tiles for the
#: alpha^2 K x C partial sums their products make. dW is no input of later work, so F(4x4)'s
#: larger rounding (1e-6 relative) is not amplified as in a forward conv.
WINOGRAD_GRAD_F2_POSITIONS = 14 * 14
WINOGRAD_GRAD_F4_POSITIONS = 28 * 28


def _float32_static(values) -> bool:
    return all(v.type.dtype == FLOAT32 and v.type.is_static for v in values if v is not None)


def _geometry(attrs: dict, out_spatial) -> tuple:
    rank = len(out_spatial)
    return geometry(attrs["kernel_shape"], attrs.get("strides") or [1] * rank,
                    attrs.get("dilations") or [1] * rank, attrs.get("pads") or [0] * (2 * rank),
                    out_spatial)


def _winograd_tile(out_spatial) -> int:
    """m of the Winograd F(m x m, 3x3) to run with a run-time filter transform; 0: none."""
    return 2 if int(np.prod(out_spatial)) >= WINOGRAD_MIN_POSITIONS else 0


def emit_runtime_conv(node: Node, cg: Codegen, act: tuple, post: tuple):
    """Conv / FusedConv / ConvTranspose whose W is not a constant: emit_conv calls this after its
    dtype and shape checks, with the epilogue's activations (act, post) parsed."""
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    r = node.inputs[3] if len(node.inputs) > 3 else None
    y = node.outputs[0]
    attrs = node.attrs
    g = _geometry(attrs, y.type.shape[2:])
    group = attrs["group"]
    bias = cg.arg(b)
    if node.op == "ConvTranspose":
        return _emit_runtime_transposed(node, cg, bias, g)
    channels, k_out = x.type.shape[1], y.type.shape[1]
    algorithm = choose_algorithm(node, channels, k_out)
    epilogue = f"act={literal(act)}, residual={cg.arg(r)}, post={literal(post)}"
    head = f"{cg.arg(x)}, {cg.arg(w)}, {bias}, {cg.dest(y)}"
    out_spatial = y.type.shape[2:]
    m = _winograd_tile(out_spatial) if algorithm in WINOGRAD_TILES else 0
    if m:
        ws = workspace(cg, training.winograd_runtime_size(x.type.shape[0], channels, k_out,
                                                          *out_spatial, m))
        call = cg.kernel(KERNELS, "conv_winograd_runtime")
        cg.line(f"{call}({head}, {ws}, {m}, {tuple(attrs['pads'])!r}, {epilogue})")
    elif algorithm == "direct" or algorithm == "depthwise":
        w5 = f"{cg.arg(w)}.reshape({tuple(w.type.shape[:2]) + g[0:3]!r})"
        ws = workspace(cg, scratch_size("direct", x.type.shape, w.type.shape, g))
        call = cg.kernel(CONV, "conv_direct")
        cg.line(f"{call}({cg.arg(x)}, {w5}, {bias}, {cg.dest(y)}, {ws}, {g!r}, group={group}, "
                f"{epilogue})")
    else:
        ws = workspace(cg, training.batched_size(x.type.shape, k_out, g, group))
        call = cg.kernel(KERNELS, "conv_batched")
        cg.line(f"{call}({head}, {ws}, {g!r}, group={group}, {epilogue})")
    return None


def _emit_runtime_transposed(node: Node, cg: Codegen, bias: str, g: tuple) -> None:
    """A stride-1 3x3 ConvTranspose (the input gradient of a stride-1 Conv) on a large enough
    map runs as the Winograd Conv of its input with the flipped kernel; others as GEMM +
    col2im."""
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    attrs = node.attrs
    group = attrs["group"]
    rank = x.type.rank - 2
    strides = attrs.get("strides") or [1] * rank
    dilations = attrs.get("dilations") or [1] * rank
    pads = training.transpose_as_conv_pads(attrs["kernel_shape"], dilations,
                                           attrs.get("pads") or [0] * (2 * rank),
                                           attrs.get("output_padding") or [0] * rank)
    channels, k_out = w.type.shape[0], y.type.shape[1]
    square = list(attrs["kernel_shape"]) == [3, 3] and set(dilations) == {1}
    m = _winograd_tile(y.type.shape[2:]) if square and group == 1 else 0
    # as a Conv only for Winograd: otherwise the flipped copy of W (a strided gather) costs
    # more than col2im saves (ResNet-18's 4x4 layer4 at batch 8: 5.4 ms against 3.2 ms)
    if set(strides) == {1} and pads is not None and m:
        conv_g = geometry(attrs["kernel_shape"], strides, dilations, pads, y.type.shape[2:])
        taps = int(np.prod(attrs["kernel_shape"]))
        flipped = k_out * (channels // group) * taps
        size = training.winograd_runtime_size(x.type.shape[0], channels, k_out,
                                              *y.type.shape[2:], m)
        ws = workspace(cg, flipped + size)
        call = cg.kernel(KERNELS, "conv_transpose_as_conv")
        cg.line(f"{call}({cg.arg(x)}, {cg.arg(w)}, {bias}, {cg.dest(y)}, {ws}, {conv_g!r}, "
                f"group={group}, winograd={m}, pads={tuple(pads)!r})")
        return None
    ws = workspace(cg, training.transpose_batched_size(x.type.shape, w.type.shape, g, group))
    call = cg.kernel(KERNELS, "conv_transpose_batched")
    cg.line(f"{call}({cg.arg(x)}, {cg.arg(w)}, {bias}, {cg.dest(y)}, {ws}, {g!r}, "
            f"group={group})")
    return None


def _winograd_grad_tile(attrs: dict, dy_shape) -> int:
    """m of the Winograd F(m x m, 3x3) that runs a weight gradient; 0: im2col."""
    ones = [1, 1]
    if (len(dy_shape) != 4 or list(attrs["kernel_shape"]) != [3, 3]
            or list(attrs.get("strides") or ones) != ones
            or list(attrs.get("dilations") or ones) != ones or attrs["group"] != 1):
        return 0
    positions = dy_shape[2] * dy_shape[3]
    if positions >= WINOGRAD_GRAD_F4_POSITIONS:
        return 4
    return 2 if positions >= WINOGRAD_GRAD_F2_POSITIONS else 0


@emits("ConvGradWeight")
def emit_conv_grad_weight(node: Node, cg: Codegen):
    x, dy = node.inputs
    out = node.outputs[0]
    if not _float32_static([x, dy, out]):
        return False
    attrs = node.attrs
    m = _winograd_grad_tile(attrs, dy.type.shape)
    if m:
        n_batch, channels, k_out = x.type.shape[0], x.type.shape[1], dy.type.shape[1]
        size = training.winograd_grad_plan(n_batch, channels, k_out, *dy.type.shape[2:], m, 1)[2]
        call = cg.kernel(KERNELS, "conv_grad_weight_winograd")
        cg.line(f"{call}({cg.arg(x)}, {cg.arg(dy)}, {cg.dest(out)}, {workspace(cg, size)}, {m}, "
                f"{tuple(attrs.get('pads') or (0, 0, 0, 0))!r})")
        return None
    g = _geometry(attrs, dy.type.shape[2:])
    ws = workspace(cg, training.grad_weight_size(x.type.shape, dy.type.shape, g))
    call = cg.kernel(KERNELS, "conv_grad_weight")
    cg.line(f"{call}({cg.arg(x)}, {cg.arg(dy)}, {cg.dest(out)}, {ws}, {g!r}, "
            f"group={node.attrs['group']})")
    return None


@emits("MaxPoolGrad")
def emit_max_pool_grad(node: Node, cg: Codegen):
    dy, x = node.inputs[:2]
    y = node.inputs[2] if len(node.inputs) > 2 else None
    dx = node.outputs[0]
    if not _float32_static([dy, x, y, dx]):
        return False
    g = _geometry(node.attrs, dy.type.shape[2:])
    call = cg.kernel(KERNELS, "max_pool_backward")
    maxima = "" if y is None else f", y={cg.arg(y)}"
    cg.line(f"{call}({cg.arg(dy)}, {cg.arg(x)}, {cg.dest(dx)}, {g!r}{maxima})")
    return None


@emits("AveragePoolGrad")
def emit_average_pool_grad(node: Node, cg: Codegen):
    dy = node.inputs[0]
    dx = node.outputs[0]
    if not _float32_static([dy, dx]):
        return False
    attrs = node.attrs
    rank = dy.type.rank - 2
    g = _geometry(attrs, dy.type.shape[2:])
    counts = _window_counts(list(dx.type.shape[2:]), attrs["kernel_shape"], g[3 + 3 - rank:6],
                            g[6 + 3 - rank:9], attrs.get("pads") or [0] * (2 * rank),
                            list(dy.type.shape[2:]), attrs["count_include_pad"])
    scale = (1.0 / np.maximum(counts, 1)).astype(np.float32).reshape(g[12:15])
    scale = cg.constant(scale, f"{node.name}_scale")
    call = cg.kernel(KERNELS, "avg_pool_backward")
    cg.line(f"{call}({cg.arg(dy)}, {scale}, {cg.dest(dx)}, {g!r})")
    return None


@emits("BatchNormTrain")
def emit_batch_norm_train(node: Node, cg: Codegen):
    if len(node.outputs) != 3 or not _float32_static(node.inputs + node.outputs):
        return False
    x, scale, b = node.inputs
    y, mean, var = node.outputs
    call = cg.kernel(KERNELS, "batchnorm_train_forward")
    cg.line(f"{call}({cg.arg(x)}, {cg.arg(scale)}, {cg.arg(b)}, {cg.dest(y)}, {cg.dest(mean)}, "
            f"{cg.dest(var)}, {literal(float(node.attrs['epsilon']))})")
    return None


@emits("BatchNormTrainGrad")
def emit_batch_norm_train_grad(node: Node, cg: Codegen):
    if len(node.outputs) != 3 or not _float32_static(node.inputs + node.outputs):
        return False
    inputs = (list(node.inputs) + [None] * (8 - len(node.inputs)))[:8]
    args = ", ".join(cg.arg(v) for v in inputs[:7])
    dests = ", ".join(cg.dest(v) for v in node.outputs)
    through = ""
    if node.attrs.get("activation"):
        grad = _activation_code(node.attrs["activation"], node.attrs.get("activation_attrs"))
        if grad is None or not _float32_static([inputs[7]]):
            return False
        code, p0, p1 = grad
        through = f", {cg.arg(inputs[7])}, {code}, {literal(p0)}, {literal(p1)}"
    call = cg.kernel(KERNELS, "batchnorm_train_backward")
    cg.line(f"{call}({args}, {dests}, {literal(float(node.attrs['epsilon']))}{through})")
    return None


#: ActivationGrad's activations with a Numba derivative: code and its two parameters' names and
#: defaults (attrs of the forward op)
ACTIVATION_GRADS = {
    "Relu": (training.RELU, ()), "Relu6": (training.RELU6, ()),
    "Clip": (training.CLIP, (("min", -np.inf), ("max", np.inf))),
    "LeakyRelu": (training.LEAKY_RELU, (("alpha", 0.01),)),
    "Sigmoid": (training.SIGMOID, ()), "Tanh": (training.TANH, ()),
    "Elu": (training.ELU, (("alpha", 1.0),)), "HardSwish": (training.HARD_SWISH, ()),
    "Silu": (training.SILU, ()),
    "HardSigmoid": (training.HARD_SIGMOID, (("alpha", 0.2), ("beta", 0.5))),
}


def _activation_code(activation: str, given: dict | None) -> tuple | None:
    """(code, p0, p1) of an activation's gradient for the training kernels; None: no kernel."""
    if activation not in ACTIVATION_GRADS:
        return None
    code, names = ACTIVATION_GRADS[activation]
    given = given or {}
    params = [float(default if given.get(k) is None else given[k]) for k, default in names]
    params += [0.0] * (2 - len(params))
    return code, params[0], params[1]


@emits("ActivationGrad")
def emit_activation_grad(node: Node, cg: Codegen):
    dy, v = node.inputs
    dx = node.outputs[0]
    grad = _activation_code(node.attrs["activation"], node.attrs.get("activation_attrs"))
    if grad is None or not _float32_static([dy, v, dx]):
        return False
    code, p0, p1 = grad
    call = cg.kernel(KERNELS, "activation_backward")
    cg.line(f"{call}({cg.arg(dy)}, {cg.arg(v)}, {cg.dest(dx)}, {code}, {literal(p0)}, "
            f"{literal(p1)})")
    return None
