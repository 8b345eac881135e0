"""Every gradient rule against central finite differences (float64) and against PyTorch autograd.

Each case is one op in a small graph with the scalar loss sum(op(inputs) * R), R random: the
gradients cnncompile.grad computes (run on the reference executor) must match
(loss(x + eps e) - loss(x - eps e)) / (2 eps) along random directions e and single coordinates,
at several random points. The PyTorch checks evaluate the same graph with torch.nn.functional
(``torch_run``, also used by test_autodiff_graph.py) and compare with torch.autograd. They need
torch (a test extra): without it they fail, they do not skip.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cnncompile
from cnncompile.backends.reference import ReferenceExecutor
from cnncompile.errors import ModelError
from cnncompile.ir.graph import Graph, Node
from cnncompile.ir.types import TensorType
from cnncompile.ops import OPS
from cnncompile.ops.conv import extent, out_size

OPSET = 17
EPS = 1e-6
#: |analytic - finite difference| <= FD_TOL * (1 + |finite difference|)
FD_TOL = 1e-6
#: relative L2 against torch in float64 (Resize computes its coordinates in float32, as
#: onnxruntime does; that is what separates the two at all)
TORCH_TOL = 1e-6
HYPOTHESIS = settings(max_examples=30, deadline=None)


# ---- building and differentiating one-op graphs --------------------------------------------------
def op_graph(op: str, inputs: dict, attrs: dict | None = None, output: int = 0,
             seed: int = 0) -> Graph:
    """inputs: {name: array or None (an absent optional input)}; every array is a graph input.
    The loss is sum(output * R) with R fixed random (a ReduceMean of output * R * size)."""
    graph = Graph(op, OPSET)
    values = [None if a is None else graph.add_input(name, TensorType.of(np.asarray(a)))
              for name, a in inputs.items()]
    types = [None if v is None else v.type for v in values]
    while values and values[-1] is None:
        values.pop()
        types.pop()
    attrs = OPS[op].normalize(dict(attrs or {}), types, OPSET)
    out_types = OPS[op].infer(*types, **attrs)
    out_types = [out_types] if isinstance(out_types, TensorType) else out_types
    outs = [graph.new_value(f"y{i}", t) for i, t in enumerate(out_types)]
    graph.add_node(Node(op, values, outs, attrs, name=op.lower()))
    y = outs[output]
    weights = np.random.default_rng(seed).standard_normal(y.shape) * max(y.type.size, 1)
    weights = weights.astype(y.dtype)
    product = graph.new_value("product", y.type)
    graph.add_node(Node("Mul", [y, graph.add_constant("R", weights)], [product], {}, name="mul"))
    loss = graph.new_value("loss", TensorType(y.dtype, ()))
    graph.add_node(Node("ReduceMean", [product], [loss],
                        {"axes": list(range(y.type.rank)), "keepdims": False}, name="loss"))
    graph.outputs = [loss]
    return graph.verify()


def float_names(inputs: dict) -> list[str]:
    return [k for k, a in inputs.items() if a is not None and np.asarray(a).dtype.kind == "f"]


def gradients(graph: Graph, feeds: dict, wrt: list[str]) -> dict[str, np.ndarray]:
    joint = cnncompile.grad(graph, "loss", wrt)
    assert [v.name for v in joint.outputs] == ["loss"] + [f"grad:{n}" for n in wrt]
    outputs = ReferenceExecutor(joint).run([feeds[v.name] for v in joint.inputs])
    return dict(zip(wrt, outputs[1:]))


def fd_error(graph: Graph, feeds: dict, wrt: list[str], rng, directions: int = 3,
             coordinates: int = 8) -> float:
    """The largest |analytic - finite difference| / (1 + |finite difference|) over random
    directions and coordinates of every wrt input."""
    analytic = gradients(graph, feeds, wrt)
    forward = ReferenceExecutor(graph)

    def loss(changes: dict) -> float:
        run = {**feeds, **changes}
        return float(forward.run([run[v.name] for v in graph.inputs])[0])

    worst = 0.0
    for name in wrt:
        x, g = feeds[name], analytic[name]
        assert g.shape == x.shape and g.dtype == x.dtype
        probes = [rng.standard_normal(x.shape) for _ in range(directions)]
        for index in rng.choice(x.size, size=min(coordinates, x.size), replace=False):
            unit = np.zeros(x.shape)
            unit.flat[index] = 1.0
            probes.append(unit)
        for e in probes:
            fd = (loss({name: x + EPS * e}) - loss({name: x - EPS * e})) / (2 * EPS)
            worst = max(worst, abs(float(np.sum(g * e)) - fd) / (1.0 + abs(fd)))
    return worst


def check_fd(op: str, inputs: dict, attrs: dict | None = None, output: int = 0, points: int = 3,
             seed: int = 0, wrt: list[str] | None = None) -> float:
    """FD check at ``points`` random points: the float inputs are redrawn (same shapes and
    scales) for every point after the first."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for point in range(points):
        feeds = {k: np.asarray(a) for k, a in inputs.items() if a is not None}
        if point:
            feeds = {k: redraw(a, rng) if k in float_names(inputs) else a
                     for k, a in feeds.items()}
        graph = op_graph(op, {k: feeds.get(k) for k in inputs}, attrs, output, seed=point)
        worst = max(worst, fd_error(graph, feeds, wrt or float_names(inputs), rng))
    assert worst <= FD_TOL, f"{op} {attrs}: finite-difference error {worst:.3g} > {FD_TOL}"
    return worst


def redraw(a: np.ndarray, rng) -> np.ndarray:
    """A new random array like ``a``: positive if a is, with a's spread."""
    spread = max(float(np.std(a)), 0.1)
    if a.size and a.min() > 0:
        return rng.uniform(a.min(), a.max() + 1e-3, a.shape)
    return rng.standard_normal(a.shape) * spread


