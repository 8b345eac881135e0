"""How the CPU backend shares the cores: Numba's threads, NumPy's OpenBLAS and the drivers' tasks.

Two fork-join pools on the same cores stall each other, and a fork-join pool on a machine where
another process holds a core stalls every region until that core comes back. OpenBLAS is the worst
case: it splits each GEMM statically over its threads and spins until all parts are done, and an idle
OpenBLAS worker keeps spinning for a while after its last GEMM. Measured on this 2-core machine:
ResNet-18 at batch 1 ran 714 ms with OpenBLAS on 2 threads against 37 ms on 1 under a load average
of ~4, and 52 ms against 30.5 ms on a quiet machine when OpenBLAS went back to 2 threads between
convolutions.

So a module runs with OpenBLAS on ONE thread (``thread_limit``, restored when the run ends) and the
drivers split their work into tasks themselves (``run_tasks``): the calling thread and helper threads
take the next task from a shared counter, each running a serial Numba kernel or a single-threaded
BLAS call (both release the GIL). Whoever is scheduled does the work; a helper that never got a core
never took a task, and the call does not wait for it.
"""

from __future__ import annotations

import ctypes
import itertools
from concurrent.futures import ThreadPoolExecutor

import numba

_EXECUTOR: list = []
_OPENBLAS: list = []


def threads() -> int:
    """Threads a driver may use: Numba's current count (the backend's ``threads`` setting)."""
    return numba.get_num_threads()


def _drain(fn, counter, count, slot):
    for index in iter(counter.__next__, None):
        if index >= count:
            return
        fn(slot, index)


def run_tasks(fn, count: int, workers: int) -> None:
    """fn(slot, index) for every index in range(count), on up to ``workers`` threads: the caller
    (slot 0) and helpers (slots 1...), each taking the next index when free. ``slot`` names the
    thread's private scratch. fn must release the GIL (nogil Numba kernels, BLAS) to overlap."""
    helpers = min(workers, count) - 1
    if helpers <= 0:
        for index in range(count):
            fn(0, index)
        return
    if not _EXECUTOR:
        _EXECUTOR.append(ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                            thread_name_prefix="cnncompile-conv"))
    counter = itertools.count()
    futures = [_EXECUTOR[0].submit(_drain, fn, counter, count, slot)
               for slot in range(1, helpers + 1)]
    _drain(fn, counter, count, 0)
    for future in futures:
        if not future.cancel():  # a helper that never started has nothing left to do
            future.result()


def openblas():
    """(get, set) of NumPy's OpenBLAS thread count, or None when NumPy uses another BLAS."""
    if _OPENBLAS:
        return _OPENBLAS[0]
    names = [("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
             ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
             ("openblas_get_num_threads", "openblas_set_num_threads")]
    found = None
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower()})
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for getter, setter in names:
            if found is None and hasattr(lib, getter) and hasattr(lib, setter):
                found = (getattr(lib, getter), getattr(lib, setter))
    _OPENBLAS.append(found)
    return found


class blas_threads:
    """NumPy's OpenBLAS on ``count`` threads inside, the previous count restored on exit (no-op
    for None, or where NumPy's BLAS is not OpenBLAS)."""

    def __init__(self, count: int | None):
        self.count = count
        self.saved = None

    def __enter__(self):
        api = openblas() if self.count else None
        if api is not None:
            self.saved = api[0]()
            if self.saved != self.count:
                api[1](int(self.count))
        return self

    def __exit__(self, *exc):
        if self.saved is not None and self.saved != self.count:
            openblas()[1](int(self.saved))
        return False


def serial_blas() -> blas_threads:
    """Single-threaded OpenBLAS inside (a no-op during a module run, which already is)."""
    return blas_threads(1)


class thread_limit:
    """A module run: at most ``threads`` Numba threads (None: all) and single-threaded OpenBLAS,
    both restored afterwards."""

    def __init__(self, threads: int | None):
        self.threads = threads
        self.saved = None
        self.blas = blas_threads(1)

    def __enter__(self):
        if self.threads:
            self.saved = numba.get_num_threads()
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        self.blas.__enter__()
        return self

    def __exit__(self, *exc):
        self.blas.__exit__(*exc)
        if self.saved is not None:
            numba.set_num_threads(self.saved)
        return False
