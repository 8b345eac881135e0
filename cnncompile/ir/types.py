"""Tensor types: an element dtype and a shape.

A shape is a tuple of dimensions. A dimension is an ``int`` once it is static. It is a ``str`` while it
is symbolic: either a dynamic axis of a graph input that nobody fixed (the frontend refuses to go on
with those) or the data-dependent size of an op's output (NonMaxSuppression's row count), which only
the run knows.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

# Short names for the printer; also the dtypes the IR admits.
_SHORT = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
    np.dtype(np.float16): "f16",
    np.dtype(np.int64): "i64",
    np.dtype(np.int32): "i32",
    np.dtype(np.int16): "i16",
    np.dtype(np.int8): "i8",
    np.dtype(np.uint64): "u64",
    np.dtype(np.uint32): "u32",
    np.dtype(np.uint16): "u16",
    np.dtype(np.uint8): "u8",
    np.dtype(np.bool_): "bool",
}
# Storage-only dtypes: tensors of these types are loaded, cast and moved, not computed on. ml_dtypes
# provides them to NumPy; onnx itself depends on it, so it costs no extra dependency.
LOW_PRECISION = {
    "bfloat16": "bf16", "float8_e4m3fn": "f8e4m3fn", "float8_e4m3fnuz": "f8e4m3fnuz",
    "float8_e5m2": "f8e5m2", "float8_e5m2fnuz": "f8e5m2fnuz", "float4_e2m1fn": "f4e2m1fn",
    "int4": "i4", "uint4": "u4", "int2": "i2", "uint2": "u2",
}
for _name, _short in LOW_PRECISION.items():
    _SHORT[np.dtype(getattr(ml_dtypes, _name))] = _short
FLOAT8_DTYPES = tuple(np.dtype(getattr(ml_dtypes, n)) for n in LOW_PRECISION if n.startswith("float8"))

SUPPORTED_DTYPES = tuple(_SHORT)
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

Dim = int | str


@dataclass(frozen=True)
class TensorType:
    dtype: np.dtype
    shape: tuple[Dim, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(d if isinstance(d, str) else int(d)
                                                for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def size(self) -> int:
        """Number of elements; only for static shapes."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.is_static else -1

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize if self.is_static else -1

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype) -> "TensorType":
        return TensorType(np.dtype(dtype), self.shape)

    def __str__(self) -> str:
        return f"{dtype_short(self.dtype)}[{','.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> "TensorType":
        return TensorType(array.dtype, array.shape)


def dtype_short(dtype) -> str:
    dtype = np.dtype(dtype)
    return _SHORT.get(dtype, dtype.name)


def shape_str(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