# ---- PyTorch evaluation of an IR graph (shared with test_autodiff_graph.py) ----------------------
def _torch():
    import torch  # a test extra: missing torch must fail these tests, not skip them
    return torch


def _symmetric(pads) -> list[int] | None:
    rank = len(pads) // 2
    return list(pads[:rank]) if list(pads[:rank]) == list(pads[rank:]) else None


def _torch_pad_arg(pads) -> list[int]:
    """ONNX [begins..., ends...] over the trailing axes -> torch.nn.functional.pad's order."""
    rank = len(pads) // 2
    out = []
    for axis in reversed(range(rank)):
        out += [pads[axis], pads[rank + axis]]
    return out


def _conv(x, w, b=None, *, dilations, group, kernel_shape, pads, strides):
    F = _torch().nn.functional
    rank = x.dim() - 2
    x = F.pad(x, _torch_pad_arg(pads))
    return getattr(F, f"conv{rank}d")(x, w, b, stride=strides, dilation=dilations, groups=group)


def _conv_transpose(x, w, b=None, *, dilations, group, kernel_shape, output_padding, pads,
                    strides):
    F = _torch().nn.functional
    rank = x.dim() - 2
    y = getattr(F, f"conv_transpose{rank}d")(x, w, b, stride=strides, groups=group,
                                             dilation=dilations, output_padding=output_padding)
    crop = tuple(slice(pads[i], y.shape[2 + i] - pads[i + rank]) for i in range(rank))
    return y[(slice(None), slice(None)) + crop]


def _max_pool(x, *, ceil_mode, dilations, kernel_shape, pads, strides, storage_order=0):
    F = _torch().nn.functional
    rank = x.dim() - 2
    padding = _symmetric(pads)
    assert padding is not None, "torch pools take symmetric pads only"
    pool = getattr(F, f"max_pool{rank}d")
    return pool(x, kernel_shape, strides, padding, dilations, ceil_mode=bool(ceil_mode))


def _avg_pool(x, *, ceil_mode, count_include_pad, dilations, kernel_shape, pads, strides):
    F = _torch().nn.functional
    assert set(dilations) == {1}, "torch's average pools have no dilation"
    padding = _symmetric(pads)
    assert padding is not None, "torch pools take symmetric pads only"
    pool = getattr(F, f"avg_pool{x.dim() - 2}d")
    return pool(x, kernel_shape, strides, padding, ceil_mode=bool(ceil_mode),
                count_include_pad=bool(count_include_pad))


def _lp_pool(x, *, ceil_mode, dilations, kernel_shape, p, pads, strides):
    F = _torch().nn.functional
    assert not any(pads) and set(dilations) == {1}, "torch's lp pools have no pads or dilation"
    rank = x.dim() - 2
    # lp_pool1d wants plain ints
    kernel, stride = (kernel_shape[0], strides[0]) if rank == 1 else (kernel_shape, strides)
    # torch's lp_pool leaves out the absolute value; |x| makes it ONNX's for any p
    return getattr(F, f"lp_pool{rank}d")(x.abs(), p, kernel, stride, ceil_mode=bool(ceil_mode))


def _spatial(x):
    return tuple(range(2, x.dim()))


def _softmax_call(fn):
    def run(x, *, axis, legacy_flatten):
        if not legacy_flatten:
            return fn(x, dim=axis)
        shape = x.shape
        return fn(x.reshape(*shape[:axis], -1), dim=axis).reshape(shape)
    return run


def _variadic(reduce):
    def run(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = reduce(out, x)
        return out
    return run


def _gemm(a, b, c=None, *, alpha, beta, transA, transB):
    y = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return y if c is None else y + beta * c


def _slice(x, *, starts, ends, axes, steps):
    from cnncompile.ops.shape import _slice_range
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        assert step > 0, "torch slices step forward only"
        start, end, _ = _slice_range(x.shape[axis], start, end, step)
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _pad(x, *, pads, mode, value, axes=None):
    F = _torch().nn.functional
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
                  "wrap": "circular"}[mode]
    rank = x.dim()
    leading = [a for a in range(rank) if pads[a] or pads[rank + a]]
    spatial = rank - min(leading, default=rank)
    if mode == "constant":
        return F.pad(x, _torch_pad_arg(pads), value=value)
    assert spatial <= rank - 2, "torch pads non-constant modes over trailing axes only"
    trailing = [p for a in range(rank - spatial, rank) for p in (pads[a],)] + \
        [pads[rank + a] for a in range(rank - spatial, rank)]
    return F.pad(x, _torch_pad_arg(trailing), mode=torch_mode)


def _resize(x, *, mode, coordinate_transformation_mode, nearest_mode, scales, sizes, **attrs):
    F = _torch().nn.functional
    rank = x.dim() - 2
    torch_mode = {"nearest": "nearest", "linear": ("linear", "bilinear", "trilinear")[rank - 1],
                  "cubic": "bicubic"}[mode]
    expected = "asymmetric" if mode == "nearest" else "half_pixel"
    assert coordinate_transformation_mode == expected and attrs["cubic_coeff_a"] == -0.75
    assert mode != "nearest" or nearest_mode == "floor"
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, size=list(sizes[2:]), mode=torch_mode, **kwargs)


def _batch_norm(x, scale, b, mean, var, *, epsilon, momentum, training_mode):
    F = _torch().nn.functional
    return F.batch_norm(x, mean, var, scale, b, False, 0.0, epsilon)


