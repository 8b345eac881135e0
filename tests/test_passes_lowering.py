"""lower_convolutions (algorithm choice by cost model) and the NumPy Winograd reference."""

import numpy as np
import pytest
from onnx import helper

import cnncompile
from cnncompile import zoo
from cnncompile.errors import ShapeError
from cnncompile.ir.graph import Node
from cnncompile.ops import OPS
from cnncompile.ops.conv import Conv
from cnncompile.ops.winograd import (matrices, transform_filter, transform_ops, winograd_conv,
                                     winograd_conv2d)
from cnncompile.passes import PassManager, run_pipeline
from cnncompile.passes.lowering import ALGORITHMS, ConvProblem, choose
from helpers import assert_matches, make_model, rel_l2


# ---- Winograd reference --------------------------------------------------------------------------
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape,pads", [
    ((2, 3, 7, 9), (1, 1, 1, 1)),
    ((1, 2, 5, 5), (0, 0, 0, 0)),
    ((1, 4, 6, 11), (2, 0, 1, 3)),   # asymmetric pads, output not a multiple of the tile
    ((1, 1, 3, 3), (0, 0, 0, 0)),    # a single 1x1 output
])
def test_winograd_is_exact_in_float64(m, shape, pads):
    rng = np.random.default_rng(m * 100 + shape[3])
    x = rng.standard_normal(shape)
    w = rng.standard_normal((5, shape[1], 3, 3))
    b = rng.standard_normal(5)
    expected = Conv.reference(x, w, b, pads=list(pads))
    actual = winograd_conv2d(x, w, pads, m, b)
    assert actual.shape == expected.shape
    assert rel_l2(actual, expected) < 1e-13


def test_winograd_matrices_reconstruct_a_1d_convolution():
    """A^T [(G g) * (B^T d)] is the valid correlation of d with g, for every unit vector d, g."""
    for m in (2, 4):
        at, g, bt = matrices(m)
        alpha = m + 2
        for i in range(alpha):
            for j in range(3):
                d, f = np.eye(alpha)[i], np.eye(3)[j]
                expected = np.array([d[k:k + 3] @ f for k in range(m)])
                np.testing.assert_allclose(at @ ((g @ f) * (bt @ d)), expected, atol=1e-14)


def _float32_errors(channels, size, seed):
    """Relative L2 error of im2col, F(2x2) and F(4x4) in float32 against float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    w = (rng.standard_normal((channels, channels, 3, 3))
         * np.sqrt(2 / (9 * channels))).astype(np.float32)
    pads = [1, 1, 1, 1]
    exact = Conv.reference(x.astype(np.float64), w.astype(np.float64), pads=pads)
    im2col = Conv.reference(x, w, pads=pads)
    f2 = winograd_conv2d(x, w, pads, 2)
    f4 = winograd_conv2d(x, w, pads, 4)
    assert f2.dtype == f4.dtype == np.float32
    return rel_l2(im2col, exact), rel_l2(f2, exact), rel_l2(f4, exact), im2col, f2, f4


@pytest.mark.parametrize("channels,size", [(16, 8), (48, 12)])
def test_winograd_float32_error_per_tile_size(channels, size):
    """The numbers documented in ops/winograd.py: F(2x2) about as accurate as im2col, F(4x4) a
    few times worse, both well within the project's 1e-5."""
    e_im2col, e_f2, e_f4, im2col, f2, f4 = _float32_errors(channels, size, seed=channels)
    assert e_f2 < 3 * e_im2col + 1e-7
    assert e_f2 < 1e-6
    assert e_f4 < 5e-6
    assert e_f4 > 2 * e_f2
    assert_matches(f2, im2col, what="F(2x2) vs Conv.reference")
    assert_matches(f4, im2col, what="F(4x4) vs Conv.reference")


