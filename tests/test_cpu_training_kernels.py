"""CPU training kernels (kernels/training.py via grad_emitters.py): convolutions with run-time
weights and the gradient / training-mode ops, each against the reference executor on random
inputs; the fused optimizer updates against the NumPy formulas."""

from __future__ import annotations

import numpy as np
import pytest

from cnncompile.autodiff.optim import SGD, Adam
from cnncompile.autodiff.training import _compile_graph
from cnncompile.ir.graph import Graph, Node
from cnncompile.ir.types import TensorType
from cnncompile.ops import OPS
from helpers import rel_l2

TOLERANCE = 1e-4


def one_node(op: str, inputs: dict, attrs: dict, weights_as_inputs=True):
    """A graph of one ``op`` node over graph inputs named after ``inputs`` (None entries stay
    absent), every output a graph output."""
    graph = Graph(op)
    values = []
    for name, array in inputs.items():
        if array is None:
            values.append(None)
        else:
            values.append(graph.add_input(name, TensorType(array.dtype, array.shape)))
    types = OPS[op].infer(*[v.type if v is not None else None for v in values], **attrs)
    types = types if isinstance(types, list) else [types]
    outputs = [graph.new_value(f"out{i}", t) for i, t in enumerate(types)]
    graph.add_node(Node(op, values, outputs, attrs, name=op.lower()))
    graph.outputs = outputs
    return graph


def check(op: str, inputs: dict, attrs: dict):
    """Run on targets reference and cpu (which must call a kernel, not the op's NumPy reference);
    every output within TOLERANCE (relative L2)."""
    feeds = {k: v for k, v in inputs.items() if v is not None}
    results = {}
    for target in ("reference", "cpu"):
        module = _compile_graph(one_node(op, inputs, attrs), target, 2, False)
        if target == "cpu":
            assert ".reference(" not in module.executor.source, module.executor.source
        out = module.run(feeds)
        results[target] = [out[name] for name in module.output_names]
    for want, got in zip(results["reference"], results["cpu"]):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel_l2(got, want) <= TOLERANCE, rel_l2(got, want)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def conv_attrs(rank, kernel, strides=None, pads=None, dilations=None, group=1):
    return {"kernel_shape": list(kernel), "strides": list(strides or [1] * rank),
            "pads": list(pads or [0] * (2 * rank)), "dilations": list(dilations or [1] * rank),
            "group": group}


