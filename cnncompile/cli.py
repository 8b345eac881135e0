"""The command line: ``cnncompile run`` compiles and runs a model, ``cnncompile info`` analyses one,
``cnncompile inspect`` shows what the optimization passes did to it, ``cnncompile bench`` times it
against onnxruntime and ``cnncompile kernels`` times every conv algorithm on one shape.

Exit status: 0 success, 1 the model or an input is wrong (a ``UserError``), 2 the command line is
wrong, 3 a bug in cnncompile. No Python traceback is shown unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
import zipfile

import numpy as np

from . import __version__
from .errors import CnnCompileError, InputError, InternalError, UserError
from .ir.types import TensorType, shape_str

EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
INTERNAL_PREFIX = "internal error (this is a bug in cnncompile; please report it with the model)"

SHAPE_HELP = ("fix the shape of input NAME, dimensions joined by 'x' (e.g. input=1x3x224x224); "
              "needed for inputs with dynamic axes; repeat for several inputs")

MAIN_EPILOG = """\
examples:
  cnncompile info model.onnx                                summary and per-layer costs
  cnncompile info model.onnx --shape input=1x3x224x224      fix a dynamic batch axis first
  cnncompile run model.onnx                                 run on seeded random inputs
  cnncompile run model.onnx --input input=image.npy --output out.npz
  cnncompile inspect model.onnx --html report.html          what each optimization pass did
  cnncompile bench model.onnx --batch 1,8 --per-layer       latency against onnxruntime
  cnncompile kernels conv --shape 1,64,56,56 --weight 64,64,3,3 --pads 1
                                                            every conv algorithm on one shape
  cnncompile compile model.onnx -o model.cc                 save the compiled module (cpu)
  cnncompile --debug run model.onnx                         show the traceback of an error

exit status: 0 ok, 1 the model or an input is wrong, 2 bad command line, 3 a bug in cnncompile.
'cnncompile COMMAND --help' explains each command."""

RUN_EPILOG = """\
inputs:
  Every model input not given with --input gets random data of its dtype and shape, drawn from
  --seed: floats standard normal, integers uniform in [0, 10), bools fair coin flips.
  A .npy given for an input with dynamic axes also fixes those axes (no --shape needed).
  Write input files with numpy.save('x.npy', x); the dtype must match the model's exactly.

examples:
  cnncompile run resnet50.onnx --shape data=1x3x224x224
  cnncompile run model.onnx --input x=x.npy --input mask=mask.npy --output out.npz
  cnncompile run model.onnx --target cpu --seed 7 --opt-level 3

  Read the saved outputs back with: numpy.load('out.npz')['OUTPUT_NAME']"""

INFO_EPILOG = """\
what it prints:
  inputs and outputs with their types, the opset, how many nodes of each op, the parameter count
  and bytes, a table with one row per node (output shape, parameters read, MFLOPs; a multiply-add
  counts as 2 FLOPs), the total GFLOPs and the activation memory: 'naive' gives every tensor its
  own buffer, 'peak live' frees each intermediate after its last use (inputs and outputs stay).

examples:
  cnncompile info model.onnx
  cnncompile info model.onnx --shape input=8x3x224x224 --json > info.json
  cnncompile info model.onnx --opt-level 2          the graph after the optimization passes"""


INSPECT_EPILOG = """\
what it prints:
  the pipeline: one row per pass with its time, the node count before -> after and what it did
  ("folded 20 BatchNormalization into Conv"); with --check-numerics also the relative L2 error of
  the outputs after that pass against the unoptimized graph. Then the final IR (one line per node,
  with the ONNX nodes it came from and the pass that made it) and the memory plan: the arena size,
  the lower bound (most bytes live at one step), the naive total and the largest tensors.

examples:
  cnncompile inspect resnet18.onnx                          pipeline table, final IR, memory plan
  cnncompile inspect resnet18.onnx --html report.html       one page with before/after pictures
  cnncompile inspect model.onnx --json > passes.json        the same as one JSON document
  cnncompile inspect model.onnx --print-after fold_batchnorm fuse_conv_activation
  cnncompile inspect model.onnx --print-after-all > ir.txt  the IR after every pass
  cnncompile inspect model.onnx --check-numerics            find the pass that changed the outputs
  cnncompile inspect model.onnx --disable fuse_residual_add --dot graph.svg
  cnncompile inspect model.onnx --passes fold_batchnorm,fuse_conv_activation
  cnncompile inspect --list-passes                          every pass and its opt-levels

IR dumps (--print-*) go to stdout, or to stderr with --json. --disable, --print-after and
--print-before take several names: give MODEL before them, or join the names with commas.
--check-numerics runs the NumPy reference on seeded random inputs before the first pass and after
every pass; if a pass's error exceeds --tolerance it is named on stderr and the exit status is 1.
--dot writes the final graph: Graphviz source for FILE.dot / FILE.gv, a finished picture for
FILE.svg (drawn by cnncompile; no Graphviz needed)."""


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot see (an unreadable .npy, say): exit 2."""


