"""Shape manipulation: Flatten, Reshape, Transpose, Concat, Split, Squeeze, Unsqueeze, Slice, Pad,
Expand, Gather, Shape, ConstantOfShape, Range, DepthToSpace, SpaceToDepth.

Parameters that newer opsets pass as tensors (Reshape's shape, Slice's starts/ends, Pad's
pads...) are lifted into attributes by the frontend, so every op below has one canonical form for
opsets 7 to 22. ``normalize`` fills that form completely: axes non-negative, defaults explicit,
opset differences gone.

A dimension may be a str when it is known only at run time (NonMaxSuppression's row count); the
shape rules pass such dimensions through and answer '?' where a size depends on one.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ModelError, ShapeError
from ..ir.types import TensorType, shape_str
from .base import Op, broadcast_shapes, fill_defaults, normalize_axis, register

UNKNOWN = "?"
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


# ---- helpers -----------------------------------------------------------------------------------
class _Movement(Op):
    """Ops that only move or copy data: no arithmetic."""

    @staticmethod
    def flops(input_types, output_types, **attrs):
        return 0


def _prod(dims):
    if any(isinstance(d, str) for d in dims):
        return UNKNOWN
    return int(np.prod(dims, dtype=np.int64))


def _int_list(value, what: str) -> list[int] | None:
    """A lifted input or attribute as a list of ints; None stays None."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.ndim > 1:
        raise ModelError(f"{what} must be a 1-D list of integers, got a tensor of shape "
                         f"{list(array.shape)}")
    if array.size and not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ModelError(f"{what} must hold integers, got {array.dtype} values {array.tolist()}")
    return [int(v) for v in array.reshape(-1)]


def _axes(axes, rank: int, what: str) -> list[int]:
    """Normalise axes against a rank; duplicates are an error."""
    out = [normalize_axis(a, rank, what) for a in axes]
    if len(set(out)) != len(out):
        raise ShapeError(f"{what} {list(axes)} names an axis twice (rank {rank})")
    return out


def _data_type(op: str, input_types, name: str = "data") -> TensorType:
    if not input_types or input_types[0] is None:
        raise ModelError(f"{op} needs its '{name}' input")
    return input_types[0]


def _same(a, b) -> bool:
    """Dimension equality where a run-time dimension matches anything."""
    return isinstance(a, str) or isinstance(b, str) or a == b


def _reshape_gradient(g, node, grads):
    """Ops that only relabel the elements: dY reshaped to the input's shape."""
    x = node.inputs[0]
    return [g.reshape(grads[0], x.shape)] + [None] * (len(node.inputs) - 1)