def test_winograd_any_spatial_rank():
    rng = np.random.default_rng(3)
    for shape, pads, m in [((1, 3, 10), [1, 2], 4), ((1, 2, 5, 6, 4), [1, 0, 1, 1, 2, 0], 2)]:
        x = rng.standard_normal(shape)
        w = rng.standard_normal((4, shape[1], *[3] * (len(shape) - 2)))
        actual = winograd_conv(x, transform_filter(w, m), pads, m)
        assert rel_l2(actual, Conv.reference(x, w, pads=pads)) < 1e-13


def test_winograd_transform_costs():
    # input: 2 passes x alpha vectors x nonzeros of B^T; output: (alpha + m) vectors x nnz(A^T)
    assert transform_ops(2) == (2 * 4 * 8, (4 + 2) * 6)
    assert transform_ops(4) == (2 * 6 * 22, (6 + 4) * 18)


def test_winograd_rejects_what_it_cannot_compute():
    x = np.zeros((1, 2, 6, 6), np.float32)
    with pytest.raises(ShapeError, match=r"\[3, 2, 5, 5\]"):
        winograd_conv2d(x, np.zeros((3, 2, 5, 5), np.float32), (0, 0, 0, 0), 2)
    with pytest.raises(ShapeError, match=r"\[1, 2, 6, 6\]"):
        winograd_conv2d(x, np.zeros((3, 4, 3, 3), np.float32), (0, 0, 0, 0), 2)
    with pytest.raises(ValueError, match="F\\(3,3\\)"):
        winograd_conv2d(x, np.zeros((3, 2, 3, 3), np.float32), (0, 0, 0, 0), 3)


