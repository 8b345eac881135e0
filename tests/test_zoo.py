"""The model zoo: every model is valid ONNX, and cnncompile matches onnxruntime on it."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import onnx
import pytest
from onnx import helper

import cnncompile
from cnncompile import zoo
from cnncompile.errors import ShapeError, UserError
from helpers import assert_matches, check_against_ort, run_ort

# Small sizes keep the file fast; where cheap, large enough that the last stage is not 1x1.
CASES = [
    ("lenet5", 32, {}),
    ("alexnet", 64, {"num_classes": 10}),
    ("vgg11", 32, {"num_classes": 10}),
    ("resnet18", 64, {}),
    ("resnet50", 32, {}),
    ("mobilenetv2", 64, {}),
    ("squeezenet", 64, {}),
    ("inception_block", 16, {}),
    ("densenet_block", 16, {}),
    ("unet", 64, {}),
    ("yolo_head", 64, {"num_classes": 8}),
]


def test_cases_cover_the_whole_zoo():
    assert sorted(name for name, _, _ in CASES) == sorted(zoo.MODELS)


def _assert_activations_order_one(model, feeds):
    """He-scaled weights and calibrated BatchNormalization keep every intermediate tensor O(1)
    (the YOLO head's decoded boxes are in pixels and are left out)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    nodes = [n for n in probe.graph.node if not n.name.startswith("detect.")]
    for node in nodes:
        probe.graph.output.append(helper.make_empty_tensor_value_info(node.output[0]))
    for node, value in zip(nodes, run_ort(probe, feeds)):
        rms = float(np.sqrt(np.mean(np.square(value, dtype=np.float64))))
        assert 0.1 < rms < 10, f"{node.name}: rms {rms:.3g}"


@pytest.mark.parametrize("name,size,kw", CASES, ids=[c[0] for c in CASES])
def test_model_is_valid_and_matches_onnxruntime(name, size, kw):
    model = zoo.build(name, image_size=size, seed=1, **kw)
    onnx.checker.check_model(model, full_check=True)
    feeds = zoo.random_inputs(model, seed=len(name))
    _assert_activations_order_one(model, feeds)
    outputs = check_against_ort(model, feeds)
    for out in outputs:
        assert np.all(np.isfinite(out))
        assert out.std() > 0


@pytest.mark.parametrize("name", ["mobilenetv2", "yolo_head"])
def test_batch_two_and_opset_17(name):
    model = zoo.build(name, batch=2, image_size=64, seed=3, opset=17)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    feeds = zoo.random_inputs(model, seed=5)
    assert feeds["input"].shape == (2, 3, 64, 64)
    outputs = check_against_ort(model, feeds)
    for out in outputs:
        assert out.shape[0] == 2
        assert not np.allclose(out[0], out[1])


def test_batch_axis_is_dynamic():
    model = zoo.build("resnet18", batch=4, image_size=32)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert zoo.input_shapes(model) == {"input": (4, 3, 32, 32)}
    assert zoo.input_shapes(model, batch=1) == {"input": (1, 3, 32, 32)}
    with pytest.raises(ShapeError, match="'N'"):
        cnncompile.compile(model)
    # the same model compiled for two batch sizes
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    mod = cnncompile.compile(model, input_shapes={"input": x.shape})
    one = cnncompile.compile(model, input_shapes={"input": (1, 3, 32, 32)})
    assert_matches(mod(x)[1:2], one(x[1:2]), what="batch item 1 of 3 vs alone")


def test_default_sizes_and_descriptions():
    assert zoo.default_image_size("resnet18") == 224
    assert zoo.default_image_size("lenet5") == 32
    assert zoo.default_image_size("unet") <= 256
    for name in zoo.MODELS:
        assert zoo.describe(name)
    model = zoo.build("lenet5")
    assert zoo.input_shapes(model) == {"input": (1, 1, 32, 32)}


def test_same_seed_same_model_other_seed_other_weights():
    a = zoo.build("squeezenet", image_size=32, seed=0)
    b = zoo.build("squeezenet", image_size=32, seed=0)
    c = zoo.build("squeezenet", image_size=32, seed=1)
    assert a.SerializeToString() == b.SerializeToString()
    wa = onnx.numpy_helper.to_array(a.graph.initializer[0])
    wc = onnx.numpy_helper.to_array(c.graph.initializer[0])
    assert wa.shape == wc.shape and not np.array_equal(wa, wc)


def _ops(model):
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _attr(node, name):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_structure_follows_the_papers():
    resnet18 = zoo.build("resnet18", image_size=32)
    names = [n.name for n in resnet18.graph.node]
    assert len(set(names)) == len(names) and all(names)
    expected = {"conv1", "bn1", "layer1.0.conv1", "layer4.1.bn2", "layer2.0.downsample.0", "fc"}
    assert expected <= set(names)
    ops = _ops(resnet18)
    assert ops["Conv"] == 20 and ops["BatchNormalization"] == 20 and ops["Add"] == 8

    ops = _ops(zoo.build("resnet50", image_size=32))
    assert ops["Conv"] == 53 and ops["BatchNormalization"] == 53 and ops["Add"] == 16

    mobilenet = zoo.build("mobilenetv2", image_size=32)
    depthwise = [n for n in mobilenet.graph.node if n.op_type == "Conv" and _attr(n, "group") > 1]
    assert len(depthwise) == 17
    clips = [n for n in mobilenet.graph.node if n.op_type == "Clip"]
    assert clips and all(len(n.input) == 3 for n in clips)

    assert _ops(zoo.build("squeezenet", image_size=32))["Concat"] == 8
    assert _ops(zoo.build("inception_block"))["Concat"] == 1
    assert _ops(zoo.build("densenet_block", image_size=16))["Concat"] == 6

    unet = _ops(zoo.build("unet", image_size=32))
    assert unet["ConvTranspose"] == 4 and unet["Concat"] == 4

    yolo = zoo.build("yolo_head", image_size=64, num_classes=8)
    ops = _ops(yolo)
    assert {"Resize", "Split", "Concat", "Sigmoid", "Mul", "Reshape", "Transpose"} <= set(ops)
    resize = next(n for n in yolo.graph.node if n.op_type == "Resize")
    assert resize.input[1] == "" and resize.input[2]
    shapes = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
              for o in yolo.graph.output}
    anchors = 3 * (8 * 8 + 4 * 4 + 2 * 2)
    assert shapes == {"boxes": ["N", anchors, 4], "scores": ["N", anchors, 8]}


