"""Losses, appended to a forward graph as IR nodes.

    loss, labels = append_loss(graph, "cross_entropy")

adds a graph input for the labels and one loss node (ops in ``ops/training_ops.py``, each with its
gradient rule) reading the model's output; the result is a 0-d mean, as PyTorch's default
``reduction="mean"``:

* ``cross_entropy``   softmax over axis 1 of the scores (N, C, D1, ...), integer labels (N, D1, ...)
* ``mse``             mean squared error against a float target of the output's shape
* ``bce_with_logits`` binary cross-entropy of sigmoid(output) against a float target in [0, 1]
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType
from ..ops import OPS

#: loss name -> (op, labels dtype or None for the output's dtype, labels drop the class axis)
LOSSES = {
    "cross_entropy": ("SoftmaxCrossEntropy", np.dtype(np.int64), True),
    "mse": ("MeanSquaredError", None, False),
    "bce_with_logits": ("BinaryCrossEntropyWithLogits", None, False),
}


def labels_type(kind: str, output: TensorType) -> TensorType:
    """The type of the labels input the loss `kind` needs for a model output of type `output`."""
    op, dtype, drop_class_axis = _lookup(kind)
    shape = tuple(output.shape)
    if drop_class_axis:
        if len(shape) < 2:
            raise UserError(f"loss '{kind}' needs scores of shape (N, C, ...), but the model's "
                            f"output has shape {list(shape)}")
        shape = shape[:1] + shape[2:]
    return TensorType(dtype if dtype is not None else output.dtype, shape)


def append_loss(graph: Graph, kind: str, output: Value | None = None,
                labels_name: str = "labels") -> tuple[Value, Value]:
    """Append loss `kind` on `output` (default: the first graph output) to `graph`, with a new
    graph input for the labels. Returns (the 0-d loss value, the labels input); the graph's
    outputs are left to the caller."""
    op, _, _ = _lookup(kind)
    if output is None:
        output = graph.outputs[0]
    labels = graph.add_input(labels_name, labels_type(kind, output.type))
    loss = graph.new_value("loss", OPS[op].infer(output.type, labels.type))
    graph.add_node(Node(op, [output, labels], [loss], {}, name="loss", created_by="loss"))
    return loss, labels


def _lookup(kind: str):
    if kind not in LOSSES:
        raise UserError(f"unknown loss '{kind}'; the losses are: {', '.join(LOSSES)}")
    return LOSSES[kind]


__all__ = ["LOSSES", "append_loss", "labels_type"]
