"""The compiled artifact (save / load / ``cnncompile compile -o``), the kernel warm-up at build time
and its progress bar."""

import io
import json
import os
import zipfile

import numpy as np
import pytest

import cnncompile
from cnncompile import zoo
from cnncompile.backends.cpu.backend import count_calls, kernel_names
from cnncompile.cli import main
from cnncompile.errors import InputError, UserError
from cnncompile.passes import pipeline
from cnncompile.runtime import artifact
from cnncompile.runtime.progress import Progress


def compiled(name, size):
    model = zoo.build(name, image_size=size, seed=3)
    return model, cnncompile.compile(model, input_shapes=zoo.input_shapes(model), target="cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (model, compiled module, its saved folder); each model compiled once."""
    cache = {}

    def get(name, size):
        if name not in cache:
            model, mod = compiled(name, size)
            folder = tmp_path_factory.mktemp(name) / f"{name}.cc"
            cnncompile.save(mod, folder)
            cache[name] = model, mod, folder
        return cache[name]
    return get


@pytest.fixture
def resnet(saved):
    return saved("resnet18", 32)


# ---- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", [("resnet18", 32), ("squeezenet", 64)])
def test_loaded_module_is_bit_identical(saved, name, size):
    model, mod, folder = saved(name, size)
    loaded = cnncompile.load(folder)
    assert loaded.source == mod.source
    assert loaded.input_names == mod.input_names and loaded.output_names == mod.output_names
    for seed in (1, 2):  # twice: the loaded arena is reused like the original's
        feeds = zoo.random_inputs(model, seed=seed)
        ours, theirs = mod.run(feeds), loaded.run(feeds)
        for key in ours:
            np.testing.assert_array_equal(theirs[key], ours[key])


def test_squeezenet_artifact_keeps_its_elided_concats(saved):
    _, _, folder = saved("squeezenet", 64)
    doc = json.loads((folder / "graph.json").read_text())
    assert doc["memory_plan"]["elided_concats"] == 8
    assert "a slice of its concat" in (folder / "module.py").read_text()


def test_folder_contents(resnet):
    _, mod, folder = resnet
    assert sorted(os.listdir(folder)) == ["constants.npz", "graph.json", "graph.txt", "module.py"]
    doc = json.loads((folder / "graph.json").read_text())
    assert doc["cnncompile_version"] == cnncompile.__version__
    assert doc["target"] == "cpu" and doc["opset"] == mod.graph.opset
    assert doc["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 3, 32, 32]}]
    assert doc["outputs"] == [{"name": v.name, "dtype": "float32", "shape": list(v.type.shape)}
                              for v in mod.graph.outputs]
    plan = mod.graph.meta["memory_plan"]
    assert doc["memory_plan"]["arena_bytes"] == plan.arena_bytes
    assert (folder / "graph.txt").read_text().startswith("graph 'resnet18'")
    # no pickles: every array reads back with allow_pickle=False, byte for byte
    with np.load(folder / "constants.npz", allow_pickle=False) as arrays:
        constants = mod.executor.generated.constants
        assert sorted(arrays.files) == sorted(constants)
        for name in arrays.files:
            np.testing.assert_array_equal(arrays[name], constants[name])


def test_loaded_module_checks_its_inputs(resnet):
    _, _, folder = resnet
    loaded = cnncompile.load(folder)
    assert "resnet18" in repr(loaded) and "f32[1,3,32,32]" in repr(loaded)
    with pytest.raises(InputError, match=r"shape \[1, 3, 64, 64\], expected \[1, 3, 32, 32\]"):
        loaded.run({"input": np.zeros((1, 3, 64, 64), np.float32)})
    with pytest.raises(InputError, match="dtype float64"):
        loaded(np.zeros((1, 3, 32, 32)))
    with pytest.raises(InputError, match="missing input"):
        loaded.run({})


def test_low_precision_constants_round_trip(tmp_path):
    import ml_dtypes
    array = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3)
    raw, dtype = artifact._storable(array)
    assert raw.dtype == np.uint16 and dtype == "bfloat16"
    artifact._write_npz(str(tmp_path / "c.npz"), {"c": raw})
    with np.load(tmp_path / "c.npz", allow_pickle=False) as f:
        back = f["c"].view(artifact._dtype(dtype, str(tmp_path)))
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back.astype(np.float32), array.astype(np.float32))


