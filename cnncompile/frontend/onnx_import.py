"""ONNX -> IR.

One walk over the ONNX nodes in order. For each node the importer

1. finds the op class (``ops/``), or raises UnsupportedOperatorError listing what is supported;
2. moves constant "parameter" inputs (Reshape's shape, Clip's min/max, ...) into attributes, so that one
   canonical form serves opsets 7 to the newest;
3. normalises attributes (``Op.normalize``: auto_pad -> pads, defaults filled, legacy attributes dropped);
4. infers output types (``Op.infer``);
5. folds the node into a constant when every input is a constant, or when its value follows from static
   types alone (Shape). This is what turns the shape subgraphs of models exported with dynamic axes
   into constants once ``input_shapes`` fixes the input dimensions.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import (CnnCompileError, InternalError, ModelError, ModelLoadError,
                      NotConstantError, ShapeError, UnsupportedOperatorError, UserError)
from ..ir.graph import Graph, Node, Value
from ..ir.types import SUPPORTED_DTYPES, TensorType, shape_str
from ..ops import get_op
from .upgrade import MIN_OPSET, upgrade_opset



# ---- loading -------------------------------------------------------------------------------------
def load_model(model) -> onnx.ModelProto:
    """Accept a path, bytes or a ModelProto. External data is read only from the model's folder."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray, memoryview)):
        try:
            return onnx.load_model_from_string(bytes(model))
        except Exception as exc:  # protobuf raises its own DecodeError family
            raise ModelLoadError(f"the bytes given are not an ONNX model: {exc}") from None
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelLoadError(f"model file '{path}' does not exist")
    if os.path.isdir(path):
        raise ModelLoadError(f"'{path}' is a folder; give the path of the .onnx file inside it")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"'{path}' is not a readable ONNX model: {exc}") from None
    _load_external_data(proto, os.path.dirname(os.path.abspath(path)))
    return proto


def _load_external_data(proto: onnx.ModelProto, base_dir: str) -> None:
    base = os.path.realpath(base_dir)
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        full = os.path.realpath(os.path.join(base, location))
        if os.path.isabs(location) or os.path.commonpath([base, full]) != base:
            raise ModelLoadError(f"tensor '{tensor.name}': external data location '{location}' is "
                                 f"outside the model's folder {base}; refusing to read it")
        if not os.path.isfile(full):
            raise ModelLoadError(f"tensor '{tensor.name}': external data file '{full}' is missing")
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else -1
        with open(full, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(length) if length >= 0 else f.read()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


# ---- conversion helpers --------------------------------------------------------------------------
def onnx_dtype(elem_type: int, what: str) -> np.dtype:
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        dtype = None
    if dtype is None or dtype not in SUPPORTED_DTYPES:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "UNDEFINED"
        raise ModelError(f"{what} has element type {name}, which cnncompile does not support "
                         f"(supported: {', '.join(sorted(d.name for d in SUPPORTED_DTYPES))})")
    return dtype


def tensor_to_array(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    onnx_dtype(tensor.data_type, what)
    try:
        return np.array(numpy_helper.to_array(tensor))
    except Exception as exc:
        raise ModelError(f"{what}: cannot decode tensor '{tensor.name}': {exc}") from None


def attribute_value(attr: onnx.AttributeProto, what: str):
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise UnsupportedOperatorError(what, reason="subgraph attributes (If/Loop/Scan bodies) "
                                       "are not supported")
    if attr.type == onnx.AttributeProto.TENSOR:
        return tensor_to_array(attr.t, f"{what} attribute '{attr.name}'")
    if attr.type == onnx.AttributeProto.TENSORS:
        return [tensor_to_array(t, f"{what} attribute '{attr.name}'") for t in attr.tensors]
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list):
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in value]
    return value


def lifted_value(array: np.ndarray):
    """A constant input turned attribute: scalars become Python numbers, vectors lists."""
    array = np.asarray(array)
    if array.ndim == 0:
        return array.item()
    if array.ndim == 1:
        return array.tolist()
    return array


