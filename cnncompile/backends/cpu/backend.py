"""The CPU backend: generated Python calling Numba kernels on views of one preallocated arena."""

from __future__ import annotations

import itertools
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

from ...ir.graph import Graph, Node
from .codegen import GeneratedModule, generate, load_generated
from .emitters import emit_node


class CpuBackend:
    name = "cpu"
    preferred_layout = "NCHW"

    def __init__(self, graph: Graph, threads: int | None = None, warm_up: bool = True):
        self.graph = graph
        self.threads = threads
        self.generated = load_generated(generate(graph, emit_node))
        self._run = self.generated.run
        # One arena per module: runs of the same module must not overlap.
        self._lock = threading.Lock()
        self.warm_up_error: Exception | None = None
        if warm_up:
            self.warm_up()

    @classmethod
    def from_generated(cls, graph: Graph, generated: GeneratedModule,
                       threads: int | None = None, warm_up: bool = True) -> "CpuBackend":
        self = cls.__new__(cls)
        self.graph, self.threads = graph, threads
        self.generated = load_generated(generated)
        self._run = self.generated.run
        self._lock = threading.Lock()
        self.warm_up_error = None
        if warm_up:
            self.warm_up()
        return self

    def warm_up(self, progress: bool = True) -> None:
        """Pay Numba's JIT (or its on-disk cache load) now rather than in the first call: run once
        on zeros, with a progress bar over the kernel calls. Kernels take shapes as arguments, so
        these are the signatures every later call uses. A model that cannot run on zeros (say, an
        index input) skips it; its kernels then compile on the first real call."""
        from ...runtime.progress import Progress

        namespace = self.generated.namespace
        names = kernel_names(namespace)
        total = count_calls(self.generated.source, names)
        if not total or not all(v.type.is_static for v in self.graph.inputs):
            return
        zeros = [np.zeros(v.type.shape, dtype=v.type.dtype) for v in self.graph.inputs]
        saved = {name: namespace[name] for name in names}
        bar = Progress("compiling kernels", total, enabled=progress)
        helper = CompileHelper(self.graph)

        def counted(name, fn):
            label = name[2:] if name.startswith("k_") else name

            def call(*args, **kwargs):
                bar.step(label)
                helper.start_if_slow(bar.seconds)
                return fn(*args, **kwargs)
            return call

        # run() reads its kernels as module globals at call time, so swapping them counts calls.
        namespace.update({name: counted(name, fn) for name, fn in saved.items()})
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                self.run(zeros)
        except Exception as exc:  # noqa: BLE001  (the first real call reports real errors)
            self.warm_up_error = exc
        finally:
            namespace.update(saved)
            helper.stop()
            bar.close()

    @property
    def source(self) -> str:
        return self.generated.source

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock, thread_limit(self.threads):
            return list(self._run(*inputs))


KERNEL_PACKAGE = "cnncompile.backends.cpu.kernels"


def kernel_names(namespace: dict) -> list[str]:
    """Globals of a generated module that are kernels (Numba or drivers from the kernels
    package), as opposed to NumPy references and helpers."""
    names = []
    for name, value in namespace.items():
        module = getattr(getattr(value, "py_func", value), "__module__", None) or ""
        if callable(value) and module.startswith(KERNEL_PACKAGE):
            names.append(name)
    return names


