"""Cleanup passes (remove_identity, fold_constants, canonicalize, eliminate_common_subexpressions)
and the project ops Relu6 and Silu: each rewrite happens, and outputs still match the unoptimized
graph and onnxruntime."""

import math
import zlib

import numpy as np
import pytest
from onnx import helper

import cnncompile
from cnncompile import zoo
from cnncompile.backends.reference import ReferenceExecutor
from cnncompile.errors import ShapeError
from cnncompile.ir.graph import Graph, Node
from cnncompile.ir.types import TensorType
from cnncompile.ops import OPS
from cnncompile.passes import PassManager
from helpers import assert_matches, make_model, run_ort

F32 = np.float32


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def optimize(model, feeds, passes=("canonicalize",), opt_level=1):
    """Compile with ``passes`` (None: the opt_level pipeline); check every output against the
    unoptimized module and onnxruntime and that output names survive; return the module."""
    shapes = {k: v.shape for k, v in feeds.items()}
    mod = cnncompile.compile(model, input_shapes=shapes, opt_level=opt_level, verify_each=True,
                             passes=list(passes) if passes is not None else None)
    base = cnncompile.compile(model, input_shapes=shapes, opt_level=0)
    assert mod.output_names == base.output_names == [o.name for o in model.graph.output]
    ours, unoptimized = mod.run(feeds), base.run(feeds)
    for name, expected in zip(base.output_names, run_ort(model, feeds)):
        assert_matches(ours[name], expected, what=f"output '{name}' vs onnxruntime")
        assert_matches(ours[name], unoptimized[name], what=f"output '{name}' vs opt_level=0")
    return mod


def ops(mod):
    return mod.graph.op_counts()


def summary(mod, name):
    return {r.name: r.summary for r in mod.pass_records}[name]


def scalar(value):
    return np.array(value, dtype=F32)


# ---- the project ops -----------------------------------------------------------------------------
def test_relu6_and_silu_references():
    x = np.array([-7.0, -1.0, 0.0, 2.5, 6.0, 9.0, np.nan], F32)
    relu6 = OPS["Relu6"]
    np.testing.assert_array_equal(relu6.reference(x), OPS["Clip"].reference(x, min=0.0, max=6.0))
    assert relu6.reference(np.array([-3, 4, 100], np.int32)).tolist() == [0, 4, 6]
    with np.errstate(over="ignore"):
        expected = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    silu = OPS["Silu"].reference(x)
    assert silu.dtype == F32
    np.testing.assert_allclose(silu, expected.astype(F32), rtol=1e-6)
    big = np.array([-1000.0, 1000.0], F32)  # no overflow warnings or NaN far out
    assert OPS["Silu"].reference(big).tolist() == [-0.0, 1000.0]
    t = TensorType(np.dtype(F32), (2, 3))
    assert relu6.infer(t) == t and OPS["Silu"].infer(t) == t
    assert relu6.flops([t], [t]) == 12 and OPS["Silu"].flops([t], [t]) == 30
    with pytest.raises(ShapeError):
        OPS["Silu"].infer(TensorType(np.dtype(np.int32), (2,)))
    with pytest.raises(ShapeError):
        relu6.infer(TensorType(np.dtype(np.bool_), (2,)))


# ---- remove_identity -----------------------------------------------------------------------------
def test_remove_identity_bypasses_identity_and_dropout():
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Dropout", ["b", "ratio"], ["c", "unread_mask"]),
             helper.make_node("Identity", ["c"], ["d"]),
             helper.make_node("Exp", ["d"], ["y"])]
    model = make_model(nodes, {"x": (F32, [2, 5])}, ["y"], {"ratio": scalar(0.3)})
    mod = optimize(model, {"x": _rng("id").standard_normal((2, 5)).astype(F32)},
                   passes=["remove_identity"])
    assert ops(mod) == {"Exp": 1, "Relu": 1}
    assert summary(mod, "remove_identity") == "removed 1 Dropout, 2 Identity"