def torch_ops() -> dict:
    """op -> fn(*inputs, **canonical attrs) in torch, for the ops the tests evaluate in torch."""
    torch = _torch()
    F = torch.nn.functional
    unary = {
        "Relu": F.relu, "Relu6": F.relu6, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
        "Softplus": F.softplus, "Mish": F.mish, "HardSwish": F.hardswish, "Silu": F.silu,
        "Selu": lambda x, alpha, gamma: F.selu(x), "Abs": torch.abs, "Exp": torch.exp,
        "Sqrt": torch.sqrt, "Neg": torch.neg, "Erf": torch.erf, "Reciprocal": torch.reciprocal,
        "Identity": lambda x: x,
    }
    table = {name: (lambda fn: lambda x, **attrs: fn(x, **attrs))(fn)
             for name, fn in unary.items()}
    table.update({
        "LeakyRelu": lambda x, alpha: F.leaky_relu(x, alpha),
        "Elu": lambda x, alpha: F.elu(x, alpha),
        "Gelu": lambda x, approximate: F.gelu(x, approximate=approximate),
        "HardSigmoid": lambda x, alpha, beta: F.hardsigmoid(x) if (alpha, beta) == (1 / 6, 0.5)
        else torch.clamp(alpha * x + beta, 0.0, 1.0),
        "Clip": lambda x, min=None, max=None: torch.clamp(x, min, max),
        "PRelu": lambda x, slope: torch.where(x < 0, slope * x, x),
        "Softmax": _softmax_call(torch.softmax),
        "LogSoftmax": _softmax_call(torch.log_softmax),
        "Conv": _conv, "ConvTranspose": _conv_transpose,
        "MaxPool": _max_pool, "AveragePool": _avg_pool, "LpPool": _lp_pool,
        "GlobalAveragePool": lambda x: x.mean(dim=_spatial(x), keepdim=True),
        "GlobalMaxPool": lambda x: x.amax(dim=_spatial(x), keepdim=True),
        "GlobalLpPool": lambda x, p: torch.linalg.vector_norm(x, p, dim=_spatial(x),
                                                              keepdim=True),
        "BatchNormalization": _batch_norm,
        "InstanceNormalization": lambda x, s, b, epsilon: F.instance_norm(x, weight=s, bias=b,
                                                                          eps=epsilon),
        "LRN": lambda x, size, alpha, beta, bias: F.local_response_norm(x, size, alpha, beta,
                                                                        bias),
        "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
        "Pow": torch.pow,
        "Sum": _variadic(torch.add), "Max": _variadic(torch.maximum),
        "Min": _variadic(torch.minimum),
        "Mean": lambda *xs: _variadic(torch.add)(*xs) / len(xs),
        "Gemm": _gemm, "MatMul": torch.matmul,
        "ReduceMean": lambda x, axes, keepdims: x.mean(dim=tuple(axes), keepdim=keepdims),
        "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
        "Split": lambda x, axis, split, num_outputs: torch.split(x, split, dim=axis),
        "Transpose": lambda x, perm: x.permute(*perm),
        "Slice": _slice, "Pad": _pad, "Resize": _resize,
        "Expand": lambda x, shape: x * torch.ones(tuple(shape), dtype=x.dtype),
        "Gather": lambda x, i, axis: torch.index_select(
            x, axis, torch.as_tensor(np.where(i < 0, i + x.shape[axis], i).reshape(-1))
        ).reshape(*x.shape[:axis], *i.shape, *x.shape[axis + 1:]),
        "DepthToSpace": lambda x, blocksize, mode: F.pixel_shuffle(x, blocksize),
        "SpaceToDepth": lambda x, blocksize, mode: F.pixel_unshuffle(x, blocksize),
        "Dropout": lambda x, **attrs: x,
        "Cast": lambda x, to, saturate: x.to(getattr(torch, to)),
    })
    # ops that only relabel elements take the IR's output shape
    for name in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        table[name] = None
    return table


def torch_run(graph: Graph, feeds: dict, requires_grad=()) -> tuple[dict, list]:
    """Evaluate ``graph`` in torch (float64 stays float64). Returns ({name: leaf tensor} for the
    names in requires_grad, [output tensors])."""
    torch = _torch()
    table = torch_ops()
    env: dict[int, object] = {}
    leaves = {}
    for v in graph.inputs:
        if v.name not in feeds:
            raise KeyError(f"torch_run: no feed for input '{v.name}'")
    for v in list(graph.inputs) + list(graph.constants.values()):
        array = feeds[v.name] if v.data is None else v.data
        if array.dtype.kind != "f":
            env[id(v)] = np.asarray(array)
            continue
        tensor = torch.tensor(np.array(array), requires_grad=v.name in requires_grad)
        env[id(v)] = tensor
        if v.name in requires_grad:
            leaves[v.name] = tensor
    for node in graph.nodes:
        if node.op not in table:
            raise NotImplementedError(f"torch_run: no torch form for {node.op}")
        args = [env[id(v)] if v is not None else None for v in node.inputs]
        while args and args[-1] is None:
            args.pop()
        fn = table[node.op]
        if fn is None:
            result = args[0].reshape(tuple(node.outputs[0].shape))
        else:
            result = fn(*args, **node.attrs)
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        for value, r in zip(node.outputs, results):
            env[id(value)] = r
    return leaves, [env[id(v)] for v in graph.outputs]


def torch_gradients(graph: Graph, feeds: dict, wrt: list[str]) -> dict[str, np.ndarray]:
    leaves, outputs = torch_run(graph, feeds, set(wrt))
    outputs[0].backward()
    return {name: leaves[name].grad.numpy() for name in wrt}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_torch(op: str, inputs: dict, attrs: dict | None = None, output: int = 0,
                wrt: list[str] | None = None) -> float:
    wrt = wrt or float_names(inputs)
    feeds = {k: np.asarray(a) for k, a in inputs.items() if a is not None}
    graph = op_graph(op, inputs, attrs, output)
    ours = gradients(graph, feeds, wrt)
    theirs = torch_gradients(graph, feeds, wrt)
    worst = max(rel_l2(ours[n], theirs[n]) for n in wrt)
    assert worst <= TORCH_TOL, f"{op} {attrs}: relative L2 {worst:.3g} vs PyTorch"
    return worst


