"""Optimizers: update parameter arrays in place from their gradients, as torch.optim does.

    opt = cnncompile.optim.SGD(lr=0.05, momentum=0.9)
    opt.step(params, grads)        # {name: array}; params change in place

An optimizer keeps its state (momentum buffers, Adam moments) per parameter name. The updates follow
torch.optim's formulas term by term (weight decay added to the gradient, PyTorch's first-step
momentum buffer, Adam's bias corrections), so a run matches PyTorch's on the same gradients.

Contiguous float32 parameters are updated by one fused Numba pass each (kernels/training.py: read
p, g and the state once, write p and the state, no temporaries); others, or ``fused = False``,
by the NumPy formulas.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ..errors import UserError


def _check(name: str, value: float, low: float = 0.0, below: float | None = None) -> float:
    value = float(value)
    if not math.isfinite(value) or value < low or (below is not None and value >= below):
        bound = f"[{low}, {below})" if below is not None else f">= {low}"
        raise UserError(f"optimizer: {name}={value} must be {bound}")
    return value


class Optimizer:
    """Base class: ``step(params, grads)`` updates every parameter that has a gradient."""

    def __init__(self, lr: float):
        self.lr = _check("lr", lr)
        self.state: dict[str, dict] = {}
        self.steps = 0
        self.fused = True

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        unknown = [name for name in grads if name not in params]
        if unknown:
            raise UserError(f"optimizer: gradients for unknown parameter(s) {', '.join(unknown)}")
        self.steps += 1
        for name, grad in grads.items():
            param = params[name]
            if grad.shape != param.shape:
                raise UserError(f"optimizer: the gradient of '{name}' has shape "
                                f"{list(grad.shape)}, the parameter {list(param.shape)}")
            grad = np.asarray(grad, dtype=param.dtype)
            state = self.state.setdefault(name, {})
            if self.fused and _fusable(param, grad):
                self._fused_update(param, grad, state)
            else:
                self._update(name, param, grad, state)

    def _fused_update(self, param: np.ndarray, grad: np.ndarray, state: dict) -> None:
        raise NotImplementedError

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray, state: dict) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the state (momentum, moments, step count)."""
        self.state.clear()
        self.steps = 0


def _fusable(param: np.ndarray, grad: np.ndarray) -> bool:
    return (param.dtype == np.float32 and param.flags.c_contiguous and param.flags.writeable
            and grad.flags.c_contiguous)


def _kernels():
    from ..backends.cpu.kernels import training
    return training


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov momentum and L2 weight decay
    (torch.optim.SGD)."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, dampening: float = 0.0):
        super().__init__(lr)
        self.momentum = _check("momentum", momentum)
        self.weight_decay = _check("weight_decay", weight_decay)
        self.dampening = _check("dampening", dampening)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise UserError("optimizer: nesterov=True needs momentum > 0 and dampening 0")

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay}, "
                f"nesterov={self.nesterov}, dampening={self.dampening})")

    def _update(self, name, param, grad, state):
        if self.weight_decay:
            grad = grad + param.dtype.type(self.weight_decay) * param
        if self.momentum:
            buf = state.get("momentum")
            if buf is None:
                buf = state["momentum"] = grad.copy()   # PyTorch starts the buffer at the gradient
            else:
                buf *= param.dtype.type(self.momentum)
                buf += param.dtype.type(1.0 - self.dampening) * grad
            grad = grad + param.dtype.type(self.momentum) * buf if self.nesterov else buf
        param -= param.dtype.type(self.lr) * grad

    def _fused_update(self, param, grad, state):
        first = False
        buf = _NO_STATE
        if self.momentum:
            buf = state.get("momentum")
            first = buf is None
            if first:
                buf = state["momentum"] = np.zeros_like(param)
        _kernels().sgd_update(param.reshape(-1), grad.reshape(-1), buf.reshape(-1), self.lr,
                              self.momentum, self.dampening, self.weight_decay, self.nesterov,
                              first)


_NO_STATE = np.zeros(0, dtype=np.float32)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction and L2 weight decay added to the gradient
    (torch.optim.Adam, amsgrad off)."""

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr)
        if len(betas) != 2:
            raise UserError(f"optimizer: betas={betas!r} must be a pair (beta1, beta2)")
        self.betas = (_check("betas[0]", betas[0], below=1.0), _check("betas[1]", betas[1],
                                                                      below=1.0))
        self.eps = _check("eps", eps)
        self.weight_decay = _check("weight_decay", weight_decay)

    def __repr__(self) -> str:
        return (f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay})")

    def _update(self, name, param, grad, state):
        beta1, beta2 = self.betas
        cast = param.dtype.type
        if self.weight_decay:
            grad = grad + cast(self.weight_decay) * param
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(param), exp_avg_sq=np.zeros_like(param))
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg *= cast(beta1)
        exp_avg += cast(1.0 - beta1) * grad
        exp_avg_sq *= cast(beta2)
        exp_avg_sq += cast(1.0 - beta2) * grad * grad
        step_size = self.lr / (1.0 - beta1 ** step)
        denom = np.sqrt(exp_avg_sq) / cast(math.sqrt(1.0 - beta2 ** step)) + cast(self.eps)
        param -= cast(step_size) * (exp_avg / denom)

    def _fused_update(self, param, grad, state):
        beta1, beta2 = self.betas
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(param), exp_avg_sq=np.zeros_like(param))
        state["step"] += 1
        step = state["step"]
        _kernels().adam_update(param.reshape(-1), grad.reshape(-1),
                               state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1),
                               self.lr, beta1, beta2, self.eps,
                               self.weight_decay, self.lr / (1.0 - beta1 ** step),
                               math.sqrt(1.0 - beta2 ** step))


__all__ = ["Optimizer", "SGD", "Adam"]
