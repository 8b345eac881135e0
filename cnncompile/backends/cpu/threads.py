"""How the CPU backend shares the cores: Numba's OpenMP threads and NumPy's OpenBLAS.

Every parallel kernel is one Numba ``prange`` region; the GEMM drivers (kernels/conv.py, gemm.py,
winograd.py, training.py) call OpenBLAS's sgemm from inside theirs (kernels/blas.py), one
single-threaded GEMM per task. So a module runs with OpenBLAS on ONE thread (``thread_limit``,
restored when the run ends): two fork-join pools on two cores stall each other (measured: ResNet-18
at batch 1 took 714 ms with OpenBLAS on 2 threads against 37 ms on 1 under a load average of ~4),
and a multi-threaded OpenBLAS called from several OpenMP threads would share one pool. Earlier
drivers ran Python tasks on a thread pool between BLAS calls; a region of OpenMP's costs ~2 us
while its threads spin, against 50-100 us for waking a parked Python helper, which made layers
under ~0.3 ms 2x slower (see cpu/__init__.py for how long OpenMP spins).
"""

from __future__ import annotations

import ctypes
import threading

import numba

_OPENBLAS: list = []
_LIBRARY: list = []
_RUN = threading.local()  # .threads: this thread's Numba thread count in its open thread_limits
_THREAD_API = [("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
               ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
               ("openblas_get_num_threads", "openblas_set_num_threads")]


def threads() -> int:
    """Threads a driver may use: Numba's current count (the backend's ``threads`` setting; read
    once per module run, since numba.get_num_threads costs microseconds per kernel call)."""
    stack = getattr(_RUN, "threads", None)
    return stack[-1] if stack else numba.get_num_threads()


def openblas_library():
    """NumPy's OpenBLAS as a ctypes library (None when NumPy uses another BLAS)."""
    if not _LIBRARY:
        import numpy  # noqa: F401  (loads its BLAS, so that /proc/self/maps lists it)

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
            if any(hasattr(lib, getter) for getter, _ in _THREAD_API):
                found = lib
                break
        _LIBRARY.append(found)
    return _LIBRARY[0]


def openblas():
    """(get, set) of NumPy's OpenBLAS thread count, or None when NumPy uses another BLAS."""
    if _OPENBLAS:
        return _OPENBLAS[0]
    lib = openblas_library()
    found = None
    for getter, setter in _THREAD_API:
        if found is None and lib is not None and hasattr(lib, getter) and hasattr(lib, setter):
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
        if not hasattr(_RUN, "threads"):
            _RUN.threads = []
        _RUN.threads.append(numba.get_num_threads())
        self.blas.__enter__()
        return self

    def __exit__(self, *exc):
        self.blas.__exit__(*exc)
        _RUN.threads.pop()
        if self.saved is not None:
            numba.set_num_threads(self.saved)
        return False