# ---- the cases: one or more per op with a rule ---------------------------------------------------
def _cases():
    rng = np.random.default_rng(7)

    def r(*shape, low=None):
        if low is not None:
            return rng.uniform(low, low + 1.5, shape)
        return rng.standard_normal(shape)

    x4 = lambda: r(2, 3, 5, 4)  # noqa: E731
    cases = [
        # (id, op, inputs, attrs, compared with torch: True, False or the wrt names to compare)
        ("conv2d", "Conv", {"x": r(2, 4, 6, 5), "w": r(6, 2, 3, 3), "b": r(6)},
         {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2], "group": 2}, True),
        ("conv1d_depthwise", "Conv", {"x": r(2, 4, 9), "w": r(4, 1, 3)},
         {"strides": [2], "pads": [1, 1], "group": 4}, True),
        ("conv3d", "Conv", {"x": r(1, 2, 4, 5, 4), "w": r(3, 2, 2, 3, 2), "b": r(3)},
         {"strides": [1, 2, 1], "pads": [0, 1, 1, 1, 0, 0]}, True),
        ("conv_transpose2d", "ConvTranspose", {"x": r(2, 4, 3, 4), "w": r(4, 3, 3, 2),
                                               "b": r(6)},
         {"strides": [2, 3], "pads": [1, 0, 0, 1], "group": 2, "output_padding": [1, 2]}, True),
        ("conv_transpose1d_long_padding", "ConvTranspose", {"x": r(2, 2, 3), "w": r(2, 3, 2)},
         {"strides": [2], "output_padding": [3]}, False),
        ("maxpool2d_ceil", "MaxPool", {"x": r(2, 3, 7, 6)},
         {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
         True),
        ("maxpool1d_dilated", "MaxPool", {"x": r(2, 3, 9)},
         {"kernel_shape": [2], "strides": [1], "dilations": [3], "pads": [1, 1]}, True),
        ("avgpool2d", "AveragePool", {"x": x4()},
         {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 1, 1, 1]}, True),
        ("avgpool2d_include_pad_ceil", "AveragePool", {"x": x4()},
         {"kernel_shape": [2, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
          "count_include_pad": 1, "ceil_mode": 1}, True),
        ("lppool1d", "LpPool", {"x": r(2, 3, 7)}, {"kernel_shape": [3], "strides": [2], "p": 3},
         True),
        ("lppool2d", "LpPool", {"x": x4()}, {"kernel_shape": [2, 2], "strides": [2, 2]}, True),
        ("global_avg", "GlobalAveragePool", {"x": x4()}, {}, True),
        ("global_max", "GlobalMaxPool", {"x": x4()}, {}, True),
        ("global_lp", "GlobalLpPool", {"x": x4()}, {"p": 3}, True),
        ("batchnorm", "BatchNormalization", {"x": x4(), "s": r(3), "b": r(3), "m": r(3),
                                             "v": r(3, low=0.5)}, {"epsilon": 1e-3},
         # torch's batch_norm takes no gradient for the running statistics
         ["x", "s", "b"]),
        ("instancenorm", "InstanceNormalization", {"x": x4(), "s": r(3), "b": r(3)}, {}, True),
        ("lrn", "LRN", {"x": r(2, 5, 3, 3)}, {"size": 3, "alpha": 0.1, "beta": 0.75,
                                              "bias": 1.5}, True),
        ("prelu", "PRelu", {"x": x4(), "slope": r(3, 1, 1)}, {}, True),
        ("clip", "Clip", {"x": x4()}, {"min": -0.5, "max": 0.7}, True),
        ("clip_min_only", "Clip", {"x": x4()}, {"min": 0.1}, True),
        ("leaky_relu", "LeakyRelu", {"x": x4()}, {"alpha": 0.2}, True),
        ("elu", "Elu", {"x": x4()}, {"alpha": 0.7}, True),
        ("gelu", "Gelu", {"x": x4()}, {}, True),
        ("gelu_tanh", "Gelu", {"x": x4()}, {"approximate": "tanh"}, True),
        ("hard_sigmoid", "HardSigmoid", {"x": x4() * 3}, {"alpha": 1 / 6, "beta": 0.5}, True),
        ("hard_sigmoid_onnx", "HardSigmoid", {"x": x4() * 3}, {}, True),
        ("softmax", "Softmax", {"x": x4()}, {"axis": 1}, True),
        ("softmax_legacy", "Softmax", {"x": x4()}, {"axis": 1, "legacy_flatten": True}, True),
        ("log_softmax", "LogSoftmax", {"x": x4()}, {"axis": -1}, True),
        ("gemm_trans", "Gemm", {"a": r(4, 3), "b": r(5, 4), "c": r(5)},
         {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, True),
        ("gemm", "Gemm", {"a": r(3, 4), "b": r(4, 5), "c": r(3, 1)}, {}, True),
        ("gemm_transA", "Gemm", {"a": r(4, 3), "b": r(4, 5)}, {"transA": 1}, True),
        ("gemm_transB", "Gemm", {"a": r(3, 4), "b": r(5, 4), "c": r(1)}, {"transB": 1}, True),
        ("matmul_batched", "MatMul", {"a": r(2, 1, 3, 4), "b": r(3, 4, 2)}, {}, True),
        ("matmul_vector_a", "MatMul", {"a": r(4), "b": r(2, 4, 3)}, {}, True),
        ("matmul_vector_b", "MatMul", {"a": r(2, 3, 4), "b": r(4)}, {}, True),
        ("pow", "Pow", {"a": r(2, 3, low=0.5), "b": r(3)}, {}, True),
        ("sum", "Sum", {"a": r(2, 3), "b": r(3), "c": r(2, 1)}, {}, True),
        ("mean", "Mean", {"a": r(2, 3), "b": r(3), "c": r(2, 1)}, {}, True),
        ("max", "Max", {"a": r(2, 3), "b": r(3), "c": r(2, 1)}, {}, True),
        ("min", "Min", {"a": r(2, 3), "b": r(3)}, {}, True),
        ("concat", "Concat", {"a": r(2, 3), "b": r(2, 2), "c": r(2, 1)}, {"axis": 1}, True),
        ("split", "Split", {"a": r(2, 5)}, {"axis": 1, "split": [2, 3]}, True),
        ("reshape", "Reshape", {"a": r(2, 6)}, {"shape": [3, -1]}, True),
        ("flatten", "Flatten", {"a": r(2, 3, 2)}, {"axis": 1}, True),
        ("transpose", "Transpose", {"a": r(2, 3, 4)}, {"perm": [2, 0, 1]}, True),
        ("squeeze", "Squeeze", {"a": r(2, 1, 4)}, {"axes": [1]}, True),
        ("unsqueeze", "Unsqueeze", {"a": r(2, 4)}, {"axes": [0, 2]}, True),
        ("pad_constant_crop", "Pad", {"a": r(3, 4)}, {"pads": [1, -1, 2, 2]}, True),
        ("pad_reflect", "Pad", {"a": r(1, 2, 3, 4)},
         {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "mode": "reflect"}, True),
        ("pad_edge", "Pad", {"a": r(1, 2, 3, 4)},
         {"pads": [0, 0, 3, 2, 0, 0, 2, 1], "mode": "edge"}, True),
        ("pad_wrap", "Pad", {"a": r(1, 2, 3, 4)},
         {"pads": [0, 0, 2, 2, 0, 0, 3, 1], "mode": "wrap"}, True),
        ("slice", "Slice", {"a": r(5, 6)},
         {"starts": [1, -5], "ends": [5, 6], "axes": [0, 1], "steps": [2, 2]}, True),
        ("slice_negative_step", "Slice", {"a": r(5, 6)},
         {"starts": [4, 1], "ends": [0, 6], "axes": [0, 1], "steps": [-2, 2]}, False),
        ("resize_nearest", "Resize", {"a": r(1, 2, 3, 4)},
         {"mode": "nearest", "scales": [1, 1, 2, 1.5], "nearest_mode": "floor",
          "coordinate_transformation_mode": "asymmetric"}, True),
        ("resize_nearest_half_pixel", "Resize", {"a": r(1, 2, 5, 4)},
         {"mode": "nearest", "sizes": [1, 2, 3, 7]}, False),
        ("resize_linear", "Resize", {"a": r(1, 2, 3, 4)},
         {"mode": "linear", "scales": [1, 1, 2, 1.5]}, True),
        ("resize_linear_1d_shrink", "Resize", {"a": r(1, 2, 7)},
         {"mode": "linear", "sizes": [1, 2, 4]}, True),
        ("resize_cubic", "Resize", {"a": r(1, 2, 5, 4)},
         {"mode": "cubic", "sizes": [1, 2, 3, 7]}, True),
        ("resize_crop", "Resize", {"a": r(1, 2, 5, 4)},
         {"mode": "linear", "sizes": [1, 2, 3, 7],
          "coordinate_transformation_mode": "tf_crop_and_resize",
          "roi": [0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3]}, False),
        ("resize_align_corners", "Resize", {"a": r(1, 2, 3, 3)},
         {"mode": "linear", "scales": [1, 1, 2, 2], "coordinate_transformation_mode":
          "align_corners"}, False),
        ("reduce_mean", "ReduceMean", {"a": r(2, 3, 4)}, {"axes": [0, 2], "keepdims": 0}, True),
        ("reduce_mean_all", "ReduceMean", {"a": r(2, 3, 4)}, {}, True),
        ("expand", "Expand", {"a": r(3, 1)}, {"shape": [2, 3, 4]}, True),
        ("gather", "Gather", {"a": r(4, 3), "i": np.array([[0, 3], [-1, 0]])}, {"axis": 0},
         True),
        ("depth_to_space", "DepthToSpace", {"a": r(1, 8, 2, 3)},
         {"blocksize": 2, "mode": "CRD"}, True),
        ("depth_to_space_dcr", "DepthToSpace", {"a": r(1, 8, 2, 3)}, {"blocksize": 2}, False),
        ("space_to_depth", "SpaceToDepth", {"a": r(1, 2, 4, 6)}, {"blocksize": 2,
                                                                 "mode": "CRD"}, True),
        ("identity", "Identity", {"a": r(3, 2)}, {}, True),
        ("dropout", "Dropout", {"a": r(3, 2)}, {"ratio": 0.3}, True),
        ("cast", "Cast", {"a": r(3, 2)}, {"to": "float64"}, True),
        ("maxunpool", "MaxUnpool", {"x": r(1, 2, 2, 2), "i": np.array(
            [[[[0, 5], [10, 15]], [[17, 22], [24, 31]]]])},
         {"kernel_shape": [2, 2], "strides": [2, 2]}, False),
    ]
    for op in ("Relu", "Relu6", "Sigmoid", "Tanh", "Softplus", "Mish", "HardSwish", "Silu",
               "Selu", "Abs", "Neg", "Exp", "Erf"):
        cases.append((op.lower(), op, {"x": x4() * 2}, {}, True))
    for op in ("Sqrt", "Reciprocal"):
        cases.append((op.lower(), op, {"x": r(2, 3, 4, low=0.5)}, {}, True))
    for op in ("Add", "Sub", "Mul", "Div"):
        cases.append((op.lower() + "_broadcast", op, {"a": r(2, 3, 4), "b": r(3, 1, low=1.0)},
                      {}, True))
        cases.append((op.lower() + "_same", op, {"a": r(2, 3), "b": r(2, 3, low=1.0)}, {}, True))
    return cases


CASES = _cases()
#: Upsample has the canonical Resize attributes, so its case builds an Upsample node directly
UPSAMPLE = ("upsample_op", "Upsample", {"a": np.random.default_rng(3).standard_normal(
    (1, 2, 3, 3))}, {"mode": "linear", "scales": [1, 1, 2, 3]})


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_matches_finite_differences(case):
    _, op, inputs, attrs, _ = case
    check_fd(op, inputs, attrs)


def test_upsample_matches_finite_differences():
    _, op, inputs, attrs = UPSAMPLE
    check_fd(op, inputs, attrs)


TORCH_CASES = [c for c in CASES if c[4]]


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_rule_matches_torch(case):
    _, op, inputs, attrs, compared = case
    check_torch(op, inputs, attrs, wrt=compared if isinstance(compared, list) else None)


def test_every_listed_op_has_a_rule():
    """The issue's op list (and more): all have a gradient rule; fused ops decompose instead."""
    listed = {c[1] for c in CASES} | {"Upsample", "BatchNormTrain", "DropoutTrain",
                                      "StochasticPool", "SoftmaxCrossEntropy",
                                      "MeanSquaredError", "BinaryCrossEntropyWithLogits"}
    missing = sorted(op for op in listed if not hasattr(OPS[op], "gradient"))
    assert not missing, f"no gradient rule: {missing}"
    without = sorted(name for name, op in OPS.items() if not hasattr(op, "gradient"))
    # what remains: integer/shape ops (no float gradient flows), detection ops, the fused ops
    # (expanded by grad before differentiating) and the backward ops themselves
    backward = {name for name, op in OPS.items()
                if op.__module__.endswith("grad_ops") or name.endswith("Grad")}
    assert set(without) - backward <= {
        "Shape", "ConstantOfShape", "Range", "NonMaxSuppression", "RoiAlign", "MaxRoiPool",
        "FusedConv", "FusedGemm", "FusedElementwise"}, without


# ---- attributes varied with hypothesis -----------------------------------------------------------
SIZES = {1: (4, 9), 2: (3, 6), 3: (2, 4)}


@st.composite
def conv_config(draw, transpose: bool = False):
    rank = draw(st.integers(1, 3))
    sizes = [draw(st.integers(*SIZES[rank])) for _ in range(rank)]
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    pads = [draw(st.integers(0, 2)) for _ in range(2 * rank)]
    group = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    per_in, per_out = (1, 1) if depthwise else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "pads": pads,
             "group": group}
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    x = rng.standard_normal((2, group * per_in, *sizes))
    if transpose:
        padding = [draw(st.integers(0, s)) for s in strides]
        out = [(n - 1) * s + op + extent(k, d) - pads[i] - pads[i + rank]
               for i, (n, s, op, k, d) in enumerate(zip(sizes, strides, padding, kernel,
                                                        dilations))]
        assume(min(out) >= 1)
        attrs["output_padding"] = padding
        w = rng.standard_normal((group * per_in, per_out, *kernel))
    else:
        out = [out_size(n, k, s, d, pads[i], pads[i + rank])
               for i, (n, k, s, d) in enumerate(zip(sizes, kernel, strides, dilations))]
        assume(min(out) >= 1)
        w = rng.standard_normal((group * per_out, per_in, *kernel))
    channels = w.shape[1] * group if transpose else w.shape[0]
    b = rng.standard_normal(channels) if draw(st.booleans()) else None
    return {"x": x, "w": w, "b": b}, attrs


