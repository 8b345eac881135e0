"""Shape subgraphs of models exported with dynamic axes fold away once input_shapes fixes them.

The models below are built the way torch.onnx.export writes them for ``x.view(x.size(0), -1)``,
``F.interpolate(x, size=(2 * H, 2 * W))`` and ``x + torch.arange(W)``: the sizes are read with
Shape, picked with Gather/Slice, turned into tensors with Unsqueeze/Concat/Cast/Mul, and fed to
Reshape, Resize and Range.
"""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import cnncompile
from cnncompile.errors import NotConstantError, ShapeError
from helpers import assert_matches, run_ort

SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Slice", "Cast", "Mul", "Range",
             "ConstantOfShape", "Squeeze", "Expand"}


def constant(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.asarray(array), name))


def dynamic_model(opset: int):
    """x: [N, C, H, W] with every axis dynamic; three outputs, each behind a shape subgraph."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        # flat = x.view(N, -1)
        constant("zero", np.array(0, np.int64)),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        constant("minus_one", np.array([-1], np.int64)),
        helper.make_node("Concat", ["n_1d", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        # up = interpolate(x, size=(2H, 2W)), sizes = concat(shape[:2], int(float(shape[2:]) * 2))
        helper.make_node("Slice", ["shape", "s_start", "s_end"], ["hw"]),
        helper.make_node("Cast", ["hw"], ["hw_f"], to=TensorProto.FLOAT),
        constant("two", np.array([2.0, 2.0], np.float32)),
        helper.make_node("Mul", ["hw_f", "two"], ["hw2_f"]),
        helper.make_node("Cast", ["hw2_f"], ["hw2"], to=TensorProto.INT64),
        helper.make_node("Slice", ["shape", "nc_start", "nc_end"], ["nc"]),
        helper.make_node("Concat", ["nc", "hw2"], ["sizes"], axis=0),
        helper.make_node("Resize", ["x", "roi", "scales", "sizes"], ["up"], mode="nearest"),
        # ramp = x + arange(W) (a float Range, folded with its dtype)
        constant("three", np.array(3, np.int64)),
        helper.make_node("Gather", ["shape", "three"], ["w"], axis=0),
        helper.make_node("Cast", ["w"], ["w_f"], to=TensorProto.FLOAT),
        constant("r0", np.array(0.0, np.float32)),
        constant("r1", np.array(1.0, np.float32)),
        helper.make_node("Range", ["r0", "w_f", "r1"], ["ramp"]),
        helper.make_node("Add", ["x", "ramp"], ["shifted"]),
    ]
    if opset >= 13:
        nodes.insert(3, helper.make_node("Unsqueeze", ["n", "axes0"], ["n_1d"]))
    else:
        nodes.insert(3, helper.make_node("Unsqueeze", ["n"], ["n_1d"], axes=[0]))
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in {
        "s_start": np.array([2], np.int64), "s_end": np.array([4], np.int64),
        "nc_start": np.array([0], np.int64), "nc_end": np.array([2], np.int64),
        "axes0": np.array([0], np.int64), "roi": np.array([], np.float32),
        "scales": np.array([], np.float32)}.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "H", "W"])
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            for name in ("flat", "up", "shifted")]
    graph = helper.make_graph(nodes, "dynamic", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 6, 6)])
def test_shape_subgraphs_fold_to_constants(opset, shape):
    model = dynamic_model(opset)
    mod = cnncompile.compile(model, input_shapes={"x": shape})
    ops = [node.op for node in mod.graph.nodes]
    assert sorted(ops) == ["Add", "Reshape", "Resize"]
    assert not SHAPE_OPS & set(ops)
    n, c, h, w = shape
    types = {v.name: v.type.shape for v in mod.graph.outputs}
    assert types == {"flat": (n, c * h * w), "up": (n, c, 2 * h, 2 * w), "shifted": shape}
    reshape = next(node for node in mod.graph.nodes if node.op == "Reshape")
    assert reshape.attrs["shape"] == [n, -1]

    x = np.random.default_rng(opset).standard_normal(shape).astype(np.float32)
    ours = mod.run({"x": x})
    for name, expected in zip(["flat", "up", "shifted"], run_ort(model, {"x": x})):
        assert_matches(ours[name], expected, what=name)


def test_without_input_shapes_the_error_lists_every_dynamic_axis():
    with pytest.raises(ShapeError) as info:
        cnncompile.compile(dynamic_model(13))
    message = str(info.value)
    for axis, name in enumerate("NCHW"):
        assert f"input 'x' axis {axis} ('{name}')" in message
    assert "input_shapes={'x': (1, <C>, <H>, <W>)}" in message


def test_partly_fixed_input_shapes_list_the_rest():
    model = dynamic_model(13)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    with pytest.raises(ShapeError) as info:
        cnncompile.compile(model)
    message = str(info.value)
    assert "axis 1" not in message
    assert "input 'x' axis 2 ('H')" in message and "input 'x' axis 3 ('W')" in message


def reshape_by_input_model():
    """y = Reshape(x, target) where target is a graph input, not a constant."""
    nodes = [helper.make_node("Reshape", ["x", "target"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
              helper.make_tensor_value_info("target", TensorProto.INT64, [2])]
    graph = helper.make_graph(nodes, "reshape_by_input", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_non_constant_reshape_shape_names_the_graph_input():
    with pytest.raises(NotConstantError) as info:
        cnncompile.compile(reshape_by_input_model())
    assert info.value.graph_inputs == ["target"]
    message = str(info.value)
    assert "'shape' (target) must be known at compile time" in message
    assert "graph input(s) 'target'" in message
    assert "constant_inputs=" in message


def test_constant_inputs_bind_the_shape():
    model = reshape_by_input_model()
    target = np.array([6, -1], np.int64)
    mod = cnncompile.compile(model, constant_inputs={"target": target})
    assert mod.input_names == ["x"]
    assert [node.op for node in mod.graph.nodes] == ["Reshape"]
    x = np.random.default_rng(7).standard_normal((2, 3, 4)).astype(np.float32)
    (expected,) = run_ort(model, {"x": x, "target": target})
    assert_matches(mod.run({"x": x})["y"], expected)
    assert expected.shape == (6, 4)


def test_shape_computed_from_a_graph_input_names_it():
    """The shape flows from a second input through Concat: the error still names that input."""
    nodes = [helper.make_node("Concat", ["lead", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
              helper.make_tensor_value_info("lead", TensorProto.INT64, [1])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([-1], np.int64), "rest")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with pytest.raises(NotConstantError) as info:
        cnncompile.compile(model)
    assert info.value.graph_inputs == ["lead"]
    mod = cnncompile.compile(model, constant_inputs={"lead": np.array([4], np.int64)})
    assert mod.graph.outputs[0].type.shape == (4, 6)
