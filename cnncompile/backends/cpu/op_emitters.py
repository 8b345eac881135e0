"""CPU emitters for everything but convolutions: elementwise programs, pooling, Gemm / MatMul,
softmax, Resize and the data-movement ops.

Each emitter writes the node's kernel call (see codegen.py for the Codegen methods) and returns
False for what it does not handle (a dtype Numba does not compute on, a Resize mode without a
kernel...), so that the op's reference runs instead. Attributes go into the source as literals;
transformed weights (a transposed, alpha-scaled Gemm B; BatchNormalization's folded scale and
shift) become module constants, computed once here.
"""

from __future__ import annotations

import math
import weakref

import numpy as np

from ...ir.graph import Node, Value
from ...ops.fused import ELEMENTWISE
from .codegen import Codegen
from .emitters import emits, literal
from .kernels import elementwise as ew
from .kernels.epilogue import UnsupportedActivation, activation_code
from .kernels.misc import parallel_variant
from .kernels.pool import geometry3, spatial3

KERNELS = "cnncompile.backends.cpu.kernels"
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
#: dtypes Numba loads and stores (pure data movement: max pooling, nearest resize)
MOVABLE = FLOATS + tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32,
                                               np.uint32, np.int64, np.uint64, np.bool_))

# Per-Codegen memo tables (a Codegen lives for one generated module).
_PLACEMENTS: "weakref.WeakKeyDictionary[Codegen, dict]" = weakref.WeakKeyDictionary()
_PROGRAMS: "weakref.WeakKeyDictionary[Codegen, dict]" = weakref.WeakKeyDictionary()


# ---- helpers -----------------------------------------------------------------------------------
def _static(*values) -> bool:
    return all(v is None or v.type.is_static for v in values)


def _placements(cg: Codegen) -> dict:
    if cg not in _PLACEMENTS:
        from ...passes.memory import placements
        _PLACEMENTS[cg] = placements(cg.graph, cg.plan) if cg.plan is not None else {}
    return _PLACEMENTS[cg]


def _planned(cg: Codegen, value: Value) -> bool:
    """Whether the value has a preallocated home (an arena view or a caller-owned output)."""
    if not value.type.is_static:
        return False
    return value.name in _placements(cg) or any(value is v for v in cg.graph.outputs)


def _splits(cg: Codegen, value) -> tuple:
    """Axes along which a planned tensor is a partial box of its buffer (a concat slice): its
    memory is not contiguous across them, so loop axes must not merge there."""
    if not isinstance(value, Value) or value.is_constant:
        return ()
    p = _placements(cg).get(value.name)
    if p is None:
        return ()
    box = zip(p.box, p.root_shape)
    return tuple(a for a, ((lo, hi), d) in enumerate(box) if (lo, hi) != (0, d))


def _reshaped(expr: str, shape, new_shape, out: bool = False, cg: Codegen | None = None) -> str:
    """``expr`` seen with new_shape; a destination must stay a view (never a silent copy)."""
    if tuple(shape) == tuple(new_shape):
        return expr
    if out:
        view = cg.kernel(f"{KERNELS}.misc", "view_as")
        return f"{view}({expr}, {literal(tuple(new_shape))})"
    return f"{expr}.reshape({literal(tuple(new_shape))})"


def _activation(attrs: dict, slot: str = "activation"):
    """(code, params) of a fused op's activation, or None when the epilogue lacks it."""
    try:
        return activation_code(attrs.get(slot) or "", attrs.get(f"{slot}_attrs") or {})
    except UnsupportedActivation:
        return None