@HYPOTHESIS
@given(conv_config())
def test_conv_rule_over_attributes(config):
    inputs, attrs = config
    check_fd("Conv", inputs, attrs, points=1)


@HYPOTHESIS
@given(conv_config(transpose=True))
def test_conv_transpose_rule_over_attributes(config):
    inputs, attrs = config
    check_fd("ConvTranspose", inputs, attrs, points=1)


@st.composite
def pool_config(draw):
    op = draw(st.sampled_from(["MaxPool", "AveragePool", "LpPool"]))
    rank = draw(st.integers(1, 3))
    sizes = [draw(st.integers(*SIZES[rank])) for _ in range(rank)]
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    strides = [draw(st.integers(1, 3)) for _ in range(rank)]
    # a pad shorter than the window keeps every window on some input element
    pads = [draw(st.integers(0, extent(k, d) - 1)) for k, d in zip(kernel * 2, dilations * 2)]
    ceil_mode = int(draw(st.booleans()))
    out = [out_size(n, k, s, d, pads[i], pads[i + rank], bool(ceil_mode))
           for i, (n, k, s, d) in enumerate(zip(sizes, kernel, strides, dilations))]
    assume(min(out) >= 1 and all(n >= d for n, d in zip(sizes, dilations)))
    attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "pads": pads,
             "ceil_mode": ceil_mode}
    if op == "AveragePool":
        attrs["count_include_pad"] = int(draw(st.booleans()))
    if op == "LpPool":
        attrs["p"] = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 16))
    x = np.random.default_rng(seed).standard_normal((2, 2, *sizes))
    return op, {"x": x}, attrs