def declared_inputs(proto) -> dict[str, tuple | None]:
    """Graph input name -> declared dims (None for a dynamic axis); None when no shape is given."""
    initializers = {init.name for init in proto.graph.initializer}
    result = {}
    for vi in proto.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            result[vi.name] = None
            continue
        result[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0
                                else None for d in tt.shape.dim)
    return result


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelError("the model imports no version of the default ONNX domain (opset_import)")


# ---- the importer --------------------------------------------------------------------------------
def import_onnx(model, input_shapes: Mapping[str, tuple] | None = None,
                constant_inputs: Mapping[str, np.ndarray] | None = None) -> Graph:
    proto = load_model(model)
    if default_opset(proto) < MIN_OPSET:
        proto = upgrade_opset(proto)
    opset = default_opset(proto)
    g = proto.graph
    graph = Graph(name=g.name or "model", opset=opset)
    env: dict[str, Value] = {}

    for init in g.initializer:
        env[init.name] = graph.add_constant(init.name, tensor_to_array(init, "initializer"))

    _import_inputs(graph, g, env, dict(input_shapes or {}), dict(constant_inputs or {}))

    for index, onnx_node in enumerate(g.node):
        _import_node(graph, onnx_node, index, env, opset)

    for out in g.output:
        if out.name not in env:
            raise ModelError(f"graph output '{out.name}' is not produced by any node")
        graph.outputs.append(env[out.name])
    if not graph.outputs:
        raise ModelError("the graph declares no outputs")
    _drop_unused_constants(graph)
    return graph


def _declared_shape(vi: onnx.ValueInfoProto) -> tuple | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or f"unk__{axis}")
    return tuple(dims)


def _import_inputs(graph: Graph, g: onnx.GraphProto, env: dict, input_shapes: dict,
                   constant_inputs: dict) -> None:
    initializers = {init.name for init in g.initializer}
    real_inputs = [vi for vi in g.input if vi.name not in initializers]
    names = [vi.name for vi in real_inputs]
    for name in list(input_shapes) + list(constant_inputs):
        if name not in names:
            raise UserError(f"'{name}' is not an input of the model; its inputs are: "
                            + (", ".join(names) or "none"))
    unresolved = []
    declared = {}
    for vi in real_inputs:
        if not vi.type.HasField("tensor_type"):
            raise ModelError(f"graph input '{vi.name}' is not a tensor (sequence/map inputs are "
                             "not supported)")
        dtype = onnx_dtype(vi.type.tensor_type.elem_type, f"graph input '{vi.name}'")
        shape = _declared_shape(vi)
        if vi.name in constant_inputs:
            array = np.asarray(constant_inputs[vi.name], dtype=dtype)
            env[vi.name] = graph.add_constant(vi.name, array)
            continue
        if vi.name in input_shapes:
            given = tuple(int(d) for d in input_shapes[vi.name])
            if shape is not None and len(shape) != len(given):
                raise ShapeError(f"input_shapes gives '{vi.name}' the shape {list(given)} (rank "
                                 f"{len(given)}), but the model declares rank {len(shape)}: "
                                 f"{shape_str(shape)}")
            if shape is not None:
                for axis, (have, want) in enumerate(zip(shape, given)):
                    if isinstance(have, int) and have != want:
                        raise ShapeError(f"input_shapes gives '{vi.name}' the shape {list(given)}, "
                                         f"but the model fixes axis {axis} to {have}: "
                                         f"{shape_str(shape)}")
            if any(d < 0 for d in given):
                raise ShapeError(f"input_shapes['{vi.name}'] = {list(given)} has a negative size")
            shape = given
        if shape is None:
            unresolved.append((vi.name, None, "the whole shape is unknown"))
            shape = ()
        for axis, d in enumerate(shape):
            if isinstance(d, str):
                unresolved.append((vi.name, axis, d))
        declared[vi.name] = shape
        env[vi.name] = graph.add_input(vi.name, TensorType(dtype, shape))
    if unresolved:
        raise ShapeError(_unresolved_message(unresolved, declared))