# ---- elementwise -------------------------------------------------------------------------------
def emit_program(node: Node, cg: Codegen, program, operands) -> bool | None:
    """Run an elementwise ``program`` over ``operands`` (Values or compile-time arrays) into the
    node's output through a generated kernel; False when the generator declines."""
    out = node.outputs[0]
    arrays = [o for o in operands if isinstance(o, np.ndarray)]
    values = [o for o in operands if isinstance(o, Value)]
    if not _static(out, *values) or len(arrays) + len(values) != len(operands):
        return False
    shapes = [o.shape if isinstance(o, np.ndarray) else o.type.shape for o in operands]
    dtypes = [o.dtype if isinstance(o, np.ndarray) else o.type.dtype for o in operands]
    splits = [_splits(cg, out)] + [_splits(cg, o) for o in operands]
    loop, views, patterns = ew.coalesce(out.type.shape, shapes, splits)
    try:
        spec, params = ew.kernel_spec(program, dtypes, len(loop), patterns, out.type.size)
    except ew.Unsupported:
        return False
    if spec[3] != out.type.dtype.name:
        return False
    table = _PROGRAMS.setdefault(cg, {})
    if spec not in table:
        loader = cg.kernel(f"{KERNELS}.elementwise", "program_kernel")
        table[spec] = cg.fresh(f"k_ew_{'_'.join(step[0].lower() for step in spec[1])}"[:40])
        cg.header.append(f"{table[spec]} = {loader}({literal(spec)})")
    args = [_reshaped(cg.dest(out), out.type.shape, views[0], out=True, cg=cg)]
    for i, (operand, view) in enumerate(zip(operands, views[1:])):
        if isinstance(operand, np.ndarray) or operand.is_constant:
            data = operand if isinstance(operand, np.ndarray) else operand.data
            args.append(cg.constant(np.ascontiguousarray(np.reshape(data, view)),
                                    f"{node.name}_in{i}"))
        else:
            args.append(_reshaped(cg.arg(operand), operand.type.shape, view))
    if params.size:
        args.append(cg.constant(params, f"{node.name}_params"))
    cg.line(f"{table[spec]}({', '.join(args)})")
    return None


@emits(*sorted(ELEMENTWISE))
def emit_elementwise(node: Node, cg: Codegen):
    """A single elementwise op: a one-step program."""
    if any(v is None for v in node.inputs) or len(node.outputs) != 1:
        return False
    program = [[node.op, [f"in{i}" for i in range(len(node.inputs))], dict(node.attrs)]]
    return emit_program(node, cg, program, list(node.inputs))


@emits("FusedElementwise")
def emit_fused_elementwise(node: Node, cg: Codegen):
    return emit_program(node, cg, node.attrs["program"], list(node.inputs))


@emits("BatchNormalization")
def emit_batch_norm(node: Node, cg: Codegen):
    """Inference BatchNormalization with constant statistics: a per-channel affine x * a + b,
    a and b folded at compile time in float64."""
    x, *stats = node.inputs
    if len(node.outputs) != 1 or any(v is None or not v.is_constant for v in stats):
        return False
    if x.type.dtype not in FLOATS or not _static(x):
        return False
    scale, bias, mean, var = (s.data.astype(np.float64) for s in stats)
    a = scale / np.sqrt(var + node.attrs["epsilon"])
    b = bias - mean * a
    # (C,) parameters broadcast over the spatial axes; (C, D1, ...) ones as they are
    shape = a.shape + (1,) * (x.type.rank - 1 - a.ndim)
    program = [["Mul", ["in0", "in1"], {}], ["Add", ["t0", "in2"], {}]]
    dtype = x.type.dtype
    return emit_program(node, cg, program, [x, a.reshape(shape).astype(dtype),
                                            b.reshape(shape).astype(dtype)])


# ---- pooling -----------------------------------------------------------------------------------
def _window_args(node: Node) -> tuple[str, str, str, str, str]:
    a = node.attrs
    rank = node.inputs[0].type.rank - 2
    pads = a["pads"]
    return (literal(geometry3(a["kernel_shape"], 1)), literal(geometry3(a["strides"], 1)),
            literal(geometry3(a["dilations"], 1)), literal(geometry3(pads[:rank], 0)),
            literal(geometry3(pads[rank:], 0)))


def _pool_work(node: Node) -> int:
    return node.outputs[0].type.size * math.prod(node.attrs["kernel_shape"])