def test_remove_identity_keeps_graph_output_names():
    # y: Identity of a computed value -> its producer takes the name 'y'; z: Identity of a graph
    # input must stay (nothing else can be called 'z'); w: Identity of another graph output too.
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Identity", ["s"], ["y"]),
             helper.make_node("Identity", ["x"], ["z"]),
             helper.make_node("Identity", ["y"], ["w"]),
             helper.make_node("Dropout", ["s"], ["u", "mask"])]
    model = make_model(nodes, {"x": (F32, [3, 4])}, ["y", "z", "w", "u", "mask"], opset=13)
    mod = optimize(model, {"x": _rng("names").standard_normal((3, 4)).astype(F32)},
                   passes=["remove_identity"])
    assert ops(mod) == {"Dropout": 1, "Identity": 2, "Sigmoid": 1}  # the mask is read: kept
    sigmoid = next(n for n in mod.graph.nodes if n.op == "Sigmoid")
    assert sigmoid.outputs[0].name == "y"


def test_remove_identity_drops_noop_shape_ops_only():
    nodes = [helper.make_node("Reshape", ["x", "same"], ["a"]),
             helper.make_node("Cast", ["a"], ["b"], to=1),
             helper.make_node("Reshape", ["b", "flat"], ["y"])]
    model = make_model(nodes, {"x": (F32, [2, 6])}, ["y"],
                       {"same": np.array([2, 6]), "flat": np.array([12])})
    mod = optimize(model, {"x": _rng("shape").standard_normal((2, 6)).astype(F32)},
                   passes=["remove_identity"])
    assert ops(mod) == {"Reshape": 1}


# ---- fold_constants ------------------------------------------------------------------------------
def _ir_with_constant_subgraph():
    """y = x * exp(-(c1 + c2)); s = Shape(x) as a second output. The importer folds such
    subgraphs itself, so this is built as IR, as a pass would leave it."""
    g = Graph("fold")
    x = g.add_input("x", TensorType(np.dtype(F32), (2, 3)))
    c1 = g.add_constant("c1", np.arange(3, dtype=F32))
    c2 = g.add_constant("c2", np.ones(3, F32))

    def node(op, *inputs, **attrs):
        out_type = OPS[op].infer(*[v.type for v in inputs], **attrs)
        out = g.new_value(op.lower(), out_type)
        return g.add_node(Node(op, list(inputs), [out], attrs, name=out.name)).outputs[0]

    scale = node("Exp", node("Neg", node("Add", c1, c2)))
    shape = node("Shape", x, start=0, end=None)
    g.outputs = [node("Mul", x, scale), shape]
    return g


def test_fold_constants_cascades_and_keeps_names():
    g = _ir_with_constant_subgraph()
    x = _rng("fold").standard_normal((2, 3)).astype(F32)
    expected = ReferenceExecutor(g).run([x])
    manager = PassManager(passes=["fold_constants"], verify=True)
    folded = manager.run(g)
    assert folded.op_counts() == {"Mul": 1}
    assert sorted(folded.constants) == ["exp", "shape"]
    assert [v.name for v in folded.outputs] == ["mul", "shape"]
    assert folded.outputs[1].is_constant and folded.outputs[1].data.tolist() == [2, 3]
    assert manager.records[0].summary == "folded 1 Add, 1 Exp, 1 Neg, 1 Shape"
    for actual, want in zip(ReferenceExecutor(folded).run([x]), expected):
        assert_matches(actual, want)


def test_fold_constants_respects_foldable_false(monkeypatch):
    monkeypatch.setattr(OPS["Neg"], "foldable", False)
    folded = PassManager(passes=["fold_constants"], verify=True).run(_ir_with_constant_subgraph())
    assert folded.op_counts() == {"Exp": 1, "Mul": 1, "Neg": 1}  # Exp waits for Neg


# ---- canonicalize: linear algebra and Sum ------------------------------------------------------
def _matmul_add_model(a_shape, bias, swap=False, extra_user=False, constant_b=True):
    n = 5
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"]),
             helper.make_node("Add", ["bias", "m"] if swap else ["m", "bias"], ["y"])]
    outputs = ["y"]
    if extra_user:
        nodes.append(helper.make_node("Relu", ["m"], ["r"]))
        outputs.append("r")
    rng = _rng("mm", a_shape, bias.shape)
    w = rng.standard_normal((a_shape[-1], n)).astype(F32)
    inputs = {"a": (F32, a_shape)}
    inits = {"bias": bias}
    if constant_b:
        inits["w"] = w
    else:
        inputs["w"] = (F32, w.shape)
    model = make_model(nodes, inputs, outputs, inits)
    feeds = {"a": rng.standard_normal(a_shape).astype(F32)}
    if not constant_b:
        feeds["w"] = w
    return model, feeds


