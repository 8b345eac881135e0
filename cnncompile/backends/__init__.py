"""Backends turn an optimized graph into something that runs.

A backend is a class with ``name``, ``preferred_layout``, ``__init__(graph)`` and
``run(list of arrays) -> list of arrays``. ``reference`` interprets the IR with NumPy; ``cpu`` generates
Python that calls Numba kernels (``backends/cpu``); ``cuda`` will plug in here.
"""

from __future__ import annotations

from ..errors import UserError
from .reference import ReferenceExecutor

def _cpu():
    from .cpu import CpuBackend  # imports numba: only when asked for
    return CpuBackend


TARGETS = {
    "reference": lambda: ReferenceExecutor,
    "cpu": _cpu,
}
PLANNED = {"cuda": "the Numba CUDA backend is not implemented yet"}


def get_backend(target: str):
    if target in TARGETS:
        return TARGETS[target]()
    if target in PLANNED:
        raise UserError(f"target '{target}' is not available: {PLANNED[target]}. "
                        f"Available targets: {', '.join(TARGETS)}")
    raise UserError(f"unknown target '{target}'; available targets: {', '.join(TARGETS)}")
