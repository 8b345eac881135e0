r"""Time every CPU conv algorithm on ResNet-18/50 layer shapes against onnxruntime.

Each layer is a single-Conv ONNX model (bias + Relu fused, as in the real nets). cnncompile compiles
it for target="cpu" once per algorithm (the algorithm forced through the node annotation); the
same model runs in onnxruntime (``--threads`` intra-op threads, default graph optimisations; as
many Numba and OpenBLAS threads for cnncompile). Engines take turns in blocks, median of the timed
calls. GFLOP/s counts 2 * MACs of the direct convolution, so
Winograd's figure is "effective" GFLOP/s. ``vs ORT`` = ORT median / ours (> 1: we are faster).
The rel-err column is the relative L2 error against a float64 convolution.

    .venv/bin/python benchmarks/conv_kernels.py [--batch 1,8] [--nets r18,r50] [--reps 15]
                                                [--algos all|winograd_f4x4_3x3,...] [--validate]
                                                [--threads 2] [--clock wall|cpu]

Measured 2026-11-21 on this 2-core AVX-512 VM, shared with other jobs (load average 3.5-4),
so with ``--threads 1 --clock cpu``: every engine computes in the calling thread and its CPU time
is robust to the load (``--validate``: a second onnxruntime session read 0.93-1.10 throughout).
Two-thread wall-clock runs were not trustworthy on the loaded machine: OpenBLAS's own 2-thread
sgemm (NumPy alone, no Numba) took 7.5 ms median instead of 1.5 ms single-threaded, with stalls
of 8-290 ms, while onnxruntime's pool (the caller works too) stayed at ~1.15 ms; on a quiet
moment F(4x4) ran l1 in 0.98 ms (1.19x ORT) and l2 in 0.84 ms (1.38x). Direct is left out at
batch 8 (it is meant for tiny reductions: 4-45 GFLOP/s here).

    .venv/bin/python benchmarks/conv_kernels.py --threads 1 --clock cpu --validate --batch 1
    .venv/bin/python benchmarks/conv_kernels.py --threads 1 --clock cpu --validate --batch 8 \
        --reps 6 --algos im2col_gemm,gemm_1x1,winograd_f2x2_3x3,winograd_f4x4_3x3

    layer               N algorithm                   ms  GFLOP/s  vs ORT  rel err
    conv1 7x7/2         1 onnxruntime              1.556    151.7    1.00
    conv1 7x7/2         1 im2col_gemm              2.887     81.8    0.54  2.2e-07
    conv1 7x7/2         1 direct                  19.142     12.3    0.08  2.2e-07
    l1 3x3              1 onnxruntime              1.223    189.0    1.00
    l1 3x3              1 im2col_gemm              2.645     87.4    0.46  3.0e-07
    l1 3x3              1 direct                   5.197     44.5    0.24  2.5e-07
    l1 3x3              1 winograd_f2x2_3x3        1.469    157.4    0.83  2.6e-07
    l1 3x3              1 winograd_f4x4_3x3        0.868    266.4    1.41  1.7e-06
    l2 3x3              1 onnxruntime              1.206    191.6    1.00
    l2 3x3              1 im2col_gemm              1.895    122.0    0.64  3.5e-07
    l2 3x3              1 direct                   5.909     39.1    0.20  3.6e-07
    l2 3x3              1 winograd_f2x2_3x3        1.150    201.1    1.05  3.6e-07
    l2 3x3              1 winograd_f4x4_3x3        0.827    279.6    1.46  2.3e-06
    l3 3x3              1 onnxruntime              1.201    192.6    1.00
    l3 3x3              1 im2col_gemm              1.842    125.5    0.65  3.6e-07
    l3 3x3              1 direct                   8.331     27.8    0.14  5.0e-07
    l3 3x3              1 winograd_f2x2_3x3        1.234    187.4    0.97  5.0e-07
    l3 3x3              1 winograd_f4x4_3x3        1.285    179.9    0.93  2.9e-06
    l4 3x3              1 onnxruntime              1.548    149.3    1.00
    l4 3x3              1 im2col_gemm              2.613     88.5    0.59  3.5e-07
    l4 3x3              1 direct                  18.867     12.3    0.08  6.9e-07
    l4 3x3              1 winograd_f2x2_3x3        1.994    115.9    0.78  4.8e-07
    l4 3x3              1 winograd_f4x4_3x3        5.590     41.4    0.28  2.5e-06
    l2 3x3/2            1 onnxruntime              0.657    176.1    1.00
    l2 3x3/2            1 im2col_gemm              1.068    108.3    0.61  3.0e-07
    l2 3x3/2            1 direct                  15.236      7.6    0.04  2.5e-07
    l3 3x3/2            1 onnxruntime              0.597    193.6    1.00
    l3 3x3/2            1 im2col_gemm              0.965    119.8    0.62  3.5e-07
    l3 3x3/2            1 direct                  21.081      5.5    0.03  3.5e-07
    l4 3x3/2            1 onnxruntime              0.687    168.2    1.00
    l4 3x3/2            1 im2col_gemm              1.225     94.4    0.56  3.5e-07
    l4 3x3/2            1 direct                  25.199      4.6    0.03  4.9e-07
    l2 down 1x1/2       1 onnxruntime              0.138     93.1    1.00
    l2 down 1x1/2       1 im2col_gemm              0.194     66.3    0.71  1.5e-07
    l1 1x1 64-256       1 onnxruntime              0.817    125.7    1.00
    l1 1x1 64-256       1 gemm_1x1                 0.809    127.0    1.01  1.5e-07
    l1 1x1 64-256       1 im2col_gemm              0.929    110.6    0.88  1.5e-07
    l1 1x1 256-64       1 onnxruntime              0.801    128.3    1.00
    l1 1x1 256-64       1 gemm_1x1                 0.817    125.8    0.98  2.9e-07
    l1 1x1 256-64       1 im2col_gemm              1.402     73.3    0.57  2.9e-07
    l2 1x1 512-128      1 onnxruntime              0.663    154.9    1.00
    l2 1x1 512-128      1 gemm_1x1                 0.676    151.9    0.98  2.9e-07
    l2 1x1 512-128      1 im2col_gemm              0.937    109.7    0.71  2.9e-07
    l3 1x1 1024-256     1 onnxruntime              0.594    172.9    1.00
    l3 1x1 1024-256     1 gemm_1x1                 0.676    152.0    0.88  3.5e-07
    l3 1x1 1024-256     1 im2col_gemm              0.918    112.0    0.65  3.5e-07
    l4 1x1 512-2048     1 onnxruntime              0.637    161.2    1.00
    l4 1x1 512-2048     1 gemm_1x1                 0.894    115.0    0.71  2.9e-07
    l4 1x1 512-2048     1 im2col_gemm              1.008    102.0    0.63  2.9e-07
    l3 down 1x1/2       1 onnxruntime              1.326    155.0    1.00
    l3 down 1x1/2       1 im2col_gemm              1.519    135.3    0.87  2.9e-07
    conv1 7x7/2         8 onnxruntime             12.621    149.6    1.00
    conv1 7x7/2         8 im2col_gemm             25.028     75.4    0.50  2.2e-07
    l1 3x3              8 onnxruntime             11.111    166.5    1.00
    l1 3x3              8 im2col_gemm             20.661     89.5    0.54  3.0e-07
    l1 3x3              8 winograd_f2x2_3x3       12.431    148.8    0.89  2.6e-07
    l1 3x3              8 winograd_f4x4_3x3        8.315    222.4    1.34  1.7e-06
    l2 3x3              8 onnxruntime              9.484    195.0    1.00
    l2 3x3              8 im2col_gemm             14.433    128.2    0.66  3.5e-07
    l2 3x3              8 winograd_f2x2_3x3        9.243    200.1    1.03  3.6e-07
    l2 3x3              8 winograd_f4x4_3x3        6.403    288.9    1.48  2.3e-06
    l3 3x3              8 onnxruntime              9.324    198.4    1.00
    l3 3x3              8 im2col_gemm             13.750    134.5    0.68  3.5e-07
    l3 3x3              8 winograd_f2x2_3x3        8.972    206.2    1.04  5.0e-07
    l3 3x3              8 winograd_f4x4_3x3        8.259    223.9    1.13  2.9e-06
    l4 3x3              8 onnxruntime             11.018    167.9    1.00
    l4 3x3              8 im2col_gemm             17.934    103.1    0.61  3.5e-07
    l4 3x3              8 winograd_f2x2_3x3       12.201    151.6    0.90  4.8e-07
    l4 3x3              8 winograd_f4x4_3x3       12.352    149.7    0.89  2.5e-06
    l2 3x3/2            8 onnxruntime              6.293    147.0    1.00
    l2 3x3/2            8 im2col_gemm              8.470    109.2    0.74  3.1e-07
    l3 3x3/2            8 onnxruntime              5.802    159.4    1.00
    l3 3x3/2            8 im2col_gemm              8.183    113.0    0.71  3.5e-07
    l4 3x3/2            8 onnxruntime              5.549    166.7    1.00
    l4 3x3/2            8 im2col_gemm             10.201     90.7    0.54  3.5e-07
    l2 down 1x1/2       8 onnxruntime              1.450     70.9    1.00
    l2 down 1x1/2       8 im2col_gemm              1.626     63.2    0.89  1.5e-07
    l1 1x1 64-256       8 onnxruntime              8.246     99.7    1.00
    l1 1x1 64-256       8 gemm_1x1                 7.904    104.0    1.04  1.5e-07
    l1 1x1 64-256       8 im2col_gemm              8.302     99.0    0.99  1.5e-07
    l1 1x1 256-64       8 onnxruntime              9.937     82.7    1.00
    l1 1x1 256-64       8 gemm_1x1                 9.770     84.1    1.02  2.9e-07
    l1 1x1 256-64       8 im2col_gemm             12.340     66.6    0.81  2.9e-07
    l2 1x1 512-128      8 onnxruntime              6.520    126.1    1.00
    l2 1x1 512-128      8 gemm_1x1                 6.214    132.3    1.05  2.9e-07
    l2 1x1 512-128      8 im2col_gemm              8.648     95.1    0.75  2.9e-07
    l3 1x1 1024-256     8 onnxruntime              5.565    147.7    1.00
    l3 1x1 1024-256     8 gemm_1x1                 5.829    141.0    0.95  3.4e-07
    l3 1x1 1024-256     8 im2col_gemm              7.483    109.9    0.74  3.4e-07
    l4 1x1 512-2048     8 onnxruntime              5.881    139.8    1.00
    l4 1x1 512-2048     8 gemm_1x1                 7.816    105.2    0.75  2.9e-07
    l4 1x1 512-2048     8 im2col_gemm              8.412     97.7    0.70  2.9e-07
    l3 down 1x1/2       8 onnxruntime             13.705    120.0    1.00
    l3 down 1x1/2       8 im2col_gemm             14.358    114.5    0.95  2.9e-07
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import cnncompile
from cnncompile.backends.cpu.backend import CpuBackend

# name, C, K, kernel, stride, input size (square), nets
LAYERS = [
    ("conv1 7x7/2", 3, 64, 7, 2, 224, "r18 r50"),
    ("l1 3x3", 64, 64, 3, 1, 56, "r18 r50"),
    ("l2 3x3", 128, 128, 3, 1, 28, "r18 r50"),
    ("l3 3x3", 256, 256, 3, 1, 14, "r18 r50"),
    ("l4 3x3", 512, 512, 3, 1, 7, "r18 r50"),
    ("l2 3x3/2", 64, 128, 3, 2, 56, "r18"),
    ("l3 3x3/2", 128, 256, 3, 2, 28, "r18 r50"),
    ("l4 3x3/2", 256, 512, 3, 2, 14, "r18 r50"),
    ("l2 down 1x1/2", 64, 128, 1, 2, 56, "r18"),
    ("l1 1x1 64-256", 64, 256, 1, 1, 56, "r50"),
    ("l1 1x1 256-64", 256, 64, 1, 1, 56, "r50"),
    ("l2 1x1 512-128", 512, 128, 1, 1, 28, "r50"),
    ("l3 1x1 1024-256", 1024, 256, 1, 1, 14, "r50"),
    ("l4 1x1 512-2048", 512, 2048, 1, 1, 7, "r50"),
    ("l3 down 1x1/2", 512, 1024, 1, 2, 28, "r50"),
]
CONV_OPS = ("Conv", "FusedConv", "ConvTranspose")


def algorithms(k: int, stride: int) -> list[str]:
    if k == 1:
        return ["gemm_1x1", "im2col_gemm"] if stride == 1 else ["im2col_gemm"]
    found = ["im2col_gemm", "direct"]
    if k == 3 and stride == 1:
        found += ["winograd_f2x2_3x3", "winograd_f4x4_3x3"]
    return found


def layer_model(c, k, kernel, stride, size, batch, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, c, kernel, kernel)) * np.sqrt(2.0 / (c * kernel * kernel)))
    b = rng.standard_normal(k) * 0.1
    pad = kernel // 2
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["Z"], pads=[pad] * 4,
                              strides=[stride] * 2, kernel_shape=[kernel] * 2),
             helper.make_node("Relu", ["Z"], ["Y"])]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT,
                                                      [batch, c, size, size])],
        [helper.make_empty_tensor_value_info("Y")],
        [numpy_helper.from_array(w.astype(np.float32), "W"),
         numpy_helper.from_array(b.astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    x = rng.standard_normal((batch, c, size, size)).astype(np.float32)
    return model, x, w, b


def reference64(x, w, b, stride):
    """float64 Conv + Relu (im2col in float64)."""
    from cnncompile.ops.conv import Conv
    pad = w.shape[2] // 2
    y = Conv.reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                       pads=[pad] * 4, strides=[stride] * 2, dilations=[1, 1])
    return np.maximum(y, 0)


def forced_module(model, shape, algorithm):
    mod = cnncompile.compile(model, target="cpu", input_shapes={"X": shape})
    for node in mod.graph.nodes:
        if node.op in CONV_OPS:
            node.annotations["algorithm"] = algorithm
    backend = CpuBackend(mod.graph, warm_up=False)
    return backend


def timed(fn, reps, clock):
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def ort_session(model, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def bench_layer(spec, batch, algos, reps, threads, clock, validate=False):
    name, c, k, kernel, stride, size, _ = spec
    model, x, w, b = layer_model(c, k, kernel, stride, size, batch)
    sess = ort_session(model, threads)
    expected = reference64(x, w, b, stride)
    engines = {"onnxruntime": lambda: sess.run(None, {"X": x})}
    if validate:  # a second session must read ~1.00: the harness's own noise
        twin = ort_session(model, threads)
        engines["onnxruntime (twin)"] = lambda: twin.run(None, {"X": x})
    errors = {}
    for algorithm in algos:
        backend = forced_module(model, x.shape, algorithm)
        out = backend.run([x])[0]
        errors[algorithm] = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))
        engines[algorithm] = (lambda be=backend: be.run([x]))
    times = {key: [] for key in engines}
    for key, fn in engines.items():  # warm-up
        fn()
        fn()
    for _ in range(3):  # alternate blocks so drift and spinning pools hit every engine alike
        for key, fn in engines.items():
            fn()
            times[key] += timed(fn, max(1, reps // 3), clock)
    flops = 2.0 * batch * k * c * kernel * kernel * ((size + 2 * (kernel // 2) - kernel)
                                                     // stride + 1) ** 2
    ort_ms = 1e3 * statistics.median(times["onnxruntime"])
    rows = []
    for key in engines:
        ms = 1e3 * statistics.median(times[key])
        rows.append((name, batch, key, ms, flops / ms / 1e6, ort_ms / ms, errors.get(key)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--nets", default="r18,r50")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--algos", default="all")
    parser.add_argument("--layers", default="", help="substring filter on layer names")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--validate", action="store_true",
                        help="also time a second onnxruntime session (should read ~1.00)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the calling thread's CPU time (only with --threads 1, where "
                             "every engine computes in the calling thread); robust on a loaded "
                             "machine")
    args = parser.parse_args(argv)
    import numba
    from threadpoolctl import threadpool_limits
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(args.threads, user_api="blas")
    nets = set(args.nets.split(","))
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"# conv kernels vs onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, "
          f"threads={args.threads}, {args.clock} clock, numpy {np.__version__}, median of "
          f"{args.reps} ({time.strftime('%Y-%m-%d')}, load average "
          f"{os.getloadavg()[0]:.1f})")
    header = (f"{'layer':18s} {'N':>2s} {'algorithm':20s} {'ms':>9s} {'GFLOP/s':>8s} "
              f"{'vs ORT':>7s} {'rel err':>8s}")
    print(header)
    print("-" * len(header))
    for batch in (int(v) for v in args.batch.split(",")):
        for spec in LAYERS:
            if not nets & set(spec[6].split()) or args.layers not in spec[0]:
                continue
            algos = algorithms(spec[3], spec[4])
            if args.algos != "all":
                algos = [a for a in algos if a in args.algos.split(",")]
            rows = bench_layer(spec, batch, algos, args.reps, args.threads, clock,
                               args.validate)
            for name, n, key, ms, gflops, ratio, err in rows:
                err_text = "" if err is None else f"{err:.1e}"
                print(f"{name:18s} {n:2d} {key:20s} {ms:9.3f} {gflops:8.1f} {ratio:7.2f} "
                      f"{err_text:>8s}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
