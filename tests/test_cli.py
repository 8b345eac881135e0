"""The command line (`cnncompile run` / `cnncompile info`) and the analysis behind `info`."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

import cnncompile
from cnncompile import analysis
from cnncompile.cli import INTERNAL_PREFIX, main, random_array
from cnncompile.ops import OPS
from helpers import make_model


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _save(tmp_path, model, name="model.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _add_sqrt_mul(batch="N"):
    """x -> t = x + b -> y = sqrt(t) -> z = t * y; outputs y and z."""
    nodes = [helper.make_node("Add", ["x", "b"], ["t"], name="add1"),
             helper.make_node("Sqrt", ["t"], ["y"], name="sq"),
             helper.make_node("Mul", ["t", "y"], ["z"], name="mul")]
    return make_model(nodes, {"x": (np.float32, [batch, 4])}, ["y", "z"],
                      {"b": np.full(4, 3.0, np.float32)})


def _chain(n=4, size=1000):
    """x -> Sqrt -> Sqrt -> ... (n nodes): peak live memory stays at three buffers."""
    names = ["x"] + [f"v{i}" for i in range(1, n)] + ["y"]
    nodes = [helper.make_node("Abs", [a], [b], name=f"abs{i}")
             for i, (a, b) in enumerate(zip(names, names[1:]))]
    return make_model(nodes, {"x": (np.float32, [size])}, ["y"])


# ---- run -----------------------------------------------------------------------------------------
def test_run_random_inputs_prints_outputs_and_timings(tmp_path, capsys):
    path = _save(tmp_path, _add_sqrt_mul())
    code, out, err = cli(capsys, "run", path, "--shape", "x=2x4", "--seed", "3")
    assert code == 0, err
    assert err == ""
    assert "x  f32[2,4]  random normal (seed 3)" in out
    for name in ("y", "z"):
        line = next(ln for ln in out.splitlines() if ln.split()[:2] == [name, "f32[2,4]"])
        assert len(line.split()) == 5  # name, type, min, max, mean
    assert "compile" in out and " s, run " in out
    # the same seed gives the same numbers, another seed others
    assert cli(capsys, "run", path, "--shape", "x=2x4", "--seed", "3")[1] \
        .split("time")[0] == out.split("time")[0]
    assert cli(capsys, "run", path, "--shape", "x=2x4", "--seed", "4")[1] \
        .split("time")[0] != out.split("time")[0]


def test_run_random_inputs_saved_match_python_api(tmp_path, capsys):
    path = _save(tmp_path, _add_sqrt_mul())
    code, out, err = cli(capsys, "run", path, "--shape", "x=2x4", "--seed", "5",
                         "--output", tmp_path / "out")
    assert code == 0, err
    assert f"saved    2 output(s) to {tmp_path / 'out.npz'}" in out
    mod = cnncompile.compile(str(path), input_shapes={"x": (2, 4)})
    x = random_array(np.random.default_rng(5), mod.graph.inputs[0].type)
    expected = mod.run({"x": x})
    with np.load(tmp_path / "out.npz") as saved:
        assert sorted(saved.files) == ["y", "z"]
        for name in ("y", "z"):
            np.testing.assert_array_equal(saved[name], expected[name])
    np.testing.assert_allclose(expected["y"], np.sqrt(x + 3), rtol=1e-6)


def test_run_input_npy_output_npz_matches_python_api(tmp_path, capsys):
    rng = np.random.default_rng(11)
    x = rng.random((3, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    path = _save(tmp_path, _add_sqrt_mul())
    # the .npy fixes the dynamic batch axis by itself: no --shape needed
    code, out, err = cli(capsys, "run", path, "--input", f"x={tmp_path / 'x.npy'}",
                         "--output", tmp_path / "out.npz", "--target", "cpu", "--opt-level", "1")
    assert code == 0, err
    assert "f32[3,4]" in out and "x.npy" in out
    expected = cnncompile.compile(str(path), input_shapes={"x": (3, 4)}).run({"x": x})
    with np.load(tmp_path / "out.npz") as saved:
        for name in ("y", "z"):
            np.testing.assert_array_equal(saved[name], expected[name])
    # the printed stats are those of the outputs
    z_line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["z"]).split()
    assert float(z_line[2]) == pytest.approx(expected["z"].min(), rel=1e-5)
    assert float(z_line[3]) == pytest.approx(expected["z"].max(), rel=1e-5)
    assert float(z_line[4]) == pytest.approx(expected["z"].mean(), rel=1e-5)


def test_run_output_named_file_and_int_bool_inputs(tmp_path, capsys):
    # numpy.savez cannot take a keyword 'file'; integer/bool inputs get random data of their dtype
    nodes = [helper.make_node("Cast", ["m"], ["mi"], to=onnx.TensorProto.INT64, name="cast"),
             helper.make_node("Add", ["i", "mi"], ["file"], name="add")]
    model = make_model(nodes, {"i": (np.int64, [5]), "m": (np.bool_, [5])}, ["file"])
    path = _save(tmp_path, model)
    code, out, err = cli(capsys, "run", path, "--output", tmp_path / "o.npz")
    assert code == 0, err
    rng = np.random.default_rng(0)
    i = random_array(rng, cnncompile.TensorType(np.int64, (5,)))
    m = random_array(rng, cnncompile.TensorType(np.bool_, (5,)))
    assert i.dtype == np.int64 and m.dtype == np.bool_ and ((i >= 0) & (i < 10)).all()
    with np.load(tmp_path / "o.npz") as saved:
        np.testing.assert_array_equal(saved["file"], i + m)


# ---- info ----------------------------------------------------------------------------------------
def test_info_text(tmp_path, capsys):
    path = _save(tmp_path, _add_sqrt_mul())
    code, out, err = cli(capsys, "info", path, "--shape", "x=2x4")
    assert code == 0, err
    assert "graph    'test', opset 17" in out
    assert "inputs   x: f32[2,4]" in out
    assert "outputs  y: f32[2,4], z: f32[2,4]" in out
    assert "nodes    3: Add 1, Mul 1, Sqrt 1" in out
    assert "params   4 (16 B)" in out
    assert "(24 FLOPs)" in out  # one FLOP per output element of Add, Sqrt, Mul
    assert "activations 128 B naive, 128 B peak live (during 'mul')" in out
    rows = [ln.split() for ln in out.splitlines()]
    assert ["add1", "Add", "f32[2,4]", "4", "0.000"] in rows
    assert ["total", "4", "0.000"] in rows


def test_info_json_and_peak_memory(tmp_path, capsys):
    path = _save(tmp_path, _chain(n=4, size=1000))
    code, out, err = cli(capsys, "info", path, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1000],
                              "type": "f32[1000]"}]
    assert doc["op_counts"] == {"Abs": 4} and doc["nodes"] == 4
    assert [row["name"] for row in doc["layers"]] == ["abs0", "abs1", "abs2", "abs3"]
    assert doc["flops"]["total"] == 4000
    mem = doc["activation_memory"]
    # naive: the input and 4 outputs; peak: input + the buffer being read + the one being written
    assert mem["naive_bytes"] == 5 * 4000
    assert mem["peak_bytes"] == 3 * 4000
    assert mem["peak_node"] == "abs1"


def test_analysis_frees_unread_outputs_and_counts_shared_params():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop"),
             helper.make_node("Mul", ["d", "w"], ["a"], name="m1"),
             helper.make_node("Mul", ["a", "w"], ["y"], name="m2")]
    model = make_model(nodes, {"x": (np.float32, [10, 10])}, ["y"],
                       {"w": np.ones((10, 10), np.float32)})
    summary = analysis.summarize(cnncompile.import_onnx(model))
    assert summary.parameters == 100 and summary.parameter_bytes == 400
    assert [r.params for r in summary.layers] == [0, 100, 100]
    assert [r.flops for r in summary.layers] == [0, 100, 100]
    mem = summary.memory
    assert mem.naive_bytes == 400 + 400 + 100 + 400 + 400   # x, d, mask, a, y
    # the mask is never read, so it is freed right after Dropout (x, d, mask: 900 B); m1 then
    # holds x, d and a (1200 B); d dies after m1, so m2 holds x, a and y (1200 B, not more)
    assert mem.peak_bytes == 1200 and mem.peak_node == "m1"
    doc = summary.to_dict()
    assert doc["parameters"] == {"count": 100, "bytes": 400}
    json.dumps(doc)


# ---- errors --------------------------------------------------------------------------------------
def test_missing_model_file_exit_1(tmp_path, capsys):
    for command in ("run", "info"):
        code, out, err = cli(capsys, command, tmp_path / "nope.onnx")
        assert code == 1
        assert err == f"error: model file '{tmp_path / 'nope.onnx'}' does not exist\n"
        assert "Traceback" not in err


def test_unsupported_op_exit_1(tmp_path, capsys):
    model = make_model(helper.make_node("Frobnicate", ["x"], ["y"], name="f1"),
                       {"x": (np.float32, [1])}, ["y"])
    path = _save(tmp_path, model)
    code, out, err = cli(capsys, "info", path)
    assert code == 1
    assert err.startswith("error: node 'f1': operator 'Frobnicate'") and err.count("\n") == 1
    assert "Traceback" not in err


def test_unresolved_dynamic_dims_exit_1_shows_shape_fix(tmp_path, capsys):
    path = _save(tmp_path, _add_sqrt_mul())
    for command in ("run", "info"):
        code, out, err = cli(capsys, command, path)
        assert code == 1
        assert err.startswith("error: the model has dynamic dimensions")
        assert "input 'x' axis 0 ('N')" in err and "--shape x=1x4" in err
        assert "Traceback" not in err


@pytest.mark.parametrize("spec", ["x=1xq", "x1x4", "=1x4", "x=", "x=1x-4"])
def test_malformed_shape_exit_2(tmp_path, capsys, spec):
    path = _save(tmp_path, _add_sqrt_mul())
    code, out, err = cli(capsys, "run", path, "--shape", spec)
    assert code == 2
    assert "argument --shape" in err and "e.g. --shape" in err and "1x3x224x224" in err
    assert "Traceback" not in err


def test_bad_usage_exit_2(tmp_path, capsys):
    path = _save(tmp_path, _add_sqrt_mul(2))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    np.savez(tmp_path / "arch.npz", x=np.ones((2, 4), np.float32))
    cases = [
        (["--input", f"x={tmp_path / 'missing.npy'}"], "no such file"),
        (["--input", f"x={tmp_path / 'junk.npy'}"], "not a .npy file"),
        (["--input", f"x={tmp_path / 'arch.npz'}"], "is an .npz archive"),
        (["--input", "x.npy"], "is not NAME=FILE"),
        (["--shape", "x=2x4", "--shape", "x=2x4"], "given twice"),
        (["--target", "cuda"], "not available"),
        (["--opt-level", "7"], "invalid choice"),
        (["--output", tmp_path / "no" / "such" / "dir" / "o.npz"], "does not exist"),
    ]
    for extra, message in cases:
        code, out, err = cli(capsys, "run", path, *extra)
        assert code == 2, extra
        assert message in err, (extra, err)
        assert "Traceback" not in err
    assert cli(capsys)[0] == 2
    assert cli(capsys, "compile", path)[0] == 2


def test_wrong_input_exit_1_names_the_input(tmp_path, capsys):
    path = _save(tmp_path, _add_sqrt_mul(2))
    np.save(tmp_path / "x.npy", np.ones((3, 4), np.float32))
    np.save(tmp_path / "x64.npy", np.ones((2, 4)))
    code, out, err = cli(capsys, "run", path, "--input", f"x={tmp_path / 'x.npy'}")
    assert code == 1
    assert err.startswith("error: input 'x' (--input x=") and "[3, 4]" in err and "[2,4]" in err
    code, out, err = cli(capsys, "run", path, "--input", f"x={tmp_path / 'x64.npy'}")
    assert code == 1
    assert "input 'x'" in err and "float64" in err and "astype(numpy.float32)" in err
    code, out, err = cli(capsys, "run", path, "--input", f"w={tmp_path / 'x.npy'}")
    assert code == 1 and "'w' is not an input of the model; its inputs are: x" in err
    # a --shape that disagrees with the file is named
    dyn = _save(tmp_path, _add_sqrt_mul(), "dyn.onnx")
    code, out, err = cli(capsys, "run", dyn, "--shape", "x=2x4",
                         "--input", f"x={tmp_path / 'x.npy'}")
    assert code == 1 and "(set by --shape x=2x4)" in err


def test_internal_error_exit_3_and_debug_traceback(tmp_path, capsys, monkeypatch):
    path = _save(tmp_path, _add_sqrt_mul(2))
    # a reference that disagrees with its shape rule is a bug in cnncompile
    monkeypatch.setattr(OPS["Sqrt"], "reference", staticmethod(lambda x: x.astype(np.float64)))
    code, out, err = cli(capsys, "run", path)
    assert code == 3
    assert err.startswith(INTERNAL_PREFIX + ": Sqrt node 'sq'")
    assert "--debug" in err and "Traceback" not in err
    code, out, err = cli(capsys, "--debug", "run", path)
    assert code == 3 and "Traceback (most recent call last)" in err and "InternalError" in err
    code, out, err = cli(capsys, "run", path, "--debug")
    assert code == 3 and "Traceback (most recent call last)" in err
    # any other exception escaping is a bug too
    monkeypatch.setattr(OPS["Sqrt"], "reference", staticmethod(lambda x: 1 / 0))
    code, out, err = cli(capsys, "run", path)
    assert code == 3 and "ZeroDivisionError" in err and "Traceback" not in err


def test_debug_shows_traceback_of_user_errors(tmp_path, capsys):
    code, out, err = cli(capsys, "--debug", "info", tmp_path / "nope.onnx")
    assert code == 1 and "Traceback (most recent call last)" in err and "ModelLoadError" in err


def test_help_and_version(capsys):
    code, out, err = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"cnncompile {cnncompile.__version__}"
    for argv in ([], ["run"], ["info"]):
        code, out, err = cli(capsys, *argv, "--help")
        assert code == 0 and "examples:" in out and "cnncompile" in out


def test_subprocess_python_m(tmp_path):
    path = _save(tmp_path, _add_sqrt_mul())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.abspath(cnncompile.__file__))),
        os.environ.get("PYTHONPATH")])))

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "cnncompile", *map(str, argv)],
                              capture_output=True, text=True, env=env, timeout=120)

    ok = run("run", path, "--shape", "x=1x4", "--output", tmp_path / "o.npz")
    assert ok.returncode == 0, ok.stderr
    assert "y     f32[1,4]" in ok.stdout and (tmp_path / "o.npz").exists()
    bad = run("info", path)
    assert bad.returncode == 1 and "--shape x=1x4" in bad.stderr
    assert "Traceback" not in bad.stderr
    usage = run("info", path, "--shape", "x=1xq")
    assert usage.returncode == 2 and "usage: cnncompile info" in usage.stderr


def test_analysis_data_dependent_sizes_are_reported_not_counted():
    from cnncompile.ir import Graph, Node, TensorType
    graph = Graph("dd", opset=17)
    x = graph.add_input("x", TensorType(np.float32, (4,)))
    rows = graph.new_value("rows", TensorType(np.float32, ("nms_rows",)))
    y = graph.new_value("y", TensorType(np.float32, ("nms_rows",)))
    graph.add_node(Node("Abs", [x], [rows], name="a"))
    graph.add_node(Node("Abs", [rows], [y], name="b"))
    graph.outputs.append(y)
    summary = analysis.summarize(graph)
    assert summary.memory.naive_bytes == 16 and summary.memory.peak_bytes == 16
    assert summary.memory.unknown == ["rows", "y"]
    assert json.loads(json.dumps(summary.to_dict()))["activation_memory"]["unknown_size"] == \
        ["rows", "y"]


# ---- real CNNs -----------------------------------------------------------------------------------
def _conv_model():
    """Conv 3->4 (3x3, pad 1, bias) -> Relu -> grouped Conv 4->4 (group 2, stride 2, no bias)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", group=2,
                              strides=[2, 2], pads=[1, 1, 1, 1])]
    inits = {"w1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "b1": rng.standard_normal(4).astype(np.float32),
             "w2": rng.standard_normal((4, 2, 3, 3)).astype(np.float32)}
    return make_model(nodes, {"x": (np.float32, ["N", 3, 8, 8])}, ["y"], inits)


