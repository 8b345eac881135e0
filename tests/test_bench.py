"""`cnncompile bench` and `cnncompile kernels`: the tools' structure and correctness on tiny models.
Speed is never asserted here (benchmarks/ reports it); a timing only has to be a positive number."""

import json
import sys

import numpy as np
import onnx
import pytest

import cnncompile
from cnncompile import bench, zoo
from cnncompile.backends.cpu.codegen import generate, load_generated
from cnncompile.backends.cpu.emitters import emit_node
from cnncompile.cli import main
from cnncompile.passes.lowering import ALGORITHMS

FAST = ["--runs", "4", "--blocks", "2", "--warmup", "1"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "lenet5.onnx"
    zoo.save("lenet5", path, seed=3)
    return path


# ---- the harness ---------------------------------------------------------------------------------
def test_time_alternating_alternates_blocks_with_warmup():
    calls = []
    engines = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = bench.time_alternating(engines, runs=5, warmup=1, blocks=3)
    # blocks of 2, 2 and 1 timed runs, each after one warm-up call: A B A B A B
    assert "".join(calls) == "aaa" "bbb" "aaa" "bbb" "aa" "bb"
    for timing in timings.values():
        assert len(timing.times) == 5 and len(timing.block_medians) == 3
        assert all(t >= 0 for t in timing.times)
        assert timing.p90 >= timing.median > 0 and timing.spread >= 1.0


def test_run_profiled_matches_run_and_times_every_node(lenet):
    model = onnx.load(str(lenet))
    mod = cnncompile.compile(model, input_shapes=zoo.input_shapes(model, 2), target="cpu")
    generated = load_generated(generate(mod.graph, emit_node, profile=True))
    x = zoo.random_inputs(model, seed=2, batch=2)["input"]
    outputs, times = generated.namespace["run_profiled"](x)
    np.testing.assert_array_equal(outputs[0], mod(x))
    assert len(times) == len(mod.graph.nodes) == len(generated.node_code)
    assert all(t >= 0 for t in times)
    assert "def run(" in generated.source and "def run_profiled(" in generated.source
    # without profile the module is unchanged: no clock, no second function
    assert "run_profiled" not in mod.source and "_clock" not in mod.source


# ---- bench ---------------------------------------------------------------------------------------
def test_bench_json_structure(lenet, capsys):
    code, out, err = cli(capsys, "bench", lenet, "--batch", "1,3", "--json",
                         "--compare", "onnxruntime,torch", *FAST)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["target"] == "cpu" and doc["threads"] == 2 and doc["runs"] == 4
    assert doc["machine"]["gemm_ceiling_gflops"] > 0 and doc["machine"]["cores"] >= 1
    assert doc["peak_rss_bytes"] > 0
    assert [b["batch"] for b in doc["batches"]] == [1, 3]
    for entry in doc["batches"]:
        assert entry["input_shapes"] == {"input": [entry["batch"], 1, 32, 32]}
        assert entry["compile_s"] > 0 and entry["gflop"] > 0 and entry["arena_bytes"] > 0
        assert 0 <= entry["reference_nodes"] <= entry["nodes"]
        assert set(entry["engines"]) == {"cnncompile", "onnxruntime", "torch"}
        for t in entry["engines"].values():
            assert t["runs"] == 4 and len(t["block_medians_ms"]) == 2
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["p90_ms"]
            assert t["images_per_s"] == pytest.approx(entry["batch"] * 1e3 / t["median_ms"])
            assert t["gflops_per_s"] > 0
        ratio = entry["ratios"]["onnxruntime"]
        ours, theirs = (entry["engines"][k]["median_ms"] for k in ("cnncompile", "onnxruntime"))
        assert ratio["latency_ratio"] == pytest.approx(ours / theirs)
        assert ratio["speedup"] == pytest.approx(theirs / ours)
        assert entry["max_rel_l2"]["onnxruntime"] <= 1e-4  # it timed the right computation
        # no TorchScript file given: PyTorch eager over the imported graph, checked the same way
        assert entry["max_rel_l2"]["torch"] <= 1e-4 and not entry["skipped"]
        assert "layers" not in entry


def test_bench_text_and_html(lenet, capsys, tmp_path):
    html = tmp_path / "bench.html"
    code, out, err = cli(capsys, "bench", lenet, "--html", html, "--per-layer", "--top", "3",
                         *FAST)
    assert code == 0, err
    assert "cnncompile / engine latency" in out and "onnxruntime" in out
    assert "GEMM ceiling" in out and "peak RSS" in out and "per layer (batch 1)" in out
    assert "more layers (the 3 slowest are shown)" in out
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "per layer" in page and "c1" in page


def test_per_layer_table_sums_to_the_total(lenet):
    report = bench.bench_model(str(lenet), batches=[4], compare=[], per_layer=True, runs=12,
                               warmup=2, blocks=3)
    entry = report["batches"][0]
    layers = entry["layers"]
    model = onnx.load(str(lenet))
    mod = cnncompile.compile(model, target="cpu", input_shapes=zoo.input_shapes(model, 4))
    assert [r["name"] for r in layers] == [n.name for n in mod.graph.nodes]
    assert sum(r["share"] for r in layers) == pytest.approx(1.0)
    assert entry["layer_sum_ms"] == pytest.approx(sum(r["ms"] for r in layers))
    # the per-node clock reads cost little: the layers add up to the whole run timed alongside
    assert 0.5 <= entry["layer_sum_ms"] / entry["profile_run_ms"] <= 2.0
    convs = [r for r in layers if r["op"] in ("Conv", "FusedConv")]
    assert convs and all(r["algorithm"] in ALGORITHMS for r in convs)
    ceiling = report["machine"]["gemm_ceiling_gflops"]
    for r in convs:
        assert r["gflops_per_s"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["pct_ceiling"] == pytest.approx(100 * r["gflops_per_s"] / ceiling)
        assert r["impl"] == bench.REFERENCE or r["impl"].startswith("conv_"), r


def test_self_check_reads_about_one(lenet, capsys):
    code, out, err = cli(capsys, "bench", lenet, "--self-check", "--json", "--runs", "40",
                         "--blocks", "4")
    assert code == 0, err
    check = json.loads(out)["self_check"][0]
    assert check["a"]["runs"] == check["b"]["runs"] == 40
    assert check["ratio"] == pytest.approx(check["a"]["median_ms"] / check["b"]["median_ms"])
    # the same engine twice: generous bounds, the machine is shared and noisy
    assert 0.5 <= check["ratio"] <= 2.0
    assert check["block_ratio_min"] <= check["block_ratio_max"] and len(check["block_ratios"]) == 4
    code, out, err = cli(capsys, "bench", lenet, "--self-check", "--runs", "6")
    assert code == 0 and "ratio A/B of medians" in out and "per-block ratios" in out


def test_missing_onnxruntime_is_a_clear_error(lenet, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    for extra in (["--compare", "onnxruntime"], ["--self-check"]):
        code, out, err = cli(capsys, "bench", lenet, *extra, *FAST)
        assert code == 1
        assert "onnxruntime is not installed" in err and "pip install cnncompile[bench]" in err
        assert "Traceback" not in err
    # by default the comparison is dropped with a note, and cnncompile is still timed
    code, out, err = cli(capsys, "bench", lenet, "--json", *FAST)
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc["batches"][0]["engines"]) == ["cnncompile"]
    assert "pip install cnncompile[bench]" in doc["notes"][0]


def test_bench_shape_errors(tmp_path, capsys):
    model = zoo.build("lenet5")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    path = tmp_path / "fixed.onnx"
    onnx.save(fixed, str(path))
    code, out, err = cli(capsys, "bench", path, "--batch", "4", *FAST)
    assert code == 1 and "fixed batch axis of 2" in err
    code, out, err = cli(capsys, "bench", "zoo:nonet", *FAST)
    assert code == 1 and "no model 'nonet'" in err
    code, out, err = cli(capsys, "bench", "zoo:lenet5", "--compare", "tvm", *FAST)
    assert code == 1 and "unknown engine 'tvm'" in err


# ---- the kernel lab ------------------------------------------------------------------------------
def _lab_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("algorithm"))
    assert lines[start].rstrip().endswith("rel L2 vs reference")
    rows = {}
    for line in lines[start + 1:]:
        if not line or line.startswith(("*", " ")):
            break
        cells = line.replace(" *", "").split()
        rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("argv, applicable", [
    (["--shape", "1,5,9,9", "--weight", "7,5,3,3", "--pads", "1", "--bias"],
     {"direct", "im2col_gemm", "winograd_f2x2_3x3", "winograd_f4x4_3x3"}),
    (["--shape", "2,6,7,7", "--weight", "6,1,3,3", "--group", "6", "--stride", "2",
      "--pads", "0,1,1,0"], {"direct", "im2col_gemm", "depthwise", "grouped"}),
    (["--shape", "1,3,5,5", "--weight", "4,3,1,1"],
     {"direct", "im2col_gemm", "gemm_1x1"}),
])
def test_kernel_lab_rows(capsys, argv, applicable):
    code, out, err = cli(capsys, "kernels", "conv", *argv, "--runs", "3", "--blocks", "1")
    assert code == 0, err
    rows = _lab_rows(out)
    assert list(rows) == list(ALGORITHMS) + ["onnxruntime"]
    for algorithm in ALGORITHMS:
        cells = rows[algorithm]
        if algorithm in applicable:
            assert cells[1] == "numpy" or cells[1].startswith("conv_"), cells
            assert float(cells[-1]) <= 1e-4, cells  # every forced algorithm is correct
            assert float(cells[-5]) > 0  # median ms
        else:
            assert cells[1] == "n/a" and cells[-1] == "n/a", cells
            assert f"  {algorithm}: n/a: " in out  # and the reason is printed
    assert float(rows["onnxruntime"][-1]) <= 1e-4


def test_kernel_lab_json_and_chosen_algorithm(capsys):
    code, out, err = cli(capsys, "kernels", "conv", "--shape", "1,4,6,6", "--weight", "4,4,3,3",
                         "--stride", "2", "--algos", "im2col_gemm,winograd_f2x2_3x3",
                         "--no-ort", "--json", "--runs", "2", "--blocks", "1")
    assert code == 0, err
    lab = json.loads(out)
    assert lab["output_shape"] == [1, 4, 2, 2] and lab["flops"] == 2 * 4 * 4 * 4 * 9
    rows = {r["algorithm"]: r for r in lab["rows"]}
    assert list(rows) == ["im2col_gemm", "winograd_f2x2_3x3"]
    assert rows["winograd_f2x2_3x3"]["status"] == "n/a"
    assert "stride 2x2" in rows["winograd_f2x2_3x3"]["reason"]
    assert rows["im2col_gemm"]["rel_l2"] <= 1e-4 and rows["im2col_gemm"]["median_ms"] > 0
    assert lab["chosen"] in ALGORITHMS


def test_kernel_lab_errors(capsys):
    code, out, err = cli(capsys, "kernels", "conv", "--shape", "1,4,6,6", "--weight", "4,3,3,3")
    assert code == 1 and "[1,4,6,6]" in err.replace(" ", "")
    code, out, err = cli(capsys, "kernels", "conv", "--shape", "1,4,6,6", "--weight", "4,4,3,3",
                         "--algos", "fft")
    assert code == 1 and "unknown conv algorithm 'fft'" in err
    code, out, err = cli(capsys, "kernels", "conv", "--shape", "1,4,6,6", "--weight", "4,4,3,3",
                         "--pads", "1,2,3")
    assert code == 1 and "--pads 1,2,3" in err
