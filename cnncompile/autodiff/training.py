"""Training: compile forward + loss + backward into one graph, and step it with an optimizer.

    tr = cnncompile.compile_training("lenet5.onnx", loss="cross_entropy",
                                     optimizer=cnncompile.optim.SGD(lr=0.05, momentum=0.9),
                                     input_shapes={"input": (64, 1, 32, 32)}, target="cpu")
    loss = tr.step(x, labels)          # forward + backward + update
    tr.export("trained.onnx")

How the training graph is built from the imported (inference) graph:

1. training-mode rewrite: BatchNormalization -> BatchNormTrain (batch statistics, which become extra
   outputs so that the module can update the running statistics as PyTorch's train mode does);
   Dropout -> DropoutTrain whose keep-mask is a new graph input; with ``pooling="stochastic"``
   MaxPool -> StochasticPool whose uniform draws are a new graph input. The module fills those
   inputs from one seeded generator every step.
2. the loss (``losses.py``) reads the model output and a new ``labels`` input;
3. ``grad`` differentiates the loss with respect to every trainable initializer, which turns them
   into graph inputs (the arrays live in the module and change every step without recompiling);
4. the joint graph goes through the normal pass pipeline and backend.

Inference (``predict``, ``export``) uses the imported graph with the trained weights and running
statistics as inputs, compiled once per input shape.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InputError, InternalError, UserError
from ..frontend import import_onnx, load_model
from ..ir.graph import Graph, Node, Value
from ..ir.types import FLOAT_DTYPES, TensorType
from ..runtime import Module
from .losses import LOSSES, append_loss
from .optim import SGD, Optimizer

POOLINGS = ("max", "stochastic")


def compile_training(model, loss: str = "cross_entropy", optimizer: Optimizer | None = None,
                     input_shapes: Mapping[str, tuple] | None = None, target: str = "cpu",
                     opt_level: int = 2, seed: int = 0, output: str | None = None,
                     trainable: Sequence[str] | None = None, pooling: str = "max",
                     verify_each: bool = False) -> "TrainingModule":
    """Compile an ONNX model (path, bytes or ModelProto) for training.

    loss          "cross_entropy" (integer labels), "mse" or "bce_with_logits"
    optimizer     cnncompile.optim.SGD(...) or Adam(...); default SGD(lr=0.01)
    input_shapes  fixes the data inputs' shapes, batch included: {"input": (64, 1, 32, 32)}
    output        the model output the loss reads (default: the first)
    trainable     initializer names to train (default: every floating-point initializer)
    pooling       "stochastic" trains MaxPool layers as stochastic pooling (Zeiler & Fergus)
    seed          seeds the Dropout masks and stochastic-pooling draws
    """
    return TrainingModule(model, loss, optimizer or SGD(lr=0.01), input_shapes, target, opt_level,
                          seed, output, trainable, pooling, verify_each)


class TrainingModule:
    """A compiled training step with its parameters, optimizer state and running statistics."""

    def __init__(self, model, loss, optimizer, input_shapes, target, opt_level, seed, output,
                 trainable, pooling, verify_each):
        if loss not in LOSSES:
            raise UserError(f"unknown loss '{loss}'; the losses are: {', '.join(LOSSES)}")
        if pooling not in POOLINGS:
            raise UserError(f"pooling='{pooling}' must be one of {', '.join(POOLINGS)}")
        if not isinstance(optimizer, Optimizer):
            raise UserError(f"optimizer must be a cnncompile.optim optimizer (SGD, Adam), got "
                            f"{type(optimizer).__name__}")
        self.proto = load_model(model)
        self.loss_kind = loss
        self.optimizer = optimizer
        self.target = target
        self.opt_level = opt_level
        self.pooling = pooling
        self.verify_each = verify_each
        self.rng = np.random.default_rng(seed)
        self.training = True

        self.forward = import_onnx(self.proto, input_shapes=input_shapes)
        self.output = _pick_output(self.forward, output)
        self.data_inputs = [v.name for v in self.forward.inputs]
        named = _initializer_names(self.proto)
        self.buffers = _running_stats(self.forward)
        self.parameters = _parameters(self.forward, named, trainable, set(self.buffers))
        self._compiled: dict = {}
        self._inference: dict = {}
        self._build("train")

    # ---- the user's API ----------------------------------------------------------------------
    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return (f"<cnncompile.TrainingModule {self.forward.name!r} loss={self.loss_kind} "
                f"{self.optimizer!r} target={self.target} mode={mode}, "
                f"{len(self.parameters)} parameters>")

    @property
    def backward_graph(self) -> Graph:
        """The joint forward + loss + backward IR of the current mode, before optimization."""
        return self._build(self._mode).graph

    @property
    def module(self) -> Module:
        """The compiled joint graph of the current mode."""
        return self._build(self._mode).module

    def train_mode(self) -> "TrainingModule":
        """Batch statistics (updated running statistics), active Dropout and stochastic pooling."""
        self.training = True
        return self

    def eval_mode(self) -> "TrainingModule":
        """step/gradients as inference computes: running statistics, no Dropout, no sampling."""
        self.training = False
        return self

    def step(self, x, labels) -> float:
        """Forward, backward and one optimizer update; returns the loss (before the update)."""
        loss, grads, stats = self._run(x, labels)
        self._update_running_stats(stats)
        self.optimizer.step(self.parameters, grads)
        return loss

    def gradients(self, x, labels) -> dict[str, np.ndarray]:
        """{parameter name: gradient of the loss}; nothing is updated."""
        _, grads, _ = self._run(x, labels)
        return {name: np.array(g) for name, g in grads.items()}

    def loss(self, x, labels) -> float:
        """The loss in the current mode, without gradients or updates."""
        return self._run(x, labels)[0]

    def predict(self, x):
        """Inference with the current weights and running statistics: the model output the loss
        reads. Any batch size; each new input shape compiles the inference graph once."""
        feeds = self._data_feeds(x, check_shape=False)
        key = tuple((name, tuple(a.shape)) for name, a in feeds.items())
        module, names = self._inference_module(key)
        feeds.update({n: self._state(n) for n in names})
        return module.run(feeds)[self.output]

    def export(self, path=None) -> onnx.ModelProto:
        """The ONNX model with the trained weights and running statistics (written to path if
        given). A valid model: onnx.checker passes and onnxruntime matches predict()."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        state = dict(self.parameters)
        state.update(self.buffers)
        for init in proto.graph.initializer:
            if init.name in state:
                init.CopyFrom(numpy_helper.from_array(state[init.name], init.name))
        for node in proto.graph.node:
            if node.op_type == "Constant" and node.output[0] in state:
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute(
                    "value", numpy_helper.from_array(state[node.output[0]], node.output[0])))
        if self.pooling == "stochastic":
            _export_stochastic_pools(proto, self.forward)
        _fill_missing_types(proto, self.forward)
        onnx.checker.check_model(proto)
        if path is not None:
            onnx.save_model(proto, str(path))
        return proto

    # ---- building ----------------------------------------------------------------------------
    @property
    def _mode(self) -> str:
        return "train" if self.training else "eval"

    def _build(self, mode: str) -> "_Compiled":
        if mode not in self._compiled:
            self._compiled[mode] = _Compiled(self, mode)
        return self._compiled[mode]

    def _inference_module(self, key):
        if key not in self._inference:
            shapes = {name: shape for name, shape in key}
            graph = import_onnx(self.proto, input_shapes=shapes)
            if self.pooling == "stochastic":
                _stochastic_pools(graph, training=False)
            names = _constants_to_inputs(graph, list(self.parameters) + list(self.buffers))
            module = _compile_graph(graph, self.target, self.opt_level, self.verify_each)
            self._inference[key] = (module, names)
        return self._inference[key]

    # ---- running -----------------------------------------------------------------------------
    def _state(self, name: str) -> np.ndarray:
        return self.parameters[name] if name in self.parameters else self.buffers[name]

    def _data_feeds(self, x, check_shape: bool = True) -> dict[str, np.ndarray]:
        if not isinstance(x, Mapping):
            if len(self.data_inputs) != 1:
                raise InputError(f"the model has inputs {', '.join(self.data_inputs)}; pass a dict "
                                 "{name: array}")
            x = {self.data_inputs[0]: x}
        missing = [n for n in self.data_inputs if n not in x]
        if missing or len(x) != len(self.data_inputs):
            raise InputError(f"the model's inputs are {', '.join(self.data_inputs)}; got "
                             f"{', '.join(map(str, x))}")
        feeds = {}
        for value in self.forward.inputs:
            array = np.asarray(x[value.name])
            if array.dtype != value.dtype and array.dtype.kind == value.dtype.kind:
                array = array.astype(value.dtype)
            if check_shape and array.shape != tuple(value.shape):
                raise InputError(f"input '{value.name}' has shape {list(array.shape)}; the "
                                 f"training step was compiled for {list(value.shape)} (pass "
                                 "input_shapes= to compile_training for another batch)")
            feeds[value.name] = array
        return feeds

    def _labels(self, labels, want: TensorType) -> np.ndarray:
        array = np.asarray(labels)
        if want.dtype.kind in "iu" and array.dtype.kind not in "iu":
            raise InputError(f"loss '{self.loss_kind}' takes integer class labels, got "
                             f"{array.dtype}")
        array = array.astype(want.dtype, copy=False)
        if array.shape != tuple(want.shape):
            raise InputError(f"labels have shape {list(array.shape)}; loss '{self.loss_kind}' "
                             f"on an output of shape {list(self.forward.value(self.output).shape)} "
                             f"needs labels of shape {list(want.shape)}")
        return array

    def _run(self, x, labels):
        compiled = self._build(self._mode)
        feeds = self._data_feeds(x)
        feeds[compiled.labels.name] = self._labels(labels, compiled.labels.type)
        for name, (shape, ratio) in compiled.masks.items():
            feeds[name] = self.rng.random(shape) >= ratio
        for name, (shape, dtype) in compiled.uniforms.items():
            feeds[name] = self.rng.random(shape).astype(dtype)
        for name in compiled.state_inputs:
            feeds[name] = self._state(name)
        out = compiled.module.run(feeds)
        values = [out[name] for name in compiled.module.output_names]
        loss = float(values[0])
        grads = {name: values[i] for name, i in compiled.grad_index.items()}
        stats = {bn: (values[i], values[j]) for bn, (i, j) in compiled.stat_index.items()}
        return loss, grads, stats

    def _update_running_stats(self, stats) -> None:
        info = self._build("train").bn_info
        for bn, (mean, var) in stats.items():
            mean_name, var_name, momentum, count = info[bn]
            running_mean, running_var = self.buffers[mean_name], self.buffers[var_name]
            unbiased = var * (count / (count - 1)) if count > 1 else var
            keep = running_mean.dtype.type(momentum)
            running_mean *= keep
            running_mean += (1 - keep) * mean.astype(running_mean.dtype)
            running_var *= keep
            running_var += (1 - keep) * unbiased.astype(running_var.dtype)


