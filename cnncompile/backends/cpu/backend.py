"""The CPU backend: generated Python calling Numba kernels on views of one preallocated arena."""

from __future__ import annotations

import threading

import numpy as np

from ...ir.graph import Graph
from .codegen import GeneratedModule, generate, load_generated
from .emitters import emit_node


class CpuBackend:
    name = "cpu"
    preferred_layout = "NCHW"

    def __init__(self, graph: Graph, threads: int | None = None):
        self.graph = graph
        self.threads = threads
        self.generated = load_generated(generate(graph, emit_node))
        self._run = self.generated.run
        # One arena per module: runs of the same module must not overlap.
        self._lock = threading.Lock()

    @classmethod
    def from_generated(cls, graph: Graph, generated: GeneratedModule,
                       threads: int | None = None) -> "CpuBackend":
        self = cls.__new__(cls)
        self.graph, self.threads = graph, threads
        self.generated = load_generated(generated)
        self._run = self.generated.run
        self._lock = threading.Lock()
        return self

    @property
    def source(self) -> str:
        return self.generated.source

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock, thread_limit(self.threads):
            return list(self._run(*inputs))


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