def _unresolved_message(unresolved: list, declared: dict) -> str:
    lines = ["the model has dynamic dimensions that must be fixed at compile time:"]
    for name, axis, dim in unresolved:
        if axis is None:
            lines.append(f"  input '{name}': {dim}")
        else:
            lines.append(f"  input '{name}' axis {axis} ('{dim}')")
    fixes = {}
    for name in dict.fromkeys(n for n, _, _ in unresolved):
        shape = declared.get(name) or ()
        dims = []
        for axis, d in enumerate(shape):
            if isinstance(d, int):
                dims.append(str(d))
            else:
                dims.append("1" if axis == 0 else f"<{d if not d.startswith('unk__') else 'size'}>")
        fixes[name] = dims or ["<dims>"]
    py = ", ".join(f"'{n}': ({', '.join(d)}{',' if len(d) == 1 else ''})" for n, d in fixes.items())
    cli = " ".join(f"--shape {n}={'x'.join(d)}" for n, d in fixes.items())
    lines.append(f"fix: cnncompile.compile(model, input_shapes={{{py}}})")
    lines.append(f"  or, with the CLI (run, info, inspect): {cli}")
    return "\n".join(lines)


def _node_label(onnx_node, index: int) -> str:
    return onnx_node.name or f"{onnx_node.op_type}_{index}"


def _import_node(graph: Graph, onnx_node, index: int, env: dict, opset: int) -> None:
    label = _node_label(onnx_node, index)
    where = f"{onnx_node.op_type} node '{label}'"

    if onnx_node.op_type == "Constant" and onnx_node.domain in ("", "ai.onnx"):
        env[onnx_node.output[0]] = graph.add_constant(onnx_node.output[0],
                                                      _constant_value(onnx_node, where))
        return

    op = get_op(onnx_node.op_type, onnx_node.domain, node=label, opset=opset)
    inputs: list[Value | None] = []
    for pos, name in enumerate(onnx_node.input):
        if name == "":
            inputs.append(None)
        elif name not in env:
            raise ModelError(f"{where}: input {pos} '{name}' is not defined before this node (not a "
                             "graph input, initializer or earlier node output)")
        else:
            inputs.append(env[name])

    attrs = {a.name: attribute_value(a, where) for a in onnx_node.attribute}
    count_attr = getattr(op, "output_count_attr", None)
    if count_attr and attrs.get(count_attr) is None:
        # Some ops (Split before opset 18) take their output count from the node itself.
        attrs[count_attr] = len(onnx_node.output)
    kept: list[Value | None] = []
    for pos, value in enumerate(inputs):
        attr = op.lift_inputs.get(pos)
        if attr is None:
            kept.append(value)
        elif value is not None:
            if not value.is_constant:
                raise _not_constant(graph, where, pos, op, value)
            attrs[attr] = lifted_value(value.data)
    while kept and kept[-1] is None:
        kept.pop()

    in_types = [v.type if v is not None else None for v in kept]
    try:
        attrs = op.normalize(attrs, in_types, opset)
        out_types = op.infer(*in_types, **attrs)
    except UserError as exc:
        if isinstance(exc, UnsupportedOperatorError) and exc.opset is None:
            exc = UnsupportedOperatorError(op.name, node=label, opset=opset,
                                           reason=getattr(exc, "reason", "") or str(exc))
            raise with_context(exc, "", f"; input shapes: {_types_str(kept)}") from None
        raise with_context(exc, f"{where}: ", f"; input shapes: {_types_str(kept)}") from None
    except Exception as exc:
        raise InternalError(f"{where}: shape rule of {op.name} failed ({exc!r}); input shapes: "
                            f"{_types_str(kept)}") from exc
    if isinstance(out_types, TensorType):
        out_types = [out_types]
    out_types = list(out_types)
    if len(onnx_node.output) > len(out_types):
        raise ModelError(f"{where} has {len(onnx_node.output)} outputs; {op.name} produces at most "
                         f"{len(out_types)}")

    constant = None
    static_value = getattr(op, "value_from_types", None)
    if op.foldable and all(v is None or v.is_constant for v in kept):
        constant = _fold(op, kept, attrs, where)
    elif static_value is not None:
        value = static_value(*in_types, **attrs)
        if value is not None:
            constant = [value]

    if constant is not None:
        for name, array in zip(onnx_node.output, constant):
            if name:
                env[name] = graph.add_constant(name, np.asarray(array))
        return

    outputs = []
    for pos, t in enumerate(out_types[:len(onnx_node.output)]):
        name = onnx_node.output[pos] or f"{label}.out{pos}"
        value = graph.new_value(name, t)
        if onnx_node.output[pos]:
            env[onnx_node.output[pos]] = value
        outputs.append(value)
    graph.add_node(Node(op.name, kept, outputs, attrs, name=label, origins=(label,)))


