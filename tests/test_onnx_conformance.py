"""onnx's own backend test suite, run through cnncompile.onnx_backend.

Selected: every node, pytorch-converted and pytorch-operator test whose model uses only operators
of the project's op set (OP_SET), in the default domain, with tensor-typed inputs and outputs. The
'real', 'simple' and 'light' model tests need downloads and are left out. onnx's own tolerances
apply.

Selected tests that fail for a reason we accept are listed in EXCLUDED with that reason; they run
as expected failures, so one that starts passing fails the suite until its entry is removed. They
count as not passed in the pass rate that conftest.py prints at the end of the run.
"""

from __future__ import annotations

import os
import re
import warnings

import onnx
import onnx.backend.test
import pytest
from onnx.backend.test.loader import load_model_tests

import numpy as np
from onnx import TensorProto, helper

from cnncompile.onnx_backend import CnnCompileBackend
from helpers import assert_matches, make_model, run_ort

# The project's committed op set (not just what is registered today).
OP_SET = frozenset("""
    Conv ConvTranspose MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool
    BatchNormalization InstanceNormalization LRN Relu LeakyRelu PRelu Elu Selu Gelu Sigmoid
    HardSigmoid HardSwish Tanh Softplus Mish Clip Softmax LogSoftmax Gemm MatMul Flatten Reshape
    Transpose Concat Split Squeeze Unsqueeze Slice Pad Resize Upsample Add Sub Mul Div Pow Sqrt Exp
    Neg Abs Erf Reciprocal Floor Ceil Sum Max Min Mean ReduceMean Identity Dropout Constant
    ConstantOfShape Shape Gather Cast Expand Range DepthToSpace SpaceToDepth MaxUnpool RoiAlign
    MaxRoiPool NonMaxSuppression
""".split())

# Several cases feed NaN-producing inputs on purpose (sqrt of negatives...); NumPy's warnings about
# them are noise here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

KINDS = {"node": "NodeModel", "pytorch-converted": "PyTorchConvertedModel",
         "pytorch-operator": "PyTorchOperatorModel"}

# test name (a regex searched in the name, which ends in "_cpu") -> why it is accepted to fail
EXCLUDED: dict[str, str] = {
    r"FLOAT8E8M0": "FLOAT8E8M0 (opset 24's exponent-only scale type, with its round_mode) is not an "
                   "IR dtype; the other float8, float4, int4, int2 and bfloat16 types are",
    r"^test_training_dropout": "Dropout with training_mode=True is a training op (random mask); "
                               "cnncompile compiles inference graphs",
    r"^test_batchnorm_.*_training_mode": "BatchNormalization with training_mode=1 computes batch "
                                         "statistics and running-stat outputs; inference only",
    # onnxruntime (the project's oracle) computes what cnncompile computes for these two; onnx's
    # expected data follows another reading of the spec.
    r"^test_maxunpool_export_with_output_shape": "onnx's expected output is known to be wrong "
        "(onnx issue #2398); cnncompile matches onnxruntime",
    r"^test_resize_downsample_scales_(linear|cubic)_align_corners": "onnx's expected output uses "
        "the unrounded input*scale as the output length for align_corners; cnncompile matches "
        "onnxruntime, which uses the actual output length",
}


def _model_of(case) -> onnx.ModelProto:
    if case.model is not None:
        return case.model
    return onnx.load(os.path.join(case.model_dir, "model.onnx"))