def _pool_views(node: Node, cg: Codegen, dtypes) -> tuple[str, str] | None:
    x, y = node.inputs[0], node.outputs[0]
    if not _static(x, y) or x.type.dtype not in dtypes or not 3 <= x.type.rank <= 5:
        return None
    x5 = _reshaped(cg.arg(x), x.type.shape, spatial3(x.type.shape))
    y5 = _reshaped(cg.dest(y), y.type.shape, spatial3(y.type.shape), out=True, cg=cg)
    return x5, y5


@emits("MaxPool")
def emit_max_pool(node: Node, cg: Codegen):
    views = _pool_views(node, cg, MOVABLE[:-1])
    if views is None:
        return False
    kernel, strides, dilations, pads, _ends = _window_args(node)
    geometry = f"{kernel}, {strides}, {dilations}, {pads}"
    if len(node.outputs) > 1 and node.outputs[1] is not None:
        out = node.outputs[1]
        indices = _reshaped(cg.dest(out), out.type.shape, spatial3(out.type.shape), True, cg)
        fn = cg.kernel(f"{KERNELS}.pool", "max_pool_indices")
        cg.line(f"{fn}({views[0]}, {views[1]}, {indices}, {geometry}, "
                f"{node.attrs['storage_order']})")
        return None
    dtype = node.inputs[0].type.dtype
    lowest = float("-inf") if dtype.kind == "f" else int(np.iinfo(dtype).min)
    fn = cg.kernel(f"{KERNELS}.pool", parallel_variant("max_pool", _pool_work(node)))
    cg.line(f"{fn}({views[0]}, {views[1]}, {geometry}, np.{dtype.name}({literal(lowest)}))")
    return None


@emits("AveragePool", "LpPool")
def emit_sum_pool(node: Node, cg: Codegen):
    views = _pool_views(node, cg, FLOATS)
    if views is None:
        return False
    kernel, strides, dilations, pads, ends = _window_args(node)
    lp = node.op == "LpPool"
    # p = 0 asks for a plain sum (average pooling)
    p = node.attrs["p"] if lp else 0
    include = 0 if lp else node.attrs["count_include_pad"]
    fn = cg.kernel(f"{KERNELS}.pool", parallel_variant("sum_pool", _pool_work(node)))
    cg.line(f"{fn}({views[0]}, {views[1]}, {kernel}, {strides}, {dilations}, {pads}, {ends}, "
            f"{p}, {include})")
    return None