def _fold(op, inputs, attrs, where) -> list[np.ndarray]:
    try:
        result = op.reference(*[v.data if v is not None else None for v in inputs], **attrs)
    except UserError as exc:
        raise with_context(exc, f"{where}: ") from None
    except Exception as exc:
        raise InternalError(f"{where}: constant folding failed ({exc!r})") from exc
    return list(result) if isinstance(result, (tuple, list)) else [result]


def with_context(exc: Exception, prefix: str, suffix: str = "") -> Exception:
    """Prefix an error's message with where it happened, keeping its class and fields."""
    exc.args = (f"{prefix}{exc}{suffix}",) + tuple(exc.args[1:])
    return exc


def _constant_value(onnx_node, where: str) -> np.ndarray:
    if len(onnx_node.attribute) != 1:
        raise ModelError(f"{where}: a Constant needs exactly one value attribute")
    attr = onnx_node.attribute[0]
    value = attribute_value(attr, where)
    kinds = {"value": None, "value_float": np.float32, "value_floats": np.float32,
             "value_int": np.int64, "value_ints": np.int64}
    if attr.name not in kinds:
        raise UnsupportedOperatorError("Constant", node=where,
                                       reason=f"attribute '{attr.name}' is not supported")
    return np.asarray(value, dtype=kinds[attr.name])


def _not_constant(graph: Graph, where: str, pos: int, op, value: Value) -> NotConstantError:
    deps = _graph_input_ancestors(value)
    label = op.input_names[pos] if pos < len(op.input_names) else f"input {pos}"
    via = (f"it is computed from graph input(s) {', '.join(repr(d) for d in deps)}" if deps
           else "it is not a constant")
    return NotConstantError(f"{where}: '{label}' ({value.name}) must be known at compile time, but "
                            f"{via}. If a dynamic axis feeds it, fix the input shapes with "
                            f"input_shapes= (CLI --shape); if it is a data input, bind it with "
                            f"constant_inputs=", deps)


def _graph_input_ancestors(value: Value) -> list[str]:
    seen, found, stack = set(), [], [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.producer is None:
            if not v.is_constant:
                found.append(v.name)
        else:
            stack.extend(x for x in v.producer.inputs if x is not None)
    return sorted(found)


def _types_str(values) -> str:
    return ", ".join("none" if v is None else str(v.type) for v in values) or "none"


def _drop_unused_constants(graph: Graph) -> None:
    used = {id(v) for n in graph.nodes for v in n.inputs if v is not None}
    used.update(id(v) for v in graph.outputs)
    graph.constants = {k: v for k, v in graph.constants.items() if id(v) in used}


__all__ = ["import_onnx", "load_model", "CnnCompileError"]
