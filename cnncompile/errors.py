"""The exception hierarchy.

Two families, kept apart on purpose:

* ``UserError`` -- the model, a shape, an attribute or a run-time input is wrong. The message names the
  node / op / input and says how to fix it. The CLI prints it on one line and exits with status 1.
* ``InternalError`` -- cnncompile itself is wrong (a verifier failure, a reference result whose shape
  disagrees with the shape rule). The CLI asks for a bug report and exits with status 3.
"""

from __future__ import annotations


class CnnCompileError(Exception):
    """Base class of every error cnncompile raises on purpose."""


class UserError(CnnCompileError):
    """The model or the input is at fault, not the compiler."""


class ModelLoadError(UserError):
    """The file is missing, is not ONNX, or its external data is out of bounds."""


class UnsupportedOperatorError(UserError):
    def __init__(self, op_type: str, node: str = "", domain: str = "", opset: int | None = None,
                 supported: list[str] | None = None, reason: str = ""):
        self.op_type = op_type
        self.node = node
        self.domain = domain
        self.reason = reason
        self.opset = opset
        where = f"node '{node}': " if node else ""
        dom = domain if domain not in ("", "ai.onnx") else "ai.onnx (default)"
        msg = f"{where}operator '{op_type}' (domain {dom}, opset {opset}) is not supported"
        if reason:
            msg += f": {reason}"
        if supported:
            msg += f". Supported operators: {', '.join(sorted(supported))}"
        super().__init__(msg)


class ModelError(UserError):
    """A node is malformed: a bad attribute value, a missing input, an inconsistent graph."""


class ShapeError(ModelError):
    """Shapes or dtypes do not fit an op's rule, or a dimension could not be made static."""


class NotConstantError(ShapeError):
    """An input that must be known at compile time (a Reshape's shape, say) is not.

    ``graph_inputs`` lists the graph inputs it depends on, so that a caller (the onnx backend adapter)
    can bind them with ``compile(..., constant_inputs=...)``.
    """

    def __init__(self, message: str, graph_inputs: list[str]):
        self.graph_inputs = list(graph_inputs)
        super().__init__(message)


class InputError(UserError):
    """A run-time input has the wrong name, shape or dtype."""


class InternalError(CnnCompileError):
    """A bug in cnncompile. Please report it with the model that triggers it."""


class VerificationError(InternalError):
    """The IR broke one of its invariants. The message shows the IR around the offending node."""
