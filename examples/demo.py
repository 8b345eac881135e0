"""cnncompile in one minute: build a zoo CNN, save it as ONNX, compile it, run it, check it.

    python examples/demo.py                      # ResNet-18 at 224x224
    python examples/demo.py --model mobilenetv2 --image-size 160
    python examples/demo.py --list
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time

import numpy as np
import onnx

import cnncompile
from cnncompile import zoo
from cnncompile.analysis import format_bytes, summarize
from cnncompile.errors import CnnCompileError
from cnncompile.ir.printer import format_graph, format_node

RULE = "-" * 78
# float32 agreement; random deep networks amplify rounding differences at large sizes, so this is
# looser than the tests' 1e-5 (which they hold at small sizes)
TOLERANCE = 1e-4


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Build a model from cnncompile's zoo (random weights, nothing downloaded), "
                    "save it as ONNX, compile it, run it on a random input and compare the "
                    "result with onnxruntime when it is installed.")
    parser.add_argument("--model", default="resnet18", metavar="NAME",
                        help="zoo model to use (default: resnet18; see --list)")
    parser.add_argument("--image-size", type=int, default=None, metavar="PX",
                        help="input height and width (default: the model's own, 224 for ResNet)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the input")
    parser.add_argument("--target", default="reference", choices=["reference", "cpu"],
                        help="compilation target (default: reference)")
    parser.add_argument("--out", default="out", metavar="DIR",
                        help="folder for the .onnx file (default: ./out); '' uses a temporary one")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="time N runs and report the best (default: 3)")
    parser.add_argument("--ir", action="store_true",
                        help="print the whole compiled IR, not only its first nodes")
    parser.add_argument("--list", action="store_true", help="list the zoo's models and exit")
    return parser.parse_args(argv)


def list_models() -> None:
    print("cnncompile.zoo models (name, default input size, description):")
    for name in zoo.MODELS:
        lines = textwrap.wrap(zoo.describe(name), 54)
        print(f"  {name:16s} {zoo.default_image_size(name):4d} px  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':17s}{'':10s}{line}")


def seconds(t: float) -> str:
    return f"{t * 1000:.0f} ms" if t < 1 else f"{t:.2f} s"


def row(label: str, text: str) -> None:
    print(f"  {label:<10s} {text}")


def op_table(counts: dict[str, int], width: int = 64) -> list[str]:
    """'Conv x20   Relu x17 ...' wrapped into lines, most frequent first."""
    items = [f"{op} x{n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines, line = [], ""
    for item in items:
        if line and len(line) + len(item) + 3 > width:
            lines.append(line)
            line = ""
        line = f"{line}   {item}" if line else item
    return lines + [line]


def describe_output(name: str, array: np.ndarray) -> None:
    if array.ndim == 2 and array.shape[1] >= 5:
        top = np.argsort(-array[0], kind="stable")[:5]
        picks = "  ".join(f"#{i} ({array[0, i]:+.3f})" for i in top)
        row("top-5", f"{name}[0]: {picks}")
    else:
        row("stats", f"{name}: mean {array.mean():+.4f}  std {array.std():.4f}  "
                     f"min {array.min():+.4f}  max {array.max():+.4f}")


def compare_with_onnxruntime(path: str, feeds: dict, ours: dict) -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        row("check", "onnxruntime is not installed; pip install onnxruntime to compare")
        return True
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    theirs = sess.run(None, feeds)
    elapsed = time.perf_counter() - start
    ok = True
    for out, expected in zip(sess.get_outputs(), theirs):
        actual = ours[out.name].astype(np.float64)
        expected = expected.astype(np.float64)
        diff = np.abs(actual - expected)
        rel_max = diff.max() / max(np.abs(expected).max(), 1e-30)
        rel_l2 = np.linalg.norm(diff) / max(np.linalg.norm(expected), 1e-30)
        good = rel_l2 <= TOLERANCE
        ok = ok and good
        row("vs ORT", f"{out.name}: max |diff| {diff.max():.2e}, max rel diff {rel_max:.2e}, "
                      f"relative L2 {rel_l2:.2e}  {'OK' if good else 'MISMATCH'}")
        if actual.ndim == 2 and actual.shape[1] >= 5:
            same = np.array_equal(np.argsort(-actual[0], kind="stable")[:5],
                                  np.argsort(-expected[0], kind="stable")[:5])
            row("", f"top-5 {'agrees' if same else 'differs'} with onnxruntime "
                    f"{ort.__version__} (which ran it in {seconds(elapsed)})")
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        list_models()
        return 0
    try:
        size = args.image_size or zoo.default_image_size(args.model)
        print(f"cnncompile {cnncompile.__version__} demo: {args.model} at {size}x{size}, "
              f"batch {args.batch}, target '{args.target}'")
        print(RULE)
        start = time.perf_counter()
        model = zoo.build(args.model, batch=args.batch, image_size=size, seed=args.seed)
        build_time = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.out or tmp
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{args.model}.onnx")
            onnx.save_model(model, path)
            ok = run_demo(args, model, path, build_time)
    except CnnCompileError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def run_demo(args, model, path: str, build_time: float) -> bool:
    shapes = zoo.input_shapes(model)
    for i, line in enumerate(textwrap.wrap(zoo.describe(args.model), 64)):
        row("model" if i == 0 else "", line)
    row("saved", f"{path} ({format_bytes(os.path.getsize(path))}, opset "
                 f"{model.opset_import[0].version}, built in {seconds(build_time)})")

    start = time.perf_counter()
    mod = cnncompile.compile(path, target=args.target, input_shapes=shapes)
    compile_time = time.perf_counter() - start
    summary = summarize(mod.graph)
    for t in summary.inputs:
        row("input", f"{t.name}: {t.type}")
    for t in summary.outputs:
        row("output", f"{t.name}: {t.type}")
    row("graph", f"{len(model.graph.node)} ONNX nodes -> {len(mod.graph.nodes)} IR nodes, "
                 f"{summary.parameters / 1e6:.2f} M parameters "
                 f"({format_bytes(summary.parameter_bytes)})")
    row("cost", f"{summary.total_flops / 1e9:.3f} GFLOPs per run, activations peak at "
                f"{format_bytes(summary.memory.peak_bytes)}")
    for i, line in enumerate(op_table(summary.op_counts)):
        row("ops" if i == 0 else "", line)
    if args.ir:
        print(format_graph(mod.graph, constants=False))
    else:
        for i, node in enumerate(mod.graph.nodes[:3]):
            text = format_node(node)
            row("IR" if i == 0 else "", text if len(text) <= 86 else text[:83] + "...")
        row("", f"... {len(mod.graph.nodes) - 3} more nodes (--ir prints them all)")
    print(RULE)

    feeds = zoo.random_inputs(model, seed=args.seed)
    times = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        outputs = mod.run(feeds)
        times.append(time.perf_counter() - start)
    gflops = summary.total_flops / min(times) / 1e9
    row("compile", f"{seconds(compile_time)} (load, import, passes, '{args.target}' backend)")
    row("run", f"{seconds(min(times))} best of {len(times)} ({gflops:.1f} GFLOP/s)")
    for name, array in outputs.items():
        describe_output(name, array)
    ok = compare_with_onnxruntime(path, feeds, outputs)
    print(RULE)
    return ok


if __name__ == "__main__":
    sys.exit(main())