# ---- lower_convolutions --------------------------------------------------------------------------
def _conv_graph(op="Conv", channels=8, out_channels=8, size=8, kernel=3, group=1, rank=2,
                **attrs):
    rng = np.random.default_rng(channels + out_channels + size)
    if op == "ConvTranspose":
        w_shape = (channels, out_channels // group, *[kernel] * rank)
    else:
        w_shape = (out_channels, channels // group, *[kernel] * rank)
    w = rng.standard_normal(w_shape).astype(np.float32)
    node = helper.make_node(op, ["x", "w"], ["y"], name="c", group=group, **attrs)
    model = make_model(node, {"x": (np.float32, (1, channels, *[size] * rank))}, ["y"],
                       {"w": w})
    return cnncompile.import_onnx(model)


def _lowered(graph):
    manager = PassManager(passes=["lower_convolutions"], verify=True)
    return manager.run(graph), manager.records[0].summary


@pytest.mark.parametrize("case,expected", [
    (dict(kernel=1), "gemm_1x1"),
    (dict(channels=64, out_channels=64, kernel=1, size=4), "gemm_1x1"),
    (dict(channels=32, out_channels=32, kernel=1, strides=[2, 2]), "im2col_gemm"),
    (dict(channels=4, out_channels=4, kernel=1, strides=[2, 2]), "direct"),
    (dict(channels=8, out_channels=8, group=8), "depthwise"),
    (dict(channels=8, out_channels=8, group=8, kernel=5, pads=[2, 2, 2, 2]), "depthwise"),
    (dict(channels=8, out_channels=16, group=8), "grouped"),
    (dict(channels=8, out_channels=8, group=2), "grouped"),
    (dict(channels=32, out_channels=32, size=32, pads=[1, 1, 1, 1]), "winograd_f4x4_3x3"),
    # 9 F(4x4) tiles make GEMMs too short: F(2x2) has 25
    (dict(channels=32, out_channels=32, size=10, pads=[1, 1, 1, 1]), "winograd_f2x2_3x3"),
    # 16 positions: a short GEMM either way, and F(2x2) adds its transforms
    (dict(channels=32, out_channels=32, size=4, pads=[1, 1, 1, 1]), "im2col_gemm"),
    (dict(channels=16, out_channels=16, size=64, pads=[1, 1, 1, 1]), "winograd_f4x4_3x3"),
    (dict(channels=8, out_channels=16, size=64, pads=[1, 1, 1, 1]), "im2col_gemm"),
    (dict(channels=3, out_channels=32, size=10, pads=[1, 1, 1, 1]), "im2col_gemm"),
    (dict(channels=32, out_channels=32, size=10, strides=[2, 2]), "im2col_gemm"),
    (dict(channels=32, out_channels=32, size=10, dilations=[2, 2]), "im2col_gemm"),
    (dict(channels=1, out_channels=4, size=12, kernel=3), "direct"),
    (dict(channels=32, out_channels=32, size=40, rank=1), "im2col_gemm"),
    (dict(op="ConvTranspose", channels=8, out_channels=4, kernel=2, strides=[2, 2]),
     "transposed"),
])
def test_algorithm_choice(case, expected):
    graph, summary = _lowered(_conv_graph(**case))
    node = graph.nodes[0]
    assert node.annotations["algorithm"] == expected, node.annotations["_reason"]
    assert summary == f"conv algorithms: 1 {expected}"
    assert node.annotations["_macs"] * 2 == OPS[node.op].flops(
        [v.type for v in node.inputs], [v.type for v in node.outputs], **node.attrs)
    assert f"{node.inputs[0].shape[1]}->{node.outputs[0].shape[1]} channels" in (
        node.annotations["_reason"])


def test_streamed_weights_favour_the_smaller_copy():
    """ResNet's 512-channel 7x7 layer at batch 1: F(2x2) while the weights stay in cache, im2col
    (its W is 16/9 times smaller than F(2x2)'s) when every run reads them from memory."""
    from cnncompile.passes.lowering import ConvProblem, choose

    shape = dict(op="Conv", batch=1, channels=512, out_channels=512, group=1, kernel=(3, 3),
                 strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1), in_spatial=(7, 7),
                 out_spatial=(7, 7))
    cached, _, _ = choose(ConvProblem(**shape))
    streamed, reason, costs = choose(ConvProblem(**shape, streamed=True))
    assert (cached, streamed) == ("winograd_f2x2_3x3", "im2col_gemm")
    assert "weights read from memory every run" in reason
    # at batch 8 the same weights serve 8x the tiles: Winograd again
    assert choose(ConvProblem(**dict(shape, batch=8), streamed=True))[0] == "winograd_f2x2_3x3"


def test_large_models_stream_their_weights():
    small = _lowered(_conv_graph(channels=64, out_channels=64, size=7, pads=[1, 1, 1, 1]))[0]
    large = _lowered(_conv_graph(channels=768, out_channels=768, size=7, pads=[1, 1, 1, 1]))[0]
    assert "weights read from memory" not in small.nodes[0].annotations["_reason"]
    assert "weights read from memory" in large.nodes[0].annotations["_reason"]


def test_reason_records_shapes_and_multiply_counts():
    graph, _ = _lowered(_conv_graph(channels=64, out_channels=64, size=16, pads=[1, 1, 1, 1]))
    node = graph.nodes[0]
    reason = node.annotations["_reason"]
    # direct: 256 outputs x 64 x 64 x 9 = 9.44M MACs; F(4x4): 16 tiles x 36 x 64 x 64 = 2.36M;
    # F(2x2): 64 tiles x 16 x 64 x 64 = 4.19M
    assert "3x3 Conv stride 1x1, 64->64 channels, 16x16->16x16" in reason
    assert "direct 9.44M MACs" in reason
    assert "F(4x4,3x3) 2.36M multiplies (4.00x fewer)" in reason
    assert "F(2x2,3x3) 4.19M multiplies (2.25x fewer)" in reason
    costs = node.annotations["_cost"]
    assert set(costs) == {"direct", "im2col_gemm", "winograd_f2x2_3x3", "winograd_f4x4_3x3"}
    assert min(costs, key=costs.get) == node.annotations["algorithm"] == "winograd_f4x4_3x3"
    # the reason is not printed in the one-line IR, the algorithm is
    assert "algorithm='winograd_f4x4_3x3'" in str(graph)
    assert "multiplies" not in str(graph)


def test_tiny_channels_say_why_winograd_was_skipped():
    graph, _ = _lowered(_conv_graph(channels=4, out_channels=16, pads=[1, 1, 1, 1]))
    assert "4 input channels < 8" in graph.nodes[0].annotations["_reason"]


def test_fused_conv_is_lowered_like_conv():
    graph = _conv_graph(channels=32, out_channels=32, size=32, pads=[1, 1, 1, 1])
    conv = graph.nodes[0]
    attrs = OPS["FusedConv"].normalize({**conv.attrs, "activation": "Relu"},
                                       [v.type for v in conv.inputs], graph.opset)
    graph.nodes[0] = Node("FusedConv", conv.inputs, conv.outputs, attrs, conv.name)
    graph, summary = _lowered(graph)
    assert graph.nodes[0].annotations["algorithm"] == "winograd_f4x4_3x3"
    assert summary == "conv algorithms: 1 winograd_f4x4_3x3"


def test_symbolic_batch_is_costed_per_image():
    problem = ConvProblem("Conv", 1, 16, 16, 1, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (8, 8),
                          (8, 8))
    algorithm, reason, costs = choose(problem)
    assert algorithm in ALGORITHMS and "batch" not in reason
    batched = ConvProblem(**{**problem.__dict__, "batch": 4})
    assert choose(batched)[2]["direct"] == pytest.approx(4 * costs["direct"])


ZOO = [("lenet5", 32), ("alexnet", 64), ("vgg11", 32), ("resnet18", 64), ("resnet50", 32),
       ("mobilenetv2", 64), ("squeezenet", 64), ("inception_block", 16),
       ("densenet_block", 16), ("unet", 64), ("yolo_head", 64)]


@pytest.mark.parametrize("name,size", ZOO, ids=[z[0] for z in ZOO])
def test_every_zoo_conv_gets_a_valid_algorithm(name, size):
    kw = {"num_classes": 10} if name in ("alexnet", "vgg11") else {}
    model = zoo.build(name, image_size=size, **kw)
    graph = cnncompile.import_onnx(model, input_shapes=zoo.input_shapes(model))
    before = str(graph)
    lowered, summary = _lowered(graph)
    convs = [n for n in lowered.nodes if n.op in ("Conv", "ConvTranspose")]
    assert convs
    tally = {}
    for node in convs:
        algorithm = node.annotations["algorithm"]
        assert algorithm in ALGORITHMS
        assert node.annotations["_reason"]
        tally[algorithm] = tally.get(algorithm, 0) + 1
        if algorithm.startswith("winograd"):
            assert node.attrs["kernel_shape"] == [3, 3] and node.attrs["strides"] == [1, 1]
            assert node.attrs["dilations"] == [1, 1] and node.attrs["group"] == 1
        if node.op == "ConvTranspose":
            assert algorithm == "transposed"
    for algorithm, n in tally.items():
        assert f"{n} {algorithm}" in summary
    # annotations only: the printed IR without them is unchanged
    for node in lowered.nodes:
        node.annotations.clear()
    assert str(lowered) == before


def test_resnet18_pipeline_annotates_every_fused_conv():
    model = zoo.build("resnet18", image_size=32)
    graph = cnncompile.import_onnx(model, input_shapes=zoo.input_shapes(model))
    optimized, manager = run_pipeline(graph, opt_level=2, verify_each=True)
    convs = [n for n in optimized.nodes if n.op in ("Conv", "FusedConv")]
    assert len(convs) == 20
    assert all(n.annotations["algorithm"] in ALGORITHMS for n in convs)
    record = next(r for r in manager.records if r.name == "lower_convolutions")
    assert record.summary.startswith("conv algorithms: ")
    assert sum(int(part.split()[0]) for part in record.summary[17:].split(", ")) == 20
