"""Training with the compiler: reverse-mode differentiation on the IR (``grad``), losses,
optimizers, and the training module built on them (``compile_training``).

The backward pass is more nodes of the forward graph (see grad.py and docs/AUTODIFF.md), so the
pass pipeline and every backend compile it as they compile inference.
"""

from .grad import GradBuilder, decompose_fused, grad

__all__ = ["GradBuilder", "decompose_fused", "grad"]