class _Compiled:
    """The joint graph of one mode, compiled, with the positions of its outputs."""

    def __init__(self, owner: TrainingModule, mode: str):
        from .grad import grad

        graph = owner.forward.copy()
        self.masks: dict[str, tuple] = {}
        self.uniforms: dict[str, tuple] = {}
        self.bn_info: dict[str, tuple] = {}
        stats: list[tuple[str, Value, Value]] = []
        if mode == "train":
            stats = _batchnorm_train(graph, self.bn_info)
            _dropout_train(graph, self.masks)
            if owner.pooling == "stochastic":
                _stochastic_pools(graph, training=True, uniforms=self.uniforms)
        elif owner.pooling == "stochastic":
            _stochastic_pools(graph, training=False)
        loss, self.labels = append_loss(graph, owner.loss_kind, graph.value(owner.output))
        graph.outputs = [loss]
        graph.remove_unused()
        # running statistics stay fixed inputs in eval mode; parameters become inputs in grad
        self.state_inputs = _constants_to_inputs(graph, list(owner.buffers))
        wrt = [n for n in owner.parameters if n in graph.constants]
        joint = grad(graph, loss.name, wrt,
                     extra_outputs=[v.name for _, mean, var in stats for v in (mean, var)])
        names = [v.name for v in joint.outputs]
        self.grad_index = {}
        for name in wrt:
            if f"grad:{name}" not in names:
                raise InternalError(f"grad() returned no output 'grad:{name}'")
            self.grad_index[name] = names.index(f"grad:{name}")
        if names[0] != loss.name:
            raise InternalError(f"grad() put '{names[0]}' first among its outputs, not the loss")
        self.stat_index = {bn: (names.index(mean.name), names.index(var.name))
                           for bn, mean, var in stats}
        inputs = {v.name for v in joint.inputs}
        self.state_inputs += [n for n in wrt if n in inputs]
        self.graph = joint
        self.module = _compile_graph(joint.copy(), owner.target, owner.opt_level,
                                     owner.verify_each)
        if hasattr(self.module.executor, "reuse_outputs"):
            # the step consumes its outputs before the next run (gradients() copies them)
            self.module.executor.reuse_outputs = True


