"""Shared test helpers: build small ONNX models, run them in onnxruntime (the oracle), compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import cnncompile

DEFAULT_OPSET = 17
REL_L2 = 1e-5


def np_to_onnx_dtype(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def make_model(nodes, inputs: dict, outputs: list[str], initializers: dict | None = None,
               opset: int = DEFAULT_OPSET, name: str = "test") -> onnx.ModelProto:
    """inputs: {name: array or (dtype, shape)}; outputs: names (types left to inference)."""
    if isinstance(nodes, onnx.NodeProto):
        nodes = [nodes]
    in_vis = []
    for key, spec in inputs.items():
        if isinstance(spec, np.ndarray):
            dtype, shape = spec.dtype, spec.shape
        else:
            dtype, shape = spec
        in_vis.append(helper.make_tensor_value_info(key, np_to_onnx_dtype(dtype), list(shape)))
    out_vis = [helper.make_empty_tensor_value_info(o) for o in outputs]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), name, in_vis, out_vis, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.31 reads IR version <= 11
    return model


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    denom = np.linalg.norm(e.ravel())
    diff = np.linalg.norm((a - e).ravel())
    return float(diff / denom) if denom > 0 else float(diff)


def assert_matches(actual: np.ndarray, expected: np.ndarray, tol: float = REL_L2, what: str = ""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_array_equal(actual, expected, err_msg=what)
        return
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN positions differ"
    finite = ~np.isnan(expected)
    err = rel_l2(actual[finite], expected[finite])
    assert err <= tol, f"{what}: relative L2 error {err:.3g} > {tol:g}"


def check_against_ort(model: onnx.ModelProto, feeds: dict, tol: float = REL_L2,
                      target: str = "reference", **compile_kwargs) -> list[np.ndarray]:
    """Compile with cnncompile, run both, compare every output. Returns cnncompile's outputs."""
    shapes = {k: v.shape for k, v in feeds.items()}
    mod = cnncompile.compile(model, target=target, input_shapes=shapes, **compile_kwargs)
    ours = mod.run(feeds)
    theirs = run_ort(model, feeds)
    for name, expected in zip(mod.output_names, theirs):
        assert_matches(ours[name], expected, tol, what=f"output '{name}'")
    return [ours[n] for n in mod.output_names]


def random_input(rng: np.random.Generator, shape, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)
