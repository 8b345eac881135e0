"""Generated elementwise kernels: one Numba function per FusedElementwise program (or single op).

A program is a straight-line list of steps over the node's inputs (cnncompile/ops/fused.py). The
emitter first coalesces the output shape (``coalesce``): axes of size 1 go, and neighbouring axes
merge where every operand is either full or broadcast along both and its memory allows the merge.
What remains is a short loop nest (rank 1 for same-shape operands, (C, H*W) or (N, C, H*W) for a
per-channel operand) whose broadcast pattern is fixed in the generated source, so the inner loop
has unit or zero strides and vectorises. Sizes stay arguments.

The generated source is written once into the cache directory under a name derived from its hash
(which covers the program's structure, dtypes, ranks and broadcast pattern, plus the sources of
the helpers it inlines) and imported from there, so that Numba's on-disk cache, keyed by file,
serves it to later processes. Numeric attributes (Clip bounds, LeakyRelu's alpha...) are not in
the source: they arrive in a float64 ``params`` array, so programs differing only in them share a
kernel. Activations go through epilogue.apply_activation, the same code as conv/gemm epilogues.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import threading

import numpy as np
from numba import njit

from . import epilogue

#: dtypes the generator computes on; others decline to the reference
FLOAT_TYPES = ("float32", "float64")
INT_TYPES = ("int32", "int64")
#: outputs smaller than this run the serial variant (a parallel launch costs more than it saves,
#: and it compiles several times slower)
PARALLEL_MIN_SIZE = 1 << 16
#: ops on integers (every op listed below also takes floats)
INTEGER_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Relu",
                         "Relu6", "Clip", "Abs", "Neg"})
_UNARY = {"Abs": "abs({0})", "Neg": "-{0}", "Exp": "np.exp({0})", "Sqrt": "np.sqrt({0})",
          "Erf": "math.erf({0})", "Floor": "np.floor({0})", "Ceil": "np.ceil({0})"}
_ACTIVATIONS = ("Relu", "Relu6", "Clip", "LeakyRelu", "Sigmoid", "Silu", "HardSwish",
                "HardSigmoid", "Tanh", "Gelu", "Elu", "Selu", "Softplus", "Mish")
_BINARY = {"Add": "+", "Sub": "-", "Mul": "*"}
#: bump when the generated code changes meaning
GENERATOR_VERSION = 1


class Unsupported(ValueError):
    """A program (or dtype) the generator does not handle; the emitter falls back."""


# ---- scalar helpers the generated code calls ---------------------------------------------------
@njit(cache=True, inline="always")
def int_div(a, b):
    """ONNX integer division: truncation toward zero (x / 0 gives 0, as the reference)."""
    if b == 0:
        return a - a
    q = a // b
    if q * b != a and (a < 0) != (b < 0):
        q += 1
    return q


@njit(cache=True, inline="always")
def nan_max(a, b):
    """np.maximum of scalars: NaN wins."""
    return a if (a > b or a != a) else b


@njit(cache=True, inline="always")
def nan_min(a, b):
    return a if (a < b or a != a) else b


# ---- shapes ------------------------------------------------------------------------------------
def coalesce(out_shape, in_shapes, splits=None):
    """Merge the loop axes of an elementwise op.

    out_shape: the output shape; in_shapes: the inputs' shapes (broadcasting to out_shape);
    splits[k] (k = 0 for the output, then one per input): axes (in that operand's own numbering)
    at which its memory is not contiguous with the axis before, e.g. the channel axis of a
    concat slice. Returns (loop shape, [per-operand shape], [per-input broadcast pattern]): the
    output and every input are viewed with the per-operand shapes, pattern[k][d] is True where
    input k is broadcast along loop axis d.
    """
    rank = len(out_shape)
    operands = [tuple(out_shape)] + [(1,) * (rank - len(s)) + tuple(s) for s in in_shapes]
    shifts = [0] + [rank - len(s) for s in in_shapes]
    splits = splits or [()] * len(operands)
    cuts = [{a + shift for a in axes} for axes, shift in zip(splits, shifts)]
    kept = [d for d in range(rank) if out_shape[d] != 1]
    groups: list[list[int]] = []
    for d in kept:
        if groups:
            prev = groups[-1][-1]
            same = all((s[prev] == 1) == (s[d] == 1) for s in operands)
            contiguous = all(not any(prev < a <= d for a in cut) or s[d] == 1
                             for s, cut in zip(operands, cuts))
            if same and contiguous:
                groups[-1].append(d)
                continue
        groups.append([d])
    loop = tuple(math.prod(out_shape[d] for d in g) for g in groups) or (1,)
    shapes = []
    for s in operands:
        shapes.append(tuple(math.prod(s[d] for d in g) for g in groups) or (1,))
    patterns = [tuple(n == 1 and m != 1 for n, m in zip(s, loop)) for s in shapes[1:]]
    return loop, shapes, patterns


# ---- program -> source -------------------------------------------------------------------------
def kernel_spec(program, in_dtypes, rank: int, pattern_list, size: int):
    """The hashable description of a kernel (a literal the generated model module can hold) and
    the float64 params array it reads. ``rank`` and ``pattern_list`` come from coalesce, ``size``
    (the output's) picks the parallel or the serial loop. Raises Unsupported for what it cannot
    generate."""
    in_dtypes = tuple(np.dtype(d).name for d in in_dtypes)
    steps = []
    params: list[float] = []
    dtypes = []  # of every step's result
    for index, step in enumerate(program):
        op, refs, attrs = step[0], tuple(str(r) for r in step[1]), dict(step[2] or {})
        operand_dtypes = [_operand_dtype(ref, in_dtypes, dtypes) for ref in refs]
        dtype = operand_dtypes[0]
        if dtype not in FLOAT_TYPES + INT_TYPES:
            raise Unsupported(f"step {index} ({op}) on {dtype}")
        if dtype in INT_TYPES and op not in INTEGER_OPS:
            raise Unsupported(f"step {index} ({op}) on integers")
        if op != "Pow" and len(set(operand_dtypes)) != 1:
            raise Unsupported(f"step {index} ({op}) mixes {operand_dtypes}")
        extra: tuple = ()
        if op in _ACTIVATIONS and not (dtype in INT_TYPES and op == "Clip"):
            try:
                code, values = epilogue.activation_code(op, attrs)
            except epilogue.UnsupportedActivation as exc:
                raise Unsupported(str(exc)) from None
            extra = ("act", int(code), len(params) // 2)
            params += [float(v) for v in values]
        elif op == "Clip":
            extra = ("clip", attrs.get("min"), attrs.get("max"))
        elif op == "Pow":
            if operand_dtypes[1] not in FLOAT_TYPES + INT_TYPES:
                raise Unsupported(f"Pow exponent of dtype {operand_dtypes[1]}")
        elif op not in _UNARY and op not in _BINARY and op not in (
                "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Reciprocal"):
            raise Unsupported(f"op {op}")
        steps.append((op, refs, extra, dtype))
        dtypes.append(dtype)
    patterns = tuple(tuple(bool(b) for b in p) for p in pattern_list)
    spec = (GENERATOR_VERSION, tuple(steps), in_dtypes, dtypes[-1], rank, patterns,
            size >= PARALLEL_MIN_SIZE)
    return spec, np.array(params, dtype=np.float64)


def _operand_dtype(ref: str, in_dtypes, step_dtypes) -> str:
    index = int(ref[2:] if ref.startswith("in") else ref[1:])
    return in_dtypes[index] if ref.startswith("in") else step_dtypes[index]


def _typed(value, dtype: str) -> str:
    return f"np.{dtype}({value!r})"


def _step_expr(op: str, args: list[str], extra: tuple, dtype: str) -> str:
    """Python expression of one step over the scalar operands ``args``."""
    if op in _BINARY:
        return f"({args[0]} {_BINARY[op]} {args[1]})"
    if op in _UNARY:
        return _UNARY[op].format(args[0])
    if op == "Div":
        if dtype in INT_TYPES:
            return f"int_div({args[0]}, {args[1]})"
        return f"({args[0]} / {args[1]})"
    if op == "Reciprocal":
        return f"({_typed(1.0, dtype)} / {args[0]})"
    if op == "Pow":
        return f"(np.float64({args[0]}) ** np.float64({args[1]}))"
    if op in ("Max", "Min", "Sum", "Mean"):
        fn = {"Max": "nan_max({0}, {1})", "Min": "nan_min({0}, {1})"}.get(op, "({0} + {1})")
        acc = args[0]
        for arg in args[1:]:
            acc = f"np.{dtype}({fn.format(acc, arg)})"
        if op == "Mean":
            if dtype in INT_TYPES:
                return f"(np.float64({acc}) / {len(args)})"
            return f"({acc} / {_typed(float(len(args)), dtype)})"
        return acc
    if op == "PRelu":
        return f"({args[1]} * {args[0]} if {args[0]} < 0 else {args[0]})"
    if op == "Clip" and dtype in INT_TYPES:
        expr = args[0]
        _kind, low, high = extra
        if low is not None:
            expr = f"max({expr}, {_typed(int(low), dtype)})"
        if high is not None:
            expr = f"min({expr}, {_typed(int(high), dtype)})"
        return expr
    _kind, code, slot = extra
    return f"apply_activation({args[0]}, {code}, p{slot})"


def kernel_source(spec) -> str:
    """Python source of the kernel ``spec`` describes (see kernel_spec)."""
    _version, steps, in_dtypes, _out_dtype, rank, patterns, parallel = spec
    inputs = [f"in{k}" for k in range(len(in_dtypes))]
    slots = [extra[2] for _op, _refs, extra, _dtype in steps if extra and extra[0] == "act"]
    args = ["out"] + inputs + (["params"] if slots else [])
    lines = ["# Generated by cnncompile.backends.cpu.kernels.elementwise; do not edit.",
             "import math", "", "import numpy as np", "from numba import njit, prange", "",
             "from cnncompile.backends.cpu.kernels.elementwise import int_div, nan_max, nan_min",
             "from cnncompile.backends.cpu.kernels.epilogue import apply_activation", "", "",
             f"@njit(parallel={parallel}, cache=True, error_model='numpy')",
             f"def kernel({', '.join(args)}):"]
    for d in range(rank):
        lines.append(f"    n{d} = out.shape[{d}]")
    for slot in slots:
        lines.append(f"    p{slot} = params[{2 * slot}:{2 * slot + 2}]")
    indent = "    "
    for d in range(rank):
        loop = "prange" if d == 0 and parallel else "range"
        lines.append(f"{indent}for i{d} in {loop}(n{d}):")
        indent += "    "
    full = ", ".join(f"i{d}" for d in range(rank))
    for k, pattern in enumerate(patterns):
        index = ", ".join("0" if b else f"i{d}" for d, b in enumerate(pattern))
        lines.append(f"{indent}a{k} = in{k}[{index}]")
    names = {f"in{k}": f"a{k}" for k in range(len(in_dtypes))}
    for index, (op, refs, extra, dtype) in enumerate(steps):
        expr = _step_expr(op, [names[r] for r in refs], extra, dtype)
        # every step rounds to its dtype, as the reference does op by op
        lines.append(f"{indent}t{index} = np.{dtype}({expr})")
        names[f"t{index}"] = f"t{index}"
    lines.append(f"{indent}out[{full}] = t{len(steps) - 1}")
    return "\n".join(lines) + "\n"


# ---- loading -----------------------------------------------------------------------------------
_LOADED: dict[str, object] = {}
_LOCK = threading.Lock()
#: name prefix of the generated modules (inside the kernels package's namespace, so that the
#: backend counts their calls as kernel calls)
MODULE_PREFIX = "cnncompile.backends.cpu.kernels.generated_"


def cache_dir() -> str:
    """Where generated kernel sources live: next to Numba's cache, so one directory holds both."""
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "cnncompile", "numba")
    return os.path.join(base, "cnncompile_generated")


def _dependency_digest() -> str:
    """Numba's cache does not notice changes in the functions a kernel inlines: the sources of
    those helpers go into the key instead."""
    digest = hashlib.sha256()
    for path in (__file__, epilogue.__file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


_DEPENDENCIES = _dependency_digest()


def program_kernel(spec):
    """The compiled kernel for ``spec``: from this process's table, else from the cache
    directory, else generated and written there first."""
    source = kernel_source(spec)
    key = hashlib.sha256((_DEPENDENCIES + source).encode()).hexdigest()[:20]
    with _LOCK:
        kernel = _LOADED.get(key)
        if kernel is None:
            kernel = _import(key, source)
            _LOADED[key] = kernel
    return kernel


def generated_path(key: str) -> str:
    return os.path.join(cache_dir(), f"ew_{key}.py")


def _import(key: str, source: str):
    path = generated_path(key)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # write-then-rename: a concurrent process never imports half a file, and an existing
        # file keeps its timestamp (Numba's cache index checks it)
        temp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(temp, "w") as f:
            f.write(source)
        os.replace(temp, path)
    name = MODULE_PREFIX + key
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module.kernel