# ---- helpers -------------------------------------------------------------------------------------
def _compile_graph(graph: Graph, target: str, opt_level: int, verify_each: bool) -> Module:
    from ..backends import get_backend
    from ..passes import run_pipeline

    backend = get_backend(target)
    meta = {"target": target, "layout": getattr(backend, "preferred_layout", "NCHW")}
    graph, manager = run_pipeline(graph, opt_level, verify_each=verify_each, meta=meta)
    module = Module(graph, backend(graph), target)
    module.pass_records = manager.records
    return module


def _pick_output(graph: Graph, output: str | None) -> str:
    names = [v.name for v in graph.outputs]
    if output is None:
        return names[0]
    if output not in names:
        raise UserError(f"'{output}' is not an output of the model; its outputs are: "
                        f"{', '.join(names)}")
    return output


def _initializer_names(proto: onnx.ModelProto) -> set[str]:
    names = {init.name for init in proto.graph.initializer}
    names.update(n.output[0] for n in proto.graph.node if n.op_type == "Constant")
    return names


def _running_stats(graph: Graph) -> dict[str, np.ndarray]:
    buffers = {}
    for node in graph.nodes:
        if node.op != "BatchNormalization":
            continue
        for value in node.inputs[3:5]:
            if not value.is_constant:
                raise UserError(f"BatchNormalization node '{node.name}': the running statistic "
                                f"'{value.name}' is not an initializer; it cannot be trained")
            buffers[value.name] = np.array(value.data)
    return buffers