def test_save_and_compile_from_path(tmp_path):
    path = tmp_path / "lenet5.onnx"
    model = zoo.save("lenet5", path, seed=4)
    assert path.stat().st_size > 0
    loaded = onnx.load(str(path))
    assert loaded.SerializeToString() == model.SerializeToString()
    feeds = zoo.random_inputs(loaded, seed=4)
    mod = cnncompile.compile(str(path), input_shapes=zoo.input_shapes(loaded))
    assert_matches(mod.run(feeds)["logits"], run_ort(loaded, feeds)[0], what="logits")


def test_bad_requests_are_user_errors():
    with pytest.raises(UserError, match="resnet18"):
        zoo.build("resnet19")
    with pytest.raises(UserError, match="num_classes"):
        zoo.build("resnet18", image_size=32, classes=10)
    with pytest.raises(ShapeError, match="multiple of 16"):
        zoo.build("unet", image_size=40)
    with pytest.raises(ShapeError, match="multiple of 32"):
        zoo.build("yolo_head", image_size=48)
    with pytest.raises(ShapeError, match="too small"):
        zoo.build("alexnet", image_size=32)
    with pytest.raises(UserError, match="opset"):
        zoo.build("lenet5", opset=11)


def _demo_module():
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("cnncompile_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs_and_agrees_with_onnxruntime(capsys, tmp_path):
    demo = _demo_module()
    assert demo.main(["--model", "lenet5", "--out", str(tmp_path), "--repeat", "1"]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "lenet5.onnx").is_file()
    for expected in ("input: f32[1,1,32,32]", "logits: f32[1,10]", "Conv x3", "top-5",
                     "relative L2", "top-5 agrees"):
        assert expected in text, text
    assert demo.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in zoo.MODELS)