def test_info_conv_flops_by_hand(tmp_path, capsys):
    path = _save(tmp_path, _conv_model())
    code, out, err = cli(capsys, "info", path, "--shape", "x=1x3x8x8", "--json")
    assert code == 0, err
    doc = json.loads(out)
    conv1, relu1, conv2 = doc["layers"]
    # 2 * N * K * out_h * out_w * C/group * kh * kw
    assert conv1["flops"] == 2 * 1 * 4 * 8 * 8 * 3 * 3 * 3 == 13824
    assert conv2["flops"] == 2 * 1 * 4 * 4 * 4 * 2 * 3 * 3 == 2304
    assert conv1["params"] == 4 * 3 * 9 + 4 and conv2["params"] == 4 * 2 * 9
    assert relu1["params"] == 0
    assert conv2["outputs"][0]["shape"] == [1, 4, 4, 4]
    assert doc["flops"]["total"] == 13824 + relu1["flops"] + 2304
    assert doc["parameters"] == {"count": 112 + 72, "bytes": 4 * (112 + 72)}
    assert doc["op_counts"] == {"Conv": 2, "Relu": 1}
    # x (768 B), c1 (1 KiB), r1 (1 KiB) and y (256 B): c1 dies after relu1, so at most 3 live
    assert doc["activation_memory"]["naive_bytes"] == 768 + 1024 + 1024 + 256
    assert doc["activation_memory"]["peak_bytes"] == 768 + 1024 + 1024

    code, out, err = cli(capsys, "info", path, "--shape", "x=1x3x8x8")
    assert code == 0, err
    rows = [ln.split() for ln in out.splitlines()]
    assert ["conv1", "Conv", "f32[1,4,8,8]", "112", "0.014"] in rows
    assert ["conv2", "Conv", "f32[1,4,4,4]", "72", "0.002"] in rows
    assert "params   184 (736 B)" in out


