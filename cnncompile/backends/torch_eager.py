"""PyTorch eager execution of an IR graph: the rival ``cnncompile bench --compare torch`` times.

An ONNX model carries no PyTorch definition, so this module writes one: every IR node becomes the
torch.nn.functional call a PyTorch user would write for it, run in eager mode under
``torch.inference_mode()`` on the graph as imported (no passes: BatchNorm stays a batch_norm call,
as in an eval-mode ``nn.Module``). It is a benchmark and cross-check tool, never a compile target:
the rules cover the ops of the zoo's networks and of common exported CNNs, and any other op raises
``UnsupportedOperatorError`` naming it, so the bench reports PyTorch as skipped with the reason.

One rule per op, as ``rule(torch, F, inputs, attrs) -> tensor | list of tensors``; ``inputs`` are
torch tensors (None for an absent optional input), ``attrs`` the node's canonical attributes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import UnsupportedOperatorError
from ..ir.graph import Graph

RULES: dict[str, Callable] = {}


def rule(*ops: str):
    def decorate(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return decorate


def _pads(pads, rank: int):
    """ONNX pads (begins, then ends) -> (symmetric padding for torch, extra F.pad or None)."""
    begins, ends = list(pads[:rank]), list(pads[rank:])
    if begins == ends:
        return tuple(begins), None
    extra = []
    for b, e in zip(reversed(begins), reversed(ends)):  # F.pad lists the last axis first
        extra += [b, e]
    return (0,) * rank, extra


_CONV = {1: "conv1d", 2: "conv2d", 3: "conv3d"}
_CONV_T = {1: "conv_transpose1d", 2: "conv_transpose2d", 3: "conv_transpose3d"}
_MAX_POOL = {1: "max_pool1d", 2: "max_pool2d", 3: "max_pool3d"}
_AVG_POOL = {1: "avg_pool1d", 2: "avg_pool2d", 3: "avg_pool3d"}


@rule("Conv")
def _conv(torch, F, inputs, attrs):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    rank = x.dim() - 2
    padding, extra = _pads(attrs["pads"], rank)
    if extra is not None:
        x = F.pad(x, extra)
    return getattr(F, _CONV[rank])(x, w, b, stride=tuple(attrs["strides"]), padding=padding,
                                   dilation=tuple(attrs["dilations"]), groups=attrs["group"])


@rule("ConvTranspose")
def _conv_transpose(torch, F, inputs, attrs):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    rank = x.dim() - 2
    begins, ends = attrs["pads"][:rank], attrs["pads"][rank:]
    if list(begins) != list(ends):
        raise UnsupportedOperatorError("ConvTranspose", reason="asymmetric pads have no PyTorch "
                                       "rule")
    return getattr(F, _CONV_T[rank])(x, w, b, stride=tuple(attrs["strides"]),
                                     padding=tuple(begins),
                                     output_padding=tuple(attrs["output_padding"]),
                                     groups=attrs["group"], dilation=tuple(attrs["dilations"]))


@rule("BatchNormalization")
def _batch_norm(torch, F, inputs, attrs):
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=attrs["epsilon"])


@rule("MaxPool")
def _max_pool(torch, F, inputs, attrs):
    x = inputs[0]
    rank = x.dim() - 2
    padding, extra = _pads(attrs["pads"], rank)
    if extra is not None:
        x = F.pad(x, extra, value=float("-inf"))
    return getattr(F, _MAX_POOL[rank])(x, tuple(attrs["kernel_shape"]),
                                       stride=tuple(attrs["strides"]), padding=padding,
                                       dilation=tuple(attrs["dilations"]),
                                       ceil_mode=bool(attrs["ceil_mode"]))


@rule("AveragePool")
def _avg_pool(torch, F, inputs, attrs):
    x = inputs[0]
    rank = x.dim() - 2
    padding, extra = _pads(attrs["pads"], rank)
    if extra is not None or any(d != 1 for d in attrs["dilations"]):
        raise UnsupportedOperatorError("AveragePool", reason="asymmetric pads or dilations "
                                       "have no PyTorch rule")
    return getattr(F, _AVG_POOL[rank])(x, tuple(attrs["kernel_shape"]),
                                       stride=tuple(attrs["strides"]), padding=padding,
                                       ceil_mode=bool(attrs["ceil_mode"]),
                                       count_include_pad=bool(attrs["count_include_pad"]))


@rule("GlobalAveragePool")
def _global_avg(torch, F, inputs, attrs):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@rule("GlobalMaxPool")
def _global_max(torch, F, inputs, attrs):
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@rule("Gemm")
def _gemm(torch, F, inputs, attrs):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    a = a.t() if attrs["transA"] else a
    if attrs["transB"] and c is not None and attrs["alpha"] == 1 and attrs["beta"] == 1:
        return F.linear(a, b, c)  # what nn.Linear runs
    y = attrs["alpha"] * (a @ (b.t() if attrs["transB"] else b))
    return y if c is None else y + attrs["beta"] * c


@rule("MatMul")
def _matmul(torch, F, inputs, attrs):
    return torch.matmul(inputs[0], inputs[1])


@rule("Flatten")
def _flatten(torch, F, inputs, attrs):
    x = inputs[0]
    axis = attrs["axis"] % x.dim() if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@rule("Reshape")
def _reshape(torch, F, inputs, attrs):
    x = inputs[0]
    shape = [x.shape[i] if d == 0 and not attrs["allowzero"] else d
             for i, d in enumerate(attrs["shape"])]
    return x.reshape(shape)


@rule("Transpose")
def _transpose(torch, F, inputs, attrs):
    x = inputs[0]
    perm = attrs["perm"] if attrs["perm"] is not None else list(reversed(range(x.dim())))
    return x.permute(*perm)


@rule("Concat")
def _concat(torch, F, inputs, attrs):
    return torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])


@rule("Split")
def _split(torch, F, inputs, attrs, outputs=None):
    x = inputs[0]
    sizes = attrs["split"]
    if sizes is None:
        parts = outputs or attrs["num_outputs"]
        sizes = [-(-x.shape[attrs["axis"]] // parts)] * parts
        sizes[-1] = x.shape[attrs["axis"]] - sum(sizes[:-1])
    return list(torch.split(x, list(sizes), dim=attrs["axis"]))


def _binary(name):
    def run(torch, F, inputs, attrs):
        return getattr(torch, name)(inputs[0], inputs[1])
    return run


for _op, _name in {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}.items():
    RULES[_op] = _binary(_name)


def _unary(fn):
    def run(torch, F, inputs, attrs):
        return fn(torch, F, inputs[0], attrs)
    return run


_UNARY = {
    "Relu": lambda torch, F, x, a: F.relu(x),
    "Sigmoid": lambda torch, F, x, a: torch.sigmoid(x),
    "Tanh": lambda torch, F, x, a: torch.tanh(x),
    "HardSwish": lambda torch, F, x, a: F.hardswish(x),
    "HardSigmoid": lambda torch, F, x, a: F.hardsigmoid(x),
    "LeakyRelu": lambda torch, F, x, a: F.leaky_relu(x, a["alpha"]),
    "Elu": lambda torch, F, x, a: F.elu(x, a["alpha"]),
    "Selu": lambda torch, F, x, a: F.selu(x),
    "Softplus": lambda torch, F, x, a: F.softplus(x),
    "Identity": lambda torch, F, x, a: x,
    "Dropout": lambda torch, F, x, a: x,
    "Softmax": lambda torch, F, x, a: torch.softmax(x, dim=a["axis"]),
    "LogSoftmax": lambda torch, F, x, a: torch.log_softmax(x, dim=a["axis"]),
    "Clip": lambda torch, F, x, a: torch.clamp(x, a["min"], a["max"]),
    "LRN": lambda torch, F, x, a: F.local_response_norm(x, a["size"], a["alpha"], a["beta"],
                                                         a["bias"]),
    "Gelu": lambda torch, F, x, a: F.gelu(x, approximate=a["approximate"]),
    "Mish": lambda torch, F, x, a: F.mish(x),
    "Exp": lambda torch, F, x, a: torch.exp(x),
    "Sqrt": lambda torch, F, x, a: torch.sqrt(x),
    "Abs": lambda torch, F, x, a: torch.abs(x),
    "Neg": lambda torch, F, x, a: torch.neg(x),
    "Erf": lambda torch, F, x, a: torch.erf(x),
    "Reciprocal": lambda torch, F, x, a: torch.reciprocal(x),
    "Squeeze": lambda torch, F, x, a: x.squeeze(tuple(a["axes"])) if a["axes"] else x.squeeze(),
    "Unsqueeze": lambda torch, F, x, a: x.reshape(_unsqueezed(x.shape, a["axes"])),
    "ReduceMean": lambda torch, F, x, a: x.mean(
        dim=tuple(a["axes"]) if a["axes"] else tuple(range(x.dim())), keepdim=bool(a["keepdims"])),
}
for _op, _fn in _UNARY.items():
    RULES[_op] = _unary(_fn)


def _unsqueezed(shape, axes) -> list[int]:
    rank = len(shape) + len(axes)
    axes = sorted(a % rank for a in axes)
    dims = list(shape)
    for a in axes:
        dims.insert(a, 1)
    return dims


for _op, _name in {"Max": "maximum", "Min": "minimum", "Pow": "pow"}.items():
    RULES[_op] = _binary(_name)


@rule("PRelu")
def _prelu(torch, F, inputs, attrs):
    x, slope = inputs
    return torch.where(x >= 0, x, x * slope)


@rule("InstanceNormalization")
def _instance_norm(torch, F, inputs, attrs):
    x, scale, bias = inputs
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs["epsilon"])


@rule("Resize", "Upsample")
def _resize(torch, F, inputs, attrs):
    x = inputs[0]
    mode = {"nearest": "nearest", "linear": "bilinear" if x.dim() == 4 else "linear"}.get(
        attrs.get("mode", "nearest"))
    if mode is None:
        raise UnsupportedOperatorError("Resize", reason=f"mode {attrs.get('mode')!r} has no "
                                       "PyTorch rule")
    sizes, scales = attrs.get("sizes"), attrs.get("scales")
    kwargs = {"mode": mode}
    if sizes is not None:
        kwargs["size"] = tuple(int(s) for s in list(sizes)[2:])
    else:
        kwargs["scale_factor"] = tuple(float(s) for s in list(scales)[2:])
    if mode != "nearest":
        kwargs["align_corners"] = attrs.get("coordinate_transformation_mode") == "align_corners"
    return F.interpolate(x, **kwargs)


class TorchEager:
    """Run an imported IR graph with PyTorch eager ops; ``run(arrays) -> list of ndarrays``."""

    def __init__(self, graph: Graph, threads: int | None = None):
        import torch

        self.torch = torch
        self.graph = graph
        for node in graph.nodes:
            if node.op not in RULES:
                raise UnsupportedOperatorError(node.op, node=node.name,
                                               reason="no PyTorch rule for it",
                                               supported=list(RULES))
        if threads:
            torch.set_num_threads(threads)
        self.constants = {id(v): torch.from_numpy(np.ascontiguousarray(v.data))
                          for v in graph.constants.values()}

    def __call__(self, *tensors):
        """The outputs as torch tensors, from input tensors."""
        import torch.nn.functional as F

        torch = self.torch
        env = dict(self.constants)
        with torch.inference_mode():
            for value, tensor in zip(self.graph.inputs, tensors):
                env[id(value)] = tensor
            for node in self.graph.nodes:
                args = [env[id(v)] if v is not None else None for v in node.inputs]
                if node.op == "Split":
                    result = _split(torch, F, args, node.attrs, len(node.outputs))
                else:
                    result = RULES[node.op](torch, F, args, node.attrs)
                results = result if isinstance(result, list) else [result]
                for value, tensor in zip(node.outputs, results):
                    env[id(value)] = tensor
            return [env[id(v)] for v in self.graph.outputs]

    def run(self, arrays) -> list[np.ndarray]:
        tensors = [self.torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        return [t.numpy() for t in self(*tensors)]