def _parameters(graph: Graph, named: set[str], trainable, buffers: set[str]) -> dict:
    floats = {name: v for name, v in graph.constants.items()
              if name in named and name not in buffers and v.dtype in FLOAT_DTYPES}
    if trainable is None:
        chosen = list(floats)
    else:
        chosen = list(trainable)
        unknown = [n for n in chosen if n not in floats]
        if unknown:
            raise UserError(f"trainable names {', '.join(map(repr, unknown))} are not "
                            f"floating-point initializers of the model; they are: "
                            f"{', '.join(floats)}")
    return {name: np.array(floats[name].data) for name in chosen}


def _constants_to_inputs(graph: Graph, names) -> list[str]:
    """Turn the named constants present in graph into graph inputs; returns their names."""
    moved = []
    for name in names:
        value = graph.constants.pop(name, None)
        if value is not None:
            value.data = None
            graph.inputs.append(value)
            moved.append(name)
    return moved


def _batchnorm_train(graph: Graph, info: dict) -> list[tuple[str, Value, Value]]:
    """BatchNormalization -> BatchNormTrain; returns (node name, batch mean, batch var) each."""
    stats = []
    for i, node in enumerate(graph.nodes):
        if node.op != "BatchNormalization":
            continue
        x, scale, b, running_mean, running_var = node.inputs
        if tuple(scale.shape) != (x.shape[1],):
            raise UserError(f"BatchNormalization node '{node.name}': training needs per-channel "
                            f"parameters of shape [{x.shape[1]}], got {list(scale.shape)}")
        channel = TensorType(x.dtype, (x.shape[1],))
        mean = graph.new_value(f"{node.name}.batch_mean", channel)
        var = graph.new_value(f"{node.name}.batch_var", channel)
        attrs = {"epsilon": node.attrs["epsilon"], "momentum": node.attrs["momentum"]}
        graph.nodes[i] = Node("BatchNormTrain", [x, scale, b], [node.outputs[0], mean, var],
                              attrs, name=node.name, origins=node.origins, created_by="training")
        count = x.type.size // x.shape[1]
        info[node.name] = (running_mean.name, running_var.name, attrs["momentum"], count)
        stats.append((node.name, mean, var))
    return stats


