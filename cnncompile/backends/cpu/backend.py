"""The CPU backend: generated Python calling Numba kernels on views of one preallocated arena."""

from __future__ import annotations

import re
import threading
import warnings

import numpy as np

from ...ir.graph import Graph
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

        def counted(name, fn):
            label = name[2:] if name.startswith("k_") else name

            def call(*args, **kwargs):
                bar.step(label)
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
