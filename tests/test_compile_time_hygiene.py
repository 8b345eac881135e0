"""Compile-time hygiene of the CPU backend: every kernel function compiles once per model (one
Numba signature), and the parallel compile path (signature recording,
worker processes filling Numba's disk cache) gives the kernels a run needs.

Correctness and regression checks only; compile times are measured by benchmarks/compile_time.py.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid

import numpy as np
import pytest
from numba import typeof

import cnncompile
from cnncompile import zoo
from cnncompile.backends.cpu import backend as cpu_backend
from cnncompile.backends.cpu.backend import (KERNEL_PACKAGE, CompileJob, CpuBackend,
                                             _available, _feed_worker)
from cnncompile.backends.cpu.codegen import GeneratedModule
from cnncompile.ir import Graph, TensorType


def kernel_signatures(name: str, batch: int, monkeypatch) -> dict:
    monkeypatch.setattr(CpuBackend, "warm_up", lambda self, progress=True: None)
    model = zoo.build(name, image_size=32)
    mod = cnncompile.compile(model, target="cpu", input_shapes=zoo.input_shapes(model, batch))
    return mod.executor.kernel_signatures()


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "squeezenet", "unet"])
def test_each_kernel_function_of_a_model_gets_one_signature(name, monkeypatch):
    # Every distinct argument type combination (readonly vs writeable, 'C' vs 'A', int vs
    # tuple, float32 vs float64 scalars) is one more full compile of the kernel.
    for batch in (1, 2):
        signatures = kernel_signatures(name, batch, monkeypatch)
        assert len(signatures) >= 3  # the model really runs through Numba kernels
        several = {kernel: sigs for kernel, sigs in signatures.items() if len(sigs) > 1}
        assert not several, (name, batch)


@pytest.fixture
def fresh_kernels(tmp_path):
    """Two Numba kernels in a new source file (so not in any disk cache yet), loaded as a module
    of the kernels package the way generated elementwise kernels are."""
    path = tmp_path / "fresh_kernels.py"
    path.write_text(
        "from numba import njit\n\n\n"
        "@njit(cache=True)\ndef twice(x, out):\n"
        "    for i in range(x.shape[0]):\n        out[i] = 2 * x[i]\n\n\n"
        "@njit(cache=True)\ndef plus_one(x, out):\n"
        "    for i in range(x.shape[0]):\n        out[i] = x[i] + 1\n")
    name = f"{KERNEL_PACKAGE}.generated_test_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def test_a_worker_process_compiles_a_kernel_into_the_disk_cache(fresh_kernels):
    kernel = fresh_kernels.twice
    x = np.arange(5, dtype=np.float32)
    signature = (typeof(x), typeof(x))
    job = CompileJob(kernel, [signature])
    assert job.portable and not _available(kernel, signature)
    jobs = [job]
    _feed_worker(lambda worker: jobs.pop() if jobs else None)
    assert not jobs
    # compiled there, not here: this process finds it on disk and loads it
    assert _available(kernel, signature) and signature not in kernel.overloads
    out = np.empty_like(x)
    kernel(x, out)
    np.testing.assert_array_equal(out, 2 * x)
    assert kernel.stats.cache_hits[signature] == 1


def test_warm_up_records_compiles_in_parallel_and_then_runs(fresh_kernels, monkeypatch):
    monkeypatch.setenv("CNNCOMPILE_COMPILE_WORKERS", "1")
    graph = Graph("parallel")
    x = graph.add_input("x", TensorType(np.float32, (4,)))
    graph.outputs = [x]
    source = ("import numpy as np\n\n\ndef run(x):\n    y = np.empty(4, np.float32)\n"
              "    k_twice(x, y)\n    z = np.empty(4, np.float32)\n    k_plus_one(y, z)\n"
              "    return (z, )\n")
    backend = CpuBackend.from_generated(graph, GeneratedModule(source, {}, "<parallel>"),
                                        warm_up=False)
    namespace = backend.generated.namespace
    namespace.update(k_twice=fresh_kernels.twice, k_plus_one=fresh_kernels.plus_one)
    seen = []
    real_precompile = cpu_backend.precompile

    def precompile(jobs, progress=True):
        seen.extend(job.label for job in jobs)
        real_precompile(jobs, progress)

    monkeypatch.setattr(cpu_backend, "precompile", precompile)
    backend.warm_up(progress=False)
    assert backend.warm_up_error is None
    assert sorted(seen) == ["plus_one", "twice"]  # both recorded in one run (the 2nd skipped)
    assert namespace["k_twice"] is fresh_kernels.twice  # the dispatchers are back in place
    assert fresh_kernels.twice.signatures and fresh_kernels.plus_one.signatures
    (z,) = backend.run([np.arange(4, dtype=np.float32)])
    np.testing.assert_array_equal(z, 2 * np.arange(4, dtype=np.float32) + 1)
    # a second warm-up finds everything compiled: one plain run, nothing to precompile
    seen.clear()
    backend.warm_up(progress=False)
    assert backend.warm_up_error is None and seen == []