@HYPOTHESIS
@given(pool_config())
def test_pool_rules_over_attributes(config):
    op, inputs, attrs = config
    check_fd(op, inputs, attrs, points=1)


@HYPOTHESIS
@given(st.integers(1, 3), st.integers(0, 2 ** 16), st.sampled_from([False, True]))
def test_torch_conv_over_ranks_and_groups(rank, seed, depthwise):
    rng = np.random.default_rng(seed)
    group = 3 if depthwise else rng.integers(1, 3)
    per_in = 1 if depthwise else int(rng.integers(1, 3))
    sizes = [int(rng.integers(*SIZES[rank])) + 2 for _ in range(rank)]
    kernel = [int(rng.integers(1, 4)) for _ in range(rank)]
    attrs = {"strides": [int(rng.integers(1, 3)) for _ in range(rank)],
             "dilations": [int(rng.integers(1, 3)) for _ in range(rank)],
             "pads": [int(rng.integers(0, 3)) for _ in range(2 * rank)], "group": int(group)}
    out = [out_size(n, k, s, d, attrs["pads"][i], attrs["pads"][i + rank])
           for i, (n, k, s, d) in enumerate(zip(sizes, kernel, attrs["strides"],
                                                attrs["dilations"]))]
    assume(min(out) >= 1)
    inputs = {"x": rng.standard_normal((2, group * per_in, *sizes)),
              "w": rng.standard_normal((group * 2, per_in, *kernel)),
              "b": rng.standard_normal(group * 2)}
    check_torch("Conv", inputs, attrs)


