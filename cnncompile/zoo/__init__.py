"""A model zoo: standard CNNs as ONNX models with seeded random weights, built offline.

    model = cnncompile.zoo.build("resnet18", image_size=64)     # an onnx.ModelProto
    cnncompile.zoo.save("mobilenetv2", "mobilenetv2.onnx")
    feeds = cnncompile.zoo.random_inputs(model)                # {"input": array [1, 3, 64, 64]}
    mod = cnncompile.compile(model, input_shapes=cnncompile.zoo.input_shapes(model))

The graph input's batch axis is the dynamic dimension 'N'; ``batch`` is only the default that
``input_shapes`` and ``random_inputs`` use. BatchNormalization stays a separate node.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

import numpy as np
import onnx

from ..errors import UserError
from .builder import Builder
from .models import (alexnet, densenet_block, inception_block, lenet5, mobilenetv2, resnet18,
                     resnet50, squeezenet, unet, vgg11, yolo_head)

MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "vgg11": vgg11,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "squeezenet": squeezenet,
    "inception_block": inception_block,
    "densenet_block": densenet_block,
    "unet": unet,
    "yolo_head": yolo_head,
}


def _builder(name: str) -> Callable[..., onnx.ModelProto]:
    if name not in MODELS:
        raise UserError(f"the zoo has no model '{name}'; it has: {', '.join(MODELS)}")
    return MODELS[name]


def default_image_size(name: str) -> int:
    return inspect.signature(_builder(name)).parameters["image_size"].default


def describe(name: str) -> str:
    """The first paragraph of the model's docstring, on one line."""
    paragraph = (_builder(name).__doc__ or name).strip().split("\n\n")[0]
    return " ".join(paragraph.split())


def build(name: str, batch: int = 1, image_size: int | None = None, seed: int = 0,
          **kw) -> onnx.ModelProto:
    """Build zoo model `name`; image_size None means the model's default. Extra keyword arguments
    (opset=13 or 17, num_classes, width, ...) go to the model's builder."""
    builder = _builder(name)
    if image_size is None:
        image_size = default_image_size(name)
    params = inspect.signature(builder).parameters
    unknown = sorted(k for k in kw if k not in params)
    if unknown:
        options = [p for p in params if p not in ("batch", "image_size", "seed")]
        raise UserError(f"zoo model '{name}' has no option {', '.join(unknown)}; its options "
                        f"are: {', '.join(options)}")
    return builder(batch=batch, image_size=image_size, seed=seed, **kw)


def save(name: str, path: str | os.PathLike, batch: int = 1, image_size: int | None = None,
         seed: int = 0, **kw) -> onnx.ModelProto:
    """Build zoo model `name` and write it to path (a .onnx file); returns the model."""
    model = build(name, batch=batch, image_size=image_size, seed=seed, **kw)
    onnx.save_model(model, os.fspath(path))
    return model


def input_shapes(model: onnx.ModelProto, batch: int | None = None) -> dict[str, tuple]:
    """{input name: static shape}, with the dynamic batch axis set to batch (default: the batch
    the model was built with)."""
    if batch is None:
        props = {p.key: p.value for p in model.metadata_props}
        batch = int(props.get("zoo.batch", 1))
    initializers = {i.name for i in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(batch if d.dim_param else d.dim_value for d in dims)
    return shapes


def random_inputs(model: onnx.ModelProto, seed: int = 0,
                  batch: int | None = None) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for every graph input."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32)
            for name, shape in input_shapes(model, batch).items()}


__all__ = ["MODELS", "Builder", "build", "save", "input_shapes", "random_inputs",
           "default_image_size", "describe"]
