"""target="cpu": generated Python + Numba kernels over one memory arena.

Numba's on-disk cache goes under the user's cache directory (``$XDG_CACHE_HOME/cnncompile/numba``)
unless NUMBA_CACHE_DIR is set, so each kernel family compiles once per machine.
"""

import os

if "NUMBA_CACHE_DIR" not in os.environ:
    _cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(_cache, "cnncompile", "numba")

from .backend import CpuBackend  # noqa: E402

__all__ = ["CpuBackend"]
