"""target="cpu": generated Python + Numba kernels over one memory arena.

Numba's on-disk cache goes under the user's cache directory (``$XDG_CACHE_HOME/cnncompile/numba``)
unless NUMBA_CACHE_DIR is set, so each kernel family compiles once per machine.

Numba's parallel kernels (OpenMP threading layer) and NumPy's OpenBLAS take turns on the same cores.
OpenMP threads that busy-wait after a parallel region steal the cores from the next BLAS call (measured
here: parallel regions 16 ms instead of 12 us under load), so OMP_WAIT_POLICY defaults to PASSIVE
unless the user set it.
"""

import os

import sys

if "NUMBA_CACHE_DIR" not in os.environ:
    _cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(_cache, "cnncompile", "numba")
    if "numba" in sys.modules:  # numba read the environment when it was imported
        sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .backend import CpuBackend  # noqa: E402

__all__ = ["CpuBackend"]