# ---- Flatten / Reshape / Transpose --------------------------------------------------------------
@register
class Flatten(_Movement):
    """2-D view: dims before ``axis`` form the rows, the rest the columns."""
    attrs = {"axis": 1}
    input_names = ("input",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        rank = _data_type("Flatten", input_types, "input").rank
        axis = int(attrs["axis"])
        if not -rank <= axis <= rank:
            raise ShapeError(f"Flatten axis={axis} is out of range for a tensor of rank {rank} "
                             f"(allowed {-rank}..{rank})")
        attrs["axis"] = axis + rank if axis < 0 else axis
        return attrs

    @staticmethod
    def infer(x, axis=1):
        return x.with_shape((_prod(x.shape[:axis]), _prod(x.shape[axis:])))

    @staticmethod
    def reference(x, axis=1):
        return x.reshape(_prod(x.shape[:axis]), _prod(x.shape[axis:]))

    gradient = staticmethod(_reshape_gradient)


def _reshape_target(in_shape, shape, allowzero) -> tuple:
    out = []
    for i, d in enumerate(shape):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                raise ShapeError(f"Reshape shape {shape} copies dimension {i} (a 0 there), but "
                                 f"the input {shape_str(in_shape)} has rank {len(in_shape)}")
            out.append(in_shape[i])
        else:
            out.append(d)
    total = _prod(in_shape)
    if -1 in out:
        k = out.index(-1)
        known = _prod(out[:k] + out[k + 1:])
        if isinstance(total, str) or isinstance(known, str):
            out[k] = UNKNOWN
        elif known == 0 or total % known:
            raise ShapeError(f"cannot reshape {shape_str(in_shape)} ({total} elements) into "
                             f"{shape}: the other dimensions hold {known} elements, so -1 has no "
                             "integer size")
        else:
            out[k] = total // known
    size = _prod(out)
    if not isinstance(total, str) and not isinstance(size, str) and size != total:
        raise ShapeError(f"cannot reshape {shape_str(in_shape)} ({total} elements) into {shape} "
                         f"(resolved {shape_str(out)}, {size} elements)")
    return tuple(out)


@register
class Reshape(_Movement):
    """New shape with the same elements; 0 copies the input dimension (unless allowzero), -1 is
    inferred."""
    attrs = {"shape": None, "allowzero": 0}
    legacy_attrs = ("consumed_inputs",)
    lift_inputs = {1: "shape"}
    input_names = ("data", "shape")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        _data_type("Reshape", input_types)
        shape = _int_list(attrs["shape"], "Reshape 'shape'")
        if shape is None:
            raise ModelError("Reshape needs its 'shape' input")
        if any(d < -1 for d in shape) or shape.count(-1) > 1:
            raise ShapeError(f"Reshape shape {shape} is invalid: dimensions must be >= -1, with "
                             "at most one -1")
        allowzero = int(bool(attrs["allowzero"]))
        if allowzero and 0 in shape and -1 in shape:
            raise ShapeError(f"Reshape shape {shape} has both 0 and -1 with allowzero=1, which "
                             "ONNX forbids")
        attrs.update(shape=shape, allowzero=allowzero)
        return attrs

    @staticmethod
    def infer(data, shape=None, allowzero=0):
        return data.with_shape(_reshape_target(data.shape, shape, allowzero))

    @staticmethod
    def reference(data, shape=None, allowzero=0):
        return data.reshape(_reshape_target(data.shape, shape, allowzero))

    gradient = staticmethod(_reshape_gradient)


@register
class Transpose(_Movement):
    attrs = {"perm": None}
    input_names = ("data",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        rank = _data_type("Transpose", input_types).rank
        perm = _int_list(attrs["perm"], "Transpose 'perm'")
        if perm is None:
            perm = list(range(rank))[::-1]
        if sorted(perm) != list(range(rank)):
            raise ShapeError(f"Transpose perm={perm} is not a permutation of the {rank} axes of "
                             f"{input_types[0]}")
        attrs["perm"] = perm
        return attrs

    @staticmethod
    def infer(data, perm=None):
        return data.with_shape(tuple(data.shape[p] for p in perm))

    @staticmethod
    def reference(data, perm=None):
        return np.transpose(data, perm)

    @staticmethod
    def gradient(g, node, grads):
        inverse = [int(i) for i in np.argsort(node.attrs["perm"])]
        return [g.op("Transpose", [grads[0]], {"perm": inverse})]


# ---- Concat / Split ------------------------------------------------------------------------------
@register
class Concat(_Movement):
    attrs = {"axis": None}
    input_names = ("inputs",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        if not input_types or any(t is None for t in input_types):
            raise ModelError("Concat needs at least one input and no empty input names")
        if attrs["axis"] is None:
            raise ModelError("Concat needs the attribute 'axis'")
        attrs["axis"] = normalize_axis(int(attrs["axis"]), input_types[0].rank, "Concat axis")
        return attrs

    @staticmethod
    def infer(*types, axis=0):
        first = types[0]
        listing = ", ".join(str(t) for t in types)
        for t in types[1:]:
            if t.dtype != first.dtype or t.rank != first.rank or not all(
                    _same(a, b) for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != axis):
                raise ShapeError(f"Concat along axis {axis} needs inputs of one dtype and rank "
                                 f"that agree on every other axis, got {listing}")
        shape = list(first.shape)
        for i in range(first.rank):
            if i != axis and isinstance(shape[i], str):
                shape[i] = next((t.shape[i] for t in types if isinstance(t.shape[i], int)),
                                shape[i])
        dims = [t.shape[axis] for t in types]
        shape[axis] = UNKNOWN if any(isinstance(d, str) for d in dims) else sum(dims)
        return first.with_shape(shape)

    @staticmethod
    def reference(*arrays, axis=0):
        return np.concatenate(arrays, axis=axis)

    @staticmethod
    def gradient(g, node, grads):
        """dY split back into the inputs' pieces."""
        if len(node.inputs) == 1:
            return [grads[0]]
        axis = node.attrs["axis"]
        sizes = [v.shape[axis] for v in node.inputs]
        return g.op("Split", [grads[0]], {"axis": axis, "split": sizes,
                                          "num_outputs": len(sizes)}, outputs=len(sizes))


@register
class Split(_Movement):
    """Split along ``axis`` into parts of sizes ``split`` (canonical: always explicit)."""
    attrs = {"axis": 0, "split": None, "num_outputs": None}
    lift_inputs = {1: "split"}
    input_names = ("input", "split")
    #: the frontend fills num_outputs from the node when the model leaves it implicit
    output_count_attr = "num_outputs"

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = _data_type("Split", input_types, "input")
        axis = normalize_axis(int(attrs["axis"]), x.rank, "Split axis")
        dim = x.shape[axis]
        split = _int_list(attrs["split"], "Split 'split'") or None
        if split is None:
            n = attrs["num_outputs"]
            if not n or int(n) < 1:
                raise ModelError("Split needs 'split' sizes or a number of outputs")
            n = int(n)
            if isinstance(dim, str):
                raise ShapeError(f"Split cannot divide axis {axis} of {x} into {n} parts: its size "
                                 "is known only at run time")
            if opset >= 18:
                # Opset 18 allows an uneven split: ceil-sized chunks, the last one smaller.
                chunk = -(-dim // n)
                split = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
                if split[-1] <= 0 < dim:
                    raise ShapeError(f"Split of axis {axis} of {x} (size {dim}) with "
                                     f"num_outputs={n} leaves no elements for the last output "
                                     f"(chunks of {chunk})")
            elif dim % n:
                raise ShapeError(f"Split cannot divide axis {axis} of {x} (size {dim}) into {n} "
                                 "equal parts; give the 'split' sizes")
            else:
                split = [dim // n] * n
        if any(s < 0 for s in split) or (isinstance(dim, int) and sum(split) != dim):
            raise ShapeError(f"Split sizes {split} do not add up to {dim}, the size of axis {axis} "
                             f"of {x}")
        attrs.update(axis=axis, split=split, num_outputs=len(split))
        return attrs

    @staticmethod
    def infer(x, axis=0, split=None, num_outputs=None):
        out = []
        for size in split:
            shape = list(x.shape)
            shape[axis] = size
            out.append(x.with_shape(shape))
        return out

    @staticmethod
    def reference(x, axis=0, split=None, num_outputs=None):
        return tuple(np.split(x, np.cumsum(split)[:-1], axis=axis))

    @staticmethod
    def gradient(g, node, grads):
        """The parts' gradients concatenated; a part that got none contributes zeros."""
        parts = [gv if gv is not None else g.zeros(v.type) for gv, v in zip(grads, node.outputs)]
        dx = parts[0] if len(parts) == 1 else g.op("Concat", parts, {"axis": node.attrs["axis"]})
        return [dx] + [None] * (len(node.inputs) - 1)


# ---- Squeeze / Unsqueeze -----------------------------------------------------------------------
@register
class Squeeze(_Movement):
    """Remove axes of size 1 (all of them when ``axes`` is not given)."""
    attrs = {"axes": None}
    lift_inputs = {1: "axes"}
    input_names = ("data", "axes")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = _data_type("Squeeze", input_types)
        axes = _int_list(attrs["axes"], "Squeeze 'axes'")
        if not axes:
            if not x.is_static:
                raise ShapeError(f"Squeeze without axes on {x}: which axes have size 1 is known "
                                 "only at run time; give 'axes'")
            axes = [i for i, d in enumerate(x.shape) if d == 1]
        axes = sorted(_axes(axes, x.rank, "Squeeze axes"))
        bad = [a for a in axes if not _same(x.shape[a], 1)]
        if bad:
            raise ShapeError(f"Squeeze axes {axes}: axis {bad[0]} of {x} has size "
                             f"{x.shape[bad[0]]}, not 1")
        attrs["axes"] = axes
        return attrs

    @staticmethod
    def infer(data, axes=()):
        return data.with_shape(tuple(d for i, d in enumerate(data.shape) if i not in axes))

    @staticmethod
    def reference(data, axes=()):
        if any(data.shape[a] != 1 for a in axes):
            raise ShapeError(f"Squeeze axes {list(axes)} of an array of shape "
                             f"{list(data.shape)}: not all have size 1")
        return np.squeeze(data, axis=tuple(axes))

    gradient = staticmethod(_reshape_gradient)


@register
class Unsqueeze(_Movement):
    """Insert axes of size 1 at ``axes`` (positions in the output)."""
    attrs = {"axes": None}
    lift_inputs = {1: "axes"}
    input_names = ("data", "axes")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = _data_type("Unsqueeze", input_types)
        axes = _int_list(attrs["axes"], "Unsqueeze 'axes'")
        if axes is None:
            raise ModelError("Unsqueeze needs 'axes'")
        attrs["axes"] = sorted(_axes(axes, x.rank + len(axes), "Unsqueeze axes"))
        return attrs

    @staticmethod
    def infer(data, axes=()):
        shape = list(data.shape)
        for a in axes:
            shape.insert(a, 1)
        return data.with_shape(shape)

    @staticmethod
    def reference(data, axes=()):
        return np.expand_dims(data, tuple(axes))

    gradient = staticmethod(_reshape_gradient)


# ---- Slice / Pad / Expand ----------------------------------------------------------------------
def _slice_range(dim: int, start: int, end: int, step: int) -> tuple[int, int, int]:
    """ONNX clamping of one axis: (start, end, length); end == -1 means 'before index 0'."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start = min(max(start, 0), dim)
        end = min(max(end, 0), dim)
        length = max(0, -(-(end - start) // step))
    else:
        start = min(max(start, 0), dim - 1)
        end = min(max(end, -1), dim - 1)
        length = max(0, -(-(start - end) // -step))
    return start, end, length


@register
class Slice(_Movement):
    """Strided slices along ``axes``; negative steps and out-of-range bounds follow ONNX."""
    attrs = {"starts": None, "ends": None, "axes": None, "steps": None}
    lift_inputs = {1: "starts", 2: "ends", 3: "axes", 4: "steps"}
    input_names = ("data", "starts", "ends", "axes", "steps")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = _data_type("Slice", input_types)
        starts = _int_list(attrs["starts"], "Slice 'starts'")
        ends = _int_list(attrs["ends"], "Slice 'ends'")
        if starts is None or ends is None:
            raise ModelError("Slice needs 'starts' and 'ends'")
        axes = _int_list(attrs["axes"], "Slice 'axes'")
        axes = list(range(len(starts))) if axes is None else axes
        steps = _int_list(attrs["steps"], "Slice 'steps'")
        steps = [1] * len(starts) if steps is None else steps
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise ShapeError(f"Slice starts={starts}, ends={ends}, axes={axes}, steps={steps} "
                             "must have the same length")
        if 0 in steps:
            raise ShapeError(f"Slice steps={steps} contains 0")
        attrs.update(starts=starts, ends=ends, axes=_axes(axes, x.rank, "Slice axes"),
                     steps=steps)
        return attrs

    @staticmethod
    def infer(data, starts=(), ends=(), axes=(), steps=()):
        shape = list(data.shape)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if isinstance(shape[axis], int):
                shape[axis] = _slice_range(shape[axis], start, end, step)[2]
            else:
                shape[axis] = UNKNOWN
        return data.with_shape(shape)

    @staticmethod
    def reference(data, starts=(), ends=(), axes=(), steps=()):
        index = [slice(None)] * data.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            start, end, length = _slice_range(data.shape[axis], start, end, step)
            if length == 0:
                index[axis] = slice(0, 0)
            else:
                index[axis] = slice(start, end if end >= 0 else None, step)
        return data[tuple(index)]

    @staticmethod
    def gradient(g, node, grads):
        """dY written back where the slice read, zeros elsewhere (SliceGrad)."""
        x = node.inputs[0]
        dx = g.op("SliceGrad", [grads[0]], {**node.attrs, "shape": list(x.shape)})
        return [dx] + [None] * (len(node.inputs) - 1)


PAD_MODES = ("constant", "reflect", "edge", "wrap")


@register
class Pad(_Movement):
    """Pad (or crop, for negative pads). Canonical ``pads``: [begin_0..begin_r-1, end_0..end_r-1]
    over every axis; ``value`` is the constant-mode fill."""
    attrs = {"pads": None, "mode": "constant", "value": 0.0, "axes": None}
    lift_inputs = {1: "pads", 2: "value", 3: "axes"}
    input_names = ("data", "pads", "constant_value", "axes")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = _data_type("Pad", input_types)
        pads = _int_list(attrs["pads"], "Pad 'pads'")
        if pads is None:
            raise ModelError("Pad needs 'pads'")
        mode = attrs["mode"]
        if mode not in PAD_MODES:
            raise ModelError(f"Pad mode '{mode}' is not one of {', '.join(PAD_MODES)}")
        axes = _int_list(attrs["axes"], "Pad 'axes'")
        axes = list(range(x.rank)) if axes is None else _axes(axes, x.rank, "Pad axes")
        if len(pads) != 2 * len(axes):
            raise ShapeError(f"Pad pads={pads} must hold 2 values per padded axis ({len(axes)} "
                             f"axes of {x}), i.e. {2 * len(axes)} values")
        full = [0] * (2 * x.rank)
        for i, axis in enumerate(axes):
            full[axis] = pads[i]
            full[x.rank + axis] = pads[len(axes) + i]
        value = attrs["value"]
        if isinstance(value, (list, np.ndarray)):
            flat = np.asarray(value).reshape(-1)
            if flat.size > 1:
                raise ModelError(f"Pad constant_value must be a scalar, got {flat.size} values")
            value = flat[0].item() if flat.size else None
        value = 0 if value is None else value
        attrs.update(pads=full, axes=None,
                     value=np.asarray(value).astype(x.dtype).item())
        return attrs

    @staticmethod
    def infer(data, pads=(), mode="constant", value=0.0, axes=None):
        rank = data.rank
        shape = []
        for axis, d in enumerate(data.shape):
            begin, end = pads[axis], pads[rank + axis]
            if isinstance(d, str):
                shape.append(d if begin == end == 0 else UNKNOWN)
                continue
            size = d + begin + end
            if size < 0:
                raise ShapeError(f"Pad pads={list(pads)} crop axis {axis} of {data} below zero "
                                 "size")
            if mode != "constant" and d == 0 and (begin > 0 or end > 0):
                raise ShapeError(f"Pad mode '{mode}' cannot pad axis {axis} of {data}: it is "
                                 "empty")
            shape.append(size)
        return data.with_shape(shape)

    @staticmethod
    def reference(data, pads=(), mode="constant", value=0.0, axes=None):
        rank = data.ndim
        # Negative pads crop; crop first, then pad what remains.
        crop = tuple(slice(max(-pads[a], 0), data.shape[a] - max(-pads[rank + a], 0))
                     for a in range(rank))
        data = data[crop]
        width = [(max(pads[a], 0), max(pads[rank + a], 0)) for a in range(rank)]
        if mode == "constant":
            return np.pad(data, width, mode="constant",
                          constant_values=np.asarray(value).astype(data.dtype))
        return np.pad(data, width, mode=mode)

    @staticmethod
    def gradient(g, node, grads):
        """Each output element's gradient goes back to the input element it copies (PadGrad)."""
        x = node.inputs[0]
        attrs = {"pads": node.attrs["pads"], "mode": node.attrs["mode"], "shape": list(x.shape)}
        return [g.op("PadGrad", [grads[0]], attrs)] + [None] * (len(node.inputs) - 1)


@register
class Expand(_Movement):
    """Broadcast to ``shape`` (bidirectionally: a 1 in ``shape`` keeps the input's size)."""
    attrs = {"shape": None}
    lift_inputs = {1: "shape"}
    input_names = ("input", "shape")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        _data_type("Expand", input_types, "input")
        shape = _int_list(attrs["shape"], "Expand 'shape'")
        if shape is None:
            raise ModelError("Expand needs its 'shape' input")
        if any(d < 0 for d in shape):
            raise ShapeError(f"Expand shape {shape} has a negative dimension")
        attrs["shape"] = shape
        return attrs

    @staticmethod
    def infer(x, shape=()):
        return x.with_shape(broadcast_shapes(x.shape, tuple(shape)))

    @staticmethod
    def reference(x, shape=()):
        out = broadcast_shapes(x.shape, tuple(shape))
        return np.array(np.broadcast_to(x, out))

    @staticmethod
    def gradient(g, node, grads):
        return [g.sum_to(grads[0], node.inputs[0])] + [None] * (len(node.inputs) - 1)


# ---- Gather ------------------------------------------------------------------------------------
@register
class Gather(_Movement):
    """Take entries of ``data`` along ``axis`` at ``indices`` (negative indices count from the
    end)."""
    attrs = {"axis": 0}
    input_names = ("data", "indices")

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = _data_type("Gather", input_types)
        if len(input_types) < 2 or input_types[1] is None:
            raise ModelError("Gather needs its 'indices' input")
        attrs["axis"] = normalize_axis(int(attrs["axis"]), x.rank, "Gather axis")
        return attrs

    @staticmethod
    def infer(data, indices, axis=0):
        if indices.dtype not in INDEX_DTYPES:
            raise ShapeError(f"Gather indices must be int32 or int64, got {indices}")
        return data.with_shape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])

    @staticmethod
    def reference(data, indices, axis=0):
        dim = data.shape[axis]
        idx = indices.astype(np.int64)
        if idx.size and (idx.min() < -dim or idx.max() >= dim):
            raise ModelError(f"Gather indices range over [{idx.min()}, {idx.max()}], outside "
                             f"[{-dim}, {dim - 1}] for axis {axis} of data shape "
                             f"{list(data.shape)}")
        return np.take(data, np.where(idx < 0, idx + dim, idx), axis=axis)

    @staticmethod
    def gradient(g, node, grads):
        """dY added into zeros at the gathered indices (GatherGrad); the indices get none."""
        data, indices = node.inputs
        attrs = {"axis": node.attrs["axis"], "shape": list(data.shape)}
        return [g.op("GatherGrad", [grads[0], indices], attrs), None]


# ---- Shape / ConstantOfShape / Range -------------------------------------------------------------
@register
class Shape(_Movement):
    """The input's dimensions ``start:end`` as int64. A constant once the input shape is static."""
    attrs = {"start": 0, "end": None}
    input_names = ("data",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        rank = _data_type("Shape", input_types).rank
        start = int(attrs["start"])
        end = rank if attrs["end"] is None else int(attrs["end"])
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        attrs.update(start=start, end=max(start, end))
        return attrs

    @staticmethod
    def infer(data, start=0, end=None):
        return TensorType(np.int64, (len(data.shape[start:end]),))

    @staticmethod
    def value_from_types(data, start=0, end=None):
        dims = data.shape[start:end]
        if any(isinstance(d, str) for d in dims):
            return None
        return np.array(dims, dtype=np.int64)

    @staticmethod
    def reference(data, start=0, end=None):
        return np.array(data.shape[start:end], dtype=np.int64)


@register
class ConstantOfShape(_Movement):
    """A tensor of ``shape`` filled with ``value`` (a one-element array; float32 0 by default)."""
    attrs = {"shape": None, "value": None}
    lift_inputs = {0: "shape"}
    input_names = ("input",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        shape = _int_list(attrs["shape"], "ConstantOfShape shape")
        if shape is None:
            raise ModelError("ConstantOfShape needs its shape input")
        if any(d < 0 for d in shape):
            raise ShapeError(f"ConstantOfShape shape {shape} has a negative dimension")
        value = attrs["value"]
        value = np.zeros(1, np.float32) if value is None else np.asarray(value)
        if value.size != 1:
            raise ModelError(f"ConstantOfShape value must hold one element, got shape "
                             f"{list(value.shape)}")
        attrs.update(shape=shape, value=value.reshape(1))
        return attrs

    @staticmethod
    def infer(shape=(), value=None):
        return TensorType(value.dtype, tuple(shape))

    @staticmethod
    def reference(shape=(), value=None):
        return np.full(tuple(shape), value[0], dtype=value.dtype)


@register
class Range(_Movement):
    """start, start + delta, ... up to (excluding) limit.

    Its inputs are not lifted: lifting turns 0-d tensors into Python numbers, which would lose the
    dtype the output must have. Constant inputs fold it at import all the same; with run-time inputs
    its length is known only at run time.
    """
    input_names = ("start", "limit", "delta")

    @staticmethod
    def infer(start, limit, delta):
        types = [start, limit, delta]
        if len({t.dtype for t in types}) != 1 or any(_prod(t.shape) != 1 for t in types):
            raise ShapeError("Range needs three scalars of one dtype, got "
                             + ", ".join(str(t) for t in types))
        return TensorType(start.dtype, (UNKNOWN,))

    @staticmethod
    def reference(start, limit, delta):
        start, limit, delta = (np.asarray(v).reshape(()) for v in (start, limit, delta))
        if delta == 0:
            raise ModelError("Range delta is 0")
        # The difference is taken in the input dtype, the division in double, as onnxruntime does.
        count = max(int(math.ceil(float(limit - start) / float(delta))), 0)
        return (start + np.arange(count, dtype=np.float64 if start.dtype.kind == "f"
                                  else np.int64) * delta).astype(start.dtype)


# ---- DepthToSpace / SpaceToDepth ---------------------------------------------------------------
def _block_input(op: str, x: TensorType, blocksize) -> int:
    if blocksize is None or int(blocksize) < 1:
        raise ModelError(f"{op} needs a positive 'blocksize', got {blocksize}")
    if x.rank != 4:
        raise ShapeError(f"{op} takes an NCHW tensor (rank 4), got {x}")
    return int(blocksize)


@register
class DepthToSpace(_Movement):
    """Move channel blocks into b x b spatial blocks; DCR (depth-column-row) or CRD order."""
    attrs = {"blocksize": None, "mode": "DCR"}
    input_names = ("input",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = _data_type("DepthToSpace", input_types, "input")
        attrs["blocksize"] = _block_input("DepthToSpace", x, attrs["blocksize"])
        if attrs["mode"] not in ("DCR", "CRD"):
            raise ModelError(f"DepthToSpace mode '{attrs['mode']}' is not DCR or CRD")
        return attrs

    @staticmethod
    def infer(x, blocksize=1, mode="DCR"):
        n, c, h, w = x.shape
        b2 = blocksize * blocksize
        if isinstance(c, int) and c % b2:
            raise ShapeError(f"DepthToSpace with blocksize {blocksize} needs channels divisible "
                             f"by {b2}, got {x}")
        scale = [d * blocksize if isinstance(d, int) else UNKNOWN for d in (h, w)]
        return x.with_shape((n, c // b2 if isinstance(c, int) else UNKNOWN, *scale))

    @staticmethod
    def reference(x, blocksize=1, mode="DCR"):
        n, c, h, w = x.shape
        b = blocksize
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (b * b), h * b, w * b)

    @staticmethod
    def gradient(g, node, grads):
        """A permutation of the elements, undone by SpaceToDepth in the same mode."""
        return [g.op("SpaceToDepth", [grads[0]], dict(node.attrs))]


@register
class SpaceToDepth(_Movement):
    """Move b x b spatial blocks into channels; DCR (block-major, the inverse of DepthToSpace DCR)
    or CRD (channel-major) order."""
    attrs = {"blocksize": None, "mode": "DCR"}
    input_names = ("input",)

    @classmethod
    def normalize(cls, attrs, input_types, opset):
        attrs = fill_defaults(cls, attrs)
        x = _data_type("SpaceToDepth", input_types, "input")
        attrs["blocksize"] = _block_input("SpaceToDepth", x, attrs["blocksize"])
        if attrs["mode"] not in ("DCR", "CRD"):
            raise ModelError(f"SpaceToDepth mode '{attrs['mode']}' is not DCR or CRD")
        return attrs

    @staticmethod
    def infer(x, blocksize=1, mode="DCR"):
        n, c, h, w = x.shape
        if any(isinstance(d, int) and d % blocksize for d in (h, w)):
            raise ShapeError(f"SpaceToDepth with blocksize {blocksize} needs height and width "
                             f"divisible by it, got {x}")
        spatial = [d // blocksize if isinstance(d, int) else UNKNOWN for d in (h, w)]
        depth = c * blocksize * blocksize if isinstance(c, int) else UNKNOWN
        return x.with_shape((n, depth, *spatial))

    @staticmethod
    def reference(x, blocksize=1, mode="DCR"):
        n, c, h, w = x.shape
        b = blocksize
        y = x.reshape(n, c, h // b, b, w // b, b)
        y = y.transpose(0, 3, 5, 1, 2, 4) if mode == "DCR" else y.transpose(0, 1, 3, 5, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)

    @staticmethod
    def gradient(g, node, grads):
        """A permutation of the elements, undone by DepthToSpace in the same mode."""
        return [g.op("DepthToSpace", [grads[0]], dict(node.attrs))]