# ---- argument types ------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'input=1x3x224x224' -> ('input', (1, 3, 224, 224)); commas work as separators too."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not NAME=DIMS; write the input's name, '=' and its dimensions joined "
            f"by 'x', e.g. --shape input=1x3x224x224")
    parts = re.split(r"[x,]", dims.strip())
    bad = [p for p in parts if not p.strip().isdigit()]
    if bad:
        raise argparse.ArgumentTypeError(
            f"'{text}': dimension '{bad[0]}' is not a non-negative integer; write the dimensions "
            f"as integers joined by 'x', e.g. --shape {name}=1x3x224x224")
    return name, tuple(int(p) for p in parts)


def parse_input(text: str) -> tuple[str, str]:
    """'x=path/to/x.npy' -> ('x', 'path/to/x.npy')."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not NAME=FILE; write the input's name, '=' and a .npy file, "
            f"e.g. --input input=image.npy")
    return name, path


def parse_pass_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']; names are checked against the registry when the pipeline is built."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"'{text}' names no pass; see --list-passes")
    return names


def parse_target(text: str) -> str:
    from .backends import get_backend
    try:
        get_backend(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# ---- the parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .backends import TARGETS

    parser = argparse.ArgumentParser(
        prog="cnncompile", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile, run and analyse convolutional networks stored as ONNX models.",
        epilog=MAIN_EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full Python traceback of any error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # --debug is accepted after the command too; SUPPRESS keeps a global --debug from being reset.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full Python traceback of any error")

    run = commands.add_parser(
        "run", parents=[debug], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compile a model and run it once on given or random inputs",
        description="Compile MODEL, run it once and print every output's shape, dtype and\n"
                    "min/max/mean, with the compile and run times.",
        epilog=RUN_EPILOG)
    run.add_argument("model", metavar="MODEL", help="path of the .onnx file")
    run.add_argument("--shape", metavar="NAME=DIMS", type=parse_shape, action="append",
                     default=[], help=SHAPE_HELP)
    run.add_argument("--input", metavar="NAME=FILE", type=parse_input, action="append",
                     default=[], help="feed input NAME from a .npy file; repeat for several "
                     "inputs (the others get seeded random data)")
    run.add_argument("--output", metavar="FILE", help="save every output to this .npz archive, "
                     "keyed by output name")
    run.add_argument("--target", default="reference", type=parse_target,
                     metavar="{" + ",".join(TARGETS) + "}",
                     help="backend to compile for (default: reference, the NumPy interpreter)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of the random inputs (default: 0)")
    run.add_argument("--opt-level", type=int, choices=range(4), default=2, metavar="{0,1,2,3}",
                     help="optimization level (default: 2)")
    run.set_defaults(func=cmd_run)

    info = commands.add_parser(
        "info", parents=[debug], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="summarize a model: types, op counts, parameters, FLOPs, activation memory",
        description="Import MODEL and print what it computes and what that costs.",
        epilog=INFO_EPILOG)
    info.add_argument("model", metavar="MODEL", help="path of the .onnx file")
    info.add_argument("--shape", metavar="NAME=DIMS", type=parse_shape, action="append",
                      default=[], help=SHAPE_HELP)
    info.add_argument("--json", action="store_true",
                      help="print one JSON document instead of text (FLOPs and bytes as integers)")
    info.add_argument("--opt-level", type=int, choices=range(4), default=0, metavar="{0,1,2,3}",
                      help="analyse the graph after this level's passes (default: 0, the model "
                      "as imported with dead nodes removed)")
    info.set_defaults(func=cmd_info)

    insp = commands.add_parser(
        "inspect", parents=[debug], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="show what each optimization pass did: timings, summaries, IR, memory plan, "
             "HTML report",
        description="Import MODEL, run the optimization pipeline with its instruments on and show\n"
                    "what every pass did. With --debug the IR is also verified after every pass.",
        epilog=INSPECT_EPILOG)
    insp.add_argument("model", metavar="MODEL", nargs="?",
                      help="path of the .onnx file (not needed with --list-passes)")
    insp.add_argument("--shape", metavar="NAME=DIMS", type=parse_shape, action="append",
                      default=[], help=SHAPE_HELP)
    insp.add_argument("--opt-level", type=int, choices=range(4), default=2, metavar="{0,1,2,3}",
                      help="which pipeline to run (default: 2; see --list-passes)")
    insp.add_argument("--passes", metavar="PASS,...", type=parse_pass_list,
                      help="run exactly these passes, in this order, instead of --opt-level's")
    insp.add_argument("--disable", metavar="PASS", nargs="+", action="extend", default=[],
                      type=parse_pass_list, help="leave these passes out (names separated by "
                      "spaces or commas; repeatable)")
    insp.add_argument("--print-after-all", action="store_true",
                      help="print the IR after every pass")
    insp.add_argument("--print-after", metavar="PASS", nargs="+", action="extend", default=[],
                      type=parse_pass_list, help="print the IR after these passes")
    insp.add_argument("--print-before-all", action="store_true",
                      help="print the IR before every pass")
    insp.add_argument("--print-before", metavar="PASS", nargs="+", action="extend", default=[],
                      type=parse_pass_list, help="print the IR before these passes")
    insp.add_argument("--check-numerics", action="store_true",
                      help="run the reference executor after every pass and report each pass's "
                      "error against the unoptimized graph; exit 1 naming the first pass over "
                      "--tolerance")
    insp.add_argument("--tolerance", type=float, default=1e-5, metavar="X",
                      help="relative L2 error a pass may introduce (default: 1e-5)")
    insp.add_argument("--seed", type=int, default=0,
                      help="seed of the random inputs of --check-numerics (default: 0)")
    insp.add_argument("--target", default="reference", type=parse_target,
                      metavar="{" + ",".join(TARGETS) + "}",
                      help="backend whose preferences (layout) the passes follow "
                      "(default: reference)")
    insp.add_argument("--layout", choices=("NCHW", "NHWC"),
                      help="store activations in this layout instead of the target's preferred "
                      "one (shows what choose_layout does for a channels-last backend)")
    insp.add_argument("--dot", metavar="FILE",
                      help="write the final graph: Graphviz source (.dot, .gv) or a picture (.svg)")
    insp.add_argument("--html", metavar="FILE",
                      help="write a self-contained HTML report: pipeline, before/after pictures "
                      "per pass, conv algorithms, memory timeline")
    insp.add_argument("--json", action="store_true",
                      help="print one JSON document: {\"passes\": [...], \"memory\": {...}}")
    insp.add_argument("--no-ir", action="store_true",
                      help="leave the final IR out of the text output")
    insp.add_argument("--list-passes", action="store_true",
                      help="list every registered pass with its opt-levels and description")
    insp.set_defaults(func=cmd_inspect)
    add_bench_parser(commands, debug)
    add_kernels_parser(commands, debug)
    add_compile_command(commands, debug)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cnncompile`` and ``python -m cnncompile``; returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except UsageError as exc:
        return _fail(debug, EXIT_USAGE, f"cnncompile {args.command}: error: {exc}\n"
                     f"(see 'cnncompile {args.command} --help')")
    except UserError as exc:
        return _fail(debug, EXIT_USER, f"error: {exc}")
    except KeyboardInterrupt:
        return _fail(debug, 130, "interrupted")
    except BrokenPipeError:
        # the reader of our stdout went away (| head); nothing more to say to it
        sys.stdout = open(os.devnull, "w")
        return EXIT_USER
    except MemoryError as exc:
        return _fail(debug, EXIT_USER, f"error: out of memory{': ' + str(exc) if str(exc) else ''}")
    except Exception as exc:
        detail = str(exc) if isinstance(exc, CnnCompileError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, InternalError) and exc.__cause__ is not None:
            detail += f" [{type(exc.__cause__).__name__}]"
        return _fail(debug, EXIT_INTERNAL, f"{INTERNAL_PREFIX}: {detail}\n"
                     "(run again with --debug to see the traceback)")


def _fail(debug: bool, status: int, message: str) -> int:
    sys.stdout.flush()
    if debug:
        traceback.print_exc(file=sys.stderr)
    else:
        print(message, file=sys.stderr)
    return status


# ---- run -----------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    import cnncompile
    from .frontend import load_model

    shapes = _collect(args.shape, "--shape")
    files = _collect(args.input, "--input")
    arrays = {name: _load_npy(name, path) for name, path in files.items()}
    output = _output_path(args.output) if args.output else None

    proto = load_model(args.model)
    from .frontend.onnx_import import declared_inputs
    declared = declared_inputs(proto)
    for name, array in arrays.items():
        if name not in declared:
            raise InputError(f"--input {name}=...: '{name}' is not an input of the model; its "
                             f"inputs are: {', '.join(declared) or 'none'}")
        dims = declared[name]
        if dims is not None and not _fits(dims, array.shape):
            raise InputError(f"input '{name}' (--input {name}={files[name]}) has shape "
                             f"{list(array.shape)}, but the model declares {_dims_str(dims)}")
        if name not in shapes and (dims is None or None in dims):
            shapes[name] = tuple(array.shape)

    start = time.perf_counter()
    module = cnncompile.compile(proto, target=args.target, input_shapes=shapes or None,
                                opt_level=args.opt_level)
    compile_s = time.perf_counter() - start

    rng = np.random.default_rng(args.seed)
    feeds, sources = {}, {}
    for value in module.graph.inputs:
        if value.name in arrays:
            feeds[value.name] = _check_file_input(value.name, files[value.name], value.type,
                                                  arrays[value.name], shapes)
            sources[value.name] = files[value.name]
        else:
            feeds[value.name] = random_array(rng, value.type)
            sources[value.name] = f"random {_distribution(value.type)} (seed {args.seed})"

    start = time.perf_counter()
    outputs = module.run(feeds)
    run_s = time.perf_counter() - start

    graph = module.graph
    print(f"model    {args.model}  (graph '{graph.name}', opset {graph.opset}, "
          f"{len(graph.nodes)} nodes)")
    print(f"target   {args.target}, opt-level {args.opt_level}")
    print("inputs")
    _print_table([[name, str(TensorType.of(feeds[name])), sources[name]]
                  for name in feeds], indent=2)
    print("outputs")
    rows = [["name", "type", "min", "max", "mean"]]
    rows += [[name, str(TensorType.of(array))] + array_stats(array)
             for name, array in outputs.items()]
    _print_table(rows, indent=2, numeric_from=2)
    print(f"time     compile {compile_s:.3f} s, run {run_s:.3f} s")
    if output is not None:
        save_npz(output, outputs)
        print(f"saved    {len(outputs)} output(s) to {output}")
    return EXIT_OK


def _collect(pairs, flag: str) -> dict:
    result = {}
    for name, value in pairs:
        if name in result:
            raise UsageError(f"{flag} {name}=... is given twice; give each input once")
        result[name] = value
    return result


def _load_npy(name: str, path: str) -> np.ndarray:
    where = f"--input {name}={path}"
    if not os.path.isfile(path):
        raise UsageError(f"{where}: no such file; write the array with numpy.save('{path}', x)")
    hint = f"write the array with numpy.save('{path}', x)"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic.startswith(b"PK"):
            raise UsageError(f"{where}: the file is an .npz archive; give one .npy file per "
                             f"input ({hint})")
        if magic != b"\x93NUMPY":
            raise UsageError(f"{where}: not a .npy file (it lacks the .npy header); {hint}")
        return np.load(path, allow_pickle=False)
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, EOFError) as exc:
        # object arrays (pickles) and truncated files end up here
        raise UsageError(f"{where}: not a readable .npy array ({exc}); {hint}") from None


def _output_path(path: str) -> str:
    if not path.endswith(".npz"):
        path += ".npz"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--output {path}: the folder {folder} does not exist")
    return path


def _fits(dims: tuple, shape: tuple) -> bool:
    return len(dims) == len(shape) and all(d is None or d == s for d, s in zip(dims, shape))


def _dims_str(dims: tuple) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _check_file_input(name: str, path: str, want: TensorType, array: np.ndarray,
                      shapes: dict) -> np.ndarray:
    where = f"input '{name}' (--input {name}={path})"
    if tuple(array.shape) != tuple(want.shape):
        how = (f" (set by --shape {name}={'x'.join(str(d) for d in shapes[name])})"
               if name in shapes and tuple(shapes[name]) != tuple(array.shape) else "")
        raise InputError(f"{where} has shape {list(array.shape)}, but the model expects "
                         f"{shape_str(want.shape)}{how}")
    if array.dtype != want.dtype:
        raise InputError(f"{where} has dtype {array.dtype}, but the model expects {want.dtype}; "
                         f"save it with numpy.save('{path}', x.astype(numpy.{want.dtype.name}))")
    return array


def random_array(rng: np.random.Generator, t: TensorType) -> np.ndarray:
    """Random data of type ``t``: floats standard normal, integers in [0, 10), bools coin flips."""
    if np.issubdtype(t.dtype, np.floating):
        return rng.standard_normal(t.shape).astype(t.dtype)
    if t.dtype == np.bool_:
        return rng.random(t.shape) < 0.5
    return rng.integers(0, 10, size=t.shape).astype(t.dtype)


def _distribution(t: TensorType) -> str:
    if np.issubdtype(t.dtype, np.floating):
        return "normal"
    return "bools" if t.dtype == np.bool_ else "integers in [0, 10)"


def array_stats(array: np.ndarray) -> list[str]:
    """[min, max, mean] as text; NaNs are left out of them and counted."""
    if array.size == 0:
        return ["-", "-", "(empty)"]
    values = array.astype(np.float64) if array.dtype == np.bool_ else array
    finite = values[~np.isnan(values)] if np.issubdtype(values.dtype, np.floating) else values
    nans = values.size - finite.size
    if finite.size == 0:
        return ["nan", "nan", "nan"]
    stats = [f"{finite.min():.6g}", f"{finite.max():.6g}", f"{finite.mean(dtype=np.float64):.6g}"]
    if nans:
        stats[2] += f"  ({nans} NaN)"
    return stats


def save_npz(path: str, outputs: dict[str, np.ndarray]) -> None:
    """Like numpy.savez, which cannot take an array named 'file' as a keyword."""
    try:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, array in outputs.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    except OSError as exc:
        raise UserError(f"cannot write --output {path}: {exc.strerror or exc}") from None


# ---- compile -------------------------------------------------------------------------------------
COMPILE_EPILOG = """\
what it writes (no pickles):
  DIR/module.py       the generated Python module (the code Module.source shows)
  DIR/constants.npz   the arrays it binds: weights, pre-packed and transformed weights
  DIR/graph.json      inputs and outputs with dtypes and shapes, target, opset, version, memory plan
  DIR/graph.txt       the optimized IR as text, for people

  Run it again, without the .onnx file and without recompiling, from Python:
      mod = cnncompile.load("DIR"); outputs = mod.run({"input": x})
  An artifact loads only in the cnncompile version that wrote it.

