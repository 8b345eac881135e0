"""target="cpu" kernels other than convolution, each against the reference executor on random
inputs: pooling, generated elementwise programs, Gemm / MatMul, softmax, Resize and the
data-movement ops, with odd sizes (1x1 images, prime channel counts, stride > kernel, ceil_mode,
asymmetric pads, batch 2 and strided concat slices as destinations).

Every case also checks that the op really ran its kernel: the generated source must not call the
op's NumPy reference.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from onnx import helper

import cnncompile
from cnncompile.backends.cpu.kernels import elementwise as ew
from helpers import make_model, rel_l2

TOL = 1e-4


def run_both(model, feeds: dict, kernel_ops=(), fallback_ops=(), **kwargs):
    """Compile for cpu and reference, compare every output (rel L2 <= 1e-4 for floats, exact
    otherwise); ``kernel_ops`` must not run their reference on cpu, ``fallback_ops`` must."""
    shapes = {k: v.shape for k, v in feeds.items()}
    cpu = cnncompile.compile(model, target="cpu", input_shapes=shapes, **kwargs)
    ref = cnncompile.compile(model, target="reference", input_shapes=shapes, **kwargs)
    for op in kernel_ops:
        assert f"ref_{op}.reference(" not in cpu.source, f"{op} ran its reference:\n{cpu.source}"
    for op in fallback_ops:
        assert f"ref_{op}.reference(" in cpu.source, f"{op} did not fall back:\n{cpu.source}"
    ours, theirs = cpu.run(feeds), ref.run(feeds)
    for name in ref.output_names:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        if a.dtype.kind == "f":
            finite = np.isfinite(b)
            np.testing.assert_array_equal(a[~finite], b[~finite], err_msg=name)  # NaN, inf
            assert rel_l2(a[finite], b[finite]) <= TOL, (name, rel_l2(a[finite], b[finite]))
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    return cpu, ours


def node_model(op, feeds: dict, outputs=("y",), initializers=None, opset=17, **attrs):
    names = list(feeds) + list(initializers or {})
    node = helper.make_node(op, names, list(outputs), **attrs)
    return make_model(node, feeds, list(outputs), initializers=initializers, opset=opset)


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ---- pooling -----------------------------------------------------------------------------------
POOL_CASES = {
    "resnet_stem": ((1, 8, 16, 16), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "ceil_asym": ((2, 7, 9, 8), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 1, 0],
                                     ceil_mode=1)),
    "stride_gt_kernel": ((1, 5, 11, 10), dict(kernel_shape=[2, 2], strides=[3, 3])),
    "dilated": ((2, 3, 10, 9), dict(kernel_shape=[3, 2], dilations=[2, 3], pads=[2, 1, 1, 2])),
    "one_pixel": ((2, 3, 1, 1), dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "all_padding_windows": ((1, 2, 3, 3), dict(kernel_shape=[2, 2], pads=[2, 2, 2, 2])),
    "pool_1d": ((2, 5, 13), dict(kernel_shape=[4], strides=[3], pads=[1, 2], ceil_mode=1)),
    "pool_3d": ((1, 3, 5, 6, 7), dict(kernel_shape=[2, 3, 2], strides=[2, 1, 2],
                                      pads=[1, 0, 1, 0, 1, 1])),
}


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_max_pool_with_indices(case):
    rng = np.random.default_rng(1)
    shape, attrs = POOL_CASES[case]
    x = randn(rng, *shape)
    run_both(node_model("MaxPool", {"x": x}, ("y", "i"), **attrs), {"x": x}, ["MaxPool"])


@pytest.mark.parametrize("case", sorted(POOL_CASES))
@pytest.mark.parametrize("include_pad", [0, 1])
def test_average_pool(case, include_pad):
    rng = np.random.default_rng(2)
    shape, attrs = POOL_CASES[case]
    x = randn(rng, *shape)
    model = node_model("AveragePool", {"x": x}, count_include_pad=include_pad, opset=19, **attrs)
    run_both(model, {"x": x}, ["AveragePool"])


@pytest.mark.parametrize("p", [1, 2, 3])
def test_lp_pool(p):
    rng = np.random.default_rng(3)
    shape, attrs = POOL_CASES["ceil_asym"]
    x = randn(rng, *shape)
    run_both(node_model("LpPool", {"x": x}, p=p, opset=18, **attrs), {"x": x}, ["LpPool"])


def test_max_pool_column_major_indices_int8_and_nan():
    rng = np.random.default_rng(4)
    x = randn(rng, 2, 3, 7, 6)
    x[0, 1, 2, 3] = np.nan
    model = node_model("MaxPool", {"x": x}, ("y", "i"), kernel_shape=[3, 3], strides=[2, 2],
                       pads=[1, 1, 1, 1], storage_order=1, opset=12)
    run_both(model, {"x": x}, ["MaxPool"])
    q = rng.integers(-128, 128, (2, 5, 6, 6)).astype(np.int8)
    model = node_model("MaxPool", {"x": q}, kernel_shape=[2, 2], strides=[2, 2], opset=12)
    run_both(model, {"x": q}, ["MaxPool"])


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"])
@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (1, 3, 1, 1), (2, 3, 9), (1, 2, 3, 4, 5)])
def test_global_pools(op, shape):
    rng = np.random.default_rng(5)
    x = randn(rng, *shape)
    run_both(node_model(op, {"x": x}), {"x": x}, [op])


def test_pools_write_strided_concat_slices():
    """With batch 2, each pool's output is a strided channel slice of the concat buffer."""
    rng = np.random.default_rng(6)
    x = randn(rng, 2, 5, 8, 8)
    nodes = [helper.make_node("MaxPool", ["x"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["x"], ["b"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Relu", ["c"], ["y"])]
    cpu, _ = run_both(make_model(nodes, {"x": x}, ["y"]), {"x": x}, ["MaxPool", "AveragePool"])
    assert "a slice of its concat" in cpu.source


# ---- elementwise -------------------------------------------------------------------------------
UNARY = {"Relu": {}, "Sigmoid": {}, "Tanh": {}, "Exp": {}, "Abs": {}, "Neg": {}, "Floor": {},
         "Ceil": {}, "Erf": {}, "Reciprocal": {}, "Softplus": {}, "Elu": {"alpha": 0.7},
         "Selu": {}, "LeakyRelu": {"alpha": 0.2}, "HardSigmoid": {"alpha": 0.3, "beta": 0.4},
         "HardSwish": {}, "Mish": {}, "Gelu": {"approximate": "tanh"}}


def test_unary_ops():
    """Every unary op as its own branch of one model (each is a one-step program)."""
    rng = np.random.default_rng(7)
    x = randn(rng, 2, 3, 5, 7) * 3
    nodes, outputs = [], []
    for op, attrs in UNARY.items():
        nodes.append(helper.make_node(op, ["x"], [f"y_{op}"], **attrs))
        outputs.append(f"y_{op}")
    s = randn(rng, 4, 9) ** 2
    nodes.append(helper.make_node("Sqrt", ["s"], ["y_sqrt"]))
    nodes.append(helper.make_node("Clip", ["x", "lo", "hi"], ["y_clip"]))
    model = make_model(nodes, {"x": x, "s": s}, outputs + ["y_sqrt", "y_clip"], opset=20,
                       initializers={"lo": np.float32(-0.5), "hi": np.float32(1.5)})
    run_both(model, {"x": x, "s": s}, list(UNARY) + ["Sqrt", "Clip"])


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"])
def test_binary_broadcasting(op):
    rng = np.random.default_rng(8)
    a = randn(rng, 2, 3, 4, 5)
    b = randn(rng, 3, 1, 5)
    if op == "Pow":
        a = np.abs(a) + 0.5
    run_both(node_model(op, {"a": a, "b": b}), {"a": a, "b": b}, [op])


def test_variadic_and_prelu():
    rng = np.random.default_rng(9)
    a, b, c = randn(rng, 2, 7, 3, 3), randn(rng, 7, 1, 1), randn(rng, 3)
    feeds = {"a": a, "b": b, "c": c}
    nodes = [helper.make_node(op, ["a", "b", "c"], [f"y_{op}"]) for op in ("Sum", "Mean", "Max",
                                                                          "Min")]
    nodes.append(helper.make_node("PRelu", ["a", "slope"], ["y_prelu"]))
    slope = randn(rng, 7, 1, 1)
    model = make_model(nodes, feeds, ["y_Sum", "y_Mean", "y_Max", "y_Min", "y_prelu"],
                       initializers={"slope": slope})
    run_both(model, feeds, ["Sum", "Mean", "Max", "Min", "PRelu"],
             disabled_passes=["canonicalize"])


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_ops_are_exact(dtype):
    rng = np.random.default_rng(10)
    a = rng.integers(-50, 50, (3, 4, 5)).astype(dtype)
    b = rng.integers(-7, 8, (4, 1)).astype(dtype)
    feeds = {"a": a, "b": b}
    ops = ["Add", "Sub", "Mul", "Div", "Max", "Min"]
    nodes = [helper.make_node(op, ["a", "b"], [f"y_{op}"]) for op in ops]
    nodes += [helper.make_node("Relu", ["a"], ["y_relu"]),
              helper.make_node("Abs", ["a"], ["y_abs"]),
              helper.make_node("Neg", ["a"], ["y_neg"]),
              helper.make_node("Clip", ["a", "lo", "hi"], ["y_clip"]),
              helper.make_node("Mean", ["a", "b"], ["y_mean"])]
    outs = [f"y_{op}" for op in ops] + ["y_relu", "y_abs", "y_neg", "y_clip", "y_mean"]
    model = make_model(nodes, feeds, outs, initializers={"lo": np.array(-9, dtype),
                                                         "hi": np.array(20, dtype)})
    run_both(model, feeds, ops + ["Relu", "Abs", "Neg", "Clip", "Mean"])


def test_fused_program_broadcasts_three_inputs():
    """(x + b) * s, Relu, Sub c: one FusedElementwise over inputs of shapes (2,3,4,5), (3,1,1),
    (5,) and (4,1)."""
    rng = np.random.default_rng(11)
    feeds = {"x": randn(rng, 2, 3, 4, 5), "b": randn(rng, 3, 1, 1), "s": randn(rng, 5),
             "c": randn(rng, 4, 1)}
    nodes = [helper.make_node("Add", ["x", "b"], ["t0"]),
             helper.make_node("Mul", ["t0", "s"], ["t1"]),
             helper.make_node("Relu", ["t1"], ["t2"]),
             helper.make_node("Sub", ["t2", "c"], ["y"])]
    cpu, _ = run_both(make_model(nodes, feeds, ["y"]), feeds, ["FusedElementwise"])
    assert "FusedElementwise(" in cpu.source and "k_ew_add_mul_relu_sub" in cpu.source


def test_elementwise_writes_strided_slices_and_in_place():
    """Batch 2: both branches write channel slices of the concat buffer; the Relu after it runs
    in place."""
    rng = np.random.default_rng(12)
    x = randn(rng, 2, 3, 4, 4)
    w = randn(rng, 2, 3, 1, 1)
    nodes = [helper.make_node("Sigmoid", ["x"], ["a"]), helper.make_node("Mul", ["x", "w"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Exp", ["c"], ["e"]), helper.make_node("MaxPool", ["e"], ["y"],
                                                                     kernel_shape=[2, 2])]
    cpu, _ = run_both(make_model(nodes, {"x": x}, ["y"], initializers={"w": w}), {"x": x},
                      ["Sigmoid", "Mul", "Exp"])
    assert "a slice of its concat" in cpu.source


def test_batch_norm_standalone_and_declined_dtype():
    rng = np.random.default_rng(13)
    x = randn(rng, 2, 5, 3, 3)
    stats = {"scale": randn(rng, 5), "bias": randn(rng, 5), "mean": randn(rng, 5),
             "var": np.abs(randn(rng, 5)) + 0.1}
    model = node_model("BatchNormalization", {"x": x}, initializers=stats, epsilon=1e-3)
    run_both(model, {"x": x}, ["BatchNormalization"], disabled_passes=["fold_batchnorm"])
    h = randn(rng, 3, 4, dtype=np.float16)
    run_both(node_model("Relu", {"h": h}), {"h": h}, fallback_ops=["Relu"])


def test_generated_kernel_is_cached():
    """A second compile of the same program reuses the kernel: no new source file, no new
    compilation; Numba's on-disk cache holds it for the next process."""
    rng = np.random.default_rng(14)
    feeds = {"x": randn(rng, 3, 5), "y": randn(rng, 5)}
    nodes = [helper.make_node("Mul", ["x", "y"], ["t"]), helper.make_node("Tanh", ["t"], ["z"])]
    model = make_model(nodes, feeds, ["z"])
    shapes = {k: v.shape for k, v in feeds.items()}
    first = cnncompile.compile(model, target="cpu", input_shapes=shapes)
    files = sorted(glob.glob(os.path.join(ew.cache_dir(), "ew_*.py")))
    kernels = [v for k, v in first.executor.generated.namespace.items() if k.startswith("k_ew")]
    assert len(kernels) == 1
    kernel = kernels[0]
    source_file = kernel.py_func.__code__.co_filename
    stamp = os.stat(source_file).st_mtime_ns
    compiled = len(kernel.signatures)
    second = cnncompile.compile(model, target="cpu", input_shapes=shapes)
    again = [v for k, v in second.executor.generated.namespace.items() if k.startswith("k_ew")]
    assert again == [kernel] and len(kernel.signatures) == compiled
    assert sorted(glob.glob(os.path.join(ew.cache_dir(), "ew_*.py"))) == files
    assert os.stat(source_file).st_mtime_ns == stamp
    stem = os.path.splitext(os.path.basename(source_file))[0]
    index = glob.glob(os.path.join(os.environ["NUMBA_CACHE_DIR"], "**", f"{stem}.kernel-*.nbi"),
                      recursive=True)
    assert index, "Numba wrote no on-disk cache index for the generated kernel"
    np.testing.assert_allclose(second.run(feeds)["z"], np.tanh(feeds["x"] * feeds["y"]),
                               rtol=1e-6)


# ---- Gemm / MatMul -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["fc", "trans_a_alpha_beta", "column_bias", "full_c",
                                  "scalar_c", "no_c", "runtime_b_c", "wide"])
def test_gemm(case):
    rng = np.random.default_rng(15)
    m, k, n = 3, 7, 11
    a = randn(rng, m, k)
    attrs = {"transB": 1}
    b = randn(rng, n, k)
    c = randn(rng, n)
    if case == "trans_a_alpha_beta":
        a, attrs = randn(rng, k, m), dict(transA=1, transB=1, alpha=0.5, beta=-2.0)
    elif case == "column_bias":
        c = randn(rng, m, 1)
    elif case == "full_c":
        c = randn(rng, m, n)
    elif case == "scalar_c":
        c = randn(rng)
    elif case == "wide":  # many columns: several column blocks, B read untransposed
        k, n = 700, 1031
        a = randn(rng, m, k)
        b, c, attrs = randn(rng, k, n), randn(rng, m, 1), dict(alpha=0.75, beta=1.5)
    if case == "runtime_b_c":
        feeds = {"a": a, "b": b, "c": randn(rng, m, n)}
        model = node_model("Gemm", feeds, alpha=1.5, beta=0.5, transB=1)
    else:
        inits = {"b": b} if case == "no_c" else {"b": b, "c": c}
        feeds = {"a": a}
        model = node_model("Gemm", feeds, initializers=inits, **attrs)
    run_both(model, feeds, ["Gemm"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("m", [1, 5])
def test_gemm_kernel_operands(dtype, trans_a, trans_b, m):
    """The Gemm kernel on transposed views, a strided destination and a strided operand (copied),
    against NumPy in float64: sgemm's (and for one row sgemv's) flags and pitches, and the
    float64 path."""
    from cnncompile.backends.cpu.kernels.gemm import gemm

    rng = np.random.default_rng(7)
    k, n = 300, 1500  # >= 2M multiply-adds (m = 5), 450K weights (m = 1): several blocks
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, 2 * k) if trans_b else (k, n)).astype(dtype)
    b = b[:, ::2] if trans_b else b  # neither rows nor columns contiguous: a copy
    a_op = a.T if trans_a else a
    b_op = b.T if trans_b else b
    c = rng.standard_normal((1, n)).astype(dtype)
    out = np.zeros((m, 2 * n), dtype)[:, :n]
    gemm(a_op, b_op, out, c, 0.5, 2.0)
    expected = 0.5 * (a_op.astype(np.float64) @ b_op.astype(np.float64)) + 2.0 * c
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_fused_gemm_and_flatten():
    """Flatten -> Gemm -> Relu (a FusedGemm) -> Gemm -> Softmax, a classifier head."""
    rng = np.random.default_rng(16)
    x = randn(rng, 2, 8, 1, 1)
    inits = {"w1": randn(rng, 13, 8), "b1": randn(rng, 13), "w2": randn(rng, 10, 13),
             "b2": randn(rng, 10)}
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["h"], transB=1),
             helper.make_node("Softmax", ["h"], ["y"], axis=1)]
    cpu, _ = run_both(make_model(nodes, {"x": x}, ["y"], initializers=inits), {"x": x},
                      ["Flatten", "FusedGemm", "Gemm", "Softmax"])
    assert "FusedGemm(" in cpu.source


@pytest.mark.parametrize("shapes", [((2, 1, 3, 4), (5, 4, 6)), ((4,), (3, 4, 2)), ((3, 5), (5,)),
                                    ((2, 3, 4), (4, 7))])
def test_matmul(shapes):
    rng = np.random.default_rng(17)
    feeds = {"a": randn(rng, *shapes[0]), "b": randn(rng, *shapes[1])}
    run_both(node_model("MatMul", feeds), feeds, ["MatMul"])
    ints = {k: rng.integers(-9, 9, v.shape).astype(np.int32) for k, v in feeds.items()}
    run_both(node_model("MatMul", ints), ints, ["MatMul"])


# ---- softmax -----------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis,opset", [(-1, 17), (1, 17), (0, 17), (1, 11)])
def test_softmax(op, axis, opset):
    rng = np.random.default_rng(18)
    x = randn(rng, 2, 5, 3, 4) * 4
    run_both(node_model(op, {"x": x}, axis=axis, opset=opset), {"x": x}, [op])


# ---- resize ------------------------------------------------------------------------------------
RESIZE_CASES = {
    "yolo_nearest": (dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                          nearest_mode="floor"), [1, 1, 2, 2], None),
    "nearest_down": (dict(mode="nearest"), [1, 1, 0.6, 0.5], None),
    "nearest_sizes": (dict(mode="nearest", coordinate_transformation_mode="align_corners",
                           nearest_mode="round_prefer_ceil"), None, [2, 3, 7, 4]),
    "linear_half_pixel": (dict(mode="linear"), [1, 1, 2, 1.5], None),
    "linear_align_corners": (dict(mode="linear", coordinate_transformation_mode="align_corners"),
                             None, [2, 3, 9, 2]),
    "cubic": (dict(mode="cubic", exclude_outside=1), [1, 1, 1.7, 0.8], None),
}


