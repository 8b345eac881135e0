"""The op set: one module per op family, one class per op (see base.py for what a class holds).

Importing this package registers every op in ``OPS``.
"""

from .base import OPS, Op, get_op, register, supported_ops
from . import (activation, conv, detection, elementwise, fused, grad_ops, linalg,  # noqa: F401
               norm, pool, reduce, resize, shape, training_ops)

__all__ = ["OPS", "Op", "get_op", "register", "supported_ops"]