examples:
  cnncompile compile resnet50.onnx -o resnet50.cc --shape data=1x3x224x224
  cnncompile compile model.onnx -o model.cc --opt-level 3     autotune every conv first"""


def add_compile_command(commands, debug) -> None:
    comp = commands.add_parser(
        "compile", parents=[debug], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compile a model for target cpu and save it to a folder that cnncompile.load runs",
        description="Compile MODEL for target cpu (generated Python + Numba kernels, compiled\n"
                    "now) and write the result to the folder DIR.",
        epilog=COMPILE_EPILOG)
    comp.add_argument("model", metavar="MODEL", help="path of the .onnx file")
    comp.add_argument("-o", "--output", metavar="DIR", required=True,
                      help="folder to write (created if needed; its files are replaced)")
    comp.add_argument("--shape", metavar="NAME=DIMS", type=parse_shape, action="append",
                      default=[], help=SHAPE_HELP)
    comp.add_argument("--opt-level", type=int, choices=range(4), default=2, metavar="{0,1,2,3}",
                      help="optimization level (default: 2; 3 also autotunes every conv)")
    comp.add_argument("--tune", action="store_true",
                      help="autotune every conv at this opt-level too (as --opt-level 3 does)")
    comp.set_defaults(func=cmd_compile)


def cmd_compile(args) -> int:
    import cnncompile
    from .analysis import format_bytes

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"-o {args.output}: it is a file; give a folder")
    shapes = _collect(args.shape, "--shape")
    start = time.perf_counter()
    module = cnncompile.compile(args.model, target="cpu", input_shapes=shapes or None,
                                opt_level=args.opt_level, tune=args.tune)
    compile_s = time.perf_counter() - start
    folder = cnncompile.save(module, args.output)
    graph = module.graph
    tuned = " + autotune" if args.tune and args.opt_level < 3 else ""
    print(f"model    {args.model}  (graph '{graph.name}', opset {graph.opset}, "
          f"{len(graph.nodes)} nodes)")
    print(f"target   cpu, opt-level {args.opt_level}{tuned}; compiled in {compile_s:.2f} s")
    print(f"inputs   {', '.join(f'{v.name}: {v.type}' for v in graph.inputs) or 'none'}")
    print(f"outputs  {', '.join(f'{v.name}: {v.type}' for v in graph.outputs)}")
    print(f"wrote    {folder}")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            print(f"  {name:<14} {format_bytes(os.path.getsize(path))}")
    print(f"load it  cnncompile.load({folder!r})")
    return EXIT_OK


# ---- info ----------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from .analysis import summarize
    from .frontend import import_onnx
    from .passes import run_pipeline

    shapes = _collect(args.shape, "--shape")
    graph, _ = run_pipeline(import_onnx(args.model, input_shapes=shapes or None), args.opt_level)
    summary = summarize(graph)
    if args.json:
        doc = {"model": args.model, "opt_level": args.opt_level, **summary.to_dict()}
        print(json.dumps(doc, indent=2))
    else:
        print_summary(args.model, summary)
    return EXIT_OK


# ---- inspect -------------------------------------------------------------------------------------
DOT_SUFFIXES = (".dot", ".gv")


def cmd_inspect(args) -> int:
    from .inspect import inspect

    if args.list_passes:
        print_pass_list()
        return EXIT_OK
    if not args.model:
        eaten = [name for name in _flat(args.disable) + _flat(args.print_after)
                 + _flat(args.print_before) if name.lower().endswith(".onnx")]
        if eaten:
            raise UsageError(f"'{eaten[0]}' was read as a pass name; give MODEL before "
                             "--disable/--print-after/--print-before, or join pass names "
                             "with commas")
        raise UsageError("MODEL is required (only --list-passes works without one)")
    shapes = _collect(args.shape, "--shape")
    dot = _writable(args.dot, "--dot", DOT_SUFFIXES + (".svg",)) if args.dot else None
    html = _writable(args.html, "--html", (".html", ".htm")) if args.html else None
    passes = args.passes or None
    print_after = ["all"] if args.print_after_all else _flat(args.print_after)
    print_before = ["all"] if args.print_before_all else _flat(args.print_before)
    stream = sys.stderr if args.json else sys.stdout

    report = inspect(args.model, input_shapes=shapes or None, opt_level=args.opt_level,
                     disabled_passes=_flat(args.disable), passes=passes,
                     check_numerics=args.check_numerics, tolerance=args.tolerance,
                     print_after=print_after, print_before=print_before,
                     keep_graphs=html is not None, stream=stream, target=args.target,
                     layout=args.layout, verify_each=getattr(args, "debug", False),
                     seed=args.seed)
    written = []
    if dot is not None:
        if dot.lower().endswith(DOT_SUFFIXES):
            text = report.graph.to_dot()
        else:
            from .report.svg import graph_svg
            text = graph_svg(report.graph, title=f"{report.model} after the pipeline")
        _write_text(dot, text, "--dot")
        written.append(f"wrote    {dot} (final graph, {len(report.graph.nodes)} nodes)")
    if html is not None:
        _write_text(html, report.to_html(), "--html")
        written.append(f"wrote    {html} (HTML report)")
    if args.json:
        print(report.to_json())
    else:
        print(report.format_text(ir=not args.no_ir))
        if written:
            print()
    for line in written:
        print(line, file=sys.stderr if args.json else sys.stdout)
    bad = report.bad_pass_message()
    if bad is not None:
        sys.stdout.flush()
        print(f"error: --check-numerics: {bad}", file=sys.stderr)
        return EXIT_USER
    return EXIT_OK


def _flat(groups) -> list[str]:
    return [name for group in groups or () for name in group]


def _writable(path: str, flag: str, suffixes: tuple[str, ...]) -> str:
    if not path.lower().endswith(suffixes):
        raise UsageError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    return path


def _write_text(path: str, text: str, flag: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise UserError(f"cannot write {flag} {path}: {exc.strerror or exc}") from None


def print_pass_list() -> None:
    from .passes import PIPELINES, list_passes

    rows = [["pass", "opt-levels", "description"]]
    for info in list_passes():
        levels = [str(level) for level, names in sorted(PIPELINES.items()) if info.name in names]
        rows.append([info.name, ",".join(levels) or "-", info.description])
    _print_table(rows)
    print()
    for level, names in sorted(PIPELINES.items()):
        from .passes import PASSES
        present = [name for name in names if name in PASSES]
        print(f"opt-level {level}: {' -> '.join(present) or '(no passes)'}")


def print_summary(model: str, summary) -> None:
    from .analysis import format_bytes

    def types(infos):
        return ", ".join(f"{t.name}: {t.type}" for t in infos) or "none"

    ops = ", ".join(f"{op} {n}" for op, n in summary.op_counts.items()) or "none"
    mem = summary.memory
    peak_at = f"during '{mem.peak_node}'" if mem.peak_node else "the inputs alone"
    flops = summary.total_flops
    lines = [
        ("model", model),
        ("graph", f"'{summary.name}', opset {summary.opset}"),
        ("inputs", types(summary.inputs)),
        ("outputs", types(summary.outputs)),
        ("nodes", f"{len(summary.layers)}: {ops}"),
        ("params", f"{summary.parameters:,} ({format_bytes(summary.parameter_bytes)})"),
        ("compute", f"{flops / 1e9:.4g} GFLOPs ({flops:,} FLOPs)"),
        ("memory", f"activations {format_bytes(mem.naive_bytes)} naive, "
                   f"{format_bytes(mem.peak_bytes)} peak live ({peak_at})"),
    ]
    if summary.unknown_flops:
        lines.append(("note", "FLOPs of data-dependent nodes not counted: "
                      + ", ".join(summary.unknown_flops)))
    if mem.unknown:
        lines.append(("note", "activations of data-dependent size not counted: "
                      + ", ".join(mem.unknown)))
    width = max(len(k) for k, _ in lines)
    for key, text in lines:
        print(f"{key:<{width}}  {text}")
    print()
    rows = [["layer", "op", "output shape", "params", "MFLOPs"]]
    for row in summary.layers:
        mflops = "?" if row.flops is None else f"{row.flops / 1e6:.3f}"
        rows.append([row.name, row.op, ", ".join(str(o.type) for o in row.outputs),
                     f"{row.params:,}", mflops])
    rows.append(["total", "", "", f"{summary.parameters:,}",
                 f"{flops / 1e6:.3f}"])
    _print_table(rows, numeric_from=3)


def _print_table(rows: list[list[str]], indent: int = 0, numeric_from: int | None = None) -> None:
    """Left-aligned text columns, right-aligned numeric ones (index >= numeric_from)."""
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = []
        for i, cell in enumerate(r):
            right = numeric_from is not None and i >= numeric_from
            cells.append(f"{cell:>{widths[i]}}" if right else f"{cell:<{widths[i]}}")
        print(" " * indent + "  ".join(cells).rstrip())


# ---- bench and kernels ---------------------------------------------------------------------------
BENCH_EPILOG = """\
what it prints:
  per batch: each engine's median and p90 latency over --runs timed runs, p90/median (the
  spread), images/s and GFLOP/s, and the latency ratio cnncompile / engine (below 1: cnncompile
  is faster). The engines run in the same process in alternating blocks (A B A B ...), each block
  after --warmup untimed calls, so one engine's idle thread pool cannot slow the other's timed
  runs. Then the compile time, the arena size, how many nodes still run a NumPy reference, the
  outputs' error against onnxruntime and the process's peak RSS. --per-layer adds one row per
  node: algorithm, time, GFLOP/s, % of the machine's GEMM ceiling (np.matmul 2048^3 float32,
  measured once) and share of the total.