def _dropout_train(graph: Graph, masks: dict) -> None:
    """Dropout -> DropoutTrain with its keep-mask as a new graph input."""
    for i, node in enumerate(graph.nodes):
        if node.op != "Dropout":
            continue
        x = node.inputs[0]
        ratio = float(node.attrs["ratio"])
        mask = graph.add_input(f"{node.name}.mask", TensorType(np.bool_, x.shape))
        masks[mask.name] = (tuple(x.shape), ratio)
        graph.nodes[i] = Node("DropoutTrain", [x, mask], [node.outputs[0]], {"ratio": ratio},
                              name=node.name, origins=node.origins, created_by="training")
        if len(node.outputs) > 1:
            out_mask = node.outputs[1]
            if out_mask.dtype != np.bool_:
                raise UserError(f"Dropout node '{node.name}': its mask output is "
                                f"{out_mask.dtype}; training needs the bool mask of opset 10+")
            graph.replace_all_uses(out_mask, mask)


def _stochastic_pools(graph: Graph, training: bool, uniforms: dict | None = None) -> None:
    """MaxPool -> StochasticPool (sampling in training, the expectation at inference)."""
    for i, node in enumerate(graph.nodes):
        if node.op != "MaxPool":
            continue
        attrs = {k: node.attrs[k] for k in ("kernel_shape", "strides", "pads", "dilations",
                                            "ceil_mode")}
        attrs["training"] = training
        if len(node.outputs) > 1:
            raise UserError(f"MaxPool node '{node.name}' uses its Indices output; it cannot become "
                            "a stochastic pool")
        y = node.outputs[0]
        inputs = [node.inputs[0]]
        outputs = [y]
        if training:
            u = graph.add_input(f"{node.name}.uniform", y.type)
            uniforms[u.name] = (tuple(y.shape), y.dtype)
            inputs.append(u)
            outputs.append(graph.new_value(f"{node.name}.sampled", y.type.with_dtype(np.int64)))
        graph.nodes[i] = Node("StochasticPool", inputs, outputs, attrs, name=node.name,
                              origins=node.origins, created_by="training")


def _fill_missing_types(proto: onnx.ModelProto, graph: Graph) -> None:
    """Give declared outputs and value_info without a type the element type the import found
    (the checker requires one; exporters sometimes leave it out)."""
    from onnx import helper

    known = {v.name: v.type for v in graph.values()}
    for info in list(proto.graph.output) + list(proto.graph.value_info):
        if not info.type.HasField("tensor_type") and info.name in known:
            t = known[info.name]
            info.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(t.dtype)
            # the rank is known; the sizes are left unknown (the batch may be dynamic)
            for _ in range(t.rank):
                info.type.tensor_type.shape.dim.add()


def _export_stochastic_pools(proto: onnx.ModelProto, graph: Graph) -> None:
    """Write each MaxPool as its stochastic-pooling expectation in plain ONNX ops:
    y = AveragePool(w * w) / max(AveragePool(w), tiny), w = Relu(x) (the window counts cancel)."""
    from onnx import helper

    dtypes = {v.name: v.dtype for v in graph.values()}
    tiny: dict[np.dtype, str] = {}
    nodes = []
    for node in proto.graph.node:
        if node.op_type != "MaxPool":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if any(d != 1 for d in attrs.get("dilations", [])):
            raise UserError(f"MaxPool node '{node.name}': a dilated stochastic pool has no ONNX "
                            "AveragePool form before opset 19")
        attrs.pop("dilations", None)
        attrs.pop("storage_order", None)
        dtype = dtypes.get(node.input[0], np.dtype(np.float32))
        if dtype not in tiny:
            tiny[dtype] = f"stochastic_pool.tiny.{dtype.name}"
            proto.graph.initializer.append(numpy_helper.from_array(
                np.array(np.finfo(dtype).tiny, dtype=dtype), tiny[dtype]))
        x, y, base = node.input[0], node.output[0], node.output[0] + ".stochastic"
        nodes += [helper.make_node("Relu", [x], [f"{base}.w"]),
                  helper.make_node("Mul", [f"{base}.w", f"{base}.w"], [f"{base}.w2"]),
                  helper.make_node("AveragePool", [f"{base}.w2"], [f"{base}.num"], **attrs),
                  helper.make_node("AveragePool", [f"{base}.w"], [f"{base}.den"], **attrs),
                  helper.make_node("Max", [f"{base}.den", tiny[dtype]], [f"{base}.safe"]),
                  helper.make_node("Div", [f"{base}.num", f"{base}.safe"], [y], name=node.name)]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


__all__ = ["compile_training", "TrainingModule"]