@pytest.mark.parametrize("bias_shape,swap", [((5,), False), ((5,), True), ((1, 5), False),
                                             ((4, 5), True), ((), False)])
def test_matmul_add_becomes_gemm(bias_shape, swap):
    bias = _rng("bias", bias_shape).standard_normal(bias_shape).astype(F32)
    model, feeds = _matmul_add_model((4, 8), bias, swap)
    mod = optimize(model, feeds)
    assert ops(mod) == {"Gemm": 1}
    gemm = mod.graph.nodes[0]
    assert gemm.created_by == "canonicalize" and set(gemm.origins) == {"MatMul_0", "Add_1"}
    assert summary(mod, "canonicalize") == "rewrote 1 MatMul+Add -> Gemm"


@pytest.mark.parametrize("case", ["3-D A", "bias of rank 3", "two users", "B not constant"])
def test_matmul_add_stays_when_gemm_cannot_express_it(case):
    a_shape = (2, 4, 8) if case == "3-D A" else (4, 8)
    bias = np.ones((1, 1, 5) if case == "bias of rank 3" else (5,), F32)
    model, feeds = _matmul_add_model(a_shape, bias, extra_user=case == "two users",
                                     constant_b=case != "B not constant")
    mod = optimize(model, feeds)
    assert ops(mod).get("Gemm", 0) == 0 and ops(mod)["MatMul"] == 1


@pytest.mark.parametrize("attrs,swap", [({}, False), ({"alpha": 0.5, "transB": 1}, True)])
def test_gemm_add_takes_the_bias_as_c(attrs, swap):
    rng = _rng("gemm", swap)
    w = rng.standard_normal((6, 8) if attrs.get("transB") else (8, 6)).astype(F32)
    nodes = [helper.make_node("Gemm", ["a", "w"], ["g"], **attrs),
             helper.make_node("Add", ["bias", "g"] if swap else ["g", "bias"], ["y"])]
    model = make_model(nodes, {"a": (F32, [3, 8])}, ["y"],
                       {"w": w, "bias": rng.standard_normal(6).astype(F32)})
    mod = optimize(model, {"a": rng.standard_normal((3, 8)).astype(F32)})
    assert ops(mod) == {"Gemm": 1}
    gemm = mod.graph.nodes[0]
    assert len(gemm.inputs) == 3 and gemm.attrs["alpha"] == attrs.get("alpha", 1.0)


def test_sum_of_two_becomes_add_sum_of_one_disappears():
    nodes = [helper.make_node("Sum", ["x", "b"], ["s2"]),
             helper.make_node("Sum", ["s2"], ["s1"]),
             helper.make_node("Sum", ["s1", "x", "b"], ["s3"]),
             helper.make_node("Sum", ["s3"], ["y"])]  # a graph output: its producer renamed
    model = make_model(nodes, {"x": (F32, [2, 3]), "b": (F32, [3])}, ["y"])
    rng = _rng("sum")
    feeds = {"x": rng.standard_normal((2, 3)).astype(F32), "b": rng.standard_normal(3).astype(F32)}
    mod = optimize(model, feeds)
    assert ops(mod) == {"Add": 1, "Sum": 1}
    assert mod.graph.nodes[-1].op == "Sum" and mod.graph.nodes[-1].outputs[0].name == "y"
    assert summary(mod, "canonicalize") == "rewrote 1 Sum -> Add, 2 Sum of one removed"


