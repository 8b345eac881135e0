"""The IR itself: printing, verification, views, and the errors a user sees."""

import numpy as np
import onnx
import pytest
from onnx import helper

import cnncompile
from cnncompile.errors import (InputError, ModelLoadError, ShapeError, UnsupportedOperatorError,
                               VerificationError)
from helpers import check_against_ort, make_model


def _add_sqrt_model(batch="N"):
    nodes = [helper.make_node("Add", ["x", "b"], ["t"], name="add1"),
             helper.make_node("Sqrt", ["t"], ["y"], name="sq")]
    return make_model(nodes, {"x": (np.float32, [batch, 4])}, ["y"],
                      {"b": np.ones(4, np.float32)})


def test_printer_one_line_per_node_with_origins():
    mod = cnncompile.compile(_add_sqrt_model(), input_shapes={"x": (2, 4)}, opt_level=0)
    text = str(mod.graph)
    assert "%t: f32[2,4] = Add(%x, %b)  # from 'add1'" in text
    assert "%y: f32[2,4] = Sqrt(%t)  # from 'sq'" in text
    assert text == str(mod.graph)  # stable


def test_unresolved_dynamic_dims_error_shows_fix():
    with pytest.raises(ShapeError) as info:
        cnncompile.compile(_add_sqrt_model())
    msg = str(info.value)
    assert "input 'x' axis 0 ('N')" in msg
    assert "input_shapes={'x': (1, 4)}" in msg and "--shape x=1x4" in msg


def test_run_matches_onnxruntime():
    rng = np.random.default_rng(0)
    x = rng.random((3, 4), dtype=np.float32)
    check_against_ort(_add_sqrt_model(), {"x": x})


def test_positional_call_and_input_errors():
    mod = cnncompile.compile(_add_sqrt_model(2))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(mod(x), np.sqrt(x + 1))
    with pytest.raises(InputError, match="dtype float64, expected float32"):
        mod(x.astype(np.float64))
    with pytest.raises(InputError, match=r"shape \[3, 4\], expected \[2, 4\]"):
        mod(np.ones((3, 4), np.float32))
    with pytest.raises(InputError, match="missing input"):
        mod.run({})


def test_unknown_operator_names_node_and_lists_supported():
    model = make_model(helper.make_node("Frobnicate", ["x"], ["y"], name="f1"),
                       {"x": (np.float32, [1])}, ["y"])
    with pytest.raises(UnsupportedOperatorError) as info:
        cnncompile.compile(model)
    assert "node 'f1'" in str(info.value) and "'Frobnicate'" in str(info.value)
    assert "Supported operators:" in str(info.value) and "Add" in str(info.value)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        cnncompile.compile(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ModelLoadError):
        cnncompile.compile(bad)


def test_verifier_prints_ir_around_offending_node():
    mod = cnncompile.compile(_add_sqrt_model(2), opt_level=0)
    g = mod.graph.copy()
    g.nodes.reverse()  # Sqrt now reads %t before Add defines it
    with pytest.raises(VerificationError) as info:
        g.verify()
    msg = str(info.value)
    assert "used before it is defined" in msg and "--> " in msg and "Sqrt(%t)" in msg


def test_networkx_and_dot_views():
    mod = cnncompile.compile(_add_sqrt_model(2), opt_level=0)
    nxg = mod.graph.to_networkx()
    assert nxg.number_of_edges() == 3  # x->Add, Add->Sqrt, Sqrt->output
    dot = mod.graph.to_dot()
    assert dot.startswith('digraph "test"') and "Sqrt" in dot


def test_external_data_outside_model_folder_is_refused(tmp_path):
    model = _add_sqrt_model(2)
    init = model.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.ClearField("raw_data")
    init.ClearField("float_data")
    entry = init.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        cnncompile.compile(path)