examples:
  cnncompile bench resnet18.onnx --batch 1,8
  cnncompile bench zoo:resnet50 --per-layer --top 15
  cnncompile bench zoo:unet --image-size 256 --json > unet.json
  cnncompile bench model.onnx --shape input=1x3x320x320 --html bench.html
  cnncompile bench zoo:resnet18 --self-check          onnxruntime vs onnxruntime: must read ~1.00

MODEL is an .onnx file or zoo:NAME (a zoo model with random weights; see cnncompile.zoo).
--batch sets the dynamic leading axis of every input (zoo models: 'N'); one compile per batch.
onnxruntime is an optional extra: pip install cnncompile[bench]."""

KERNELS_EPILOG = """\
what it prints:
  for every conv algorithm: whether it applies to the shape (n/a with the reason when not),
  whether a kernel or the NumPy reference ran it, the median time, GFLOP/s, % of the GEMM
  ceiling and the relative L2 error against the reference executor; onnxruntime's time and
  error for the same conv last.

examples:
  cnncompile kernels conv --shape 1,64,56,56 --weight 64,64,3,3 --pads 1
  cnncompile kernels conv --shape 1,32,112,112 --weight 32,1,3,3 --group 32 --pads 1 --stride 2
  cnncompile kernels conv --shape 8,256,14,14 --weight 256,256,3,3 --pads 1 \\
      --algos im2col_gemm,winograd_f2x2_3x3,winograd_f4x4_3x3