# ---- canonicalize: activations -----------------------------------------------------------------
def _clip_model(low, high, opset):
    if opset < 11:
        attrs = {k: v for k, v in (("min", low), ("max", high)) if v is not None}
        node = helper.make_node("Clip", ["x"], ["y"], **attrs)
        return make_model(node, {"x": (F32, [2, 8])}, ["y"], opset=opset)
    names = ["x", "lo" if low is not None else "", "hi" if high is not None else ""]
    inits = {k: scalar(v) for k, v in (("lo", low), ("hi", high)) if v is not None}
    node = helper.make_node("Clip", [n for n in names if n] if high is not None else names[:2],
                            ["y"])
    return make_model(node, {"x": (F32, [2, 8])}, ["y"], inits, opset=opset)


@pytest.mark.parametrize("low,high,opset,want", [
    (0.0, 6.0, 13, "Relu6"), (0.0, 6.0, 10, "Relu6"), (0.0, None, 13, "Relu"),
    (0.0, None, 10, "Relu"), (0.0, 5.0, 13, "Clip"), (-1.0, 6.0, 13, "Clip"),
    (None, 6.0, 10, "Clip")])
def test_clip_canonical_forms(low, high, opset, want):
    x = (4 * _rng("clip", low, high).standard_normal((2, 8))).astype(F32)
    mod = optimize(_clip_model(low, high, opset), {"x": x})
    assert ops(mod) == {want: 1}


@pytest.mark.parametrize("dtype,want", [(np.int32, "Relu6"), (np.uint8, "Clip")])
def test_integer_clip_becomes_relu6_only_where_relu6_is_defined(dtype, want):
    node = helper.make_node("Clip", ["x", "lo", "hi"], ["y"])
    inits = {"lo": np.array(0, dtype), "hi": np.array(6, dtype)}
    model = make_model(node, {"x": (dtype, [2, 8])}, ["y"], inits, opset=13)
    x = _rng("int-clip", dtype).integers(0 if dtype == np.uint8 else -9, 10, (2, 8)).astype(dtype)
    mod = optimize(model, {"x": x})
    assert ops(mod) == {want: 1}


def _unary_model(nodes, opset=17, inits=None, shape=(2, 3, 4)):
    return make_model(nodes, {"x": (F32, list(shape))}, ["y"], inits, opset=opset)


def _x(key, shape=(2, 3, 4), scale=3.0):
    return (scale * _rng(key).standard_normal(shape)).astype(F32)


@pytest.mark.parametrize("swap", [False, True])
def test_x_times_sigmoid_x_becomes_silu(swap):
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Mul", ["s", "x"] if swap else ["x", "s"], ["y"])]
    mod = optimize(_unary_model(nodes), {"x": _x("silu")})
    assert ops(mod) == {"Silu": 1}
    assert summary(mod, "canonicalize") == "rewrote 1 x*Sigmoid(x) -> Silu"


@pytest.mark.parametrize("case", ["other operand", "sigmoid read twice"])
def test_silu_negative_cases(case):
    if case == "other operand":
        nodes = [helper.make_node("Sigmoid", ["z"], ["s"]),
                 helper.make_node("Mul", ["x", "s"], ["y"])]
        model = make_model(nodes, {"x": (F32, [2, 3]), "z": (F32, [2, 3])}, ["y"])
        feeds = {"x": _x("a", (2, 3)), "z": _x("b", (2, 3))}
    else:
        nodes = [helper.make_node("Sigmoid", ["x"], ["s"]),
                 helper.make_node("Mul", ["x", "s"], ["y"]),
                 helper.make_node("Neg", ["s"], ["n"])]
        model = make_model(nodes, {"x": (F32, [2, 3])}, ["y", "n"])
        feeds = {"x": _x("c", (2, 3))}
    mod = optimize(model, feeds)
    assert "Silu" not in ops(mod) and ops(mod)["Sigmoid"] == 1


@pytest.mark.parametrize("alpha,beta,swap,want", [
    (1 / 6, 0.5, False, "HardSwish"), (1 / 6, 0.5, True, "HardSwish"),
    (0.2, 0.5, False, "Mul"), (1 / 6, 0.4, False, "Mul")])
def test_x_times_hardsigmoid_x(alpha, beta, swap, want):
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=alpha, beta=beta),
             helper.make_node("Mul", ["h", "x"] if swap else ["x", "h"], ["y"])]
    mod = optimize(_unary_model(nodes), {"x": _x(("hs", alpha, beta, swap))})
    assert want in ops(mod) and len(mod.graph.nodes) == (1 if want == "HardSwish" else 2)


