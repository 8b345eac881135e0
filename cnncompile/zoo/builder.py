"""A small helper for writing CNNs as ONNX graphs with random weights.

Each method adds one layer (and its initializers) and returns the name of its output, so a model
definition reads like the paper's diagram::

    b = Builder("tiny", (1, 3, 32, 32))
    x = b.conv(b.input, 16, 3, bias=False, name="conv1")
    x = b.relu(b.bn(x, name="bn1"), name="relu1")
    x = b.flatten(b.global_avg_pool(x, name="pool"), name="flatten")
    b.output(b.linear(x, 10, name="fc"), "logits")
    model = b.model()

Every layer needs a name (a keyword argument); it names the node, its output tensor and its weights
('conv1.weight', 'bn1.running_var', ...).

The builder tracks every tensor's static shape (for the default batch) and an estimate of each
channel's mean and variance, propagated layer by layer as if activations were independent Gaussians.
Weights are He-scaled normals; BatchNormalization's running mean and variance are set from those
estimates, as training would have done, so activations stay O(1) through deep networks and
relative-error comparisons stay meaningful.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ShapeError, UserError

OPSETS = (13, 17)
IR_VERSION = 8  # opset 13/17 need IR >= 7/8; onnxruntime reads up to 11

# Gauss-Hermite nodes and weights for E[f(X)], X ~ N(0, 1)
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(48)
_GH_W = _GH_W / _GH_W.sum()


def _through(fn, stats):
    """Per-channel mean and variance of fn(X) for X ~ N(mean, var), by quadrature."""
    mean, var = stats
    samples = fn(mean[:, None] + np.sqrt(var)[:, None] * _GH_X[None, :])
    out_mean = samples @ _GH_W
    return out_mean, np.maximum((samples * samples) @ _GH_W - out_mean ** 2, 0.0)


def _expected_max(n: int) -> tuple[float, float]:
    """Mean and variance of the largest of n independent standard normals."""
    x = np.linspace(-8.0, 8.0, 4001)
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = np.cumsum(pdf) * (x[1] - x[0])
    density = n * pdf * cdf ** (n - 1)
    density /= density.sum()
    mean = float(density @ x)
    return mean, float(density @ (x - mean) ** 2)


def _collapse(stats, channels: int):
    """One mean and variance for the whole tensor, repeated for `channels` channels: used where an
    op mixes the channel axis with others (Reshape, Transpose)."""
    mean, var = stats
    m = float(np.mean(mean))
    v = float(np.mean(var + mean ** 2)) - m * m
    return np.full(channels, m), np.full(channels, max(v, 0.0))


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return tuple(value)


def _out_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1,
              ceil_mode: bool = False) -> int:
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    steps = -(-span // stride) if ceil_mode else span // stride
    if ceil_mode and steps * stride >= size + pad:
        steps -= 1  # the last window must start inside the input or the left padding
    return steps + 1


class Builder:
    """Build one ONNX graph layer by layer; every method returns the output tensor's name."""

    def __init__(self, name: str, input_shape: Sequence[int], seed: int = 0, opset: int = 13,
                 input_name: str = "input", doc: str = ""):
        if opset not in OPSETS:
            raise UserError(f"the zoo writes opset {' or '.join(map(str, OPSETS))}, not {opset}")
        self.name = name
        self.doc = doc
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.input = input_name
        self.input_shape = tuple(int(d) for d in input_shape)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {input_name: self.input_shape}
        # per-channel (mean, variance) estimates, float64 vectors of length shape[1]
        self.stats: dict[str, tuple[np.ndarray, np.ndarray]] = {
            input_name: (np.zeros(self.input_shape[1]), np.ones(self.input_shape[1]))}
        # for outputs of monotone activations: (activation, stats of its input); a max pool then
        # takes the max before the activation, which is what it computes (they commute)
        self.pre_activation: dict[str, tuple] = {}
        self.outputs: list[str] = []
        self._shared: dict[tuple, str] = {}

    # ---- bookkeeping -----------------------------------------------------------------------------
    def shape(self, x: str) -> tuple[int, ...]:
        return self.shapes[x]

    def channels(self, x: str) -> int:
        return self.shapes[x][1]

    def _node(self, op: str, inputs: list[str], name: str, shape: tuple, stats, **attrs) -> str:
        if name in self.shapes:
            raise ValueError(f"layer name '{name}' is used twice in {self.name}")
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        self.shapes[name] = tuple(shape)
        self.stats[name] = stats
        return name

    def _param(self, name: str, array: np.ndarray) -> str:
        self.initializers[name] = np.ascontiguousarray(array)
        return name

    def _const(self, array, dtype) -> str:
        """A small constant (Clip bounds, Reshape shapes...), shared by every node that needs it."""
        array = np.asarray(array, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._shared:
            name = f"const.{len(self._shared)}"
            self._shared[key] = self._param(name, array)
        return self._shared[key]

    def _he_normal(self, shape: tuple, fan_in: int) -> np.ndarray:
        weight = self.rng.standard_normal(shape, dtype=np.float32)
        weight *= np.float32(math.sqrt(2.0 / fan_in))
        return weight

    def _bias(self, n: int) -> np.ndarray:
        return self.rng.uniform(-0.1, 0.1, n).astype(np.float32)

    def _weighted_stats(self, x: str, weight: np.ndarray, groups: int, bias, taps: float = 1.0):
        """Mean and variance of a grouped weighted sum over channels (and kernel taps) of x.

        weight is [out, in / groups, taps...]; each output sums in/groups channels times `taps`
        kernel positions on average (less than the kernel size for strided ConvTranspose)."""
        mean, var = self.stats[x]
        out = weight.shape[0]
        # float32 throughout: the big Gemm weights must not be copied or squared into temporaries
        flat = weight.reshape(groups, out // groups, weight.shape[1], -1)
        scale = taps / flat.shape[-1]
        mean_in = mean.reshape(groups, -1).astype(np.float32)
        var_in = var.reshape(groups, -1).astype(np.float32)
        out_mean = np.einsum("goct,gc->go", flat, mean_in).ravel() * scale
        out_var = np.einsum("goct,goct,gc->go", flat, flat, var_in).ravel() * scale
        out_mean = out_mean.astype(np.float64)
        out_var = out_var.astype(np.float64)
        if bias is not None:
            out_mean = out_mean + bias
        return out_mean, out_var

    # ---- convolution and linear layers -----------------------------------------------------------
    def conv(self, x: str, out_channels: int, kernel, stride=1, padding=None, groups: int = 1,
             dilation=1, bias: bool = True, *, name: str) -> str:
        """Conv2d; padding defaults to dilation * (k - 1) // 2 on each side ('same' at stride 1)."""
        kh, kw = _pair(kernel)
        sh, sw = _pair(stride)
        dh, dw = _pair(dilation)
        ph, pw = _pair(padding if padding is not None else (dh * (kh - 1) // 2, dw * (kw - 1) // 2))
        n, c, h, w = self.shape(x)
        if c % groups or out_channels % groups:
            raise ValueError(f"{name}: channels {c} -> {out_channels} not divisible by groups "
                             f"{groups}")
        weight = self._he_normal((out_channels, c // groups, kh, kw), c // groups * kh * kw)
        inputs = [x, self._param(f"{name}.weight", weight)]
        b = self._bias(out_channels) if bias else None
        if bias:
            inputs.append(self._param(f"{name}.bias", b))
        oh = _out_size(h, kh, sh, ph, dh)
        ow = _out_size(w, kw, sw, pw, dw)
        if oh < 1 or ow < 1:
            raise ShapeError(f"{self.name}: layer '{name}' gets a {h}x{w} input, too small for a "
                             f"{kh}x{kw} kernel at stride {sh}; use a larger image_size")
        stats = self._weighted_stats(x, weight, groups, b, taps=kh * kw)
        return self._node("Conv", inputs, name, (n, out_channels, oh, ow), stats,
                          kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                          dilations=[dh, dw], group=groups)

    def conv_transpose(self, x: str, out_channels: int, kernel, stride=1, padding=0,
                       bias: bool = True, *, name: str) -> str:
        kh, kw = _pair(kernel)
        sh, sw = _pair(stride)
        ph, pw = _pair(padding)
        n, c, h, w = self.shape(x)
        # each output pixel sums about c * kh * kw / (sh * sw) products
        taps = max(1.0, kh * kw / (sh * sw))
        weight = self._he_normal((c, out_channels, kh, kw), int(c * taps))
        inputs = [x, self._param(f"{name}.weight", weight)]
        b = self._bias(out_channels) if bias else None
        if bias:
            inputs.append(self._param(f"{name}.bias", b))
        oh = (h - 1) * sh - 2 * ph + kh
        ow = (w - 1) * sw - 2 * pw + kw
        stats = self._weighted_stats(x, weight.transpose(1, 0, 2, 3), 1, b, taps=taps)
        return self._node("ConvTranspose", inputs, name, (n, out_channels, oh, ow), stats,
                          kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw])

    def linear(self, x: str, out_features: int, *, name: str) -> str:
        """Gemm with a [out, in] weight (transB=1), as PyTorch exports nn.Linear."""
        n, in_features = self.shape(x)
        weight = self._he_normal((out_features, in_features), in_features)
        b = self._bias(out_features)
        inputs = [x, self._param(f"{name}.weight", weight), self._param(f"{name}.bias", b)]
        stats = self._weighted_stats(x, weight, 1, b)
        return self._node("Gemm", inputs, name, (n, out_features), stats, transB=1)

    def bn(self, x: str, eps: float = 1e-5, residual: bool = False, *, name: str) -> str:
        """BatchNormalization whose running statistics match the estimated input statistics (with
        a little noise), so it normalises as a trained one would. residual=True marks the last BN
        of a residual branch: its scale is small, as in trained ResNets (and zero-init-residual
        training), so the sum of many branches neither grows nor amplifies rounding noise."""
        c = self.channels(x)
        mean, var = self.stats[x]
        low, high = (0.1, 0.5) if residual else (0.5, 1.5)
        scale = self.rng.uniform(low, high, c).astype(np.float32)
        shift = self.rng.uniform(-0.2, 0.2, c).astype(np.float32)
        std = np.sqrt(var)
        running_mean = (mean + 0.1 * std * self.rng.standard_normal(c)).astype(np.float32)
        running_var = (var * self.rng.uniform(0.8, 1.25, c) + eps).astype(np.float32)
        inputs = [x, self._param(f"{name}.weight", scale), self._param(f"{name}.bias", shift),
                  self._param(f"{name}.running_mean", running_mean),
                  self._param(f"{name}.running_var", running_var)]
        inv = scale / np.sqrt(running_var.astype(np.float64) + eps)
        stats = ((mean - running_mean) * inv + shift, var * inv * inv)
        return self._node("BatchNormalization", inputs, name, self.shape(x), stats, epsilon=eps)

    def conv_bn(self, x: str, out_channels: int, kernel, stride=1, padding=None, groups: int = 1,
                act: str | None = "relu", residual: bool = False, *, name: str) -> str:
        """Conv (no bias) -> BatchNormalization -> activation: name.conv, name.bn, name.<act>."""
        x = self.conv(x, out_channels, kernel, stride, padding, groups, bias=False,
                      name=f"{name}.conv")
        x = self.bn(x, name=f"{name}.bn", residual=residual)
        return self.act(x, act, name=f"{name}.{act}")

    # ---- activations -----------------------------------------------------------------------------
    def _unary(self, op: str, x: str, name: str, fn, inputs=None, **attrs) -> str:
        self.pre_activation[name] = (fn, self.stats[x])
        return self._node(op, inputs or [x], name, self.shape(x), _through(fn, self.stats[x]),
                          **attrs)

    def relu(self, x: str, *, name: str) -> str:
        return self._unary("Relu", x, name, lambda z: np.maximum(z, 0.0))

    def relu6(self, x: str, *, name: str) -> str:
        """ReLU6 as PyTorch exports it: Clip with min and max given as inputs (opset 11+)."""
        lo = self._const(0.0, np.float32)
        hi = self._const(6.0, np.float32)
        return self._unary("Clip", x, name, lambda z: np.clip(z, 0.0, 6.0), inputs=[x, lo, hi])

    def sigmoid(self, x: str, *, name: str) -> str:
        return self._unary("Sigmoid", x, name, _sigmoid)

    def tanh(self, x: str, *, name: str) -> str:
        return self._unary("Tanh", x, name, np.tanh)

    def silu(self, x: str, *, name: str) -> str:
        """SiLU written out as x * Sigmoid(x), as exporters without a SiLU op do."""
        gate = self.sigmoid(x, name=f"{name}.sigmoid")
        return self._node("Mul", [x, gate], name, self.shape(x),
                          _through(lambda z: z * _sigmoid(z), self.stats[x]))

    def act(self, x: str, kind: str | None, *, name: str) -> str:
        """Apply the activation called kind ('relu', 'relu6', 'silu', 'tanh' or None)."""
        if kind is None:
            return x
        return getattr(self, kind)(x, name=name)

    # ---- pooling and shape -----------------------------------------------------------------------
    def max_pool(self, x: str, kernel, stride=None, padding=0, ceil_mode: bool = False,
                 *, name: str) -> str:
        return self._pool("MaxPool", x, kernel, stride, padding, ceil_mode, name)

    def avg_pool(self, x: str, kernel, stride=None, padding=0, ceil_mode: bool = False,
                 *, name: str) -> str:
        return self._pool("AveragePool", x, kernel, stride, padding, ceil_mode, name)

    def _pool(self, op, x, kernel, stride, padding, ceil_mode, name) -> str:
        kh, kw = _pair(kernel)
        sh, sw = _pair(stride if stride is not None else kernel)
        ph, pw = _pair(padding)
        n, c, h, w = self.shape(x)
        oh = _out_size(h, kh, sh, ph, ceil_mode=ceil_mode)
        ow = _out_size(w, kw, sw, pw, ceil_mode=ceil_mode)
        if oh < 1 or ow < 1:
            raise ShapeError(f"{self.name}: layer '{name}' gets a {h}x{w} input, too small for a "
                             f"{kh}x{kw} pool; use a larger image_size")
        if op == "MaxPool":
            fn, (mean, var) = self.pre_activation.get(x, (None, self.stats[x]))
            shift, shrink = _expected_max(kh * kw)
            stats = (mean + shift * np.sqrt(var), var * shrink)
            if fn is not None:
                stats = _through(fn, stats)
        else:
            stats = self.stats[x]  # neighbouring activations are strongly correlated
        return self._node(op, [x], name, (n, c, oh, ow), stats, kernel_shape=[kh, kw],
                          strides=[sh, sw], pads=[ph, pw, ph, pw], ceil_mode=int(ceil_mode))

    def global_avg_pool(self, x: str, *, name: str) -> str:
        n, c, h, w = self.shape(x)
        mean, var = self.stats[x]
        return self._node("GlobalAveragePool", [x], name, (n, c, 1, 1), (mean, var / (h * w)))

    def flatten(self, x: str, *, name: str) -> str:
        shape = self.shape(x)
        per_channel = math.prod(shape[2:])
        mean, var = self.stats[x]
        stats = (np.repeat(mean, per_channel), np.repeat(var, per_channel))
        return self._node("Flatten", [x], name, (shape[0], math.prod(shape[1:])), stats, axis=1)

    def reshape(self, x: str, shape: Sequence[int], *, name: str) -> str:
        """Reshape; a 0 copies the input's dimension (keeps the batch dynamic), -1 is inferred."""
        src = self.shape(x)
        dims = [src[i] if d == 0 else d for i, d in enumerate(shape)]
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = math.prod(src) // known
        return self._node("Reshape", [x, self._const(list(shape), np.int64)], name, tuple(dims),
                          _collapse(self.stats[x], dims[1]))

    def transpose(self, x: str, perm: Sequence[int], *, name: str) -> str:
        shape = tuple(self.shape(x)[p] for p in perm)
        return self._node("Transpose", [x], name, shape, _collapse(self.stats[x], shape[1]),
                          perm=list(perm))

    def resize(self, x: str, scale: float = 2.0, *, name: str) -> str:
        """Nearest-neighbour upsampling of H and W through Resize's scales input, with the
        attributes torch.nn.Upsample exports."""
        n, c, h, w = self.shape(x)
        scales = self._const([1.0, 1.0, scale, scale], np.float32)
        shape = (n, c, int(math.floor(h * scale)), int(math.floor(w * scale)))
        return self._node("Resize", [x, "", scales], name, shape, self.stats[x], mode="nearest",
                          coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    # ---- combining -------------------------------------------------------------------------------
    def add(self, a: str, b: str, *, name: str) -> str:
        (ma, va), (mb, vb) = self.stats[a], self.stats[b]
        return self._binary("Add", a, b, name, (ma + mb, va + vb))

    def mul(self, a: str, b: str, *, name: str) -> str:
        (ma, va), (mb, vb) = self.stats[a], self.stats[b]
        mean = ma * mb
        return self._binary("Mul", a, b, name, (mean, (va + ma * ma) * (vb + mb * mb) - mean ** 2))

    def _binary(self, op: str, a: str, b: str, name: str, stats) -> str:
        shape = tuple(np.broadcast_shapes(self.shape(a), self.shape(b)))
        return self._node(op, [a, b], name, shape, stats)

    def add_const(self, x: str, value, *, name: str) -> str:
        """x + value, with value stored as the initializer '<name>.value' (broadcast to x)."""
        value = np.asarray(value, dtype=np.float32)
        mean, var = self.stats[x]
        shape = tuple(np.broadcast_shapes(self.shape(x), value.shape))
        stats = (mean + float(value.mean()), var + float(value.var()))
        return self._node("Add", [x, self._param(f"{name}.value", value)], name, shape, stats)

    def mul_const(self, x: str, value, *, name: str) -> str:
        """x * value, with value stored as the initializer '<name>.value' (broadcast to x)."""
        value = np.asarray(value, dtype=np.float32)
        mean, var = self.stats[x]
        square = float(np.mean(value.astype(np.float64) ** 2))
        shape = tuple(np.broadcast_shapes(self.shape(x), value.shape))
        stats = (mean * float(value.mean()), var * square)
        return self._node("Mul", [x, self._param(f"{name}.value", value)], name, shape, stats)

    def concat(self, xs: Sequence[str], axis: int = 1, *, name: str) -> str:
        shapes = [self.shape(x) for x in xs]
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        if axis == 1:
            stats = tuple(np.concatenate([self.stats[x][i] for x in xs]) for i in range(2))
        else:
            merged = tuple(np.concatenate([self.stats[x][i] for x in xs]) for i in range(2))
            stats = _collapse(merged, out[1])
        return self._node("Concat", list(xs), name, tuple(out), stats, axis=axis)

    def split(self, x: str, sizes: Sequence[int], axis: int = 1, *, name: str) -> list[str]:
        """Split with the sizes given as an input (opset 13+); returns one name per part."""
        src = self.shape(x)
        if sum(sizes) != src[axis]:
            raise ValueError(f"{name}: split sizes {list(sizes)} do not add up to {src[axis]}")
        outs = [f"{name}.{i}" for i in range(len(sizes))]
        self.nodes.append(helper.make_node("Split", [x, self._const(list(sizes), np.int64)], outs,
                                           name=name, axis=axis))
        mean, var = self.stats[x]
        start = 0
        for out, size in zip(outs, sizes):
            shape = list(src)
            shape[axis] = size
            self.shapes[out] = tuple(shape)
            if axis == 1:
                self.stats[out] = (mean[start:start + size], var[start:start + size])
            else:
                self.stats[out] = (mean, var)
            start += size
        return outs

    # ---- finishing -------------------------------------------------------------------------------
    def output(self, x: str, name: str) -> str:
        """Mark x as a graph output called name (renaming the tensor)."""
        for node in self.nodes:
            node.output[:] = [name if o == x else o for o in node.output]
            node.input[:] = [name if i == x else i for i in node.input]
        self.shapes[name] = self.shapes.pop(x)
        self.stats[name] = self.stats.pop(x)
        self.outputs.append(name)
        return name

    def model(self, metadata: dict | None = None) -> onnx.ModelProto:
        """The finished ModelProto; the batch axis of the input and outputs is the dim_param 'N'."""
        if not self.outputs:
            raise ValueError(f"{self.name}: no outputs marked")
        batch = self.input_shape[0]

        def dynamic(shape):
            return ["N" if i == 0 and d == batch else d for i, d in enumerate(shape)]

        inputs = [helper.make_tensor_value_info(self.input, TensorProto.FLOAT,
                                                dynamic(self.input_shape))]
        outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, dynamic(self.shapes[o]))
                   for o in self.outputs]
        model = helper.make_model(helper.make_graph(self.nodes, self.name, inputs, outputs,
                                                    doc_string=self.doc),
                                  opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="cnncompile.zoo", ir_version=IR_VERSION)
        # filled in place: make_graph would copy every weight tensor twice more
        for key, array in self.initializers.items():
            tensor = model.graph.initializer.add()
            tensor.name = key
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            tensor.dims.extend(array.shape)
            tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        props = {"zoo.batch": str(batch)}
        props.update(metadata or {})
        helper.set_model_props(model, props)
        return model
