"""PyTorch eager over the IR (the bench's PyTorch rival) computes what onnxruntime computes."""

import numpy as np
import pytest
import torch  # noqa: F401  (a test extra, which CI installs: no skip)
from onnx import helper

import cnncompile
from cnncompile import zoo
from cnncompile.backends.torch_eager import RULES, TorchEager
from cnncompile.errors import UnsupportedOperatorError
from helpers import make_model, run_ort



def eager(model, shapes):
    return TorchEager(cnncompile.import_onnx(model, input_shapes=shapes), threads=2)


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_every_zoo_model_matches_onnxruntime(name):
    size = min(zoo.default_image_size(name), 64)
    model = zoo.build(name, batch=2, image_size=size)
    feeds = zoo.random_inputs(model, seed=3)
    shapes = {k: v.shape for k, v in feeds.items()}
    engine = eager(model, shapes)
    ours = engine.run([feeds[v.name] for v in engine.graph.inputs])
    theirs = run_ort(model, feeds)
    for got, want in zip(ours, theirs):
        assert rel_l2(got, want) <= 1e-4


def test_asymmetric_pads_and_ceil_mode():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[0, 1, 2, 1], strides=[2, 1]),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 2], pads=[1, 0, 0, 1],
                              strides=[2, 2], ceil_mode=1)]
    model = make_model(nodes, {"x": (np.float32, (2, 3, 11, 9))}, ["y"], {"w": w})
    x = rng.standard_normal((2, 3, 11, 9)).astype(np.float32)
    engine = eager(model, {"x": x.shape})
    assert rel_l2(engine.run([x])[0], run_ort(model, {"x": x})[0]) <= 1e-5


def test_an_op_without_a_rule_is_named():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="act")],
                       {"x": (np.float32, (2, 3))}, ["y"])
    graph = cnncompile.import_onnx(model)
    graph.nodes[0].op = "Erfc"  # an op no rule covers
    with pytest.raises(UnsupportedOperatorError,
                       match=r"node 'act'.*'Erfc'.*no PyTorch rule.*Supported.*Conv"):
        TorchEager(graph)
