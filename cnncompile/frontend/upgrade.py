"""Bring models older than the oldest opset the importer reads up to it."""

from __future__ import annotations

import onnx
import onnx.shape_inference
import onnx.version_converter
from onnx import helper

from ..errors import ModelError

MIN_OPSET = 7


def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Models older than opset 7 (PyTorch exports of 2018) go through onnx's version converter."""
    opsets = [e.version for e in model.opset_import if e.domain in ("", "ai.onnx")]
    if not opsets or opsets[0] >= MIN_OPSET:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    _prelu_slopes_per_channel(model)
    try:
        return onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # the converter raises plain RuntimeErrors from C++
        raise ModelError(f"the model uses opset {opsets[0]} and onnx's version converter could not "
                         f"upgrade it to opset {MIN_OPSET}: {exc}") from None


def _prelu_slopes_per_channel(model: onnx.ModelProto) -> None:
    """Opset 6's PRelu applies a 1-D slope per channel (axis 1); opset 7 broadcasts it numpy-style
    from the last axis. onnx's converter leaves PRelu unchanged, so reshape constant slopes here."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
             for vi in list(inferred.graph.input) + list(inferred.graph.value_info)
             if vi.type.tensor_type.HasField("shape")}
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "PRelu" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        slope = initializers[node.input[1]]
        rank = ranks.get(node.input[0], 0)
        if len(slope.dims) == 1 and slope.dims[0] > 1 and rank > 2:
            slope.dims[:] = [slope.dims[0]] + [1] * (rank - 2)
            for vi in model.graph.input:
                if vi.name == slope.name:
                    vi.CopyFrom(helper.make_tensor_value_info(vi.name, slope.data_type,
                                                              list(slope.dims)))