@pytest.mark.parametrize("scale_op", ["Div", "Mul"])
def test_pytorch_legacy_hardswish(scale_op):
    """x * Clip(x + 3, 0, 6) / 6, as PyTorch exports hardswish before opset 14."""
    factor = scalar(6.0 if scale_op == "Div" else 1 / 6)
    nodes = [helper.make_node("Add", ["x", "three"], ["t"]),
             helper.make_node("Clip", ["t", "zero", "six"], ["c"]),
             helper.make_node("Mul", ["x", "c"], ["m"]),
             helper.make_node(scale_op, ["m", "k"], ["y"])]
    inits = {"three": scalar(3), "zero": scalar(0), "six": scalar(6), "k": factor}
    mod = optimize(_unary_model(nodes, 13, inits), {"x": _x("legacy-hs")})
    assert ops(mod) == {"HardSwish": 1}


@pytest.mark.parametrize("swap", [False, True])
def test_mish_pattern(swap):
    nodes = [helper.make_node("Softplus", ["x"], ["sp"]), helper.make_node("Tanh", ["sp"], ["t"]),
             helper.make_node("Mul", ["t", "x"] if swap else ["x", "t"], ["y"])]
    mod = optimize(_unary_model(nodes), {"x": _x("mish")})
    assert ops(mod) == {"Mish": 1}


def _gelu_tail(p, assoc, swap, nodes):
    """0.5 * x * p in association ``assoc`` (outer, half-first, half-with-p)."""
    def mul(a, b, out):
        nodes.append(helper.make_node("Mul", [b, a] if swap else [a, b], [out]))
    if assoc == "outer":        # PyTorch: (x * p) * 0.5
        mul("x", p, "xp")
        mul("xp", "half", "y")
    elif assoc == "half-first":  # TF: (0.5 * x) * p
        mul("half", "x", "hx")
        mul("hx", p, "y")
    else:                       # x * (p * 0.5)
        mul(p, "half", "ph")
        mul("x", "ph", "y")
    return nodes


ASSOCIATIONS = ["outer", "half-first", "half-with-p"]


