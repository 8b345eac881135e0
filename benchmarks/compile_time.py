"""Compile one zoo model in a fresh process and print the times as one JSON line.

    NUMBA_CACHE_DIR=/tmp/fresh python benchmarks/compile_time.py resnet50 --batch 1

run_all.py calls it twice with the same NUMBA_CACHE_DIR: the first process compiles every kernel
(cold), the second finds them in Numba's on-disk cache (warm). Numba compiles a kernel at its
first call, so the first run is timed too: ``compile_s + first_run_s - second_run_s`` is the
compile time including the first call's JIT, without the inference itself.

Other processes on the machine stretch the wall-clock times; ``cpu_s`` (this process) and
``workers_cpu_s`` (the compile workers it started, see CNNCOMPILE_COMPILE_WORKERS) are the CPU
seconds of the compile and first run, which load changes much less.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

START = time.perf_counter()

import cnncompile  # noqa: E402  (timed: the import is part of a cold start)
from cnncompile import zoo  # noqa: E402

IMPORTED = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="zoo model name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--opt-level", type=int, default=2)
    args = parser.parse_args()

    model = zoo.build(args.model, image_size=args.image_size)
    feeds = zoo.random_inputs(model, batch=args.batch)
    start = time.perf_counter()
    cpu_start = time.process_time()
    mod = cnncompile.compile(model, target=args.target, opt_level=args.opt_level,
                             input_shapes=zoo.input_shapes(model, args.batch))
    compiled = time.perf_counter()
    mod.run(feeds)
    first = time.perf_counter()
    cpu = time.process_time() - cpu_start
    mod.run(feeds)
    second = time.perf_counter()
    print(json.dumps({
        "model": args.model, "batch": args.batch, "import_s": IMPORTED - START,
        "compile_s": compiled - start, "first_run_s": first - compiled,
        "second_run_s": second - first,
        "compile_with_jit_s": (compiled - start) + max(0.0, (first - compiled) - (second - first)),
        "cpu_s": cpu, "workers_cpu_s": _children_cpu(),
    }))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
