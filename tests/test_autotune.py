"""Autotuning: the JSON tuning cache, the autotune pass's choice and records, opt_level 3."""

import json

import numpy as np
import pytest
from onnx import helper

import cnncompile
from cnncompile import tuning
from cnncompile.passes import PASSES, pipeline
from cnncompile.passes import autotune as autotune_module
from cnncompile.passes.lowering import ConvProblem
from helpers import assert_matches, make_model, rel_l2, run_ort


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test tunes into its own cache file, never the user's."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.ENV, str(path))
    return path


def small_net(seed=0):
    """3x3 conv + relu (4 candidates: direct, im2col, both Winograds), then a 1x1 conv (direct,
    im2col, gemm_1x1)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = (rng.standard_normal((4, 8, 1, 1)) / 3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv3x3", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv1x1")]
    return make_model(nodes, {"x": (np.float32, [1, 8, 10, 10])}, ["y"],
                      {"w1": w1, "b1": b1, "w2": w2})


def feeds(seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((1, 8, 10, 10)).astype(np.float32)}


def tuned(**kwargs):
    return cnncompile.compile(small_net(), target="cpu", input_shapes={"x": (1, 8, 10, 10)},
                              opt_level=3, **kwargs)


def convs(module):
    return [n for n in module.graph.nodes if n.op in ("Conv", "FusedConv")]


def fake_times(monkeypatch, ms: dict[str, float], corrupt: str | None = None):
    """Real measurements with deterministic times (and one candidate's outputs spoiled)."""
    real = autotune_module.measure
    calls = []

    def measure(graphs, inputs):
        results = real(graphs, inputs)
        calls.append(sorted(graphs))
        for algorithm, result in results.items():
            result["ms"] = ms.get(algorithm, 50.0)
            if algorithm == corrupt:
                result["outputs"] = [o * np.float32(1.01) for o in result["outputs"]]
        return results

    monkeypatch.setattr(autotune_module, "measure", measure)
    return calls


# ---- the cache -----------------------------------------------------------------------------------
def test_key_names_everything_a_decision_depends_on():
    node = convs(tuned(passes=["fuse_conv_activation"]))[0]
    key = tuning.tuning_key(node, threads=2)
    assert key["op"] == "FusedConv" and key["attrs"]["activation"] == "Relu"
    assert key["inputs"] == [[1, 8, 10, 10], [8, 8, 3, 3], [8]]
    assert key["outputs"] == [[1, 8, 10, 10]]
    assert key["attrs"]["pads"] == [1, 1, 1, 1] and key["dtype"] == "float32"
    assert key["threads"] == 2 and key["version"] == cnncompile.__version__
    import llvmlite.binding as llvm
    assert key["cpu"] == llvm.get_host_cpu_name()
    assert len(key["cpu_features"]) == 16
    json.dumps(key)  # the key is plain JSON
    assert tuning.tuning_key(node, threads=1) != key


def test_cache_miss_put_save_and_hit_in_a_new_reader(private_cache):
    key = {"op": "Conv", "inputs": [[1, 2, 3, 3]], "version": "x"}
    cache = tuning.TuningCache()
    assert cache.path == str(private_cache) and cache.get(key) is None
    cache.put(key, "direct", {"direct": {"ms": 1.5, "rel_err": 0.0}})
    cache.save()
    doc = json.loads(private_cache.read_text())
    assert doc["format"] == tuning.FORMAT
    (entry,) = doc["entries"].values()
    assert entry["key"] == key and entry["algorithm"] == "direct"
    again = tuning.TuningCache()
    assert again.get(key)["candidates"] == {"direct": {"ms": 1.5, "rel_err": 0.0}}
    assert again.get({**key, "version": "y"}) is None


def test_save_merges_with_another_writer_and_survives_a_corrupt_file(private_cache):
    a, b = tuning.TuningCache(), tuning.TuningCache()
    a.put({"k": 1}, "direct", {})
    a.save()
    b.put({"k": 2}, "im2col_gemm", {})
    b.save()
    merged = tuning.TuningCache()
    assert merged.get({"k": 1}) and merged.get({"k": 2})
    private_cache.write_text("{not json")
    broken = tuning.TuningCache()
    assert len(broken) == 0
    broken.put({"k": 3}, "direct", {})
    broken.save()
    assert tuning.TuningCache().get({"k": 3})["algorithm"] == "direct"


def test_default_path_is_under_the_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_path() == str(tmp_path / "cnncompile" / "tuning.json")


# ---- candidates ----------------------------------------------------------------------------------
def test_candidates_follow_the_shape():
    mod = tuned(passes=["lower_convolutions"])
    conv3, conv1 = convs(mod)
    assert autotune_module.candidates(ConvProblem.of(conv3)) == [
        "direct", "im2col_gemm", "winograd_f2x2_3x3", "winograd_f4x4_3x3"]
    assert autotune_module.candidates(ConvProblem.of(conv1)) == [
        "direct", "im2col_gemm", "gemm_1x1"]
    strided = ConvProblem("Conv", 1, 8, 8, 1, (3, 3), (2, 2), (1, 1), (1,) * 4, (9, 9), (5, 5))
    assert "winograd_f2x2_3x3" not in autotune_module.candidates(strided)
    depthwise = ConvProblem("Conv", 1, 8, 8, 8, (3, 3), (1, 1), (1, 1), (1,) * 4, (9, 9), (9, 9))
    assert autotune_module.candidates(depthwise) == ["depthwise", "grouped", "direct"]
    transposed = ConvProblem("ConvTranspose", 1, 8, 8, 1, (2, 2), (2, 2), (1, 1), (0,) * 4,
                             (4, 4), (8, 8))
    assert autotune_module.candidates(transposed) == []


# ---- the pass ------------------------------------------------------------------------------------
def test_opt_level_3_and_tune_run_the_autotune_pass():
    assert "autotune" in PASSES and pipeline(3)[-1] == "autotune"
    assert "autotune" not in pipeline(2)
    assert [r.name for r in tuned().pass_records][-1] == "autotune"
    mod = cnncompile.compile(small_net(), target="cpu", input_shapes={"x": (1, 8, 10, 10)},
                             tune=True)
    assert [r.name for r in mod.pass_records][-2:] == ["plan_memory", "autotune"]


def test_autotune_picks_the_fastest_and_records_every_candidate(monkeypatch):
    calls = fake_times(monkeypatch, {"winograd_f2x2_3x3": 1.0, "im2col_gemm": 2.0,
                                     "winograd_f4x4_3x3": 3.0, "gemm_1x1": 0.5, "direct": 4.0})
    mod = tuned()
    conv3, conv1 = convs(mod)
    assert calls == [sorted(autotune_module.candidates(ConvProblem.of(n))) for n in (conv3, conv1)]
    assert conv3.annotations["algorithm"] == "winograd_f2x2_3x3"
    assert conv1.annotations["algorithm"] == "gemm_1x1"
    table = conv3.annotations["_tuning"]
    assert set(table) == {"direct", "im2col_gemm", "winograd_f2x2_3x3", "winograd_f4x4_3x3"}
    assert table["im2col_gemm"]["ms"] == 2.0
    assert all(0 <= row["rel_err"] <= autotune_module.TOLERANCE for row in table.values())
    reason = conv3.annotations["_reason"]
    assert reason.startswith("autotuned: winograd_f2x2_3x3 is the fastest")
    assert "im2col_gemm 2.000 ms" in reason
    assert "2 timed, 0 from the cache" in mod.pass_records[-1].summary


def test_a_fast_candidate_outside_the_tolerance_loses(monkeypatch):
    fake_times(monkeypatch, {"direct": 0.1, "im2col_gemm": 0.2, "gemm_1x1": 0.3}, corrupt="direct")
    mod = tuned()
    for node in convs(mod):
        assert node.annotations["algorithm"] == "im2col_gemm"
        err = node.annotations["_tuning"]["direct"]["rel_err"]
        assert 5e-3 < err < 2e-2  # a 1% scaling, measured against the reference
        assert "direct 0.100 ms (err 1.0e-02 > tolerance" in node.annotations["_reason"]


def test_a_candidate_that_fails_is_recorded_and_skipped(monkeypatch):
    real = autotune_module.measure

    def measure(graphs, inputs):
        results = real(graphs, inputs)
        results["direct"] = {"error": "RuntimeError: no kernel"}
        for algorithm, result in results.items():
            if "ms" in result:
                result["ms"] = 1.0 if algorithm == "im2col_gemm" else 2.0
        return results

    monkeypatch.setattr(autotune_module, "measure", measure)
    node = convs(tuned())[0]
    assert node.annotations["algorithm"] == "im2col_gemm"
    assert node.annotations["_tuning"]["direct"] == {"ms": None, "rel_err": None,
                                                      "error": "RuntimeError: no kernel"}
    assert "direct failed (RuntimeError: no kernel)" in node.annotations["_reason"]


def test_a_second_tune_reads_the_cache_and_times_nothing(monkeypatch, private_cache):
    fake_times(monkeypatch, {"im2col_gemm": 1.0, "gemm_1x1": 0.5})
    first = [n.annotations["algorithm"] for n in convs(tuned())]
    assert first == ["im2col_gemm", "gemm_1x1"]
    assert len(json.loads(private_cache.read_text())["entries"]) == 2

    def no_timing(graphs, inputs):
        raise AssertionError("timed although the decision is cached")

    monkeypatch.setattr(autotune_module, "measure", no_timing)
    mod = tuned()
    assert [n.annotations["algorithm"] for n in convs(mod)] == first
    assert convs(mod)[0].annotations["_reason"].startswith("autotuned (cached)")
    assert "0 timed, 2 from the cache" in mod.pass_records[-1].summary


def test_tuned_module_matches_onnxruntime_with_real_timings():
    mod = tuned()
    for node in convs(mod):
        table = node.annotations["_tuning"]
        assert node.annotations["algorithm"] in table
        assert all(row["ms"] > 0 for row in table.values())
    x = feeds()
    (expected,) = run_ort(small_net(), x)
    assert_matches(mod.run(x)["y"], expected, tol=1e-4, what="tuned module")


def test_reference_target_skips_tuning():
    mod = cnncompile.compile(small_net(), input_shapes={"x": (1, 8, 10, 10)}, opt_level=3)
    assert mod.pass_records[-1].summary.startswith("skipped: target reference")
    assert all("_tuning" not in n.annotations for n in mod.graph.nodes)


def test_inspect_shows_the_choice_times_and_errors(monkeypatch):
    fake_times(monkeypatch, {"winograd_f4x4_3x3": 1.0, "gemm_1x1": 1.0})
    report = cnncompile.inspect(small_net(), input_shapes={"x": (1, 8, 10, 10)}, opt_level=3,
                                target="cpu")
    rows = report.conv_algorithms()
    assert rows[0]["algorithm"] == "winograd_f4x4_3x3"
    assert rows[0]["tuning"]["direct"]["ms"] == 50.0
    text = report.format_text(ir=False)
    assert "autotuning" in text
    line = next(line for line in text.splitlines() if "winograd_f4x4_3x3 1.000 (" in line)
    assert "direct 50.000" in line
    assert "autotuned: winograd_f4x4_3x3" in report.to_html()


def test_errors_are_measured_against_the_reference():
    """rel_err is the one-node module's distance to the reference executor on the same input."""
    mod = tuned(passes=["fuse_conv_activation", "lower_convolutions"])
    node = convs(mod)[0]
    table = autotune_module.tune_node(mod.graph, node, ["im2col_gemm", "direct"])
    for row in table.values():
        assert row["ms"] > 0 and 0 <= row["rel_err"] < 1e-5
    g = autotune_module.single_node_graph(mod.graph, node, {"algorithm": "direct"})
    assert [n.annotations["algorithm"] for n in g.nodes] == ["direct"]
    assert [v.name for v in g.inputs] == [node.inputs[0].name]
    assert rel_l2(g.constants[node.inputs[1].name].data, node.inputs[1].data) == 0