@pytest.mark.parametrize("case", sorted(RESIZE_CASES))
def test_resize(case):
    rng = np.random.default_rng(19)
    x = randn(rng, 2, 3, 5, 6)
    attrs, scales, sizes = RESIZE_CASES[case]
    inits = {"roi": np.zeros(0, np.float32)}
    inputs = ["x", "roi"]
    if scales is not None:
        inits["scales"] = np.array(scales, np.float32)
        inputs.append("scales")
    else:
        inits["scales"] = np.zeros(0, np.float32)
        inits["sizes"] = np.array(sizes, np.int64)
        inputs += ["scales", "sizes"]
    node = helper.make_node("Resize", inputs, ["y"], **attrs)
    run_both(make_model(node, {"x": x}, ["y"], initializers=inits), {"x": x}, ["Resize"])


def test_resize_into_concat_and_declined_crop():
    rng = np.random.default_rng(20)
    x = randn(rng, 2, 3, 4, 4)
    skip = randn(rng, 2, 2, 8, 8)
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["u"], mode="nearest"),
             helper.make_node("Concat", ["u", "skip"], ["y"], axis=1)]
    inits = {"scales": np.array([1, 1, 2, 2], np.float32)}
    feeds = {"x": x, "skip": skip}
    run_both(make_model(nodes, feeds, ["y"], initializers=inits), feeds, ["Resize"])
    crop = helper.make_node("Resize", ["x", "roi", "", "sizes"], ["y"], mode="linear",
                            coordinate_transformation_mode="tf_crop_and_resize")
    inits = {"roi": np.array([0, 0, 0.1, 0.2, 1, 1, 0.9, 0.8], np.float32),
             "sizes": np.array([2, 3, 3, 3], np.int64)}
    run_both(make_model(crop, {"x": x}, ["y"], initializers=inits), {"x": x},
             fallback_ops=["Resize"])


