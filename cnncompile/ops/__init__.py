"""The op set: one module per op family, one class per op (see base.py for what a class holds).

Importing this package registers every op in ``OPS``.
"""

from .base import OPS, Op, get_op, register, supported_ops
from . import (activation, conv, detection, elementwise, fused, linalg, norm,  # noqa: F401
               pool, reduce, resize, shape)

__all__ = ["OPS", "Op", "get_op", "register", "supported_ops"]
