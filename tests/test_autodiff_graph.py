"""grad() on whole zoo models at small sizes: the joint forward + backward graph verifies, runs on
the reference and cpu targets, goes through the pass pipeline with a memory plan that ``inspect``
reports, and its gradients match PyTorch autograd of the same architecture (the IR evaluated with
torch.nn.functional on the ONNX weights, see test_autodiff_rules.torch_run).

BatchNormalization is the inference form here (running statistics fixed), as in PyTorch's eval
mode; the training-mode forward (BatchNormTrain) is tested with the training module.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import cnncompile
from cnncompile import zoo
from cnncompile.backends import get_backend
from cnncompile.backends.reference import ReferenceExecutor
from cnncompile.frontend import import_onnx
from cnncompile.ir.graph import Graph, Node
from cnncompile.ir.types import TensorType
from cnncompile.passes import run_pipeline
from cnncompile.runtime import Module
from test_autodiff_rules import rel_l2, torch_run

BATCH = 2
#: float32 gradients against PyTorch's, relative L2 per parameter (the issue's bound)
TORCH_TOL = 1e-4
#: the compiled joint graph against its unoptimized reference run
COMPILED_TOL = 1e-5
MODELS = {
    "lenet5": {"image_size": 32},
    "resnet18": {"image_size": 32, "num_classes": 10},
    "mobilenetv2": {"image_size": 32, "num_classes": 10},
    "unet": {"image_size": 32, "base": 4},
}


def with_loss(graph: Graph, seed: int = 0) -> Graph:
    """loss = mean(output * R) with R fixed random: every output element gets its own weight."""
    y = graph.outputs[0]
    weights = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    r = graph.add_constant("loss.weights", weights)
    product = graph.new_value("loss.product", y.type)
    graph.add_node(Node("Mul", [y, r], [product], {}, name="loss.mul"))
    loss = graph.new_value("loss", TensorType(y.dtype, ()))
    graph.add_node(Node("ReduceMean", [product], [loss],
                        {"axes": list(range(y.type.rank)), "keepdims": False}, name="loss"))
    graph.outputs = [loss]
    return graph.verify()


def parameters(graph: Graph) -> list[str]:
    """The trainable initializers: every float constant but BatchNormalization's running
    statistics (buffers in PyTorch) and the loss weights."""
    stats = {v.name for n in graph.nodes if n.op == "BatchNormalization" for v in n.inputs[3:5]}
    return [name for name, v in graph.constants.items()
            if v.dtype.kind == "f" and name not in stats and name != "loss.weights"]


class Case:
    def __init__(self, name: str):
        proto = zoo.build(name, batch=BATCH, **MODELS[name])
        shapes = zoo.input_shapes(proto, batch=BATCH)
        self.name = name
        self.graph = with_loss(import_onnx(proto, input_shapes=shapes))
        self.params = parameters(self.graph)
        self.joint = cnncompile.grad(self.graph, "loss", self.params)
        rng = np.random.default_rng(1)
        self.feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        self.feeds.update({p: self.graph.constants[p].data for p in self.params})
        outputs = ReferenceExecutor(self.joint).run(self.ordered(self.joint))
        self.results = dict(zip((v.name for v in self.joint.outputs), outputs))

    def ordered(self, graph: Graph) -> list[np.ndarray]:
        return [self.feeds[v.name] for v in graph.inputs]


@functools.lru_cache(maxsize=None)
def case(name: str) -> Case:
    return Case(name)


@pytest.mark.parametrize("name", MODELS)
def test_joint_graph_is_a_verified_ir_graph(name):
    c = case(name)
    joint = c.joint.verify()
    assert [v.name for v in joint.outputs] == ["loss"] + [f"grad:{p}" for p in c.params]
    # the weights are inputs now: new values need no recompiling
    assert {v.name for v in joint.inputs} == {"input", *c.params}
    assert not set(c.params) & set(joint.constants)
    backward = [n for n in joint.nodes if n.created_by == "autodiff"]
    assert backward and all(n.origins for n in backward)
    counts, forward = joint.op_counts(), c.graph.op_counts()
    convs = forward.get("Conv", 0) + forward.get("ConvTranspose", 0)
    assert counts.get("ConvGradWeight", 0) == convs
    # every conv passes its gradient on as a transposed one (and a ConvTranspose as a Conv), but
    # the first: the input image is not in wrt
    assert counts.get("ConvTranspose", 0) + counts.get("Conv", 0) - convs == convs - 1
    for p in c.params:
        assert c.results[f"grad:{p}"].shape == c.feeds[p].shape
        assert np.isfinite(c.results[f"grad:{p}"]).all()


@pytest.mark.parametrize("name", MODELS)
def test_model_gradients_match_torch(name):
    c = case(name)
    leaves, outputs = torch_run(c.graph, c.feeds, set(c.params))
    outputs[0].backward()
    assert rel_l2(c.results["loss"], outputs[0].detach().numpy()) <= TORCH_TOL
    errors = {p: rel_l2(c.results[f"grad:{p}"], leaves[p].grad.numpy()) for p in c.params}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TORCH_TOL, f"{name}: gradient of {worst} off by {errors[worst]:.3g}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_joint_graph_compiles_through_the_pipeline(name, target):
    c = case(name)
    backend = get_backend(target)
    meta = {"target": target, "layout": getattr(backend, "preferred_layout", "NCHW")}
    optimized, manager = run_pipeline(c.joint.copy(), opt_level=2, verify_each=True, meta=meta)
    assert "plan_memory" in [r.name for r in manager.records]
    plan = optimized.meta["memory_plan"]
    assert 0 < plan.arena_bytes <= plan.naive_bytes
    module = Module(optimized, backend(optimized), target)
    outputs = module.run({v.name: c.feeds[v.name] for v in optimized.inputs})
    assert list(outputs) == list(c.results)
    for key, expected in c.results.items():
        assert outputs[key].dtype == expected.dtype
        assert rel_l2(outputs[key], expected) <= COMPILED_TOL, key


def test_inspect_reports_the_backward_peak_memory():
    c = case("resnet18")
    report = cnncompile.inspect(c.joint)
    summary = report.memory_summary
    assert summary is not None and summary.arena_bytes > 0
    # the backward keeps forward activations alive: the plan needs more than inference does
    inference = cnncompile.inspect(c.graph).memory_summary
    assert summary.arena_bytes > inference.arena_bytes
    assert "arena" in report.format_text(ir=False)


def test_gradient_of_the_classifier_alone_stops_there():
    c = case("lenet5")
    joint = cnncompile.grad(c.graph, "loss", ["f7.weight", "f7.bias"])
    assert {"ConvGradWeight", "ConvTranspose", "AveragePoolGrad"}.isdisjoint(joint.op_counts())
    outputs = ReferenceExecutor(joint).run([c.feeds[v.name] for v in joint.inputs])
    np.testing.assert_allclose(outputs[1], c.results["grad:f7.weight"], rtol=1e-6)
    np.testing.assert_allclose(outputs[2], c.results["grad:f7.bias"], rtol=1e-6)


@pytest.mark.parametrize("name", ["lenet5", "unet"])
def test_input_gradient_matches_torch(name):
    c = case(name)
    joint = cnncompile.grad(c.graph, "loss", ["input"])
    ours = ReferenceExecutor(joint).run([c.feeds[v.name] for v in joint.inputs])[1]
    leaves, outputs = torch_run(c.graph, c.feeds, {"input"})
    outputs[0].backward()
    assert rel_l2(ours, leaves["input"].grad.numpy()) <= TORCH_TOL


def test_an_optimized_graph_differentiates_like_the_imported_one():
    """grad() expands fused ops and drops backend annotations (packed weights name constants that
    become inputs), so even a graph after fusion and the channels-last layout pass works."""
    c = case("resnet18")
    optimized, _ = run_pipeline(c.graph.copy(), opt_level=2,
                                meta={"target": "cpu", "layout": "NHWC"})
    assert "FusedConv" in optimized.op_counts()
    wrt = ["input", "fc.weight", "fc.bias"]
    joint = cnncompile.grad(optimized, "loss", wrt)
    assert not any(n.annotations for n in joint.nodes)
    ours = ReferenceExecutor(joint).run([c.feeds[v.name] for v in joint.inputs])
    reference = cnncompile.grad(c.graph, "loss", wrt)
    expected = ReferenceExecutor(reference).run([c.feeds[v.name] for v in reference.inputs])
    for name, a, b in zip(["loss"] + wrt, ours, expected):
        assert rel_l2(a, b) <= COMPILED_TOL, name