# ---- data movement -----------------------------------------------------------------------------
def test_movement_ops_into_planned_buffers():
    """Each op sits between two elementwise ops, so it reads and writes arena buffers."""
    rng = np.random.default_rng(21)
    x = randn(rng, 2, 6, 5, 3)
    idx = np.array([[2, -1], [0, 3]], np.int64)
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "shape"], ["rs"]),
             helper.make_node("Unsqueeze", ["rs", "ax0"], ["u"]),
             helper.make_node("Squeeze", ["u", "ax0"], ["sq"]),
             helper.make_node("Pad", ["sq", "pads", "value"], ["p"], mode="constant"),
             helper.make_node("Slice", ["p", "starts", "ends", "axes", "steps"], ["sl"]),
             helper.make_node("Split", ["sl", "split"], ["s0", "s1"], axis=1),
             helper.make_node("Gather", ["s1", "idx"], ["g"], axis=1),
             helper.make_node("Cast", ["g"], ["ci"], to=6),
             helper.make_node("Identity", ["ci"], ["id"]),
             helper.make_node("Neg", ["id"], ["y_int"]),
             helper.make_node("Expand", ["s0", "eshape"], ["e"]),
             helper.make_node("Flatten", ["e"], ["f"], axis=2),
             helper.make_node("Sigmoid", ["f"], ["y"])]
    inits = {"shape": np.array([2, 15, 6], np.int64), "ax0": np.array([0], np.int64),
             "pads": np.array([0, 1, -2, 0, 2, 1], np.int64), "value": np.float32(0.25),
             "starts": np.array([-1, 0], np.int64), "ends": np.array([-100, 100], np.int64),
             "axes": np.array([1, 2], np.int64), "steps": np.array([-2, 3], np.int64),
             "split": np.array([3, 6], np.int64), "idx": idx,
             "eshape": np.array([3, 1, 1, 1], np.int64)}
    model = make_model(nodes, {"x": x}, ["y", "y_int"], initializers=inits)
    ops = ["Transpose", "Reshape", "Unsqueeze", "Squeeze", "Pad", "Slice", "Split", "Gather",
           "Cast", "Expand", "Flatten"]
    run_both(model, {"x": x}, ops)


