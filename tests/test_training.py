"""Training: losses, optimizers, training-mode ops (BatchNormTrain, DropoutTrain, StochasticPool),
compile_training end to end (gradients vs finite differences, a LeNet run, export round trip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import cnncompile
from cnncompile import zoo
from cnncompile.errors import InputError, UserError
from cnncompile.ops import OPS
from helpers import assert_matches, make_model, rel_l2, run_ort
from onnx import helper

torch.set_num_threads(1)


def ref(op, *inputs, **attrs):
    return OPS[op].reference(*inputs, **attrs)


# ---- losses --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 2, 3)])
def test_cross_entropy_matches_torch(shape):
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(shape).astype(np.float32) * 3
    labels = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    loss = ref("SoftmaxCrossEntropy", scores, labels)
    s = torch.tensor(scores, requires_grad=True)
    expected = F.cross_entropy(s, torch.tensor(labels))
    expected.backward()
    assert loss.shape == () and loss.dtype == np.float32
    assert abs(float(loss) - expected.item()) <= 1e-6 * max(1.0, abs(expected.item()))
    grad = ref("SoftmaxCrossEntropyGrad", np.float32(2.0), scores, labels)
    assert_matches(grad, 2.0 * s.grad.numpy(), what="dscores")


def test_cross_entropy_rejects_bad_labels():
    scores = np.zeros((2, 3), np.float32)
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        ref("SoftmaxCrossEntropy", scores, np.array([0, 3]))
    with pytest.raises(cnncompile.errors.ShapeError, match="labels of shape"):
        OPS["SoftmaxCrossEntropy"].infer(cnncompile.TensorType(np.float32, (2, 3)),
                                         cnncompile.TensorType(np.float32, (2,)))


def test_mse_and_bce_match_torch_and_hand_formulas():
    rng = np.random.default_rng(2)
    pred = rng.standard_normal((4, 6)).astype(np.float32) * 4
    target = rng.random((4, 6)).astype(np.float32)
    mse = ref("MeanSquaredError", pred, target)
    assert abs(float(mse) - np.mean((pred.astype(np.float64) - target) ** 2)) < 1e-5
    assert abs(float(mse) - F.mse_loss(torch.tensor(pred), torch.tensor(target)).item()) < 1e-5
    bce = ref("BinaryCrossEntropyWithLogits", pred, target)
    p = 1 / (1 + np.exp(-pred.astype(np.float64)))
    hand = -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
    torch_bce = F.binary_cross_entropy_with_logits(torch.tensor(pred), torch.tensor(target))
    assert abs(float(bce) - hand) < 1e-5 and abs(float(bce) - torch_bce.item()) < 1e-5
    # large logits stay finite (the stable form)
    huge = ref("BinaryCrossEntropyWithLogits", np.array([[200.0, -200.0]], np.float32),
               np.array([[0.0, 1.0]], np.float32))
    assert abs(float(huge) - 200.0) < 1e-3


def test_append_loss_builds_a_valid_graph():
    from cnncompile.autodiff.losses import append_loss
    model = zoo.build("lenet5", batch=3)
    graph = cnncompile.import_onnx(model, input_shapes={"input": (3, 1, 32, 32)})
    loss, labels = append_loss(graph, "cross_entropy")
    graph.outputs = [loss]
    graph.verify()
    assert labels.type == cnncompile.TensorType(np.int64, (3,))
    assert loss.type == cnncompile.TensorType(np.float32, ())
    with pytest.raises(UserError, match="unknown loss 'hinge'"):
        append_loss(graph, "hinge")


# ---- optimizers ----------------------------------------------------------------------------------
def _run_optimizer(ours, make_theirs, steps=5, seed=3):
    rng = np.random.default_rng(seed)
    shapes = {"w": (4, 3), "b": (3,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    theirs = make_theirs(list(tensors.values()))
    for _ in range(steps):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        ours.step(params, grads)
        for k, t in tensors.items():
            t.grad = torch.tensor(grads[k])
        theirs.step()
    for k in shapes:
        assert_matches(params[k], tensors[k].detach().numpy(), 1e-6, what=k)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(momentum=0.9, weight_decay=0.01),
                                dict(momentum=0.8, nesterov=True, weight_decay=0.1),
                                dict(momentum=0.5, dampening=0.3)])
def test_sgd_matches_torch(kw):
    _run_optimizer(cnncompile.optim.SGD(lr=0.1, **kw),
                   lambda p: torch.optim.SGD(p, lr=0.1, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(betas=(0.8, 0.99), eps=1e-6),
                                dict(weight_decay=0.05)])
def test_adam_matches_torch(kw):
    _run_optimizer(cnncompile.optim.Adam(lr=0.01, **kw),
                   lambda p: torch.optim.Adam(p, lr=0.01, **kw), steps=8)


def test_optimizer_errors():
    with pytest.raises(UserError, match="lr=-1.0"):
        cnncompile.optim.SGD(lr=-1)
    with pytest.raises(UserError, match="nesterov"):
        cnncompile.optim.SGD(lr=0.1, nesterov=True)
    opt = cnncompile.optim.Adam()
    with pytest.raises(UserError, match=r"shape \[2\], the parameter \[3\]"):
        opt.step({"w": np.zeros(3, np.float32)}, {"w": np.zeros(2, np.float32)})


# ---- BatchNormTrain ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (2, 3, 4, 5), (2, 2, 3, 2, 3)])
def test_batchnorm_train_matches_torch(shape):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    c = shape[1]
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    y, mean, var = ref("BatchNormTrain", x, scale, bias, epsilon=1e-3, momentum=0.9)
    xt = torch.tensor(x, requires_grad=True)
    st_, bt = torch.tensor(scale, requires_grad=True), torch.tensor(bias, requires_grad=True)
    expected = F.batch_norm(xt, torch.zeros(c), torch.ones(c), st_, bt, training=True, eps=1e-3)
    assert_matches(y, expected.detach().numpy(), 1e-6, what="Y")
    axes = (0,) + tuple(range(2, len(shape)))
    assert_matches(mean, x.mean(axis=axes), 1e-6, what="mean")
    assert_matches(var, x.var(axis=axes), 1e-6, what="biased var")
    dy = rng.standard_normal(shape).astype(np.float32)
    expected.backward(torch.tensor(dy))
    dx, dscale, db = ref("BatchNormTrainGrad", dy, x, scale, mean, var, epsilon=1e-3)
    assert_matches(dx, xt.grad.numpy(), 1e-5, what="dX")
    assert_matches(dscale, st_.grad.numpy(), 1e-5, what="dscale")
    assert_matches(db, bt.grad.numpy(), 1e-5, what="dB")


def test_batchnorm_train_grad_of_statistics_by_finite_differences():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 4))
    scale, bias = rng.uniform(0.5, 1.5, 2), rng.standard_normal(2)
    dy, dmean, dvar = rng.standard_normal(x.shape), rng.standard_normal(2), rng.standard_normal(2)

    def objective(x):
        y, mean, var = ref("BatchNormTrain", x, scale, bias)
        return (y * dy).sum() + (mean * dmean).sum() + (var * dvar).sum()

    _, mean, var = ref("BatchNormTrain", x, scale, bias)
    dx = ref("BatchNormTrainGrad", dy, x, scale, mean, var, dmean, dvar)[0]
    assert rel_l2(dx, numeric_grad(objective, x)) < 1e-6


def numeric_grad(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + eps
        up = f(x)
        x[i] = saved - eps
        down = f(x)
        x[i] = saved
        grad[i] = (up - down) / (2 * eps)
    return grad


# ---- DropoutTrain --------------------------------------------------------------------------------
def test_dropout_train_scales_kept_elements():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    mask = rng.random(x.shape) >= 0.25
    y = ref("DropoutTrain", x, mask, ratio=0.25)
    np.testing.assert_array_equal(y, np.where(mask, x * np.float32(1 / 0.75), 0).astype(np.float32))
    assert not ref("DropoutTrain", x, mask, ratio=1.0).any()
    with pytest.raises(cnncompile.errors.ShapeError, match="bool tensor"):
        OPS["DropoutTrain"].infer(cnncompile.TensorType(np.float32, (2, 3)),
                                  cnncompile.TensorType(np.float32, (2, 3)))


# ---- StochasticPool ------------------------------------------------------------------------------
POOL = dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0], dilations=[1, 1], ceil_mode=0)


def test_stochastic_pool_samples_in_proportion_to_activations():
    # one 2x2 window, replicated over the batch: the picked tap's frequency follows x / sum(x)
    window = np.array([[1.0, 2.0], [0.0, 5.0]], np.float32)
    n = 20000
    x = np.broadcast_to(window, (n, 1, 2, 2)).copy()
    u = np.random.default_rng(7).random((n, 1, 1, 1)).astype(np.float32)
    y, indices = ref("StochasticPool", x, u, training=True, **POOL)
    taps = indices.ravel() % 4
    counts = np.bincount(taps, minlength=4)
    p = window.ravel() / window.sum()
    assert counts[2] == 0  # a zero activation is never picked
    # within 5 standard deviations of the binomial counts
    assert np.all(np.abs(counts - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1e-9), counts
    np.testing.assert_array_equal(y.ravel(), window.ravel()[taps])


def test_stochastic_pool_inference_is_the_weighted_average():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    attrs = dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0], dilations=[1, 1],
                 ceil_mode=0)
    y = ref("StochasticPool", x, training=False, **attrs)
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (1, 1), (0, 0)])
    expected = np.zeros(y.shape)
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            win = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 2].reshape(2, 3, -1)
            w = np.maximum(win, 0)
            total = w.sum(-1)
            expected[:, :, i, j] = np.where(total > 0, (w * win).sum(-1) / np.where(total > 0,
                                                                                  total, 1), 0)
    assert_matches(y, expected.astype(np.float32), 1e-6)


@settings(max_examples=25, deadline=None)
@given(kernel=st.integers(1, 3), stride=st.integers(1, 3), pad=st.integers(0, 1),
       dilation=st.integers(1, 2), seed=st.integers(0, 1000))
def test_stochastic_pool_gradient_routes_to_the_sample(kernel, stride, pad, dilation, seed):
    pad = min(pad, kernel - 1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2, 7)).astype(np.float64)
    attrs = dict(kernel_shape=[kernel], strides=[stride], pads=[pad, pad], dilations=[dilation],
                 ceil_mode=0)
    out = OPS["StochasticPool"].infer(cnncompile.TensorType(np.float64, x.shape), None,
                                      training=False, **attrs).shape
    u = rng.random(out)
    y, indices = ref("StochasticPool", x, u, training=True, **attrs)
    dy = rng.standard_normal(out)
    dx = ref("StochasticPoolGrad", dy, x, indices, training=True, **attrs)
    expected = np.zeros(x.size)
    np.add.at(expected, indices[indices >= 0], dy[indices >= 0])
    np.testing.assert_allclose(dx.ravel(), expected, atol=1e-12)
    # positions that are nobody's sample get nothing; the samples are the outputs
    assert np.all(y[indices >= 0] == x.ravel()[indices[indices >= 0]])
    assert np.all(y[indices < 0] == 0)
    # inference: the analytic gradient matches finite differences
    dx_inf = ref("StochasticPoolGrad", dy, x, training=False, **attrs)
    numeric = numeric_grad(lambda v: (ref("StochasticPool", v, training=False, **attrs) * dy)
                           .sum(), x.copy())
    np.testing.assert_allclose(dx_inf, numeric, atol=1e-5)


# ---- the rules through grad(): finite differences in float64 -------------------------------------
def _node(graph, op, inputs, attrs=None, outputs=1, name=""):
    from cnncompile.ir.graph import Node
    types = OPS[op].infer(*[v.type for v in inputs], **(attrs or {}))
    types = [types] if isinstance(types, cnncompile.TensorType) else types
    values = [graph.new_value(f"{name or op}.out{i}", t) for i, t in enumerate(types[:outputs])]
    graph.add_node(Node(op, inputs, values, attrs or {}, name=name or op))
    return values[0] if outputs == 1 else values


def _check_rules(graph, loss, wrt, feeds, target="reference", eps=1e-6, tol=1e-6):
    """grad(graph) compiled for target vs central differences of the loss it computes."""
    from cnncompile.autodiff.grad import grad
    from cnncompile.autodiff.training import _compile_graph
    graph.outputs = [loss]
    joint = grad(graph, loss.name, wrt)
    module = _compile_graph(joint.copy(), target, 2, verify_each=True)
    feeds = dict(feeds)
    for name in wrt:
        if name in graph.constants:
            feeds[name] = np.array(graph.constants[name].data)
    out = module.run(feeds)
    for name in wrt:
        def f(v, name=name):
            return float(module.run({**feeds, name: v})[module.output_names[0]])
        numeric = numeric_grad(f, feeds[name].copy(), eps)
        assert rel_l2(out[f"grad:{name}"], numeric) < tol, name
    return joint


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("loss_kind", ["cross_entropy", "mse", "bce_with_logits"])
def test_training_ops_gradients_by_finite_differences(rank, loss_kind):
    from cnncompile.autodiff.losses import append_loss
    rng = np.random.default_rng(10 + rank)
    shape = (3, 2) + (4,) * rank
    graph = cnncompile.Graph("t")
    x = graph.add_input("x", cnncompile.TensorType(np.float64, shape))
    mask_in = graph.add_input("mask", cnncompile.TensorType(np.bool_, shape))
    scale = graph.add_constant("scale", rng.uniform(0.5, 1.5, 2))
    bias = graph.add_constant("bias", rng.standard_normal(2))
    y = _node(graph, "BatchNormTrain", [x, scale, bias], {"epsilon": 1e-5, "momentum": 0.9},
              outputs=3, name="bn")[0]
    y = _node(graph, "DropoutTrain", [y, mask_in], {"ratio": 0.25}, name="drop")
    pool = dict(kernel_shape=[2] * rank, strides=[2] * rank, pads=[0] * (2 * rank),
                dilations=[1] * rank, ceil_mode=0)
    out_shape = shape[:2] + (2,) * rank
    u_in = graph.add_input("u", cnncompile.TensorType(np.float64, out_shape))
    y = _node(graph, "StochasticPool", [y, u_in], dict(pool, training=True), outputs=2,
              name="sp")[0]
    y = _node(graph, "StochasticPool", [y], dict(kernel_shape=[1] * rank, strides=[1] * rank,
                                                 pads=[0] * (2 * rank), dilations=[1] * rank,
                                                 ceil_mode=0, training=False), name="sp_eval")
    loss, labels = append_loss(graph, loss_kind, y)
    feeds = {"x": rng.standard_normal(shape) + 0.3, "mask": rng.random(shape) >= 0.25,
             "u": rng.random(out_shape)}
    if loss_kind == "cross_entropy":
        feeds["labels"] = rng.integers(0, 2, labels.shape)
    else:
        feeds["labels"] = rng.random(labels.shape)
    joint = _check_rules(graph, loss, ["x", "scale", "bias"], feeds)
    ops = joint.op_counts()
    assert ops["BatchNormTrainGrad"] == 1 and ops["StochasticPoolGrad"] == 2
    assert ops["DropoutTrain"] == 2  # the backward of DropoutTrain is DropoutTrain


# ---- compile_training end to end -----------------------------------------------------------------
def small_cnn(rng, dtype=np.float32, batch=4, size=6, classes=3, dropout=0.0, pool="MaxPool",
              opset=17):
    """Conv -> BatchNormalization -> Relu -> pool -> Flatten -> [Dropout] -> Gemm."""
    c = 4
    inits = {
        "conv.weight": rng.standard_normal((c, 2, 3, 3)) * 0.4,
        "conv.bias": rng.standard_normal(c) * 0.1,
        "bn.weight": rng.uniform(0.5, 1.5, c), "bn.bias": rng.standard_normal(c) * 0.1,
        "bn.running_mean": rng.standard_normal(c) * 0.1,
        "bn.running_var": rng.uniform(0.5, 1.5, c),
        "fc.weight": rng.standard_normal((classes, c * (size // 2) ** 2)) * 0.3,
        "fc.bias": rng.standard_normal(classes) * 0.1,
    }
    inits = {k: np.asarray(v, dtype) for k, v in inits.items()}
    nodes = [helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], name="conv",
                              pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias",
                                                     "bn.running_mean", "bn.running_var"], ["b"],
                              name="bn", momentum=0.9, epsilon=1e-5),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node(pool, ["r"], ["p"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten")]
    last = "f"
    if dropout:
        ratio = "drop.ratio"
        inits[ratio] = np.asarray(dropout, dtype)
        nodes.append(helper.make_node("Dropout", ["f", ratio], ["d"], name="drop"))
        last = "d"
    nodes.append(helper.make_node("Gemm", [last, "fc.weight", "fc.bias"], ["logits"], name="fc",
                                  transB=1))
    model = make_model(nodes, {"input": (dtype, ("N", 2, size, size))}, ["logits"], inits,
                       opset=opset)
    return model, inits


def torch_small_cnn(x, p, buffers, training=True):
    y = F.conv2d(x, p["conv.weight"], p["conv.bias"], padding=1)
    y = F.batch_norm(y, buffers["bn.running_mean"], buffers["bn.running_var"], p["bn.weight"],
                     p["bn.bias"], training=training, momentum=0.1, eps=1e-5)
    y = F.max_pool2d(F.relu(y), 2)
    return F.linear(y.flatten(1), p["fc.weight"], p["fc.bias"])


def test_training_matches_torch_batchnorm_train_mode_and_sgd():
    rng = np.random.default_rng(20)
    model, inits = small_cnn(rng)
    tr = cnncompile.compile_training(
        model, optimizer=cnncompile.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3),
        input_shapes={"input": (4, 2, 6, 6)}, target="reference")
    assert sorted(tr.parameters) == ["bn.bias", "bn.weight", "conv.bias", "conv.weight",
                                     "fc.bias", "fc.weight"]
    assert sorted(tr.buffers) == ["bn.running_mean", "bn.running_var"]
    params = {k: torch.tensor(v, requires_grad=True) for k, v in inits.items()
              if k in tr.parameters}
    buffers = {k: torch.tensor(v) for k, v in inits.items() if k in tr.buffers}
    opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(4):
        x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
        labels = rng.integers(0, 3, 4)
        ours = tr.step(x, labels)
        opt.zero_grad()
        theirs = F.cross_entropy(torch_small_cnn(torch.tensor(x), params, buffers),
                                 torch.tensor(labels))
        theirs.backward()
        opt.step()
        assert abs(ours - theirs.item()) < 1e-5 * max(1, abs(theirs.item())), step
    for name, value in params.items():
        assert_matches(tr.parameters[name], value.detach().numpy(), 1e-5, what=name)
    for name, value in buffers.items():
        assert_matches(tr.buffers[name], value.numpy(), 1e-5, what=name)
    # eval mode: running statistics, as torch's eval()
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    expected = torch_small_cnn(torch.tensor(x), params, buffers, training=False)
    assert_matches(tr.predict(x), expected.detach().numpy(), 1e-5, what="predict")
    labels = rng.integers(0, 3, 4)
    tr.eval_mode()
    loss = F.cross_entropy(expected, torch.tensor(labels))
    assert abs(tr.loss(x, labels) - loss.item()) < 1e-5
    grads = tr.gradients(x, labels)
    opt.zero_grad()
    loss.backward()
    for name, value in params.items():
        assert_matches(grads[name], value.grad.numpy(), 1e-4, what=f"eval-mode grad {name}")
    assert tr.train_mode().training


def test_gradients_match_finite_differences_on_a_tiny_model():
    rng = np.random.default_rng(21)
    model, _ = small_cnn(rng, dtype=np.float64, batch=3, size=4, pool="AveragePool")
    for kind, labels in [("cross_entropy", rng.integers(0, 3, 3)),
                         ("mse", rng.standard_normal((3, 3))),
                         ("bce_with_logits", rng.random((3, 3)))]:
        tr = cnncompile.compile_training(model, loss=kind, input_shapes={"input": (3, 2, 4, 4)},
                                         target="reference")
        x = rng.standard_normal((3, 2, 4, 4))
        grads = tr.gradients(x, labels)
        assert set(grads) == set(tr.parameters)
        for name, param in tr.parameters.items():
            numeric = numeric_grad(lambda v: tr.loss(x, labels), param)
            # (conv.bias has no effect through the batch norm: its gradient is 0)
            np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8,
                                       err_msg=f"{kind} {name}")


def test_dropout_masks_are_seeded():
    rng = np.random.default_rng(22)
    model, inits = small_cnn(rng, dropout=0.5)
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 4)

    def run(seed):
        tr = cnncompile.compile_training(model, input_shapes={"input": (4, 2, 6, 6)}, seed=seed,
                                         target="reference")
        assert tr.backward_graph.op_counts()["DropoutTrain"] == 2
        return [tr.gradients(x, labels)["fc.weight"] for _ in range(3)]

    first, again, other = run(1), run(1), run(2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])  # a new mask every call
    assert not np.array_equal(first[0], other[0])
    # the mask is rng.random(shape) >= ratio from default_rng(seed): PyTorch with that mask agrees
    mask = np.random.default_rng(1).random((4, 36)) >= 0.5
    params = {k: torch.tensor(v, requires_grad=True) for k, v in inits.items()}
    buffers = {k: params.pop(k).detach() for k in ("bn.running_mean", "bn.running_var")}
    hidden = torch_small_cnn(torch.tensor(x), {**params, "fc.weight": torch.eye(36),
                                                "fc.bias": torch.zeros(36)}, buffers)
    dropped = hidden * torch.tensor(mask) * 2.0
    logits = F.linear(dropped, params["fc.weight"], params["fc.bias"])
    F.cross_entropy(logits, torch.tensor(labels)).backward()
    assert_matches(first[0], params["fc.weight"].grad.numpy(), 1e-5)


def test_export_round_trip_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng(23)
    model, _ = small_cnn(rng, dropout=0.3)
    tr = cnncompile.compile_training(model, optimizer=cnncompile.optim.Adam(lr=0.01),
                                     input_shapes={"input": (4, 2, 6, 6)}, target="reference")
    for _ in range(3):
        tr.step(rng.standard_normal((4, 2, 6, 6)).astype(np.float32), rng.integers(0, 3, 4))
    path = tmp_path / "trained.onnx"
    proto = tr.export(path)
    assert path.exists()
    x = rng.standard_normal((5, 2, 6, 6)).astype(np.float32)  # another batch size
    assert_matches(run_ort(proto, {"input": x})[0], tr.predict(x), what="exported logits")
    exported = {i.name: i for i in proto.graph.initializer}
    from onnx import numpy_helper
    np.testing.assert_array_equal(numpy_helper.to_array(exported["bn.running_var"]),
                                  tr.buffers["bn.running_var"])
    assert not np.array_equal(numpy_helper.to_array(exported["fc.weight"]),
                              numpy_helper.to_array(next(i for i in model.graph.initializer
                                                         if i.name == "fc.weight")))


def test_stochastic_pooling_trains_and_exports():
    rng = np.random.default_rng(24)
    model, _ = small_cnn(rng)
    tr = cnncompile.compile_training(model, pooling="stochastic",
                                     optimizer=cnncompile.optim.SGD(lr=0.1, momentum=0.9),
                                     input_shapes={"input": (8, 2, 6, 6)}, target="reference")
    ops = tr.backward_graph.op_counts()
    assert ops["StochasticPool"] == 1 and ops["StochasticPoolGrad"] == 1
    assert "MaxPool" not in ops
    x = rng.standard_normal((8, 2, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 8)
    losses = [tr.step(x, labels) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    proto = tr.export()
    assert_matches(run_ort(proto, {"input": x})[0], tr.predict(x), what="stochastic export")


def test_training_on_the_cpu_target_matches_reference():
    rng = np.random.default_rng(25)
    model, _ = small_cnn(rng)
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 4)
    results = {}
    for target in ("reference", "cpu"):
        tr = cnncompile.compile_training(model, optimizer=cnncompile.optim.SGD(lr=0.1),
                                         input_shapes={"input": (4, 2, 6, 6)}, target=target)
        results[target] = ([tr.step(x, labels) for _ in range(3)], tr.parameters["conv.weight"])
    np.testing.assert_allclose(results["cpu"][0], results["reference"][0], rtol=1e-5)
    assert_matches(results["cpu"][1], results["reference"][1], 1e-5)


def test_compile_training_errors():
    rng = np.random.default_rng(26)
    model, _ = small_cnn(rng)
    shapes = {"input": (4, 2, 6, 6)}
    with pytest.raises(UserError, match="unknown loss 'hinge'"):
        cnncompile.compile_training(model, loss="hinge", input_shapes=shapes)
    with pytest.raises(UserError, match="'nope' are not floating-point initializers"):
        cnncompile.compile_training(model, trainable=["nope"], input_shapes=shapes,
                                    target="reference")
    tr = cnncompile.compile_training(model, trainable=["fc.weight"], input_shapes=shapes,
                                     target="reference")
    assert list(tr.gradients(np.zeros((4, 2, 6, 6), np.float32), [0, 1, 2, 0])) == ["fc.weight"]
    with pytest.raises(InputError, match=r"labels have shape \[3\].*shape \[4\]"):
        tr.step(np.zeros((4, 2, 6, 6), np.float32), [0, 1, 2])
    with pytest.raises(InputError, match="integer class labels"):
        tr.step(np.zeros((4, 2, 6, 6), np.float32), np.zeros(4, np.float32))
    with pytest.raises(InputError, match=r"compiled for \[4, 2, 6, 6\]"):
        tr.step(np.zeros((2, 2, 6, 6), np.float32), [0, 1])


# ---- the example ---------------------------------------------------------------------------------
def _example():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_lenet_digits.py")
    spec = importlib.util.spec_from_file_location("train_lenet_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lenet_digits_example_short_run_learns(tmp_path):
    import struct
    import zlib
    example = _example()
    losses, epoch_losses, accuracy, trainer = example.train(epochs=2, target="reference",
                                                            progress=False)
    assert len(losses) == 2 * (1437 // 32)
    assert accuracy > 0.6  # chance is 0.1
    assert epoch_losses[1] < epoch_losses[0] < 0.8 * np.mean(losses[:5])
    assert trainer.backward_graph.op_counts()["ConvGradWeight"] == 3
    # the loss curve is a valid PNG of the promised size
    path = tmp_path / "curve.png"
    example.plot_losses(str(path), losses, epoch_losses)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    pixels = zlib.decompress(data[idat + 4:idat + 4 + length])
    assert (width, height) == (640, 360) and len(pixels) == height * (1 + 3 * width)