@emits("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def emit_global_pool(node: Node, cg: Codegen):
    x, y = node.inputs[0], node.outputs[0]
    if not _static(x, y) or x.type.dtype not in FLOATS or x.type.rank < 3:
        return False
    n, c = x.type.shape[:2]
    size = math.prod(x.type.shape[2:])
    if size == 0:
        return False
    mode = {"GlobalAveragePool": 0, "GlobalMaxPool": 1, "GlobalLpPool": 2}[node.op]
    fn = cg.kernel(f"{KERNELS}.pool", parallel_variant("global_pool", x.type.size))
    x3 = _reshaped(cg.arg(x), x.type.shape, (n, c, size))
    y2 = _reshaped(cg.dest(y), y.type.shape, (n, c), out=True, cg=cg)
    cg.line(f"{fn}({x3}, {y2}, {mode}, {node.attrs.get('p', 2)})")
    return None


# ---- Gemm / MatMul -----------------------------------------------------------------------------
@emits("Gemm", "FusedGemm")
def emit_gemm(node: Node, cg: Codegen):
    a, b = node.inputs[:2]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    dtype = y.type.dtype
    if dtype not in FLOATS or not _static(a, b, c, y):
        return False
    act = _activation(node.attrs)
    if act is None:
        return False
    attrs = node.attrs
    alpha, beta = attrs["alpha"], attrs["beta"]
    a_expr = cg.arg(a) + (".T" if attrs["transA"] else "")
    if b.is_constant:
        # B is stored as the model holds it (a Linear layer's (N, K) with transB) and read
        # through a transposed view where the product wants the other orientation: copying a
        # 400 MB fc6 weight at compile time cost VGG-11 a second of every warm compile
        data = b.data
        if alpha != 1.0:
            data = (alpha * data.astype(np.float64)).astype(dtype)
            alpha = 1.0
        name = cg.constant(np.ascontiguousarray(data), f"{node.name}_B")
        b_expr = f"{name}.T" if attrs["transB"] else name
    else:
        b_expr = cg.arg(b) + (".T" if attrs["transB"] else "")
    c_expr = "None"
    if c is not None and beta != 0.0:
        shape2 = (1,) * (2 - c.type.rank) + tuple(c.type.shape)
        if c.is_constant:
            bias = (beta * c.data.astype(np.float64)).astype(dtype).reshape(shape2)
            beta = 1.0
            c_expr = cg.constant(bias, f"{node.name}_C")
        else:
            c_expr = _reshaped(cg.arg(c), c.type.shape, shape2)
    code, params = act
    params_expr = cg.constant(params, f"{node.name}_act") if code else "None"
    fn = cg.kernel(f"{KERNELS}.gemm", "gemm")
    cg.line(f"{fn}({a_expr}, {b_expr}, {cg.dest(y)}, {c_expr}, {alpha!r}, {beta!r}, {code}, "
            f"{params_expr})")
    return None


@emits("MatMul")
def emit_matmul(node: Node, cg: Codegen):
    a, b = node.inputs
    y = node.outputs[0]
    if y.type.dtype not in FLOATS + (np.dtype(np.int32), np.dtype(np.int64)):
        return False
    if not _static(a, b, y):
        return False
    cg.line(f"np.matmul({cg.arg(a)}, {cg.arg(b)}, out={cg.dest(y)})")
    return None


# ---- softmax -----------------------------------------------------------------------------------
@emits("Softmax", "LogSoftmax")
def emit_softmax(node: Node, cg: Codegen):
    x, y = node.inputs[0], node.outputs[0]
    if not _static(x, y) or x.type.dtype not in FLOATS or x.type.rank == 0:
        return False
    shape = x.type.shape
    axis = node.attrs["axis"]
    if node.attrs["legacy_flatten"]:
        shape3 = (math.prod(shape[:axis]), math.prod(shape[axis:]), 1)
    else:
        shape3 = (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))
    fn = cg.kernel(f"{KERNELS}.misc", "softmax")
    cg.line(f"{fn}({cg.arg(x)}, {cg.dest(y)}, {literal(shape3)}, {node.op == 'LogSoftmax'})")
    return None


# ---- Resize / Upsample -------------------------------------------------------------------------
def _resize_tables(node: Node, attrs: dict):
    """Per-axis (indices, weights) of a Resize, from the op's own coordinate code; None if the
    kernels do not cover it. Nearest: indices (out,), weights None."""
    # The op's own coordinate code makes the tables, so the kernels agree with the reference by
    # construction (imported here: private helpers must not break the package's import).
    from ...ops.resize import _nearest_index, _source_coords, _taps
    x = node.inputs[0].type
    mode = attrs["mode"]
    ctm = attrs["coordinate_transformation_mode"]
    if ctm == "tf_crop_and_resize" or x.rank > 5 or mode not in ("nearest", "linear", "cubic"):
        return None
    scales, sizes = attrs["scales"], attrs["sizes"]
    tables = []
    for axis, in_len in enumerate(x.shape):
        out_len = sizes[axis]
        same = out_len == in_len and scales[axis] == 1.0
        if same or in_len == 0 or out_len == 0:
            index = np.arange(out_len, dtype=np.int64) if same else np.zeros(out_len, np.int64)
            tables.append((index, None if mode == "nearest" else np.ones((out_len, 1))))
            continue
        coords = _source_coords(ctm, out_len, in_len, scales[axis], None)
        if mode == "nearest":
            index = _nearest_index(coords, attrs["nearest_mode"], scales[axis] < 1)
            tables.append((np.clip(index, 0, in_len - 1).astype(np.int64), None))
        else:
            index, weights = _taps(coords, in_len, scales[axis], mode, attrs["cubic_coeff_a"],
                                   attrs["exclude_outside"], attrs["antialias"])
            tables.append((index.astype(np.int64), weights.astype(np.float64)))
    return tables


