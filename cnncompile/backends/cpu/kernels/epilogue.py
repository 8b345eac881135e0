"""Fused epilogues: bias, activation, residual add and post activation, in Numba.

API (what conv / gemm kernels and emitters use):

* ``activation_code(op_name, attrs) -> (code, params)``: an int code and a float64 ``params`` array
  (always length 2) for an epilogue activation; ``""`` / None is ``NONE``. Raises
  ``UnsupportedActivation`` (a ValueError) for any other op, so that an emitter can decline.
* ``apply_activation(x, code, params)``: ``@njit(inline="always")`` scalar function, usable inside
  any Numba kernel. With a literal ``code`` inside a loop the switch folds away and the loop
  vectorises. float32 arithmetic for float32 ``x`` (params are rounded to float32).
* ``activation_row(row, code, params)``: ``@njit`` (not inlined, so that a kernel switching over
  every activation still compiles quickly); the activation on a 1-D array in place, the switch
  hoisted out of the element loop. Call it per plane or long row: every call of a function Numba
  does not inline costs reference counting on its array arguments (measured: more than the
  arithmetic of a 7..56-element row).
* ``epilogue_plane(plane, b, code, params, res, has_res, post_code, post_params)``:
  ``@njit(inline="always")``; the same in place on one 1-D plane with a scalar bias (kernels call
  it once per output plane).
* ``bias_activation(y, out, bias, code, params, residual, post_code, post_params)``:
  ``@njit(parallel=True)`` over (N, K, S) float32 arrays (S = the flattened spatial dims)::

      out = post(act(y + bias[None, :, None]) + residual)

  ``out`` may be ``y`` (in place). ``bias`` of size 0 means no bias; ``residual`` with
  ``shape[0] == 0`` means no residual. Parallel over the N*K rows.
* ``epilogue(y, bias, code, params, residual, post_code, post_params, out=None)``: Python driver
  for any (N, K, spatial...) arrays, None for absent bias / residual; ``out`` may be a strided view
  (one call per batch item then, each on contiguous (K, S) blocks).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

NONE, RELU, RELU6, CLIP, LEAKY_RELU, SIGMOID, SILU, HARD_SWISH, HARD_SIGMOID, TANH = range(10)
GELU, GELU_TANH, ELU, SELU, SOFTPLUS, MISH = range(10, 16)

_SIMPLE = {"": NONE, "Relu": RELU, "Relu6": RELU6, "Sigmoid": SIGMOID, "Silu": SILU,
           "HardSwish": HARD_SWISH, "Tanh": TANH, "Softplus": SOFTPLUS, "Mish": MISH}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


class UnsupportedActivation(ValueError):
    pass


def activation_code(op_name: str | None, attrs: dict | None = None) -> tuple[int, np.ndarray]:
    """(code, params) for an epilogue activation given by its op name and canonical attrs."""
    attrs = attrs or {}
    name = op_name or ""
    params = np.zeros(2, dtype=np.float64)
    if name in _SIMPLE:
        return _SIMPLE[name], params
    if name == "Clip":
        lo, hi = attrs.get("min"), attrs.get("max")
        params[0] = -np.inf if lo is None else float(lo)
        params[1] = np.inf if hi is None else float(hi)
        return CLIP, params
    if name == "LeakyRelu":
        params[0] = float(attrs.get("alpha", 0.01))
        return LEAKY_RELU, params
    if name == "HardSigmoid":
        params[0] = float(attrs.get("alpha", 0.2))
        params[1] = float(attrs.get("beta", 0.5))
        return HARD_SIGMOID, params
    if name == "Gelu":
        approximate = attrs.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise UnsupportedActivation(f"Gelu approximate='{approximate}'")
        return (GELU_TANH if approximate == "tanh" else GELU), params
    if name == "Elu":
        params[0] = float(attrs.get("alpha", 1.0))
        return ELU, params
    if name == "Selu":
        params[0] = float(attrs.get("alpha", 1.67326319217681884765625))
        params[1] = float(attrs.get("gamma", 1.05070102214813232421875))
        return SELU, params
    raise UnsupportedActivation(f"no fused epilogue for activation '{name}'")


@njit(cache=True)
def _sigmoid(x):
    # exp(-|x|) never overflows
    e = math.exp(-abs(x))
    one = np.float32(1)
    if x >= 0:
        return one / (one + e)
    return e / (one + e)


@njit(cache=True)
def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, x - x)


# One small function per activation: Numba compiles each once and LLVM inlines them, which keeps
# the kernels that switch over all of them quick to compile.
@njit(cache=True)
def _relu(x, p):
    return x - x if x < 0 else x


@njit(cache=True)
def _relu6(x, p):
    six = np.float32(6)
    return x - x if x < 0 else (x - x + six if x > six else x)


@njit(cache=True)
def _clip(x, p):
    lo = np.float32(p[0])
    hi = np.float32(p[1])
    y = lo if x < lo else x
    return hi if y > hi else y


@njit(cache=True)
def _leaky_relu(x, p):
    return x * np.float32(p[0]) if x < 0 else x


@njit(cache=True)
def _sigmoid_p(x, p):
    return _sigmoid(x)


@njit(cache=True)
def _silu(x, p):
    return x * _sigmoid(x)


@njit(cache=True)
def _hard_swish(x, p):
    t = x * np.float32(1.0 / 6.0) + np.float32(0.5)
    t = x - x if t < 0 else t
    one = np.float32(1)
    return x * (x - x + one if t > one else t)


@njit(cache=True)
def _hard_sigmoid(x, p):
    t = x * np.float32(p[0]) + np.float32(p[1])
    t = x - x if t < 0 else t
    one = np.float32(1)
    return x - x + one if t > one else t


@njit(cache=True)
def _tanh(x, p):
    return math.tanh(x)


@njit(cache=True)
def _gelu(x, p):
    return np.float32(0.5) * x * (np.float32(1) + math.erf(x * np.float32(_INV_SQRT_2)))


@njit(cache=True)
def _gelu_tanh(x, p):
    inner = np.float32(_SQRT_2_OVER_PI) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1) + math.tanh(inner))


@njit(cache=True)
def _elu(x, p):
    return x if x > 0 else np.float32(p[0]) * math.expm1(x)


@njit(cache=True)
def _selu(x, p):
    return np.float32(p[1]) * (x if x > 0 else np.float32(p[0]) * math.expm1(x))


@njit(cache=True)
def _softplus_p(x, p):
    return _softplus(x)


@njit(cache=True)
def _mish(x, p):
    return x * math.tanh(_softplus(x))


@njit(inline="always", cache=True)
def apply_activation(x, code, params):
    """The activation ``code`` (see activation_code) of one scalar."""
    if code == RELU:
        return _relu(x, params)
    if code == RELU6:
        return _relu6(x, params)
    if code == CLIP:
        return _clip(x, params)
    if code == LEAKY_RELU:
        return _leaky_relu(x, params)
    if code == SIGMOID:
        return _sigmoid(x)
    if code == SILU:
        return _silu(x, params)
    if code == HARD_SWISH:
        return _hard_swish(x, params)
    if code == HARD_SIGMOID:
        return _hard_sigmoid(x, params)
    if code == TANH:
        return _tanh(x, params)
    if code == GELU:
        return _gelu(x, params)
    if code == GELU_TANH:
        return _gelu_tanh(x, params)
    if code == ELU:
        return _elu(x, params)
    if code == SELU:
        return _selu(x, params)
    if code == SOFTPLUS:
        return _softplus(x)
    if code == MISH:
        return _mish(x, params)
    return x


@njit(cache=True)
def activation_row(row, code, params):
    """Apply ``code`` to a 1-D array in place, the switch outside the element loop."""
    if code == RELU:
        for i in range(row.shape[0]):
            row[i] = _relu(row[i], params)
    elif code == RELU6:
        for i in range(row.shape[0]):
            row[i] = _relu6(row[i], params)
    elif code == CLIP:
        for i in range(row.shape[0]):
            row[i] = _clip(row[i], params)
    elif code == LEAKY_RELU:
        for i in range(row.shape[0]):
            row[i] = _leaky_relu(row[i], params)
    elif code == SIGMOID:
        for i in range(row.shape[0]):
            row[i] = _sigmoid_p(row[i], params)
    elif code == SILU:
        for i in range(row.shape[0]):
            row[i] = _silu(row[i], params)
    elif code == HARD_SWISH:
        for i in range(row.shape[0]):
            row[i] = _hard_swish(row[i], params)
    elif code == HARD_SIGMOID:
        for i in range(row.shape[0]):
            row[i] = _hard_sigmoid(row[i], params)
    elif code == TANH:
        for i in range(row.shape[0]):
            row[i] = _tanh(row[i], params)
    elif code == GELU:
        for i in range(row.shape[0]):
            row[i] = _gelu(row[i], params)
    elif code == GELU_TANH:
        for i in range(row.shape[0]):
            row[i] = _gelu_tanh(row[i], params)
    elif code == ELU:
        for i in range(row.shape[0]):
            row[i] = _elu(row[i], params)
    elif code == SELU:
        for i in range(row.shape[0]):
            row[i] = _selu(row[i], params)
    elif code == SOFTPLUS:
        for i in range(row.shape[0]):
            row[i] = _softplus_p(row[i], params)
    elif code == MISH:
        for i in range(row.shape[0]):
            row[i] = _mish(row[i], params)


@njit(inline="always", cache=True)
def epilogue_plane(plane, b, code, params, res, has_res, post_code, post_params):
    """plane = post(act(plane + b) + res) in place, for a 1-D plane; inline, Relu fused into
    the bias loop and the other activations called once per plane (calls that pass arrays cost
    reference counting, so kernels make them per plane, not per row)."""
    n = plane.shape[0]
    if code == RELU:
        zero = np.float32(0)
        for i in range(n):
            v = plane[i] + b
            plane[i] = v if v > zero else zero
    else:
        for i in range(n):
            plane[i] += b
        activation_row(plane, code, params)
    if has_res:
        for i in range(n):
            plane[i] += res[i]
        activation_row(plane, post_code, post_params)


@njit(parallel=True, cache=True)
def bias_activation(y, out, bias, code, params, residual, post_code, post_params):
    """out = post(act(y + bias) + residual) over (N, K, S) arrays; see the module docstring."""
    n_batch, k_out = y.shape[0], y.shape[1]
    has_bias = bias.shape[0] != 0
    has_res = residual.shape[0] != 0
    for row in prange(n_batch * k_out):
        n = row // k_out
        k = row % k_out
        dst = out[n, k]
        src = y[n, k]
        if src.ctypes.data != dst.ctypes.data:
            for i in range(dst.shape[0]):
                dst[i] = src[i]
        b = bias[k] if has_bias else np.float32(0)
        epilogue_plane(dst, b, code, params, residual[n, k] if has_res else dst, has_res,
                       post_code, post_params)


_EMPTY_BIAS = np.zeros(0, dtype=np.float32)
_EMPTY_RES = np.zeros((0, 0, 0), dtype=np.float32)


def as_nks(array: np.ndarray) -> np.ndarray:
    """(N, K, spatial...) -> a (N, K, S) view (a copy only if the layout allows no view)."""
    return array.reshape(array.shape[0], array.shape[1], -1)


def epilogue(y, bias=None, code=NONE, params=None, residual=None, post_code=NONE,
             post_params=None, out=None):
    """out = post(act(y + bias) + residual) for (N, K, spatial...) float32 arrays; returns out."""
    if out is None:
        out = y
    params = np.zeros(2) if params is None else params
    post_params = np.zeros(2) if post_params is None else post_params
    bias = _EMPTY_BIAS if bias is None else bias
    if out.flags.c_contiguous and y.flags.c_contiguous and (
            residual is None or residual.flags.c_contiguous):
        res = _EMPTY_RES if residual is None else as_nks(residual)
        bias_activation(as_nks(y), as_nks(out), bias, code, params, res, post_code, post_params)
        return out
    # A strided destination (a concat slice with N > 1): each batch item is contiguous.
    for n in range(y.shape[0]):
        res = _EMPTY_RES if residual is None else _contiguous_item(residual, n)
        src = _contiguous_item(y, n)
        dst = out[n:n + 1]
        if dst.flags.c_contiguous:
            bias_activation(src, as_nks(dst), bias, code, params, res, post_code, post_params)
        else:
            tmp = np.empty_like(src)
            bias_activation(src, tmp, bias, code, params, res, post_code, post_params)
            dst[...] = tmp.reshape(dst.shape)
    return out


def _contiguous_item(array: np.ndarray, n: int) -> np.ndarray:
    item = array[n:n + 1]
    if not item.flags.c_contiguous:
        item = np.ascontiguousarray(item)
    return as_nks(item)
