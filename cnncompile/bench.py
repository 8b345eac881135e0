"""Benchmarking: end-to-end latency against onnxruntime, per-layer profiles and the conv kernel lab.

Engines are timed in the same process, in alternating blocks (A B A B ...): each block starts with
warm-up calls, so a thread pool still spinning after the previous engine's block, or caches it
evicted, cost the warm-up and not the timed runs. Each engine's latency is the median of all its
timed runs; ``spread`` is p90 / median. ``self_check`` times onnxruntime against a second
onnxruntime session by the same method: a harness that reads ~1.00 there can be trusted with a
ratio between two different engines.

Per-layer times come from ``run_profiled``, a second function the CPU code generator writes (a
clock read after every node); each layer's GFLOP/s is set against the machine's GEMM ceiling, the
speed of ``np.matmul`` on 2048^3 float32 (the fastest of five calls, once per process).

onnxruntime is an optional extra (``pip install cnncompile[bench]``); PyTorch is compared only when
it is installed and a TorchScript file of the same network is given.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import InternalError, UserError

ORT_MISSING = ("onnxruntime is not installed; it is an optional extra of cnncompile's benchmarks: "
               "pip install cnncompile[bench]")
ENGINE_NAMES = {"onnxruntime": "onnxruntime", "ort": "onnxruntime", "torch": "torch",
                "pytorch": "torch"}
CEILING_SIZE = 2048
#: the fewest timed runs a time budget may leave an engine
MIN_RUNS = 5
#: with a time budget, calls longer than this get one warm-up call per block (it is plenty)
LONG_CALL_S = 0.25


# ---- timing --------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds of every timed run of one engine, and the median of each block."""
    times: list[float] = field(default_factory=list)
    block_medians: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times, 90))

    @property
    def spread(self) -> float:
        return self.p90 / self.median if self.median > 0 else math.inf

    def to_dict(self, batch: int = 1, flops: int | None = None) -> dict:
        doc = {"median_ms": self.median * 1e3, "p90_ms": self.p90 * 1e3,
               "min_ms": min(self.times) * 1e3, "spread": self.spread, "runs": len(self.times),
               "block_medians_ms": [t * 1e3 for t in self.block_medians],
               "images_per_s": batch / self.median}
        if flops:
            doc["gflops_per_s"] = flops / self.median / 1e9
        return doc