@pytest.mark.parametrize("scale_op", ["Div", "Mul"])
@pytest.mark.parametrize("assoc", ASSOCIATIONS)
@pytest.mark.parametrize("swap", [False, True])
def test_gelu_erf_variants(scale_op, assoc, swap):
    k = scalar(1.4142135 if scale_op == "Div" else 0.70710678)
    scale = ["x", "k"] if scale_op == "Div" or not swap else ["k", "x"]
    nodes = [helper.make_node(scale_op, scale, ["s"]),
             helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Add", ["one", "e"] if swap else ["e", "one"], ["p"])]
    _gelu_tail("p", assoc, swap, nodes)
    inits = {"k": k, "one": scalar(1.0), "half": scalar(0.5)}
    mod = optimize(_unary_model(nodes, 13, inits), {"x": _x(("gelu", scale_op, assoc, swap))})
    assert ops(mod) == {"Gelu": 1} and mod.graph.nodes[0].attrs == {"approximate": "none"}
    assert len(mod.graph.nodes[0].origins) == 5 and summary(mod, "canonicalize") == \
        "rewrote 1 Gelu(erf)"


def test_float16_gelu_matches_with_float16_constants():
    nodes = [helper.make_node("Div", ["x", "k"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["p"])]
    _gelu_tail("p", "half-first", False, nodes)
    inits = {"k": np.array(math.sqrt(2), np.float16), "one": np.array(1, np.float16),
             "half": np.array(0.5, np.float16)}
    model = make_model(nodes, {"x": (np.float16, [4, 8])}, ["y"], inits, opset=13)
    x = _x("gelu-f16", (4, 8)).astype(np.float16)
    mod = cnncompile.compile(model, input_shapes={"x": x.shape}, passes=["canonicalize"])
    base = cnncompile.compile(model, input_shapes={"x": x.shape}, opt_level=0)
    assert ops(mod) == {"Gelu": 1}
    # one float16 rounding instead of five
    assert_matches(mod.run({"x": x})["y"], base.run({"x": x})["y"], tol=2e-3)


def _gelu_tanh_nodes(cube, swap):
    def mul(a, b, out):
        return helper.make_node("Mul", [b, a] if swap else [a, b], [out])
    if cube == "pow":
        nodes = [helper.make_node("Pow", ["x", "three"], ["x3"])]
    else:
        nodes = [mul("x", "x", "x2"), mul("x2", "x", "x3")]
    return nodes + [mul("kappa", "x3", "kx3"),
                    helper.make_node("Add", ["kx3", "x"] if swap else ["x", "kx3"], ["inner0"]),
                    mul("beta", "inner0", "inner"),
                    helper.make_node("Tanh", ["inner"], ["t"]),
                    helper.make_node("Add", ["t", "one"] if swap else ["one", "t"], ["p"])]


GELU_TANH_INITS = {"three": scalar(3.0), "kappa": scalar(0.044715), "one": scalar(1.0),
                   "beta": scalar(math.sqrt(2 / math.pi)), "half": scalar(0.5)}


@pytest.mark.parametrize("cube", ["pow", "x*x*x"])
@pytest.mark.parametrize("assoc", ASSOCIATIONS)
@pytest.mark.parametrize("swap", [False, True])
def test_gelu_tanh_variants(cube, assoc, swap):
    nodes = _gelu_tail("p", assoc, swap, _gelu_tanh_nodes(cube, swap))
    inits = GELU_TANH_INITS if cube == "pow" else {k: v for k, v in GELU_TANH_INITS.items()
                                                    if k != "three"}
    mod = optimize(_unary_model(nodes, 13, inits), {"x": _x(("gelu-tanh", cube, assoc, swap))})
    assert ops(mod) == {"Gelu": 1} and mod.graph.nodes[0].attrs == {"approximate": "tanh"}


def test_gelu_tanh_megatron_form():
    """x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))."""
    nodes = [helper.make_node("Mul", ["beta", "x"], ["bx"]),
             helper.make_node("Mul", ["kappa", "x"], ["kx"]),
             helper.make_node("Mul", ["kx", "x"], ["kxx"]),
             helper.make_node("Add", ["one", "kxx"], ["q"]),
             helper.make_node("Mul", ["bx", "q"], ["inner"]),
             helper.make_node("Tanh", ["inner"], ["t"]),
             helper.make_node("Add", ["one", "t"], ["p"])]
    _gelu_tail("p", "outer", False, nodes)
    inits = {"beta": scalar(0.79788456), "kappa": scalar(0.044715), "one": scalar(1.0),
             "half": scalar(0.5)}
    mod = optimize(_unary_model(nodes, 13, inits), {"x": _x("megatron")})
    assert ops(mod) == {"Gelu": 1} and mod.graph.nodes[0].attrs == {"approximate": "tanh"}


@pytest.mark.parametrize("case", ["wrong constant", "broadcast to higher rank", "x reused inside"])
def test_gelu_negative_cases(case):
    k = scalar(1.5 if case == "wrong constant" else 1.4142135)
    half = np.full((1, 1, 1, 1), 0.5, F32) if case == "broadcast to higher rank" else scalar(0.5)
    nodes = [helper.make_node("Div", ["x", "k"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["p"])]
    _gelu_tail("p", "outer", False, nodes)
    outputs = ["y"]
    if case == "x reused inside":  # the Erf result is read elsewhere: it cannot vanish
        nodes.append(helper.make_node("Neg", ["e"], ["n"]))
        outputs.append("n")
    model = make_model(nodes, {"x": (F32, [2, 3, 4])}, outputs,
                       {"k": k, "one": scalar(1.0), "half": half}, opset=13)
    mod = optimize(model, {"x": _x(("gelu-neg", case))})
    assert "Gelu" not in ops(mod) and ops(mod)["Erf"] == 1


# ---- eliminate_common_subexpressions -----------------------------------------------------------
def _two_branches(outputs, same_attrs=True):
    alpha = 0.1 if same_attrs else 0.2
    nodes = [helper.make_node("Mul", ["x", "w1"], ["m1"]),
             helper.make_node("Mul", ["x", "w2"], ["m2"]),      # w2 has w1's bytes
             helper.make_node("LeakyRelu", ["m1"], ["a"], alpha=0.1),
             helper.make_node("LeakyRelu", ["m2"], ["b"], alpha=alpha),
             helper.make_node("Add", ["a", "b"], ["y"])]
    w = _rng("cse").standard_normal(4).astype(F32)
    return make_model(nodes, {"x": (F32, [3, 4])}, outputs, {"w1": w, "w2": w.copy()})


def test_cse_merges_constants_then_nodes():
    mod = optimize(_two_branches(["y"]), {"x": _x("cse-x", (3, 4))},
                   passes=["eliminate_common_subexpressions"])
    assert ops(mod) == {"Add": 1, "LeakyRelu": 1, "Mul": 1}
    assert len(mod.graph.constants) == 1
    leaky = next(n for n in mod.graph.nodes if n.op == "LeakyRelu")
    assert set(leaky.origins) == {"LeakyRelu_2", "LeakyRelu_3"}
    assert summary(mod, "eliminate_common_subexpressions") == \
        "merged 1 duplicate constant; merged 2 duplicate nodes"


def test_cse_keeps_different_attributes_apart():
    mod = optimize(_two_branches(["y"], same_attrs=False), {"x": _x("cse-x", (3, 4))},
                   passes=["eliminate_common_subexpressions"])
    assert ops(mod) == {"Add": 1, "LeakyRelu": 2, "Mul": 1}


@pytest.mark.parametrize("outputs,leaky", [(["y", "b"], 1), (["y", "a", "b"], 2)])
def test_cse_keeps_graph_output_names(outputs, leaky):
    # 'b' alone: the first LeakyRelu takes over the name; 'a' and 'b' both: nothing to merge into
    mod = optimize(_two_branches(outputs), {"x": _x("cse-x", (3, 4))},
                   passes=["eliminate_common_subexpressions"])
    assert ops(mod)["LeakyRelu"] == leaky


# ---- the whole cleanup pipeline on the zoo -----------------------------------------------------
ZOO = [("lenet5", 32, {}), ("alexnet", 64, {"num_classes": 10}), ("vgg11", 32, {"num_classes": 10}),
       ("resnet18", 32, {}), ("resnet50", 32, {}), ("mobilenetv2", 32, {}), ("squeezenet", 32, {}),
       ("inception_block", 16, {}), ("densenet_block", 16, {}), ("unet", 32, {}),
       ("yolo_head", 64, {"num_classes": 8})]


def test_zoo_list_is_complete():
    assert sorted(name for name, _, _ in ZOO) == sorted(zoo.MODELS)


@pytest.mark.parametrize("name,size,kw", ZOO, ids=[name for name, _, _ in ZOO])
def test_opt_level_1_on_zoo(name, size, kw):
    model = zoo.build(name, image_size=size, **kw)
    shapes = zoo.input_shapes(model)
    feeds = zoo.random_inputs(model, seed=1)
    base = cnncompile.compile(model, input_shapes=shapes, opt_level=0)
    mod = cnncompile.compile(model, input_shapes=shapes, opt_level=1, verify_each=True)
    expected, actual = base.run(feeds), mod.run(feeds)
    assert mod.output_names == base.output_names
    for out in base.output_names:
        assert_matches(actual[out], expected[out], what=f"{name} output '{out}'")
    before, after = base.graph.op_counts(), mod.graph.op_counts()
    summaries = {r.name: r.summary for r in mod.pass_records}
    if name == "mobilenetv2":
        assert "Clip" not in after and after["Relu6"] == before["Clip"] == 35
        assert summaries["canonicalize"] == "rewrote 35 Clip(0,6) -> Relu6"
    elif name == "yolo_head":
        # every conv-bn-SiLU block; the detection heads' sigmoids stay
        assert after["Silu"] == 31 and after["Sigmoid"] == before["Sigmoid"] - 31
        assert after["Mul"] == before["Mul"] - 31
        assert "31 x*Sigmoid(x) -> Silu" in summaries["canonicalize"]
    else:
        assert after == before  # nothing to clean up in these exports