def test_zoo_lenet5_run_and_info(tmp_path, capsys):
    from cnncompile import zoo
    model = zoo.build("lenet5")
    path = _save(tmp_path, model)
    x = zoo.random_inputs(model, seed=2)["input"]
    np.save(tmp_path / "x.npy", x)
    code, out, err = cli(capsys, "run", path, "--input", f"input={tmp_path / 'x.npy'}",
                         "--output", tmp_path / "out.npz")
    assert code == 0, err
    assert "logits  f32[1,10]" in out
    expected = cnncompile.compile(model, input_shapes=zoo.input_shapes(model)).run({"input": x})
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_array_equal(saved["logits"], expected["logits"])

    code, out, err = cli(capsys, "info", path, "--shape", "input=1x1x32x32", "--json")
    assert code == 0, err
    doc = json.loads(out)
    weights = 6 * 25 + 6 + 16 * 6 * 25 + 16 + 120 * 16 * 25 + 120 + 84 * 120 + 84 + 10 * 84 + 10
    assert doc["parameters"]["count"] == weights == 61706
    layers = {row["name"]: row for row in doc["layers"]}
    assert layers["c1"]["flops"] == 2 * 6 * 28 * 28 * 1 * 25
    assert layers["c3"]["flops"] == 2 * 16 * 10 * 10 * 6 * 25
    assert layers["f6"]["params"] == 84 * 120 + 84
    assert doc["flops"]["total"] == sum(row["flops"] for row in doc["layers"])
    assert doc["activation_memory"]["peak_bytes"] < doc["activation_memory"]["naive_bytes"]
