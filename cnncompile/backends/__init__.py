"""Backends turn an optimized graph into something that runs.

A backend is a class with ``name`` and ``__init__(graph)`` and ``run(list of arrays) -> list of
arrays``. ``reference`` interprets the IR with NumPy; ``cpu`` (Numba) and ``cuda`` arrive with later
issues and plug in here.
"""

from __future__ import annotations

from ..errors import UserError
from .reference import ReferenceExecutor

TARGETS = {
    "reference": ReferenceExecutor,
    # Until the Numba CPU backend lands, "cpu" runs the reference executor (docs/DESIGN.md says so).
    "cpu": ReferenceExecutor,
}
PLANNED = {"cuda": "the Numba CUDA backend is not implemented yet"}


def get_backend(target: str):
    if target in TARGETS:
        return TARGETS[target]
    if target in PLANNED:
        raise UserError(f"target '{target}' is not available: {PLANNED[target]}. "
                        f"Available targets: {', '.join(TARGETS)}")
    raise UserError(f"unknown target '{target}'; available targets: {', '.join(TARGETS)}")