def test_dropout_mask_and_runtime_gather_indices():
    rng = np.random.default_rng(22)
    x = randn(rng, 3, 4)
    i = np.array([3, -4, 1], np.int64)
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]),
             helper.make_node("Gather", ["d", "i"], ["y"], axis=1)]
    model = make_model(nodes, {"x": x, "i": i}, ["y", "mask"], opset=13)
    run_both(model, {"x": x, "i": i}, ["Dropout", "Gather"], opt_level=0)


def test_parallel_variants():
    """Work above the serial threshold runs the parallel kernels (the tests above are small and
    run their serial twins); pools write strided concat slices here too."""
    rng = np.random.default_rng(23)
    x = randn(rng, 2, 32, 64, 64)
    nodes = [helper.make_node("MaxPool", ["x"], ["mp"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["x"], ["ap"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1], count_include_pad=1),
             helper.make_node("Concat", ["mp", "ap"], ["pools"], axis=1),
             helper.make_node("Relu", ["pools"], ["y_pools"]),
             helper.make_node("GlobalAveragePool", ["x"], ["y_gap"]),
             helper.make_node("Resize", ["x", "", "s2"], ["y_nearest"], mode="nearest"),
             helper.make_node("Resize", ["x", "", "s2"], ["y_linear"], mode="linear"),
             helper.make_node("Resize", ["x", "", "sc"], ["y_channels"], mode="linear"),
             helper.make_node("Softmax", ["x"], ["y_softmax"], axis=1),
             helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("Add", ["sq", "b"], ["y_ew"])]
    inits = {"s2": np.array([1, 1, 2, 2], np.float32), "sc": np.array([1, 2, 1, 1], np.float32),
             "b": randn(rng, 32, 1, 1)}
    outputs = ["y_pools", "y_gap", "y_nearest", "y_linear", "y_channels", "y_softmax", "y_ew"]
    cpu, _ = run_both(make_model(nodes, {"x": x}, outputs, initializers=inits), {"x": x},
                      ["MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Softmax",
                       "FusedElementwise"])
    for kernel in ("max_pool(", "sum_pool(", "global_pool(", "resize_nearest(",
                   "resize_separable(", "resize_taps("):
        assert f"k_{kernel}" in cpu.source, kernel
    sources = []
    for name, kernel in cpu.executor.generated.namespace.items():
        if name.startswith("k_ew"):
            with open(kernel.py_func.__code__.co_filename) as f:
                sources.append(f.read())
    assert any("parallel=True" in text for text in sources)


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_blas_fallbacks_match_numpy(trans_a, trans_b):
    """The plain-loop sgemm/sgemv that kernels/blas.py registers when NumPy's BLAS is not a
    64-bit OpenBLAS, called through their C addresses as the kernels would call them."""
    import ctypes

    from cnncompile.backends.cpu.kernels import blas

    rng = np.random.default_rng(3)
    m, n, k = 4, 5, 6
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    ptr = ctypes.POINTER(ctypes.c_float)
    i32, i64, f32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_float
    gemm = ctypes.CFUNCTYPE(None, i32, i32, i32, i64, i64, i64, f32, ptr, i64, ptr, i64, f32,
                            ptr, i64)(blas._fallback_sgemm.address)
    expected = 1.5 * c + (a.T if trans_a else a) @ (b.T if trans_b else b)
    gemm(blas.ROW_MAJOR, blas.NO_TRANS + trans_a, blas.NO_TRANS + trans_b, m, n, k, 1.0,
         a.ctypes.data_as(ptr), a.shape[1], b.ctypes.data_as(ptr), b.shape[1], 1.5,
         c.ctypes.data_as(ptr), n)
    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-5)

    gemv = ctypes.CFUNCTYPE(None, i32, i32, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr,
                            i64)(blas._fallback_sgemv.address)
    x = rng.standard_normal(2 * k).astype(np.float32)  # read with stride 2
    y = np.zeros(m, np.float32)
    gemv(blas.ROW_MAJOR, blas.NO_TRANS + trans_a, a.shape[0], a.shape[1], 1.0,
         a.ctypes.data_as(ptr), a.shape[1], x.ctypes.data_as(ptr), 2, 0.0,
         y.ctypes.data_as(ptr), 1)
    np.testing.assert_allclose(y, (a.T if trans_a else a) @ x[::2], rtol=1e-5, atol=1e-5)