def _separable(tables) -> bool:
    """Only the last two axes interpolate (the others are identities)."""
    for index, weights in tables[:-2]:
        if weights.shape[1] != 1 or not np.array_equal(index, np.arange(len(index))):
            return False
    return len(tables) >= 2


def _emit_resize_separable(node: Node, cg: Codegen, tables):
    x, y = node.inputs[0], node.outputs[0]
    pad = 4 - x.type.rank
    x4 = _reshaped(cg.arg(x), x.type.shape, (1,) * pad + tuple(x.type.shape))
    y4 = _reshaped(cg.dest(y), y.type.shape, (1,) * pad + tuple(y.type.shape), out=True, cg=cg)
    args = []
    for index, weights in tables[-2:]:
        args.append(cg.constant(index.reshape(len(index), -1), f"{node.name}_index"))
        args.append(cg.constant(weights.reshape(len(index), -1), f"{node.name}_weights"))
    taps = tables[-2][1].shape[1] * tables[-1][1].shape[1]
    fn = cg.kernel(f"{KERNELS}.misc", parallel_variant("resize_separable", y.type.size * taps))
    cg.line(f"{fn}({x4}, {y4}, {', '.join(args)})")
    return None


@emits("Resize", "Upsample")
def emit_resize(node: Node, cg: Codegen):
    x, y = node.inputs[0], node.outputs[0]
    if not _static(x, y) or 0 in y.type.shape:
        return False
    attrs = dict(node.attrs)
    if node.op == "Upsample":
        attrs.update(coordinate_transformation_mode="asymmetric", nearest_mode="legacy",
                     cubic_coeff_a=-0.75, exclude_outside=0, antialias=0)
    nearest = attrs["mode"] == "nearest"
    if x.type.dtype not in (MOVABLE if nearest else FLOATS):
        return False
    tables = _resize_tables(node, attrs)
    if tables is None:
        return False
    if not nearest and _separable(tables) and x.type.rank <= 4:
        return _emit_resize_separable(node, cg, tables)
    pad = 5 - x.type.rank
    x5 = _reshaped(cg.arg(x), x.type.shape, (1,) * pad + tuple(x.type.shape))
    y5 = _reshaped(cg.dest(y), y.type.shape, (1,) * pad + tuple(y.type.shape), out=True, cg=cg)
    args = []
    for index, weights in [(np.zeros(1, np.int64), None if nearest else np.ones((1, 1)))] * pad \
            + tables:
        if nearest:
            args.append(cg.constant(index, f"{node.name}_index"))
        else:
            args.append(cg.constant(index.reshape(len(index), -1), f"{node.name}_index"))
            args.append(cg.constant(weights.reshape(len(index), -1), f"{node.name}_weights"))
    taps = 1 if nearest else math.prod(w.shape[1] for _i, w in tables)
    fn = cg.kernel(f"{KERNELS}.misc", parallel_variant(
        "resize_nearest" if nearest else "resize_taps", y.type.size * taps))
    cg.line(f"{fn}({x5}, {y5}, {', '.join(args)})")
    return None


# ---- data movement -----------------------------------------------------------------------------
def _bind(cg: Codegen, value: Value, expr: str):
    """The result expression copied into the value's planned buffer, or bound as it is (a view
    costs nothing) when the value has none."""
    if not _static(value):
        return False
    cg.assign(value, expr)
    return None