def count_calls(source: str, names: list[str]) -> int:
    """Kernel calls in run(): it is straight-line code, so call sites are calls."""
    if not names:
        return 0
    start = re.search(r"^def run\(", source, re.MULTILINE)
    if start is None:
        return 0
    body = source[start.end():]
    end = re.search(r"^def ", body, re.MULTILINE)  # a profiled twin of run may follow it
    body = body if end is None else body[:end.start()]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\(")
    return sum(len(pattern.findall(line)) for line in body.splitlines()
               if not line.lstrip().startswith("#"))


def single_node_graph(graph: Graph, node: Node, annotations: dict | None = None) -> Graph:
    """``node`` alone, as a graph the backend compiles by itself: its computed inputs become graph
    inputs, its constants stay constants (with any constant its annotations name, such as a
    pre-packed weight); ``annotations`` override the node's."""
    g = Graph(f"single_{node.name or node.op}", graph.opset)
    mapping = {}
    for value in node.inputs:
        if value is None or id(value) in mapping:
            continue
        if value.is_constant:
            mapping[id(value)] = g.add_constant(value.name, value.data)
        else:
            mapping[id(value)] = g.add_input(value.name, value.type)
    for name in node.annotations.values():
        if isinstance(name, str) and name in graph.constants and name not in g.constants:
            g.add_constant(name, graph.constants[name].data)
    outputs = [g.new_value(v.name, v.type) for v in node.outputs]
    g.add_node(Node(node.op, [mapping[id(v)] if v is not None else None for v in node.inputs],
                    outputs, dict(node.attrs), node.name, node.origins, node.created_by,
                    node.domain, {**node.annotations, **(annotations or {})}))
    g.outputs = outputs
    g.meta = {k: v for k, v in graph.meta.items() if k != "memory_plan"}
    return g


# ---- compiling in a second process ---------------------------------------------------------------
#: a warm-up still running after this many seconds is compiling (Numba's cache was cold)
HELPER_AFTER_SECONDS = 1.0
HELPER_ENV = "CNNCOMPILE_COMPILE_WORKERS"


class CompileHelper:
    """A second process that compiles the kernels of the graph's node kinds from the last one
    backwards, into Numba's on-disk cache, while this process warms up from the first node
    forwards. Numba compiles one function at a time per process; when this process reaches a
    kernel that the helper has cached, it loads it instead of compiling it (a cold compile of
    ResNet-50 spends most of its time there). Started only once a warm-up has run for
    HELPER_AFTER_SECONDS (so never on a warm cache) and with two cores or more;
    CNNCOMPILE_COMPILE_WORKERS=0 turns it off."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.process: subprocess.Popen | None = None
        self.path: str | None = None
        self.enabled = (os.environ.get(HELPER_ENV, "1") != "0"
                        and len(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity")
                                else range(os.cpu_count() or 1)) >= 2)

    def start_if_slow(self, seconds: float) -> None:
        if not self.enabled or seconds < HELPER_AFTER_SECONDS:
            return
        self.enabled = False  # one try
        graphs = [single_node_graph(self.graph, node) for node in reversed(node_kinds(self.graph))]
        if not graphs:
            return
        for g in graphs:
            g._counter = None  # itertools.count does not pickle in every Python
        handle, self.path = tempfile.mkstemp(prefix="cnncompile-precompile-", suffix=".pickle")
        with os.fdopen(handle, "wb") as f:
            pickle.dump(graphs, f, protocol=pickle.HIGHEST_PROTOCOL)
        env = dict(os.environ, **{HELPER_ENV: "0", "CNNCOMPILE_PROGRESS": "0",
                                  "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                  "OMP_NUM_THREADS": "1"})
        command = ("import sys; from cnncompile.backends.cpu.backend import precompile_file; "
                   "precompile_file(sys.argv[1])")
        self.process = subprocess.Popen([sys.executable, "-c", command, self.path], env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        """Everything this process needs is compiled: the helper's remaining work is not."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


def node_kinds(graph: Graph) -> list[Node]:
    """The first node of each kind, in graph order: nodes that differ only in sizes (which
    kernels take as arguments) compile the same kernels."""
    seen, first = set(), []
    for node in graph.nodes:
        values = [v for v in node.inputs if v is not None] + node.outputs
        if not all(v.type.is_static for v in values):
            continue
        attrs = tuple(sorted((k, len(v) if isinstance(v, (list, tuple)) else repr(v))
                             for k, v in node.attrs.items() if not isinstance(v, np.ndarray)))
        key = (node.op, node.annotations.get("algorithm"), attrs,
               tuple((v.type.dtype.name, v.type.rank, v.is_constant) for v in values))
        if key not in seen:
            seen.add(key)
            first.append(node)
    return first


def precompile_file(path: str) -> None:
    """The helper process: compile and run each single-node graph of the pickle once on zeros."""
    with open(path, "rb") as f:
        graphs = pickle.load(f)
    for g in graphs:
        g._counter = itertools.count()
        try:
            backend = CpuBackend(g, warm_up=False)
            backend.run([np.zeros(v.type.shape, dtype=v.type.dtype) for v in g.inputs])
        except Exception:  # noqa: BLE001  (a node that fails here fails in the real warm-up too)
            continue


class thread_limit:
    """Run with at most ``threads`` Numba threads (None: all), restoring the count afterwards."""

    def __init__(self, threads: int | None):
        self.threads = threads
        self.saved = None

    def __enter__(self):
        if self.threads:
            import numba
            self.saved = numba.get_num_threads()
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import numba
            numba.set_num_threads(self.saved)
        return False