def in_scope(model: onnx.ModelProto) -> bool:
    """Only op-set operators in the default domain, and tensors only at the graph boundary."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in OP_SET:
            return False
    boundary = list(model.graph.input) + list(model.graph.output)
    return all(vi.type.HasField("tensor_type") for vi in boundary)


def selected_tests() -> dict[str, set[str]]:
    """category -> names of the selected tests (with the device suffix the runner adds)."""
    chosen: dict[str, set[str]] = {category: set() for category in KINDS.values()}
    for kind, category in KINDS.items():
        for case in load_model_tests(kind=kind):
            if in_scope(_model_of(case)):
                chosen[category].add(f"{case.name}_cpu")
    return chosen


def build_test_cases(chosen: dict[str, set[str]], backend=CnnCompileBackend,
                     module: str = __name__, excluded: dict[str, str] = EXCLUDED) -> dict[str, type]:
    """onnx's BackendTest cases for ``backend``, keeping only the selected tests; the excluded
    ones become strict xfails."""
    runner = onnx.backend.test.BackendTest(backend, module)
    for pattern in excluded:
        runner.xfail(pattern)
    cases = {}
    # test_cases wraps the test functions on every access: read it once.
    for class_name, case in runner.test_cases.items():
        keep = chosen.get(class_name.removeprefix("OnnxBackend").removesuffix("Test"), set())
        for name in [n for n in vars(case) if n.startswith("test_")]:
            if name not in keep:
                delattr(case, name)
        if keep:
            cases[class_name] = case
    return cases


def _check_exclusions_match(chosen: dict[str, set[str]]) -> None:
    names = set().union(*chosen.values())
    stale = [p for p in EXCLUDED if not any(re.search(p, n) for n in names)]
    if stale:
        raise RuntimeError(f"EXCLUDED entries that match no selected test: {stale}")


with warnings.catch_warnings():
    # onnx computes the expected outputs of its node tests on import (overflowing casts, log(0)...)
    warnings.simplefilter("ignore", RuntimeWarning)
    SELECTED = selected_tests()
    _check_exclusions_match(SELECTED)
    globals().update(build_test_cases(SELECTED))


def test_exclusions_stay_under_five_percent():
    """Every selected test that is not excluded must pass (excluded ones are strict xfails), so
    this bounds the pass rate from below: >= 95% of the selected tests."""
    names = set().union(*SELECTED.values())
    excluded = {n for n in names if any(re.search(p, n) for p in EXCLUDED)}
    rate = 1 - len(excluded) / len(names)
    print(f"onnx conformance: {len(names)} selected, {len(excluded)} excluded -> at least "
          f"{rate:.1%} pass")
    assert len(names) > 600
    assert rate >= 0.95


# ---- the adapter itself --------------------------------------------------------------------------
def _dynamic_model(nodes, inputs: dict, outputs: list[str]) -> onnx.ModelProto:
    """A model whose inputs have the given dtypes and rank but symbolic dimensions."""
    in_vis = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                            [f"{name}_d{i}" for i in range(rank)])
              for name, (dtype, rank) in inputs.items()]
    out_vis = [helper.make_empty_tensor_value_info(o) for o in outputs]
    model = helper.make_model(helper.make_graph(nodes, "dyn", in_vis, out_vis),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_prepare_is_lazy_and_compiles_once_per_shape():
    rng = np.random.default_rng(101)
    model = _dynamic_model([helper.make_node("Relu", ["x"], ["y"])], {"x": (np.float32, 2)}, ["y"])
    rep = CnnCompileBackend.prepare(model)
    assert rep.modules == {}
    for shape in [(2, 3), (4, 5), (2, 3)]:
        x = rng.standard_normal(shape).astype(np.float32)
        (y,) = rep.run([x])
        assert_matches(y, run_ort(model, {"x": x})[0])
    assert len(rep.modules) == 2


def test_inputs_that_must_be_constant_are_bound_per_value():
    rng = np.random.default_rng(102)
    model = _dynamic_model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                           {"x": (np.float32, 2), "shape": (np.int64, 1)}, ["y"])
    rep = CnnCompileBackend.prepare(model)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    for target in [(3, 8), (2, 12), (3, 8)]:
        shape = np.array(target, dtype=np.int64)
        (y,) = rep.run({"x": x, "shape": shape})
        assert y.shape == target
        assert_matches(y, run_ort(model, {"x": x, "shape": shape})[0])
    assert rep.bound_inputs == {"shape"}
    assert len(rep.modules) == 2


def test_list_inputs_skip_initializers_and_outputs_keep_graph_order():
    rng = np.random.default_rng(103)
    bias = rng.standard_normal((3,)).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Neg", ["s"], ["n"])]
    model = make_model(nodes, {"x": (np.float32, (2, 3))}, ["n", "s"], initializers={"b": bias})
    model.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]))
    x = rng.standard_normal((2, 3)).astype(np.float32)
    outputs = CnnCompileBackend.run_model(model, [x])
    for ours, theirs in zip(outputs, run_ort(model, {"x": x}), strict=True):
        assert_matches(ours, theirs)


def test_run_node_and_target_pass_through():
    rng = np.random.default_rng(104)
    node = helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0, 2])
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    (t,) = CnnCompileBackend.run_node(node, [a], target="cpu")
    np.testing.assert_array_equal(t, a.transpose(1, 0, 2))
    model = make_model(node, {"a": a}, ["t"])
    rep = CnnCompileBackend.prepare(model, "CPU", target="cpu")
    rep.run([a])
    assert [m.target for m in rep.modules.values()] == ["cpu"]


def test_supports_cpu_only():
    assert CnnCompileBackend.supports_device("CPU")
    assert not CnnCompileBackend.supports_device("CUDA")
