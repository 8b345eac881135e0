"""target="cpu": generated Python + Numba kernels over one memory arena.

Numba's on-disk cache goes under the user's cache directory (``$XDG_CACHE_HOME/cnncompile/numba``)
unless NUMBA_CACHE_DIR is set, so each kernel family compiles once per machine.

Every parallel kernel is an OpenMP region of Numba's (the GEMM drivers call OpenBLAS from inside
theirs), so how long OpenMP's idle threads spin matters. Measured here: a region takes 2 us when its
threads are still spinning and 50-100 us to wake them from sleep, while spinning for libgomp's
default 300,000 rounds (a few ms) made a 0.3 ms region take 8 ms when another process held a core.
GOMP_SPINCOUNT defaults to 30,000 (about 200 us: the gap between two kernels of a run) unless the
user set it or OMP_WAIT_POLICY.
"""

import os

import sys

if "NUMBA_CACHE_DIR" not in os.environ:
    _cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(_cache, "cnncompile", "numba")
    if "numba" in sys.modules:  # numba read the environment when it was imported
        sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from .backend import CpuBackend  # noqa: E402

__all__ = ["CpuBackend"]