--stride and --dilation take one value or one per spatial axis; --pads one value, one per axis
(symmetric) or the ONNX order (all begins, then all ends)."""


def parse_ints(text: str) -> list[int]:
    """'1,64,56,56' -> [1, 64, 56, 56] ('x' separates too)."""
    parts = [p for p in re.split(r"[x,]", text.strip()) if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of integers such as "
                                         "1,64,56,56") from None
    if not values:
        raise argparse.ArgumentTypeError(f"'{text}' names no integers")
    return values


def parse_batches(text: str) -> list[int]:
    values = parse_ints(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': batch sizes must be positive")
    return values


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def _timing_options(parser: argparse.ArgumentParser, runs: int) -> None:
    parser.add_argument("--runs", type=positive, default=runs,
                        help=f"timed runs per engine (default: {runs})")
    parser.add_argument("--warmup", type=int, default=2, metavar="N",
                        help="untimed calls at the start of every block (default: 2)")
    parser.add_argument("--blocks", type=positive, default=5, metavar="N",
                        help="alternating blocks the runs are split into (default: 5)")
    parser.add_argument("--threads", type=positive, default=2, metavar="N",
                        help="threads for every engine: Numba, NumPy's BLAS and onnxruntime's "
                        "intra-op pool (default: 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def add_bench_parser(commands, debug) -> None:
    from .backends import TARGETS

    bench = commands.add_parser(
        "bench", parents=[debug], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="time a compiled model against onnxruntime (latency, throughput, per layer)",
        description="Compile MODEL and time it against onnxruntime in the same process.",
        epilog=BENCH_EPILOG)
    bench.add_argument("model", metavar="MODEL", help="path of the .onnx file, or zoo:NAME")
    bench.add_argument("--shape", metavar="NAME=DIMS", type=parse_shape, action="append",
                       default=[], help=SHAPE_HELP)
    bench.add_argument("--batch", metavar="B,...", type=parse_batches,
                       help="batch sizes to compile and time, e.g. 1,8 (default: the --shape "
                       "given, or 1 for a dynamic batch axis)")
    bench.add_argument("--image-size", type=positive, metavar="PIXELS",
                       help="image size of a zoo:NAME model (default: the model's own)")
    bench.add_argument("--compare", metavar="ENGINE,...",
                       help="engines to time beside cnncompile: onnxruntime, torch (PyTorch "
                       "eager: one torch.nn.functional call per ONNX node) or none (default: "
                       "onnxruntime when it is installed)")
    bench.add_argument("--torch-model", metavar="FILE.pt",
                       help="time this TorchScript file of the same network as the torch engine "
                       "instead of the eager translation")
    bench.add_argument("--per-layer", action="store_true",
                       help="add the per-layer table (target cpu)")
    bench.add_argument("--top", type=positive, metavar="N",
                       help="show only the N slowest layers (the JSON keeps all)")
    bench.add_argument("--html", metavar="FILE", help="write the report as one HTML page")
    bench.add_argument("--self-check", action="store_true",
                       help="validate the harness: time onnxruntime against a second "
                       "onnxruntime session; the ratio must read ~1.00")
    bench.add_argument("--target", default="cpu", type=parse_target,
                       metavar="{" + ",".join(TARGETS) + "}", help="backend (default: cpu)")
    bench.add_argument("--opt-level", type=int, choices=range(4), default=2, metavar="{0,1,2,3}",
                       help="optimization pipeline (default: 2)")
    bench.add_argument("--budget", type=float, metavar="SECONDS",
                       help="at most this many seconds of timed runs per engine and batch: "
                       "slow models get fewer runs (at least 5)")
    _timing_options(bench, runs=30)
    bench.set_defaults(func=cmd_bench)


def add_kernels_parser(commands, debug) -> None:
    from .passes.lowering import ALGORITHMS

    kernels = commands.add_parser(
        "kernels", parents=[debug], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the kernel lab: time every conv algorithm on one shape, with its error",
        description="Build a one-convolution model, force each algorithm in turn and time it.",
        epilog=KERNELS_EPILOG)
    families = kernels.add_subparsers(dest="family", metavar="FAMILY", required=True)
    conv = families.add_parser(
        "conv", parents=[debug], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="convolution algorithms", description="Time every conv algorithm on one shape.",
        epilog=KERNELS_EPILOG)
    conv.add_argument("--shape", metavar="N,C,H,W", type=parse_ints, required=True,
                      help="input shape (1 to 3 spatial axes)")
    conv.add_argument("--weight", metavar="K,C,R,S", type=parse_ints, required=True,
                      help="weight shape: output channels, input channels / group, kernel")
    conv.add_argument("--stride", metavar="S", type=parse_ints, help="strides (default: 1)")
    conv.add_argument("--pads", metavar="P", type=parse_ints, help="pads (default: 0)")
    conv.add_argument("--dilation", metavar="D", type=parse_ints, help="dilations (default: 1)")
    conv.add_argument("--group", type=positive, default=1, help="groups (default: 1)")
    conv.add_argument("--bias", action="store_true", help="give the conv a bias")
    conv.add_argument("--algos", metavar="all|A,...", default="all",
                      help="algorithms to try: all (default) or a comma-separated list of "
                      + ", ".join(ALGORITHMS))
    conv.add_argument("--no-ort", action="store_true", help="do not time onnxruntime")
    _timing_options(conv, runs=20)
    conv.set_defaults(func=cmd_kernels)


def cmd_bench(args) -> int:
    from . import bench

    shapes = _collect(args.shape, "--shape")
    html = _writable(args.html, "--html", (".html", ".htm")) if args.html else None
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    proto = bench.load_bench_model(args.model, args.image_size)
    batches = args.batch or [None]
    if args.self_check:
        checks = [bench.self_check(proto, shapes, batch, args.runs, args.warmup, args.blocks,
                                   args.threads) for batch in batches]
        if args.json:
            print(json.dumps({"model": args.model, "self_check": checks}, indent=2))
        else:
            print("\n\n".join(bench.format_self_check(c) for c in checks))
        return EXIT_OK
    if args.per_layer and args.target != "cpu":
        raise UsageError("--per-layer needs --target cpu")
    compare = bench.parse_compare(args.compare)
    log = None if args.json else (lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    report = bench.bench_model(proto, shapes, batches, compare, args.per_layer, args.runs,
                               args.warmup, args.blocks, args.threads, args.target,
                               args.opt_level, args.torch_model, model_name=args.model,
                               compare_explicit=args.compare is not None,
                               budget_s=args.budget, log=log)
    if html is not None:
        _write_text(html, bench.bench_html(report), "--html")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(bench.format_bench(report, top=args.top))
        if html is not None:
            print(f"wrote    {html} (HTML report)")
    return EXIT_OK


def cmd_kernels(args) -> int:
    from . import bench

    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    lab = bench.kernel_lab_conv(args.shape, args.weight, args.stride, args.pads, args.dilation,
                                args.group, args.bias, algos, args.runs, args.warmup, args.blocks,
                                args.threads, compare_ort=not args.no_ort)
    if args.json:
        print(json.dumps(lab, indent=2))
    else:
        print(bench.format_kernel_lab(lab))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