@HYPOTHESIS
@given(st.sampled_from(["MaxPool", "AveragePool", "LpPool"]), st.integers(1, 3),
       st.integers(0, 2 ** 16))
def test_torch_pools_over_attributes(op, rank, seed):
    """The pool attributes torch shares with ONNX: symmetric pads of at most half the kernel,
    dilation for MaxPool only, no pads for LpPool; ceil_mode and count_include_pad."""
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(*SIZES[rank])) + 1 for _ in range(rank)]
    kernel = [int(rng.integers(1, 4)) for _ in range(rank)]
    dilations = [int(rng.integers(1, 3)) if op == "MaxPool" else 1 for _ in range(rank)]
    half = [0 if op == "LpPool" else int(rng.integers(0, k // 2 + 1)) for k in kernel]
    attrs = {"kernel_shape": kernel, "strides": [int(rng.integers(1, 3)) for _ in range(rank)],
             "dilations": dilations, "pads": half + half,
             # torch's lp_pool scales a mean by the full kernel size, wrong for the partial
             # windows of ceil mode (the finite-difference tests cover those)
             "ceil_mode": 0 if op == "LpPool" else int(rng.integers(0, 2))}
    if op == "AveragePool":
        attrs["count_include_pad"] = int(rng.integers(0, 2))
    out = [out_size(n, k, s, d, p, p, bool(attrs["ceil_mode"])) for n, k, s, d, p in
           zip(sizes, kernel, attrs["strides"], dilations, half)]
    assume(min(out) >= 1)
    check_torch(op, {"x": rng.standard_normal((2, 3, *sizes))}, attrs)


# ---- the builder: what gets a gradient, accumulation, errors -------------------------------------
def _chain_graph():
    """y = Mul(x, c) + Mul(x, x) + Relu(z): x is used three times, c is a constant."""
    g = Graph("chain", OPSET)
    t = TensorType(np.float64, (2, 3))
    x, z = g.add_input("x", t), g.add_input("z", t)
    c = g.add_constant("c", np.full((2, 3), 1.5))
    values = {}
    for name, op, ins in (("xc", "Mul", [x, c]), ("xx", "Mul", [x, x]), ("rz", "Relu", [z]),
                          ("s", "Add", None), ("y", "Add", None)):
        if name == "s":
            ins = [values["xc"], values["xx"]]
        if name == "y":
            ins = [values["s"], values["rz"]]
        values[name] = g.new_value(name, t)
        g.add_node(Node(op, ins, [values[name]], {}, name=name))
    loss = g.new_value("loss", TensorType(np.float64, ()))
    g.add_node(Node("ReduceMean", [values["y"]], [loss], {"axes": [0, 1], "keepdims": False},
                    name="loss"))
    g.outputs = [loss]
    return g.verify()


def test_reused_values_accumulate_and_only_paths_get_gradients():
    graph = _chain_graph()
    joint = cnncompile.grad(graph, "loss", ["x"])
    backward = [n for n in joint.nodes if n.created_by == "autodiff"]
    # x is read three times: two Adds accumulate its gradient
    assert sum(1 for n in backward if n.op == "Add" and n.outputs[0].name.startswith("grad:x"))\
        == 2
    # z is not in wrt and c is a constant: nothing differentiates Relu(z) or towards c
    assert not any("rz" in n.origins for n in backward)
    assert not any(n.op == "Mul" and any(v.name == "x" for v in n.inputs) and
                   any(v.name == "c" for v in n.inputs) for n in backward[1:])
    assert "c" in joint.constants and [v.name for v in joint.inputs] == ["x", "z"]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3)), "z": rng.standard_normal((2, 3))}
    grads = gradients(graph, feeds, ["x"])
    np.testing.assert_allclose(grads["x"], (1.5 + 2 * feeds["x"]) / 6, rtol=1e-12)
    assert fd_error(graph, feeds, ["x", "z"], rng) <= FD_TOL