# (x shape, K, kernel, strides, pads, dilations, group)
CONVS = [
    ((2, 5, 9, 11), 7, (3, 3), (1, 1), (1, 1, 1, 1), None, 1),     # Winograd-shaped
    ((2, 3, 16, 16), 6, (3, 3), (1, 1), (1, 1, 1, 1), None, 1),
    ((2, 5, 9, 8), 7, (3, 3), (2, 2), (1, 0, 2, 1), None, 1),      # asymmetric pads
    ((1, 4, 7, 7), 5, (1, 1), (3, 3), None, None, 1),               # stride > kernel
    ((3, 6, 5, 5), 4, (1, 1), None, None, None, 1),                 # 1x1 GEMM
    ((2, 6, 9, 9), 9, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 3),     # dilated, grouped
    ((2, 4, 8, 8), 4, (3, 3), (2, 1), (1, 1, 1, 1), None, 4),       # depthwise
    ((2, 3, 13), 5, (5,), (2,), (2, 1), None, 1),                   # 1-D
    ((1, 2, 5, 6, 4), 3, (3, 2, 2), (1, 2, 1), (1, 0, 1, 1, 1, 0), None, 1),  # 3-D
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[0])) + f"_k{c[2]}")
def test_conv_runtime_weights(case):
    shape, k_out, kernel, strides, pads, dilations, group = case
    rng = np.random.default_rng(len(shape) * 100 + k_out)
    attrs = conv_attrs(len(kernel), kernel, strides, pads, dilations, group)
    x = rand(rng, *shape)
    w = rand(rng, k_out, shape[1] // group, *kernel)
    b = rand(rng, k_out)
    check("Conv", {"X": x, "W": w, "B": b}, attrs)


@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[0])) + f"_k{c[2]}")
def test_conv_grad_weight_and_input(case):
    """ConvGradWeight and the input gradient (ConvTranspose with the Conv's geometry)."""
    shape, k_out, kernel, strides, pads, dilations, group = case
    rng = np.random.default_rng(len(shape) * 10 + k_out)
    attrs = conv_attrs(len(kernel), kernel, strides, pads, dilations, group)
    y = OPS["Conv"].infer(TensorType(np.float32, shape),
                          TensorType(np.float32, (k_out, shape[1] // group, *kernel)), **attrs)
    x, dy = rand(rng, *shape), rand(rng, *y.shape)
    check("ConvGradWeight", {"X": x, "dY": dy}, attrs)
    reach = [(o - 1) * s + (k - 1) * d + 1 - attrs["pads"][i] - attrs["pads"][i + len(kernel)]
             for i, (o, s, k, d) in enumerate(zip(y.shape[2:], attrs["strides"], kernel,
                                                  attrs["dilations"]))]
    transposed = dict(attrs, output_padding=[n - r for n, r in zip(shape[2:], reach)])
    w = rand(rng, k_out, shape[1] // group, *kernel)
    check("ConvTranspose", {"X": dy, "W": w}, transposed)


@pytest.mark.parametrize("plan", ["whole_batch", "per_image"])
@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[0])) + f"_k{c[2]}")
def test_conv_grad_weight_plans(case, plan, monkeypatch):
    """Both im2col plans on every geometry: one product over the batch in blocks of input
    channels (large dW, or few positions an image), and per-image products summed in per-thread
    partials."""
    from cnncompile.backends.cpu.kernels import training

    if plan == "whole_batch":
        monkeypatch.setattr(training, "PER_IMAGE_MAX_WEIGHTS", 0)
    else:
        monkeypatch.setattr(training, "PER_IMAGE_MIN_POSITIONS", 0)
    shape, k_out, kernel, strides, pads, dilations, group = case
    rng = np.random.default_rng(len(shape) * 7 + k_out)
    attrs = conv_attrs(len(kernel), kernel, strides, pads, dilations, group)
    y = OPS["Conv"].infer(TensorType(np.float32, shape),
                          TensorType(np.float32, (k_out, shape[1] // group, *kernel)), **attrs)
    check("ConvGradWeight", {"X": rand(rng, *shape), "dY": rand(rng, *y.shape)}, attrs)


# (x shape, K, pads): 3x3 stride-1 weight gradients for the Winograd F(2x2) kernel
WINOGRAD_GRADS = [
    ((2, 5, 9, 11), 7, (1, 1, 1, 1)),        # odd sizes: partial tiles on both edges
    ((3, 4, 8, 8), 6, (0, 2, 1, 0)),         # asymmetric pads
    ((2, 3, 5, 6), 2, (0, 0, 0, 0)),         # no pads: 3x4 output
    ((1, 13, 1, 1), 11, (1, 1, 1, 1)),       # a 1x1 image, prime channel counts
    ((5, 8, 14, 14), 8, (1, 1, 1, 1)),       # tasks spanning images
]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("case", WINOGRAD_GRADS, ids=lambda c: "x".join(map(str, c[0])))
def test_conv_grad_weight_winograd(case, m, monkeypatch):
    from cnncompile.backends.cpu import grad_emitters
    from cnncompile.backends.cpu.kernels import training

    monkeypatch.setattr(grad_emitters, "WINOGRAD_GRAD_F2_POSITIONS", 0 if m == 2 else 1 << 30)
    monkeypatch.setattr(grad_emitters, "WINOGRAD_GRAD_F4_POSITIONS", 0 if m == 4 else 1 << 30)
    # small tasks, so that these maps split into several: for F(2x2), 3 tile rows of the 14x14
    # case, whose tasks then start inside images and span two
    monkeypatch.setattr(training, "WINOGRAD_GRAD_BYTES", 3 * 64 * (8 + 8) * 7)
    shape, k_out, pads = case
    rng = np.random.default_rng(shape[1] * 10 + k_out)
    attrs = conv_attrs(2, (3, 3), None, pads)
    y = OPS["Conv"].infer(TensorType(np.float32, shape),
                          TensorType(np.float32, (k_out, shape[1], 3, 3)), **attrs)
    inputs = {"X": rand(rng, *shape), "dY": rand(rng, *y.shape)}
    module = _compile_graph(one_node("ConvGradWeight", inputs, attrs), "cpu", 2, False)
    assert f"k_conv_grad_weight_winograd(X, dY, out0, conv_scratch, {m}, " in \
        module.executor.source, module.executor.source
    check("ConvGradWeight", inputs, attrs)


def test_conv_transpose_runtime_with_bias_and_output_padding():
    rng = np.random.default_rng(5)
    attrs = dict(conv_attrs(2, (3, 3), (2, 2), (1, 1, 0, 1)), output_padding=[1, 0], group=1)
    check("ConvTranspose", {"X": rand(rng, 2, 7, 5, 4), "W": rand(rng, 7, 3, 3, 3),
                            "B": rand(rng, 3)}, attrs)


def test_conv_grad_weight_fewer_positions():
    """dY shorter than X's windows give (ConvTranspose's weight gradient with output_padding)."""
    rng = np.random.default_rng(6)
    attrs = conv_attrs(2, (3, 3), (2, 2))
    check("ConvGradWeight", {"X": rand(rng, 2, 3, 12, 11), "dY": rand(rng, 2, 5, 4, 5)}, attrs)


POOLS = [
    ((2, 3, 9, 9), (3, 3), (2, 2), (1, 1, 1, 1), None, 0),
    ((1, 5, 8, 7), (2, 3), (3, 2), (0, 1, 1, 0), None, 1),          # stride > kernel, ceil
    ((2, 2, 10, 10), (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 0),      # dilated
    ((2, 3, 11), (4,), (3,), (1, 2), None, 0),                      # 1-D
    ((1, 2, 5, 6, 4), (2, 2, 3), (2, 1, 2), (1, 0, 0, 0, 1, 1), None, 0),  # 3-D
]


@pytest.mark.parametrize("case", POOLS, ids=lambda c: "x".join(map(str, c[0])))
def test_pool_grads(case):
    shape, kernel, strides, pads, dilations, ceil = case
    rng = np.random.default_rng(sum(shape))
    rank = len(kernel)
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads),
             "dilations": list(dilations or [1] * rank), "ceil_mode": ceil}
    x = rand(rng, *shape)
    x[0, 0].reshape(-1)[:3] = 1.5  # ties: the first maximum takes the gradient
    out = OPS["MaxPool"].infer(TensorType(np.float32, shape), **{**attrs, "storage_order": 0})
    out = out[0] if isinstance(out, list) else out
    dy = rand(rng, *out.shape)
    check("MaxPoolGrad", {"dY": dy, "X": x}, attrs)
    y = _max_pool(x, attrs)
    check("MaxPoolGrad", {"dY": dy, "X": x, "Y": y}, attrs)  # routed by comparing with Y
    if dilations is None:
        for include in (0, 1):
            check("AveragePoolGrad", {"dY": dy},
                  dict(attrs, count_include_pad=include, shape=list(shape)))


def _max_pool(x, attrs):
    y = OPS["MaxPool"].reference(x, **{**attrs, "storage_order": 0})
    return y[0] if isinstance(y, (list, tuple)) else y


def test_max_pool_grad_with_nan_and_inf_maxima():
    """Rows whose window maxima hold a NaN or -inf (where the padding or a NaN decides which
    element took the maximum) go by the running maximum, Y or not."""
    rng = np.random.default_rng(11)
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
             "dilations": [1, 1], "ceil_mode": 0}
    x = rand(rng, 2, 3, 9, 9)
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 0, :4] = -np.inf  # a corner window of -inf: the padding is its first maximum
    x[0, 1, 1, :4] = -np.inf
    x[1, 2, 4, 4] = np.inf
    y = _max_pool(x, attrs)
    dy = rand(rng, *y.shape)
    check("MaxPoolGrad", {"dY": dy, "X": x}, attrs)
    check("MaxPoolGrad", {"dY": dy, "X": x, "Y": y}, attrs)


@pytest.mark.parametrize("shape", [(4, 7, 5, 3), (3, 5), (2, 3, 17), (2, 4, 3, 2, 5)])
def test_batchnorm_train_and_grad(shape):
    rng = np.random.default_rng(len(shape))
    channels = shape[1]
    x = rand(rng, *shape) * 3 + 2
    scale, bias = rand(rng, channels), rand(rng, channels)
    check("BatchNormTrain", {"X": x, "scale": scale, "B": bias}, {"epsilon": 1e-5,
                                                                 "momentum": 0.9})
    _, mean, var = OPS["BatchNormTrain"].reference(x, scale, bias)
    dy = rand(rng, *shape)
    base = {"dY": dy, "X": x, "scale": scale, "mean": mean, "var": var}
    check("BatchNormTrainGrad", base, {"epsilon": 1e-3})
    check("BatchNormTrainGrad", dict(base, dmean=rand(rng, channels), dvar=rand(rng, channels)),
          {"epsilon": 1e-5})


@pytest.mark.parametrize("activation,at,attrs,stats", [
    ("Relu", "Y", None, False), ("Relu", "Y", None, True), ("Sigmoid", "Y", None, False),
    ("LeakyRelu", "X", {"alpha": 0.2}, True), ("HardSwish", "X", None, False)])
def test_batchnorm_train_grad_through_activation(activation, at, attrs, stats):
    """BatchNormTrainGrad with fuse_activation_grad's activation: dY first through
    ActivationGrad(dY, V), with and without gradients of the statistics."""
    rng = np.random.default_rng(len(activation) + stats)
    shape = (3, 6, 5, 7)
    x = rand(rng, *shape) * 3 + 2
    scale = rand(rng, 6)
    _, mean, var = OPS["BatchNormTrain"].reference(x, scale, rand(rng, 6))
    v = rand(rng, *shape) * 4
    if at == "Y":
        v = OPS[activation].reference(v, **(attrs or {}))
    grads = {"dmean": rand(rng, 6), "dvar": rand(rng, 6)} if stats else {"dmean": None,
                                                                         "dvar": None}
    inputs = dict({"dY": rand(rng, *shape), "X": x, "scale": scale, "mean": mean, "var": var},
                  **grads, V=v)
    check("BatchNormTrainGrad", inputs, {"epsilon": 1e-5, "activation": activation,
                                         "activation_attrs": attrs, "at": at})


@pytest.mark.parametrize("activation,at,attrs", [
    ("Relu", "Y", None), ("Relu6", "X", None), ("Clip", "X", {"min": -0.5, "max": None}),
    ("LeakyRelu", "X", {"alpha": 0.2}), ("Sigmoid", "Y", None), ("Tanh", "Y", None),
    ("Elu", "X", {"alpha": 0.7}), ("HardSwish", "X", None), ("Silu", "X", None),
    ("HardSigmoid", "X", {"alpha": 0.3, "beta": 0.4})])
def test_activation_grad(activation, at, attrs):
    rng = np.random.default_rng(len(activation))
    v = rand(rng, 3, 5, 7, 11) * 4
    if at == "Y":
        v = OPS[activation].reference(v, **(attrs or {}))
    check("ActivationGrad", {"dY": rand(rng, 3, 5, 7, 11), "V": v},
          {"activation": activation, "activation_attrs": attrs, "at": at})


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_sgd_fused_matches_numpy(nesterov, dampening):
    rng = np.random.default_rng(7)
    params = {"a": rand(rng, 50, 7), "b": rand(rng, 3)}
    copy = {k: v.copy() for k, v in params.items()}
    fused = SGD(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov, dampening=dampening)
    plain = SGD(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov, dampening=dampening)
    plain.fused = False
    for _ in range(3):
        grads = {k: rand(rng, *v.shape) for k, v in params.items()}
        fused.step(params, grads)
        plain.step(copy, grads)
    for k in params:
        assert rel_l2(params[k], copy[k]) <= 1e-6


def test_adam_fused_matches_numpy():
    rng = np.random.default_rng(8)
    params = {"a": rand(rng, 40, 9)}
    copy = {k: v.copy() for k, v in params.items()}
    fused, plain = Adam(lr=0.01, weight_decay=0.1), Adam(lr=0.01, weight_decay=0.1)
    plain.fused = False
    for _ in range(3):
        grads = {k: rand(rng, *v.shape) for k, v in params.items()}
        fused.step(params, grads)
        plain.step(copy, grads)
    assert rel_l2(params["a"], copy["a"]) <= 1e-6


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_runtime_drivers(m):
    """The run-time-transformed Winograd paths, forward and as an input gradient, against the
    references (the graph tests above use images too small for the emitters to pick them)."""
    from cnncompile.backends.cpu.kernels import training
    from cnncompile.backends.cpu.kernels.conv import geometry

    rng = np.random.default_rng(m)
    x, w = rand(rng, 2, 5, 11, 9), rand(rng, 7, 5, 3, 3)
    attrs = conv_attrs(2, (3, 3), pads=(1, 0, 1, 2))
    want = OPS["Conv"].reference(x, w, **attrs)
    ws = np.empty(training.winograd_runtime_size(2, 5, 7, *want.shape[2:], m) + 7 * 5 * 9,
                  np.float32)
    got = np.empty_like(want)
    training.conv_winograd_runtime(x, w, None, got, ws, m, (1, 0, 1, 2))
    assert rel_l2(got, want) <= TOLERANCE
    # the input gradient: ConvTranspose(dy, w) as the Conv of dy with the flipped kernel
    dy = rand(rng, *want.shape)
    grad_attrs = dict(attrs, output_padding=[0, 0])
    want_dx = OPS["ConvTranspose"].reference(dy, w, **grad_attrs)
    pads = training.transpose_as_conv_pads([3, 3], [1, 1], attrs["pads"], [0, 0])
    g = geometry([3, 3], [1, 1], [1, 1], pads, want_dx.shape[2:])
    ws = np.empty(training.winograd_runtime_size(2, 7, 5, *want_dx.shape[2:], m) + 7 * 5 * 9,
                  np.float32)
    got_dx = np.empty_like(want_dx)
    training.conv_transpose_as_conv(dy, w, None, got_dx, ws, g, winograd=m, pads=tuple(pads))
    assert rel_l2(got_dx, want_dx) <= TOLERANCE