def time_alternating(engines: Mapping[str, Callable[[], object]], runs: int = 30,
                     warmup: int = 2, blocks: int = 5) -> dict[str, Timing]:
    """Time each zero-argument callable ``runs`` times in ``blocks`` alternating blocks, with
    ``warmup`` untimed calls at the start of every block. The garbage collector is held off during
    the timed calls (as timeit does) and run between blocks."""
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    blocks = max(1, min(blocks, runs))
    sizes = [runs // blocks + (1 if b < runs % blocks else 0) for b in range(blocks)]
    result = {name: Timing() for name in engines}
    clock = time.perf_counter
    for size in sizes:
        for name, call in engines.items():
            gc.collect()
            for _ in range(warmup):
                call()
            block = []
            gc.disable()
            try:
                for _ in range(size):
                    start = clock()
                    call()
                    block.append(clock() - start)
            finally:
                gc.enable()
            result[name].times += block
            result[name].block_medians.append(float(np.median(block)))
    return result


# ---- the machine ---------------------------------------------------------------------------------
_CEILING: dict[int, float] = {}


def gemm_ceiling(size: int = CEILING_SIZE, runs: int = 5) -> float:
    """GFLOP/s of np.matmul on size^3 float32, measured once per process: the fastest of ``runs``
    calls, since a ceiling is what the machine can do (a shared machine's load only lowers it)."""
    if size not in _CEILING:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        c = np.empty((size, size), np.float32)
        timing = time_alternating({"matmul": lambda: np.matmul(a, b, out=c)}, runs=runs,
                                  warmup=1, blocks=1)["matmul"]
        _CEILING[size] = 2.0 * size ** 3 / min(timing.times) / 1e9
    return _CEILING[size]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_name() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # numpy < 2 has no mode="dicts"; the name is only informative
        return "unknown"


def load_average() -> float | None:
    """The 1-minute load average: above the core count, other processes share the cores."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "numpy": np.__version__,
            "blas": blas_name(), "python": platform.python_version(),
            "gemm_ceiling_gflops": gemm_ceiling(), "load_average": load_average()}


def peak_rss_bytes() -> int:
    """The process's peak resident set size (every engine in it included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def blas_threads(count: int | None):
    """NumPy's OpenBLAS on ``count`` threads while inside (``backends/cpu/threads.py``)."""
    from .backends.cpu.threads import blas_threads as limit

    return limit(count)


# ---- engines -------------------------------------------------------------------------------------
def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError(ORT_MISSING) from None
    return onnxruntime


def ort_session(model, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads and full graph optimization."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def torch_engine(path: str | None, feeds: list[np.ndarray], threads: int, proto=None,
                 shapes: Mapping[str, Sequence[int]] | None = None):
    """(callable, None) for PyTorch, or (None, why it is skipped). With ``path``, a TorchScript
    file of the same network; without, PyTorch eager over the imported graph (one
    torch.nn.functional call per node, ``backends/torch_eager.py``)."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    torch.set_num_threads(threads)
    tensors = [torch.from_numpy(x) for x in feeds]
    if path:
        try:
            model = torch.jit.load(path).eval()
        except Exception as exc:
            raise UserError(f"--torch-model {path}: cannot load it as TorchScript ({exc})") \
                from None
    else:
        from . import import_onnx
        from .backends.torch_eager import TorchEager
        from .errors import UnsupportedOperatorError

        graph = import_onnx(proto, input_shapes=shapes)
        try:
            model = TorchEager(graph, threads)
        except UnsupportedOperatorError as exc:
            return None, f"{exc}; give --torch-model FILE.pt (TorchScript) instead"

    def call():
        with torch.inference_mode():
            return model(*tensors)
    return call, None


def parse_compare(text: str | None) -> list[str]:
    """'onnxruntime,torch' -> ['onnxruntime', 'torch']; 'none' -> []."""
    if text is None:
        return ["onnxruntime"]
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in ENGINE_NAMES]
    if bad:
        raise UserError(f"--compare {text}: unknown engine '{bad[0]}'; choose from "
                        "onnxruntime, torch (comma-separated) or none")
    result = []
    for n in names:
        if ENGINE_NAMES[n] not in result:
            result.append(ENGINE_NAMES[n])
    return result


# ---- models and shapes ---------------------------------------------------------------------------
def load_bench_model(model, image_size: int | None = None):
    """An ONNX ModelProto from a path, bytes, a ModelProto or 'zoo:NAME' (built with random
    weights at ``image_size``, default the model's own)."""
    from .frontend import load_model

    if isinstance(model, str) and model.startswith("zoo:"):
        from . import zoo
        return zoo.build(model[4:], image_size=image_size)
    if image_size is not None:
        raise UserError("--image-size applies to zoo models only (MODEL written as zoo:NAME)")
    return load_model(model)


def resolve_shapes(proto, shapes: Mapping[str, Sequence[int]] | None,
                   batch: int | None) -> dict[str, tuple]:
    """Static input shapes: ``shapes`` first, then ``batch`` (default 1) for a dynamic leading
    axis."""
    shapes = dict(shapes or {})
    from .frontend.onnx_import import declared_inputs
    declared = declared_inputs(proto)
    unknown = [name for name in shapes if name not in declared]
    if unknown:
        raise UserError(f"--shape {unknown[0]}=...: '{unknown[0]}' is not an input of the model; "
                        f"its inputs are: {', '.join(declared) or 'none'}")
    result = {}
    for name, dims in declared.items():
        if dims is None and name not in shapes:
            raise UserError(f"input '{name}' declares no shape; give it with "
                            f"--shape {name}=1x3x224x224 (its real dimensions)")
        given = list(shapes.get(name, dims))
        if batch is None and name not in shapes and given and given[0] is None:
            given[0] = 1  # a dynamic batch axis left open is benchmarked at batch 1
        if batch is not None and given:
            if dims is not None and dims and dims[0] is not None and dims[0] != batch:
                raise UserError(f"--batch {batch}: input '{name}' has a fixed batch axis of "
                                f"{dims[0]} (declared {_dims_text(dims)}); only a dynamic leading "
                                "axis can be set")
            given[0] = batch
        if any(d is None for d in given):
            raise UserError(f"input '{name}' has dynamic axes ({_dims_text(dims)}); fix them with "
                            f"--shape {name}=" + "x".join(str(d or 1) for d in given))
        result[name] = tuple(int(d) for d in given)
    return result


def _dims_text(dims) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims or ()) + "]"


def random_feeds(proto, shapes: Mapping[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    from .frontend import import_onnx
    from .ir.types import TensorType

    graph = import_onnx(proto, input_shapes=shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph.inputs:
        t: TensorType = value.type
        if np.issubdtype(t.dtype, np.floating):
            feeds[value.name] = rng.standard_normal(t.shape).astype(t.dtype)
        elif t.dtype == np.bool_:
            feeds[value.name] = rng.random(t.shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 10, size=t.shape).astype(t.dtype)
    return feeds


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    if a.shape != e.shape:
        return math.inf
    denom = np.linalg.norm(e)
    diff = np.linalg.norm(a - e)
    return float(diff / denom) if denom > 0 else float(diff)


# ---- per layer -----------------------------------------------------------------------------------
REFERENCE = "numpy reference"
#: helpers the generated code calls that are not kernels
NOT_KERNELS = {"view_as", "results_list"}


def runs_reference(code: str) -> bool:
    """Whether a node's generated code calls an op's NumPy reference instead of a kernel."""
    return ".reference(" in code


def implementation(code: str) -> str:
    """What runs a node, read from its generated code: the kernels it calls ('conv_winograd'),
    'numpy reference', 'numpy' (a copy or reshape), or 'elided' (no code at all)."""
    if runs_reference(code):
        return REFERENCE
    statements = [ln for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    names = []
    for line in statements:
        for name in re.findall(r"\bk_(\w+)\(", line):
            if name not in NOT_KERNELS and name not in names:
                names.append(name)
    if names:
        return "+".join(names)
    return "numpy" if statements else "elided"


def profile_layers(module, feeds: list[np.ndarray], runs: int = 10, warmup: int = 2,
                   threads: int | None = None) -> tuple[list[dict], float]:
    """Per-node times of a CPU module, from a second generated module with ``run_profiled`` over
    the same graph (its own arena; the module's own is left alone).

    A row's ``ms`` is the node's mean, so the rows add up to the whole run and rare stalls (a
    thread pool waking up) are charged to the node that suffers them; ``median_ms`` is its typical
    call, from which GFLOP/s and % of the GEMM ceiling are computed. Also returns the mean seconds
    of that module's plain ``run``, timed alternately with ``run_profiled`` (the same load)."""
    from .analysis import node_flops
    from .backends.cpu.threads import thread_limit
    from .backends.cpu.codegen import generate, load_generated
    from .backends.cpu.emitters import emit_node

    if module.target != "cpu":
        raise UserError(f"per-layer timing needs --target cpu (the module targets "
                        f"'{module.target}')")
    generated = load_generated(generate(module.graph, emit_node, profile=True))
    run, run_profiled = generated.namespace["run"], generated.namespace["run_profiled"]
    samples, whole = [], []
    outs = None
    if getattr(module.executor, "reuse_outputs", False):  # as the module runs: same outputs
        outs = [np.empty(v.type.shape, v.type.dtype) if v.type.is_static else None
                for v in module.graph.outputs]
    with thread_limit(threads):
        for i in range(warmup + max(1, runs)):
            _, times = run_profiled(*feeds, _outs=outs)
            start = time.perf_counter()
            run(*feeds, _outs=outs)
            if i >= warmup:
                samples.append(times)
                whole.append(time.perf_counter() - start)
    means = np.mean(np.asarray(samples), axis=0)
    medians = np.median(np.asarray(samples), axis=0)
    ceiling = gemm_ceiling()
    total = float(means.sum())
    rows = []
    for node, mean, median, code in zip(module.graph.nodes, means, medians,
                                        generated.node_code):
        flops = node_flops(node)
        gflops = flops / median / 1e9 if flops and median > 0 else None
        rows.append({
            "name": node.name, "op": node.op,
            "algorithm": node.annotations.get("algorithm", ""),
            "impl": implementation(code),
            "ms": float(mean) * 1e3, "median_ms": float(median) * 1e3, "flops": flops,
            "gflops_per_s": gflops,
            "pct_ceiling": 100.0 * gflops / ceiling if gflops is not None else None,
            "share": float(mean) / total if total > 0 else 0.0,
            # time beyond what the GEMM ceiling would need for the same FLOPs: where time is lost
            "excess_ms": (float(mean) - (flops or 0) / (ceiling * 1e9)) * 1e3,
        })
    return rows, float(np.mean(whole))


def worst_layers(layers: list[dict], count: int = 3) -> list[dict]:
    """The layers that lose the most time against the GEMM ceiling."""
    return sorted(layers, key=lambda r: -r["excess_ms"])[:count]


# ---- bench ---------------------------------------------------------------------------------------
def bench_model(model, input_shapes: Mapping[str, Sequence[int]] | None = None,
                batches: Sequence[int | None] = (None,), compare: Sequence[str] = ("onnxruntime",),
                per_layer: bool = False, runs: int = 30, warmup: int = 2, blocks: int = 5,
                threads: int = 2, target: str = "cpu", opt_level: int = 2,
                torch_model: str | None = None, model_name: str | None = None,
                compare_explicit: bool = True, budget_s: float | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    """Time a model compiled by cnncompile against the engines in ``compare``, once per batch.

    Returns a JSON-ready dict; ``format_bench`` prints it. ``compare_explicit`` False turns a
    missing onnxruntime into a note instead of an error (the CLI's default comparison).
    ``budget_s`` caps each engine's timed seconds per batch: fewer runs (at least MIN_RUNS) for
    slow models."""
    import cnncompile

    proto = load_bench_model(model)
    notes: list[str] = []
    compare = list(compare)
    if "onnxruntime" in compare:
        try:
            import_onnxruntime()
        except UserError:
            if compare_explicit:
                raise
            compare.remove("onnxruntime")
            notes.append(f"onnxruntime not compared: {ORT_MISSING}")
    machine = machine_info()
    load, cores = machine["load_average"], machine["cores"] or 1
    if load is not None and load > cores:
        notes.append(f"the 1-minute load average is {load:.1f} on {cores} cores: other "
                     "processes compete for them, so the times are noisy")
    report = {"model": model_name or (model if isinstance(model, str) else proto.graph.name),
              "target": target, "opt_level": opt_level, "threads": threads, "runs": runs,
              "warmup": warmup, "blocks": blocks, "budget_s": budget_s, "machine": machine,
              "notes": notes, "batches": []}
    with blas_threads(threads):
        for batch in batches:
            shapes = resolve_shapes(proto, input_shapes, batch)
            if log:
                log(f"batch {batch}: compiling")
            start = time.perf_counter()
            module = cnncompile.compile(proto, target=target, input_shapes=shapes,
                                        opt_level=opt_level)
            compile_s = time.perf_counter() - start
            if hasattr(module.executor, "threads"):
                module.executor.threads = threads
            feeds = random_feeds(proto, shapes)
            arrays = [feeds[name] for name in module.input_names]
            entry = _bench_batch(module, proto, feeds, arrays, compare, runs, warmup, blocks,
                                 threads, torch_model, budget_s, log, shapes)
            entry["compile_s"] = compile_s
            entry["input_shapes"] = {k: list(v) for k, v in shapes.items()}
            if per_layer:
                if log:
                    log(f"batch {entry['batch']}: per-layer profile")
                timed = entry["engines"]["cnncompile"]["runs"]
                layers, whole = profile_layers(module, arrays, max(3, timed // 2),
                                               entry["warmup"], threads)
                entry["layers"] = layers
                entry["layer_sum_ms"] = sum(r["ms"] for r in layers)
                entry["profile_run_ms"] = whole * 1e3
            report["batches"].append(entry)
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


def _bench_batch(module, proto, feeds, arrays, compare, runs, warmup, blocks, threads,
                 torch_model, budget_s, log, shapes=None) -> dict:
    from .analysis import node_flops

    graph = module.graph
    batch = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
    flops = sum(f for f in (node_flops(n) for n in graph.nodes) if f)
    plan = graph.meta.get("memory_plan")
    generated = getattr(module.executor, "generated", None)
    fallback = [n.name for n, code in zip(graph.nodes, getattr(generated, "node_code", ()))
                if runs_reference(code)]
    engines: dict[str, Callable[[], object]] = {"cnncompile": lambda: module.run(feeds)}
    skipped: dict[str, str] = {}
    outputs = module.run(feeds)
    errors: dict[str, float] = {}
    if "onnxruntime" in compare:
        session = ort_session(proto, threads)
        names = [o.name for o in session.get_outputs()]
        theirs = session.run(names, feeds)
        errors["onnxruntime"] = max((rel_l2(outputs[n], t) for n, t in zip(names, theirs)
                                     if n in outputs), default=0.0)
        engines["onnxruntime"] = lambda: session.run(names, feeds)
    if "torch" in compare:
        call, why = torch_engine(torch_model, arrays, threads, proto, shapes)
        if call is None:
            skipped["torch"] = why
        else:
            theirs = _torch_outputs(call())
            errors["torch"] = max((rel_l2(outputs[n], t) for n, t in zip(module.output_names,
                                                                          theirs)), default=0.0)
            engines["torch"] = call
    if budget_s is not None:
        slowest = max(_once(call) for call in engines.values())
        runs = max(MIN_RUNS, min(runs, int(budget_s / max(slowest, 1e-9))))
        if slowest > LONG_CALL_S:
            warmup = min(warmup, 1)
    if log:
        log(f"batch {batch}: timing {', '.join(engines)} ({runs} runs each)")
    timings = time_alternating(engines, runs, warmup, blocks)
    ours = timings["cnncompile"]
    entry = {
        "batch": int(batch), "gflop": flops / 1e9, "nodes": len(graph.nodes),
        "reference_nodes": len(fallback), "arena_bytes": plan.arena_bytes if plan else None,
        "engines": {name: t.to_dict(batch, flops) for name, t in timings.items()},
        "ratios": {}, "skipped": skipped,
        "max_rel_l2": errors, "warmup": warmup, "load_average": load_average(),
    }
    for name, t in timings.items():
        if name != "cnncompile":
            entry["ratios"][name] = {"latency_ratio": ours.median / t.median,
                                     "speedup": t.median / ours.median}
    return entry


def _torch_outputs(result) -> list[np.ndarray]:
    items = result if isinstance(result, (list, tuple)) else [result]
    return [t.detach().numpy() for t in items]


def _once(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def self_check(model, input_shapes=None, batch: int | None = None, runs: int = 30,
               warmup: int = 2, blocks: int = 5, threads: int = 2) -> dict:
    """onnxruntime timed against a second onnxruntime session by the same method as ``bench``:
    the ratio of medians must read ~1.00, and the per-block ratios show how far it wanders."""
    proto = load_bench_model(model)
    shapes = resolve_shapes(proto, input_shapes, batch)
    feeds = random_feeds(proto, shapes)
    with blas_threads(threads):
        first, second = ort_session(proto, threads), ort_session(proto, threads)
        timings = time_alternating({"onnxruntime A": lambda: first.run(None, feeds),
                                    "onnxruntime B": lambda: second.run(None, feeds)},
                                   runs, warmup, blocks)
    a, b = timings["onnxruntime A"], timings["onnxruntime B"]
    block_ratios = [x / y for x, y in zip(a.block_medians, b.block_medians)]
    return {"input_shapes": {k: list(v) for k, v in shapes.items()}, "runs": runs,
            "warmup": warmup, "blocks": blocks, "threads": threads,
            "a": a.to_dict(), "b": b.to_dict(), "ratio": a.median / b.median,
            "block_ratios": block_ratios, "block_ratio_min": min(block_ratios),
            "block_ratio_max": max(block_ratios)}


# ---- text ----------------------------------------------------------------------------------------
def table(rows: list[list[str]], numeric_from: int = 1, indent: int = 2) -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [f"{c:>{widths[i]}}" if i >= numeric_from else f"{c:<{widths[i]}}"
                 for i, c in enumerate(r)]
        lines.append(" " * indent + "  ".join(cells).rstrip())
    return lines


def fmt(value, spec: str = ".3g", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def format_machine(machine: dict) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores; NumPy {machine['numpy']} "
            f"({machine['blas']}); GEMM ceiling {machine['gemm_ceiling_gflops']:.0f} GFLOP/s "
            f"(np.matmul {CEILING_SIZE}^3 float32)")


def format_ratio(ratio: dict) -> str:
    r = ratio["latency_ratio"]
    how = f"cnncompile {1 / r:.2f}x faster" if r < 1 else f"cnncompile {r:.2f}x slower"
    return f"{r:.2f} ({how})"


def format_bench(report: dict, top: int | None = None) -> str:
    from .analysis import format_bytes

    runs = f"{report['runs']} timed runs per engine"
    if report.get("budget_s") is not None:
        runs = f"up to {runs} (at most {report['budget_s']:g} s each)"
    lines = [f"model    {report['model']}",
             f"target   {report['target']}, opt-level {report['opt_level']}, "
             f"{report['threads']} threads; {runs} in {report['blocks']} alternating blocks, "
             f"{report['warmup']} warm-up calls per block",
             f"machine  {format_machine(report['machine'])}"]
    lines += [f"note     {n}" for n in report["notes"]]
    for entry in report["batches"]:
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in entry["input_shapes"].items())
        arena = format_bytes(entry["arena_bytes"]) if entry["arena_bytes"] is not None else "-"
        lines += ["", f"batch {entry['batch']}: {shapes}; {entry['gflop']:.3g} GFLOP; "
                      f"compile {entry['compile_s']:.2f} s; arena {arena}; "
                      f"{entry['reference_nodes']} of {entry['nodes']} nodes run a NumPy "
                      "reference"]
        rows = [["engine", "runs", "median ms", "p90 ms", "p90/median", "images/s", "GFLOP/s",
                 "cnncompile / engine latency"]]
        for name, t in entry["engines"].items():
            ratio = entry["ratios"].get(name)
            rows.append([name, str(t["runs"]), f"{t['median_ms']:.3f}", f"{t['p90_ms']:.3f}",
                         f"{t['spread']:.2f}", f"{t['images_per_s']:.1f}",
                         fmt(t.get("gflops_per_s"), ".1f"),
                         format_ratio(ratio) if ratio else ""])
        lines += table(rows)
        for name, why in entry["skipped"].items():
            lines.append(f"  {name}: skipped ({why})")
        for name, err in entry["max_rel_l2"].items():
            lines.append(f"  outputs vs {name}: max relative L2 {err:.2e}")
        if "layers" in entry:
            lines += [""] + format_layers(entry, report["machine"]["gemm_ceiling_gflops"], top)
    lines += ["", f"peak RSS {format_bytes(report['peak_rss_bytes'])} (the whole process, every "
                  "engine included)"]
    return "\n".join(lines)


def format_layers(entry: dict, ceiling: float, top: int | None = None) -> list[str]:
    layers = entry["layers"]
    whole = entry["profile_run_ms"]
    lines = [f"per layer (batch {entry['batch']}): the layers' means sum to "
             f"{entry['layer_sum_ms']:.3f} ms, {100 * entry['layer_sum_ms'] / whole:.0f}% of the "
             f"whole run's mean timed alongside ({whole:.3f} ms); GFLOP/s from the median call, "
             f"% ceiling against {ceiling:.0f} GFLOP/s"]
    shown = layers if top is None else sorted(layers, key=lambda r: -r["ms"])[:top]
    rows = [["node", "op", "algorithm", "impl", "mean ms", "median ms", "GFLOP/s", "% ceiling",
             "share"]]
    for r in shown:
        rows.append([r["name"], r["op"], r["algorithm"] or "-", r["impl"], f"{r['ms']:.3f}",
                     f"{r['median_ms']:.3f}", fmt(r["gflops_per_s"], ".1f"),
                     fmt(r["pct_ceiling"], ".1f"), f"{100 * r['share']:.1f}%"])
    lines += table(rows, numeric_from=4)
    if top is not None and len(layers) > top:
        lines.append(f"  ... {len(layers) - top} more layers (the {top} slowest are shown)")
    return lines


def format_self_check(check: dict) -> str:
    a, b = check["a"], check["b"]
    shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in check["input_shapes"].items())
    lines = [f"harness self-check: onnxruntime vs a second onnxruntime session ({shapes}, "
             f"{check['threads']} threads, {check['runs']} runs each in {check['blocks']} "
             f"alternating blocks, {check['warmup']} warm-up calls per block)"]
    rows = [["session", "median ms", "p90 ms", "p90/median"],
            ["A", f"{a['median_ms']:.3f}", f"{a['p90_ms']:.3f}", f"{a['spread']:.2f}"],
            ["B", f"{b['median_ms']:.3f}", f"{b['p90_ms']:.3f}", f"{b['spread']:.2f}"]]
    lines += table(rows)
    lines.append(f"  ratio A/B of medians {check['ratio']:.3f} (a trustworthy harness reads "
                 f"~1.00); per-block ratios {check['block_ratio_min']:.3f} .. "
                 f"{check['block_ratio_max']:.3f}")
    return "\n".join(lines)


# ---- html ----------------------------------------------------------------------------------------
def bench_html(report: dict) -> str:
    """One self-contained page: the engines per batch and the per-layer tables."""
    from html import escape

    from .analysis import format_bytes
    from .report.html import CSS

    parts = ["<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>cnncompile bench · {escape(report['model'])}</title><style>{CSS}</style>"
             f"</head><body><header><h1>cnncompile bench<small>{escape(report['model'])}</small>"
             f"</h1><p>target {escape(report['target'])} · opt-level {report['opt_level']} · "
             f"{report['threads']} threads · {escape(format_machine(report['machine']))}</p>"
             "</header><main>"]
    for note in report["notes"]:
        parts.append(f"<section><p>{escape(note)}</p></section>")
    for entry in report["batches"]:
        arena = format_bytes(entry["arena_bytes"]) if entry["arena_bytes"] is not None else "-"
        parts.append(f"<section><h2>batch {entry['batch']}</h2><p class='muted'>"
                     f"{entry['gflop']:.3g} GFLOP · compile {entry['compile_s']:.2f} s · arena "
                     f"{arena} · {entry['reference_nodes']} of {entry['nodes']} nodes run a NumPy "
                     "reference</p><table><tr><th>engine</th><th class='num'>median ms</th>"
                     "<th class='num'>p90 ms</th><th class='num'>p90/median</th>"
                     "<th class='num'>images/s</th><th>cnncompile / engine latency</th></tr>")
        for name, t in entry["engines"].items():
            ratio = entry["ratios"].get(name)
            parts.append(f"<tr><td>{escape(name)}</td><td class='num'>{t['median_ms']:.3f}</td>"
                         f"<td class='num'>{t['p90_ms']:.3f}</td>"
                         f"<td class='num'>{t['spread']:.2f}</td>"
                         f"<td class='num'>{t['images_per_s']:.1f}</td>"
                         f"<td>{escape(format_ratio(ratio)) if ratio else ''}</td></tr>")
        parts.append("</table>")
        for name, why in entry["skipped"].items():
            parts.append(f"<p class='muted'>{escape(name)}: skipped ({escape(why)})</p>")
        if "layers" in entry:
            parts.append(_layers_html(entry))
        parts.append("</section>")
    parts.append(f"<p class='muted'>peak RSS {format_bytes(report['peak_rss_bytes'])}</p>"
                 "</main></body></html>")
    return "\n".join(parts)


def _layers_html(entry: dict) -> str:
    from html import escape

    top = max((r["ms"] for r in entry["layers"]), default=1.0) or 1.0
    rows = ["<h3>per layer</h3><table><tr><th>node</th><th>op</th><th>algorithm</th>"
            "<th>impl</th><th class='num'>mean ms</th><th></th><th class='num'>GFLOP/s</th>"
            "<th class='num'>% ceiling</th><th class='num'>share</th></tr>"]
    for r in entry["layers"]:
        width = 100.0 * r["ms"] / top
        cls = " class='bad'" if r["impl"] == REFERENCE else ""
        rows.append(f"<tr{cls}><td><code>{escape(r['name'])}</code></td><td>{escape(r['op'])}</td>"
                    f"<td>{escape(r['algorithm'] or '-')}</td><td>{escape(r['impl'])}</td>"
                    f"<td class='num'>{r['ms']:.3f}</td><td class='barcell'><div class='bar' "
                    f"style='width:{width:.0f}%'></div></td>"
                    f"<td class='num'>{fmt(r['gflops_per_s'], '.1f')}</td>"
                    f"<td class='num'>{fmt(r['pct_ceiling'], '.1f')}</td>"
                    f"<td class='num'>{100 * r['share']:.1f}%</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


# ---- the conv kernel lab -------------------------------------------------------------------------
def conv_model(shape: Sequence[int], weight: Sequence[int], strides=None, pads=None,
               dilations=None, group: int = 1, bias: bool = False, seed: int = 0):
    """A one-Conv ONNX model with random weights, rank-generic (1-D, 2-D, 3-D)."""
    from onnx import TensorProto, helper, numpy_helper

    shape, weight = list(shape), list(weight)
    if len(shape) < 3 or len(shape) > 5:
        raise UserError(f"--shape {_csv(shape)}: give N,C and 1 to 3 spatial sizes")
    if len(weight) != len(shape):
        raise UserError(f"--weight {_csv(weight)} has rank {len(weight)} but --shape "
                        f"{_csv(shape)} has rank {len(shape)}; give K,C/group and the kernel sizes")
    if min(shape + weight) < 1:
        raise UserError(f"--shape {_csv(shape)} and --weight {_csv(weight)} must be positive")
    rank = len(shape) - 2
    rng = np.random.default_rng(seed)
    fan_in = math.prod(weight[1:])
    inits = [numpy_helper.from_array(
        (rng.standard_normal(weight) / math.sqrt(fan_in)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(weight[0]).astype(np.float32),
                                             "b"))
        inputs.append("b")
    attrs = {"kernel_shape": weight[2:], "group": group,
             "strides": _spatial(strides, rank, "--stride", 1),
             "dilations": _spatial(dilations, rank, "--dilation", 1),
             "pads": _pads(pads, rank)}
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, shape)], [helper.make_empty_tensor_value_info("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.31 reads IR version <= 11
    return model


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def _spatial(values, rank: int, flag: str, default: int) -> list[int]:
    if values is None:
        return [default] * rank
    values = list(values)
    if len(values) == 1:
        values = values * rank
    if len(values) != rank or min(values) < 1:
        raise UserError(f"{flag} {_csv(values)}: give one positive value or {rank} (one per "
                        "spatial axis)")
    return values


def _pads(values, rank: int) -> list[int]:
    if values is None:
        return [0] * (2 * rank)
    values = list(values)
    if len(values) == 1:
        values = values * (2 * rank)
    elif len(values) == rank:
        values = values * 2
    if len(values) != 2 * rank or min(values) < 0:
        raise UserError(f"--pads {_csv(values)}: give one value, {rank} (symmetric, per axis) or "
                        f"{2 * rank} (ONNX order: all begins, then all ends), none negative")
    return values


def algorithm_not_applicable(problem, algorithm: str) -> str | None:
    """Why ``algorithm`` cannot run this convolution; None when it can."""
    from .passes.lowering import ALGORITHMS, dims

    if algorithm not in ALGORITHMS:
        raise UserError(f"unknown conv algorithm '{algorithm}'; choose from "
                        + ", ".join(ALGORITHMS))
    p = problem
    if algorithm == "transposed":
        return "for ConvTranspose only"
    if algorithm == "depthwise" and not p.group == p.channels == p.out_channels:
        return (f"needs group == C == K (group {p.group}, C {p.channels}, K {p.out_channels})")
    if algorithm == "grouped" and p.group == 1:
        return "needs group > 1"
    if algorithm == "gemm_1x1":
        if set(p.kernel) != {1} or set(p.strides) != {1} or any(p.pads) or p.group != 1:
            return (f"needs a 1x1 kernel, stride 1, no pads and group 1 (kernel "
                    f"{dims(p.kernel)}, stride {dims(p.strides)}, pads {list(p.pads)}, "
                    f"group {p.group})")
    if algorithm.startswith("winograd") and not p.winograd_valid():
        return (f"needs a 2-D 3x3 kernel, stride 1, dilation 1 and group 1 (kernel "
                f"{dims(p.kernel)}, stride {dims(p.strides)}, dilation {dims(p.dilations)}, "
                f"group {p.group})")
    return None


def kernel_lab_conv(shape, weight, strides=None, pads=None, dilations=None, group: int = 1,
                    bias: bool = False, algorithms: Sequence[str] | None = None, runs: int = 20,
                    warmup: int = 2, blocks: int = 4, threads: int = 2,
                    compare_ort: bool = True) -> dict:
    """Force every conv algorithm in turn on one shape: time, GFLOP/s and error against the
    reference executor; onnxruntime's time for the same conv."""
    from .analysis import node_flops
    from .backends.cpu.backend import CpuBackend
    from .backends.reference import ReferenceExecutor
    from .frontend import import_onnx
    from .passes import run_pipeline
    from .passes.lowering import ALGORITHMS, ConvProblem

    model = conv_model(shape, weight, strides, pads, dilations, group, bias)
    graph = import_onnx(model)
    graph, _ = run_pipeline(graph, 2, meta={"target": "cpu", "layout": "NCHW"})
    convs = [n for n in graph.nodes if n.op in ("Conv", "FusedConv")]
    if len(convs) != 1:
        raise InternalError(f"kernel lab: expected one conv after the pipeline, found "
                            f"{[n.op for n in graph.nodes]}")
    node = convs[0]
    chosen = node.annotations.get("algorithm")
    problem = ConvProblem.of(node)
    flops = node_flops(node)
    x = np.random.default_rng(1).standard_normal(tuple(shape)).astype(np.float32)
    expected = ReferenceExecutor(graph).run([x])[0]
    names = list(ALGORITHMS) if not algorithms or list(algorithms) == ["all"] else list(algorithms)
    rows: dict[str, dict] = {}
    engines: dict[str, Callable[[], object]] = {}
    for algorithm in names:
        why = algorithm_not_applicable(problem, algorithm)
        row = {"algorithm": algorithm, "status": "ok", "reason": why, "impl": None,
               "rel_l2": None, "chosen": algorithm == chosen}
        rows[algorithm] = row
        if why is not None:
            row["status"] = "n/a"
            continue
        node.annotations["algorithm"] = algorithm
        try:
            backend = CpuBackend(graph, threads=threads)
            code = backend.generated.node_code[graph.nodes.index(node)]
            row["impl"] = implementation(code)
            row["rel_l2"] = rel_l2(backend.run([x])[0], expected)
        except Exception as exc:  # a kernel bug is a row of the lab, not its end
            row["status"] = "failed"
            row["reason"] = f"{type(exc).__name__}: {exc}"
            continue
        engines[algorithm] = (lambda b: lambda: b.run([x]))(backend)
    node.annotations["algorithm"] = chosen
    ort_row = None
    if compare_ort:
        session = ort_session(model, threads)
        theirs = session.run(None, {"x": x})[0]
        engines["onnxruntime"] = lambda: session.run(None, {"x": x})
        ort_row = {"algorithm": "onnxruntime", "status": "ok", "reason": None,
                   "impl": f"{threads} threads", "rel_l2": rel_l2(theirs, expected),
                   "chosen": False}
    with blas_threads(threads):
        timings = time_alternating(engines, runs, warmup, blocks) if engines else {}
    ceiling = gemm_ceiling()
    result_rows = list(rows.values()) + ([ort_row] if ort_row else [])
    for row in result_rows:
        t = timings.get(row["algorithm"])
        row["median_ms"] = t.median * 1e3 if t else None
        row["spread"] = t.spread if t else None
        row["gflops_per_s"] = flops / t.median / 1e9 if t else None
        row["pct_ceiling"] = 100 * row["gflops_per_s"] / ceiling if t else None
    return {"shape": list(shape), "weight": list(weight), "attrs": {
                "strides": list(problem.strides), "pads": list(problem.pads),
                "dilations": list(problem.dilations), "group": problem.group, "bias": bias},
            "output_shape": list(node.outputs[0].type.shape), "flops": flops,
            "chosen": chosen, "reason": node.annotations.get("_reason", ""), "runs": runs,
            "threads": threads, "gemm_ceiling_gflops": ceiling, "rows": result_rows}


def format_kernel_lab(lab: dict) -> str:
    a = lab["attrs"]
    lines = [f"conv  x {_csv(lab['shape'])}  w {_csv(lab['weight'])}  stride {_csv(a['strides'])}"
             f"  pads {_csv(a['pads'])}  dilation {_csv(a['dilations'])}  group {a['group']}"
             f"{'  +bias' if a['bias'] else ''}  ->  y {_csv(lab['output_shape'])}",
             f"work  {lab['flops'] / 1e9:.4g} GFLOP; GEMM ceiling {lab['gemm_ceiling_gflops']:.0f} "
             f"GFLOP/s; median of {lab['runs']} runs, {lab['threads']} threads",
             f"opt-level 2 picks {lab['chosen']}: {lab['reason']}", ""]
    rows = [["algorithm", "impl", "median ms", "p90/median", "GFLOP/s", "% ceiling",
             "rel L2 vs reference"]]
    notes = []
    for row in lab["rows"]:
        name = row["algorithm"] + (" *" if row["chosen"] else "")
        if row["status"] != "ok":
            rows.append([name, row["status"], "-", "-", "-", "-", "n/a" if row["status"] == "n/a"
                         else "-"])
            notes.append(f"  {row['algorithm']}: {row['status']}: {row['reason']}")
            continue
        rows.append([name, row["impl"], fmt(row["median_ms"], ".3f"), fmt(row["spread"], ".2f"),
                     fmt(row["gflops_per_s"], ".4g"), fmt(row["pct_ceiling"], ".1f"),
                     f"{row['rel_l2']:.2e}"])
    lines += table(rows, numeric_from=2, indent=0)
    lines.append("* the algorithm opt-level 2 chooses; impl: the kernel that ran it (an emitter "
                 "may substitute one) or the NumPy reference")
    lines += notes
    return "\n".join(lines)


__all__ = ["Timing", "time_alternating", "gemm_ceiling", "machine_info", "bench_model",
           "self_check", "profile_layers", "kernel_lab_conv", "format_bench",
           "format_self_check", "format_kernel_lab", "bench_html", "worst_layers"]