def test_constants_in_wrt_become_inputs_and_unreached_ones_get_zeros():
    graph = _chain_graph()
    joint = cnncompile.grad(graph, "loss", ["c", "z"])
    assert [v.name for v in joint.inputs] == ["x", "z", "c"]
    assert "c" not in joint.constants
    assert joint.meta["autodiff"]["gradients"] == ["grad:c", "grad:z"]
    feeds = {"x": np.ones((2, 3)), "z": np.array([[1.0, -1, 2], [-2, 3, -3]]),
             "c": np.full((2, 3), 1.5)}
    loss, dc, dz = ReferenceExecutor(joint).run([feeds[v.name] for v in joint.inputs])
    np.testing.assert_allclose(dc, np.full((2, 3), 1 / 6))
    np.testing.assert_allclose(dz, (feeds["z"] > 0) / 6)
    # a wrt input the loss does not depend on gets zeros
    g2 = _chain_graph()
    w = g2.add_input("unused", TensorType(np.float64, (4,)))
    joint = cnncompile.grad(g2, "loss", ["unused"])
    out = ReferenceExecutor(joint).run([feeds["x"], feeds["z"], np.ones(4)])
    assert out[1].shape == w.shape and not out[1].any()


def test_loss_and_wrt_are_checked():
    graph = _chain_graph()
    with pytest.raises(ModelError, match="scalar"):
        cnncompile.grad(graph, "y", ["x"])
    with pytest.raises(ModelError, match="nope"):
        cnncompile.grad(graph, "nope", ["x"])
    with pytest.raises(ModelError, match="computed by Mul"):
        cnncompile.grad(graph, "loss", ["xx"])
    with pytest.raises(ModelError, match="more than once"):
        cnncompile.grad(graph, "loss", ["x", "x"])


def test_op_without_rule_raises_naming_op_and_node():
    g = Graph("roi", OPSET)
    x = g.add_input("x", TensorType(np.float64, (1, 2, 6, 6)))
    rois = g.add_constant("rois", np.array([[0.0, 0.0, 4.0, 4.0]]))
    idx = g.add_constant("idx", np.array([0]))
    attrs = OPS["RoiAlign"].normalize({"output_height": 2, "output_width": 2},
                                      [x.type, rois.type, idx.type], OPSET)
    y = g.new_value("y", OPS["RoiAlign"].infer(x.type, rois.type, idx.type, **attrs))
    g.add_node(Node("RoiAlign", [x, rois, idx], [y], attrs, name="the_roi"))
    loss = g.new_value("loss", TensorType(np.float64, ()))
    g.add_node(Node("ReduceMean", [y], [loss], {"axes": [0, 1, 2, 3], "keepdims": False},
                    name="loss"))
    g.outputs = [loss]
    with pytest.raises(ModelError, match=r"no gradient rule for RoiAlign \(node 'the_roi'\)"):
        cnncompile.grad(g, "loss", ["x"])


def test_fused_ops_are_decomposed_before_differentiating():
    rng = np.random.default_rng(5)
    g = Graph("fused", OPSET)
    t = TensorType(np.float64, (2, 3, 5, 5))
    x, r = g.add_input("x", t), g.add_input("r", t)
    w, b = g.add_input("w", TensorType(np.float64, (3, 3, 3, 3))), \
        g.add_input("b", TensorType(np.float64, (3,)))
    attrs = OPS["FusedConv"].normalize({"pads": [1, 1, 1, 1], "activation": "LeakyRelu",
                                        "activation_attrs": {"alpha": 0.1}, "residual": True,
                                        "post_activation": "Tanh"}, [t, w.type, b.type], OPSET)
    y = g.new_value("y", t)
    g.add_node(Node("FusedConv", [x, w, b, r], [y], attrs, name="fc"))
    program = [["Mul", ["in0", "in1"], {}], ["Sigmoid", ["t0"], {}], ["Add", ["t1", "in0"], {}]]
    z = g.new_value("z", t)
    g.add_node(Node("FusedElementwise", [y, x], [z], {"program": program}, name="fe"))
    flat = g.new_value("flat", TensorType(np.float64, (2, 75)))
    g.add_node(Node("Flatten", [z], [flat], {"axis": 1}, name="flatten"))
    gw = g.add_input("gw", TensorType(np.float64, (4, 75)))
    gemm = OPS["FusedGemm"].normalize({"transB": 1, "activation": "Sigmoid"},
                                      [flat.type, gw.type], OPSET)
    h = g.new_value("h", TensorType(np.float64, (2, 4)))
    g.add_node(Node("FusedGemm", [flat, gw], [h], gemm, name="fg"))
    loss = g.new_value("loss", TensorType(np.float64, ()))
    g.add_node(Node("ReduceMean", [h], [loss], {"axes": [0, 1], "keepdims": False}, name="l"))
    g.outputs = [loss]
    g.verify()
    joint = cnncompile.grad(g, "loss", ["x", "r", "w", "b", "gw"])
    assert not {"FusedConv", "FusedGemm", "FusedElementwise"} & set(joint.op_counts())
    feeds = {"x": rng.standard_normal(t.shape), "r": rng.standard_normal(t.shape),
             "w": rng.standard_normal((3, 3, 3, 3)) / 3, "b": rng.standard_normal(3),
             "gw": rng.standard_normal((4, 75)) / 8}
    assert fd_error(g, feeds, ["x", "r", "w", "b", "gw"], rng) <= FD_TOL


def test_float32_gradients_keep_float32():
    rng = np.random.default_rng(2)
    inputs = {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32),
              "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              "b": rng.standard_normal(4).astype(np.float32)}
    graph = op_graph("Conv", inputs, {"pads": [1, 1, 1, 1], "strides": [2, 2]})
    grads = gradients(graph, inputs, ["x", "w", "b"])
    wide = gradients(op_graph("Conv", {k: v.astype(np.float64) for k, v in inputs.items()},
                              {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
                     {k: v.astype(np.float64) for k, v in inputs.items()}, ["x", "w", "b"])
    for name in grads:
        assert grads[name].dtype == np.float32
        assert rel_l2(grads[name], wide[name]) <= 1e-6


def test_torch_is_installed():
    """The PyTorch comparisons are part of the suite: torch must be importable (test extra)."""
    torch = _torch()
    assert math.isfinite(float(torch.ones(1).sum()))