# ---- what load refuses ---------------------------------------------------------------------------
def copy_of(folder, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for name in os.listdir(folder):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


@pytest.mark.parametrize("missing", ["module.py", "constants.npz", "graph.json"])
def test_load_names_a_missing_file(resnet, tmp_path, missing):
    folder = copy_of(resnet[2], tmp_path)
    (folder / missing).unlink()
    with pytest.raises(UserError, match=f"{missing} is missing.*cnncompile compile"):
        cnncompile.load(folder)


def test_load_refuses_another_version(resnet, tmp_path):
    folder = copy_of(resnet[2], tmp_path)
    doc = json.loads((folder / "graph.json").read_text())
    doc["cnncompile_version"] = "0.0.1"
    (folder / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"compiled by cnncompile 0\.0\.1, but this is "
                                        rf"cnncompile {cnncompile.__version__}"):
        cnncompile.load(folder)


def test_load_refuses_a_non_folder_and_a_broken_signature(resnet, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        cnncompile.load(tmp_path / "nowhere")
    folder = copy_of(resnet[2], tmp_path)
    (folder / "graph.json").write_text("{")
    with pytest.raises(UserError, match="cannot read .*graph.json"):
        cnncompile.load(folder)


def test_save_refuses_a_reference_module(tmp_path):
    model = zoo.build("lenet5")
    mod = cnncompile.compile(model, input_shapes=zoo.input_shapes(model))
    with pytest.raises(UserError, match="only modules compiled for target 'cpu'"):
        cnncompile.save(mod, tmp_path)


# ---- the command line ----------------------------------------------------------------------------
def test_cli_compile_writes_a_loadable_folder(tmp_path, capsys):
    model = zoo.save("lenet5", tmp_path / "lenet.onnx", seed=5)
    out = tmp_path / "lenet.cc"
    assert main(["compile", str(tmp_path / "lenet.onnx"), "-o", str(out),
                 "--shape", "input=2x1x32x32", "--opt-level", "1"]) == 0
    text = capsys.readouterr().out
    assert "opt-level 1" in text and "module.py" in text and "cnncompile.load(" in text
    loaded = cnncompile.load(out)
    assert "f32[2,1,32,32]" in repr(loaded)
    feeds = zoo.random_inputs(model, batch=2, seed=6)
    direct = cnncompile.compile(model, input_shapes={"input": (2, 1, 32, 32)}, target="cpu",
                                opt_level=1)
    assert [r.name for r in direct.pass_records] == pipeline(1)
    ir = (out / "graph.txt").read_text()
    assert "= Conv(" in ir and "FusedConv" not in ir  # opt-level 1 fuses nothing
    np.testing.assert_array_equal(loaded.run(feeds)["logits"], direct.run(feeds)["logits"])


def test_cli_compile_errors(tmp_path, capsys):
    zoo.save("lenet5", tmp_path / "lenet.onnx")
    (tmp_path / "file").write_text("")
    assert main(["compile", str(tmp_path / "lenet.onnx"), "-o", str(tmp_path / "file")]) == 2
    assert "it is a file" in capsys.readouterr().err
    assert main(["compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "d")]) == 1
    assert main(["compile", str(tmp_path / "lenet.onnx")]) == 2  # -o is required


# ---- warm-up and progress ------------------------------------------------------------------------
def test_warm_up_calls_every_kernel_once_on_zeros_and_restores_them(monkeypatch):
    from cnncompile.backends.cpu.backend import CpuBackend
    from cnncompile.backends.cpu.codegen import GeneratedModule
    from cnncompile.ir import Graph, TensorType

    graph = Graph("warm")
    graph.outputs = [graph.add_input("x", TensorType(np.float32, (2, 3)))]
    source = ("def run(x):\n    # k_twice(x)\n    y = k_twice(x)\n    z = k_twice(y)\n"
              "    k_note(z)\n    return (z, )\n")
    backend = CpuBackend.from_generated(graph, GeneratedModule(source, {}, "<warm>"),
                                        warm_up=False)
    received = []

    def twice(x):
        received.append(x.copy())
        return 2 * x

    def note(x):
        received.append(None)

    for fn in (twice, note):
        fn.__module__ = "cnncompile.backends.cpu.kernels.fake"
    namespace = backend.generated.namespace
    namespace.update(k_twice=twice, k_note=note)
    seen = []
    monkeypatch.setattr(Progress, "step", lambda self, label="": seen.append(label))
    backend.warm_up()
    assert backend.warm_up_error is None
    assert seen == ["twice", "twice", "note"]
    assert received[0].shape == (2, 3) and not received[0].any()  # zeros of the input's type
    assert namespace["k_twice"] is twice and namespace["k_note"] is note  # restored
    namespace["k_twice"] = None  # a run that fails on zeros is recorded, not raised
    backend.warm_up()
    assert isinstance(backend.warm_up_error, TypeError)
    assert namespace["k_twice"] is None


def test_count_calls_reads_only_run():
    source = ("import numpy as np\n\n\ndef run(x):\n    # k_conv(x) in a comment\n"
              "    k_conv(x, out=y)\n    k_relu(y)\n    k_conv(y, out=z)\n    return (z, )\n"
              "\n\ndef run_profiled(x):\n    k_conv(x, out=y)\n")
    assert count_calls(source, ["k_conv", "k_relu"]) == 3
    assert count_calls(source, []) == 0


def test_kernel_names_are_the_kernel_package_functions():
    def kernel(x):
        return x

    kernel.__module__ = "cnncompile.backends.cpu.kernels.conv"
    namespace = {"k_conv": kernel, "ref_Relu": cnncompile.ops.OPS["Relu"], "k_add": np.add,
                 "np": np, "c_w": np.zeros(3)}
    assert kernel_names(namespace) == ["k_conv"]


class FakeTty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_silent_for_a_quick_step_off_a_terminal(monkeypatch):
    monkeypatch.delenv("CNNCOMPILE_PROGRESS", raising=False)
    stream = io.StringIO()
    with Progress("compiling kernels", 3, stream=stream) as bar:
        for label in ("conv", "relu", "pool"):
            bar.step(label)
    assert stream.getvalue() == ""


def test_progress_reports_a_slow_step_in_one_line(monkeypatch):
    monkeypatch.delenv("CNNCOMPILE_PROGRESS", raising=False)
    stream = io.StringIO()
    with Progress("compiling kernels", 4, stream=stream, quiet_seconds=0.0) as bar:
        bar.step("conv_im2col")
        bar.step("relu")
    line = stream.getvalue()
    assert line.startswith("compiling kernels [##########..........] 2/4 done in ")
    assert line.count("\n") == 1 and "\r" not in line


def test_progress_redraws_in_place_on_a_terminal(monkeypatch):
    monkeypatch.delenv("CNNCOMPILE_PROGRESS", raising=False)
    stream = FakeTty()
    bar = Progress("compiling kernels", 30, stream=stream, quiet_seconds=0.0)
    for _ in range(11):
        bar.step("relu")
    bar.step("conv_im2col")
    assert "\rcompiling kernels [" in stream.getvalue()
    assert "] 1/30 relu" in stream.getvalue()
    bar.close()
    assert stream.getvalue().rstrip("\n").rsplit("\r", 1)[1].startswith(
        "compiling kernels [########............] 12/30 done in")
    monkeypatch.setenv("CNNCOMPILE_PROGRESS", "0")
    quiet = FakeTty()
    with Progress("compiling kernels", 2, stream=quiet, quiet_seconds=0.0) as bar:
        bar.step("conv")
    assert quiet.getvalue() == ""


def test_artifact_has_no_pickle_anywhere(resnet):
    with zipfile.ZipFile(resnet[2] / "constants.npz") as zf:
        for name in zf.namelist():
            header = zf.open(name).read(10)
            assert header.startswith(b"\x93NUMPY")


def test_a_loaded_module_saves_again(resnet, tmp_path):
    model, mod, folder = resnet
    cnncompile.save(cnncompile.load(folder), tmp_path / "again")
    first = json.loads((folder / "graph.json").read_text())
    second = json.loads((tmp_path / "again" / "graph.json").read_text())
    assert second == first
    assert not (tmp_path / "again" / "graph.txt").exists()  # a loaded module has no IR to print
    feeds = zoo.random_inputs(model, seed=4)
    np.testing.assert_array_equal(cnncompile.load(tmp_path / "again").run(feeds)["logits"],
                                  mod.run(feeds)["logits"])