@emits("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def emit_reshape(node: Node, cg: Codegen):
    x, y = node.inputs[0], node.outputs[0]
    if not _static(x, y):
        return False
    return _bind(cg, y, f"{cg.arg(x)}.reshape({literal(tuple(y.type.shape))})")


@emits("Identity")
def emit_identity(node: Node, cg: Codegen):
    return _bind(cg, node.outputs[0], cg.arg(node.inputs[0]))


@emits("Dropout")
def emit_dropout(node: Node, cg: Codegen):
    """Inference Dropout: the data passes through, the mask (if asked for) is all ones."""
    if not _static(*node.outputs):
        return False
    cg.assign(node.outputs[0], cg.arg(node.inputs[0]))
    if len(node.outputs) > 1 and node.outputs[1] is not None:
        cg.line(f"{cg.dest(node.outputs[1])}.fill(1)")
    return None


@emits("Transpose")
def emit_transpose(node: Node, cg: Codegen):
    x = node.inputs[0]
    perm = literal(tuple(node.attrs["perm"]))
    return _bind(cg, node.outputs[0], f"{cg.arg(x)}.transpose({perm})")


def _index_source(shape, starts, ends, axes, steps) -> str | None:
    """Python slice syntax for an ONNX Slice over a static shape (None if a size is unknown)."""
    from ...ops.shape import _slice_range
    parts = [":"] * len(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if not isinstance(shape[axis], int):
            return None
        start, end, length = _slice_range(shape[axis], start, end, step)
        if length == 0:
            parts[axis] = "0:0"
            continue
        stop = "" if end < 0 else str(end)
        parts[axis] = f"{start}:{stop}" + (f":{step}" if step != 1 else "")
    return ", ".join(parts) if parts else "..."


@emits("Slice")
def emit_slice(node: Node, cg: Codegen):
    x, y = node.inputs[0], node.outputs[0]
    a = node.attrs
    index = _index_source(x.type.shape, a["starts"], a["ends"], a["axes"], a["steps"])
    if index is None or not _static(y):
        return False
    return _bind(cg, y, f"{cg.arg(x)}[{index}]")


@emits("Split")
def emit_split(node: Node, cg: Codegen):
    x = node.inputs[0]
    if not _static(x, *node.outputs):
        return False
    axis = node.attrs["axis"]
    start = 0
    source = cg.arg(x)
    for value, size in zip(node.outputs, node.attrs["split"]):
        parts = [":"] * x.type.rank
        parts[axis] = f"{start}:{start + size}"
        start += size
        if value is not None:
            cg.assign(value, f"{source}[{', '.join(parts)}]")
    return None


@emits("Expand")
def emit_expand(node: Node, cg: Codegen):
    x, y = node.inputs[0], node.outputs[0]
    if not _static(x, y):
        return False
    if _planned(cg, y):
        cg.line(f"np.copyto({cg.dest(y)}, {cg.arg(x)})")
        return None
    cg.assign(y, f"np.broadcast_to({cg.arg(x)}, {literal(tuple(y.type.shape))}).copy()")
    return None


@emits("Pad")
def emit_pad(node: Node, cg: Codegen):
    x, y = node.inputs[0], node.outputs[0]
    if node.attrs["mode"] != "constant" or not _static(x, y) or x.type.dtype.kind not in "biuf":
        return False
    fn = cg.kernel(f"{KERNELS}.misc", "pad_constant")
    cg.line(f"{fn}({cg.arg(x)}, {cg.dest(y)}, {literal(list(node.attrs['pads']))}, "
            f"{literal(node.attrs['value'])})")
    return None


@emits("Gather")
def emit_gather(node: Node, cg: Codegen):
    data, indices = node.inputs
    y = node.outputs[0]
    if not _static(data, indices, y) or data.type.dtype.kind not in "biuf":
        return False
    cg.line(f"np.take({cg.arg(data)}, {cg.arg(indices)}, axis={node.attrs['axis']}, "
            f"out={cg.dest(y)})")
    return None


@emits("Cast")
def emit_cast(node: Node, cg: Codegen):
    x, y = node.inputs[0], node.outputs[0]
    # NumPy's own dtypes only: ml_dtypes' float8 saturation and rounding stay with the reference
    if not _static(x, y) or x.type.dtype.kind not in "biuf" or y.type.dtype.kind not in "biuf":
        return False
    if x.type.dtype.type.__module__ != "numpy" or y.type.dtype.type.__module__ != "numpy":
        return False
    cg.line(f"np.copyto({cg.dest(y)}, {cg.arg(x)}, casting='unsafe')")
    return None
