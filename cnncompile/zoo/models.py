"""The zoo's model definitions, each written the way its paper draws it.

Every builder takes (batch, image_size, seed, opset, ...) and returns an onnx.ModelProto whose
input 'input' is [N, C, H, W] with a dynamic batch axis 'N'. Layer names follow torchvision where it
has the model ('layer1.0.conv1', 'features.3.dw.conv', ...).
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from .builder import Builder


def _start(name: str, batch: int, channels: int, image_size: int, seed: int, opset: int,
           doc: str) -> Builder:
    if image_size < 1 or batch < 1:
        raise ShapeError(f"{name}: batch and image_size must be positive, got batch={batch}, "
                         f"image_size={image_size}")
    return Builder(name, (batch, channels, image_size, image_size), seed=seed, opset=opset,
                   doc=doc)


def _require_multiple(name: str, image_size: int, factor: int) -> None:
    if image_size % factor:
        raise ShapeError(f"{name}: image_size must be a multiple of {factor} (the network "
                         f"downsamples by {factor}), got {image_size}")


# ---- classic stacks ------------------------------------------------------------------------------
def lenet5(batch=1, image_size=32, seed=0, opset=13, num_classes=10):
    """LeNet-5 (LeCun et al. 1998): tanh convolutions and average-pool subsampling, 1x32x32."""
    b = _start("lenet5", batch, 1, image_size, seed, opset, lenet5.__doc__)
    x = b.tanh(b.conv(b.input, 6, 5, padding=0, name="c1"), name="c1.tanh")
    x = b.avg_pool(x, 2, name="s2")
    x = b.tanh(b.conv(x, 16, 5, padding=0, name="c3"), name="c3.tanh")
    x = b.avg_pool(x, 2, name="s4")
    x = b.tanh(b.conv(x, 120, 5, padding=0, name="c5"), name="c5.tanh")
    x = b.tanh(b.linear(b.flatten(x, name="flatten"), 84, name="f6"), name="f6.tanh")
    b.output(b.linear(x, num_classes, name="f7"), "logits")
    return b.model({"zoo.model": "lenet5"})


def alexnet(batch=1, image_size=224, seed=0, opset=13, num_classes=1000):
    """AlexNet (Krizhevsky et al. 2012) in torchvision's single-tower form, without LRN."""
    b = _start("alexnet", batch, 3, image_size, seed, opset, alexnet.__doc__)
    x = b.relu(b.conv(b.input, 64, 11, stride=4, padding=2, name="conv1"), name="relu1")
    x = b.max_pool(x, 3, 2, name="pool1")
    x = b.relu(b.conv(x, 192, 5, padding=2, name="conv2"), name="relu2")
    x = b.max_pool(x, 3, 2, name="pool2")
    x = b.relu(b.conv(x, 384, 3, name="conv3"), name="relu3")
    x = b.relu(b.conv(x, 256, 3, name="conv4"), name="relu4")
    x = b.relu(b.conv(x, 256, 3, name="conv5"), name="relu5")
    x = b.flatten(b.max_pool(x, 3, 2, name="pool5"), name="flatten")
    x = b.relu(b.linear(x, 4096, name="fc6"), name="relu6")
    x = b.relu(b.linear(x, 4096, name="fc7"), name="relu7")
    b.output(b.linear(x, num_classes, name="fc8"), "logits")
    return b.model({"zoo.model": "alexnet"})


VGG11 = [[64], [128], [256, 256], [512, 512], [512, 512]]


def vgg11(batch=1, image_size=224, seed=0, opset=13, num_classes=1000, batch_norm=False):
    """VGG-11, configuration A (Simonyan & Zisserman 2014): 3x3 convs, five 2x2 max pools."""
    b = _start("vgg11", batch, 3, image_size, seed, opset, vgg11.__doc__)
    x = b.input
    for i, widths in enumerate(VGG11, 1):
        for j, width in enumerate(widths, 1):
            name = f"block{i}.conv{j}"
            if batch_norm:
                x = b.conv_bn(x, width, 3, name=name)
            else:
                x = b.relu(b.conv(x, width, 3, name=name), name=f"{name}.relu")
        x = b.max_pool(x, 2, name=f"block{i}.pool")
    x = b.flatten(x, name="flatten")
    x = b.relu(b.linear(x, 4096, name="fc6"), name="fc6.relu")
    x = b.relu(b.linear(x, 4096, name="fc7"), name="fc7.relu")
    b.output(b.linear(x, num_classes, name="fc8"), "logits")
    return b.model({"zoo.model": "vgg11"})


# ---- residual networks ---------------------------------------------------------------------------
def _shortcut(b: Builder, x: str, channels: int, stride: int, name: str) -> str:
    if stride == 1 and b.channels(x) == channels:
        return x
    x = b.conv(x, channels, 1, stride, bias=False, name=f"{name}.downsample.0")
    return b.bn(x, name=f"{name}.downsample.1")


def basic_block(b: Builder, x: str, width: int, stride: int, name: str) -> str:
    """Two 3x3 convs plus the identity (or a 1x1 projection when the shape changes)."""
    out = b.conv(x, width, 3, stride, bias=False, name=f"{name}.conv1")
    out = b.relu(b.bn(out, name=f"{name}.bn1"), name=f"{name}.relu1")
    out = b.conv(out, width, 3, bias=False, name=f"{name}.conv2")
    out = b.bn(out, name=f"{name}.bn2", residual=True)
    out = b.add(out, _shortcut(b, x, width, stride, name), name=f"{name}.add")
    return b.relu(out, name=f"{name}.relu2")


def bottleneck(b: Builder, x: str, width: int, stride: int, name: str) -> str:
    """1x1 reduce, 3x3 (strided, as in ResNet v1.5), 1x1 expand by 4, plus the shortcut."""
    out = b.conv(x, width, 1, bias=False, name=f"{name}.conv1")
    out = b.relu(b.bn(out, name=f"{name}.bn1"), name=f"{name}.relu1")
    out = b.conv(out, width, 3, stride, bias=False, name=f"{name}.conv2")
    out = b.relu(b.bn(out, name=f"{name}.bn2"), name=f"{name}.relu2")
    out = b.conv(out, 4 * width, 1, bias=False, name=f"{name}.conv3")
    out = b.bn(out, name=f"{name}.bn3", residual=True)
    out = b.add(out, _shortcut(b, x, 4 * width, stride, name), name=f"{name}.add")
    return b.relu(out, name=f"{name}.relu3")


def _resnet(name, block, layers, batch, image_size, seed, opset, num_classes, doc):
    b = _start(name, batch, 3, image_size, seed, opset, doc)
    x = b.conv(b.input, 64, 7, stride=2, bias=False, name="conv1")
    x = b.relu(b.bn(x, name="bn1"), name="relu")
    x = b.max_pool(x, 3, 2, padding=1, name="maxpool")
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers), 1):
        for i in range(blocks):
            stride = 2 if stage > 1 and i == 0 else 1
            x = block(b, x, width, stride, f"layer{stage}.{i}")
    x = b.flatten(b.global_avg_pool(x, name="avgpool"), name="flatten")
    b.output(b.linear(x, num_classes, name="fc"), "logits")
    return b.model({"zoo.model": name})


def resnet18(batch=1, image_size=224, seed=0, opset=13, num_classes=1000):
    """ResNet-18 (He et al. 2015): basic blocks [2, 2, 2, 2]."""
    return _resnet("resnet18", basic_block, (2, 2, 2, 2), batch, image_size, seed, opset,
                   num_classes, resnet18.__doc__)


def resnet50(batch=1, image_size=224, seed=0, opset=13, num_classes=1000):
    """ResNet-50 (He et al. 2015): bottleneck blocks [3, 4, 6, 3]."""
    return _resnet("resnet50", bottleneck, (3, 4, 6, 3), batch, image_size, seed, opset,
                   num_classes, resnet50.__doc__)


# ---- mobile networks -----------------------------------------------------------------------------
# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper
MOBILENETV2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1)]


def inverted_residual(b: Builder, x: str, out: int, stride: int, expand: int, name: str) -> str:
    """1x1 expand, 3x3 depthwise (both ReLU6), linear 1x1 projection; residual if shapes match."""
    hidden = b.channels(x) * expand
    h = x
    if expand != 1:
        h = b.conv_bn(h, hidden, 1, act="relu6", name=f"{name}.expand")
    h = b.conv_bn(h, hidden, 3, stride, groups=hidden, act="relu6", name=f"{name}.dw")
    residual = stride == 1 and b.channels(x) == out
    h = b.conv_bn(h, out, 1, act=None, residual=residual, name=f"{name}.project")
    if residual:
        h = b.add(x, h, name=f"{name}.add")
    return h


def mobilenetv2(batch=1, image_size=224, seed=0, opset=13, num_classes=1000):
    """MobileNetV2 (Sandler et al. 2018): inverted residuals with depthwise convolutions."""
    b = _start("mobilenetv2", batch, 3, image_size, seed, opset, mobilenetv2.__doc__)
    x = b.conv_bn(b.input, 32, 3, stride=2, act="relu6", name="features.0")
    index = 1
    for expand, out, repeats, stride in MOBILENETV2:
        for i in range(repeats):
            x = inverted_residual(b, x, out, stride if i == 0 else 1, expand, f"features.{index}")
            index += 1
    x = b.conv_bn(x, 1280, 1, act="relu6", name=f"features.{index}")
    x = b.flatten(b.global_avg_pool(x, name="avgpool"), name="flatten")
    b.output(b.linear(x, num_classes, name="classifier"), "logits")
    return b.model({"zoo.model": "mobilenetv2"})


def fire(b: Builder, x: str, squeeze: int, expand: int, name: str) -> str:
    """Fire module: a 1x1 squeeze, then 1x1 and 3x3 expands side by side, concatenated."""
    s = b.relu(b.conv(x, squeeze, 1, name=f"{name}.squeeze"), name=f"{name}.squeeze.relu")
    e1 = b.relu(b.conv(s, expand, 1, name=f"{name}.expand1x1"), name=f"{name}.expand1x1.relu")
    e3 = b.relu(b.conv(s, expand, 3, name=f"{name}.expand3x3"), name=f"{name}.expand3x3.relu")
    return b.concat([e1, e3], name=f"{name}.concat")


def squeezenet(batch=1, image_size=224, seed=0, opset=13, num_classes=1000):
    """SqueezeNet 1.1 (Iandola et al. 2016): fire modules, ceil-mode pooling, conv classifier."""
    b = _start("squeezenet", batch, 3, image_size, seed, opset, squeezenet.__doc__)
    x = b.relu(b.conv(b.input, 64, 3, stride=2, padding=0, name="conv1"), name="conv1.relu")
    x = b.max_pool(x, 3, 2, ceil_mode=True, name="pool1")
    x = fire(b, x, 16, 64, "fire2")
    x = fire(b, x, 16, 64, "fire3")
    x = b.max_pool(x, 3, 2, ceil_mode=True, name="pool3")
    x = fire(b, x, 32, 128, "fire4")
    x = fire(b, x, 32, 128, "fire5")
    x = b.max_pool(x, 3, 2, ceil_mode=True, name="pool5")
    for i, (squeeze, expand) in enumerate([(48, 192), (48, 192), (64, 256), (64, 256)], 6):
        x = fire(b, x, squeeze, expand, f"fire{i}")
    x = b.relu(b.conv(x, num_classes, 1, name="conv10"), name="conv10.relu")
    x = b.flatten(b.global_avg_pool(x, name="avgpool"), name="flatten")
    b.output(x, "logits")
    return b.model({"zoo.model": "squeezenet"})


# ---- single blocks -------------------------------------------------------------------------------
def inception_block(batch=1, image_size=28, seed=0, opset=13, in_channels=192,
                    widths=(64, (96, 128), (16, 32), 32)):
    """GoogLeNet's inception (3a) module (Szegedy et al. 2014): four branches, concatenated."""
    b = _start("inception_block", batch, in_channels, image_size, seed, opset,
               inception_block.__doc__)
    x = b.input
    w1, (r3, w3), (r5, w5), wp = widths
    b1 = b.conv_bn(x, w1, 1, name="branch1")
    b2 = b.conv_bn(b.conv_bn(x, r3, 1, name="branch2.0"), w3, 3, name="branch2.1")
    b3 = b.conv_bn(b.conv_bn(x, r5, 1, name="branch3.0"), w5, 5, name="branch3.1")
    b4 = b.max_pool(x, 3, 1, padding=1, name="branch4.0")
    b4 = b.conv_bn(b4, wp, 1, name="branch4.1")
    b.output(b.concat([b1, b2, b3, b4], name="concat"), "output")
    return b.model({"zoo.model": "inception_block"})


def densenet_block(batch=1, image_size=56, seed=0, opset=13, in_channels=64, layers=6,
                   growth=32, bn_size=4, transition=True):
    """DenseNet-121's first dense block (Huang et al. 2016): each layer (BN-ReLU-conv 1x1,
    BN-ReLU-conv 3x3) sees the concatenation of all earlier outputs; then the transition layer."""
    b = _start("densenet_block", batch, in_channels, image_size, seed, opset,
               densenet_block.__doc__)
    features = [b.input]
    for i in range(1, layers + 1):
        name = f"denselayer{i}"
        x = features[0] if len(features) == 1 else b.concat(features, name=f"{name}.concat")
        x = b.relu(b.bn(x, name=f"{name}.norm1"), name=f"{name}.relu1")
        x = b.conv(x, bn_size * growth, 1, bias=False, name=f"{name}.conv1")
        x = b.relu(b.bn(x, name=f"{name}.norm2"), name=f"{name}.relu2")
        features.append(b.conv(x, growth, 3, bias=False, name=f"{name}.conv2"))
    x = b.concat(features, name="concat")
    if transition:
        x = b.relu(b.bn(x, name="transition.norm"), name="transition.relu")
        x = b.conv(x, b.channels(x) // 2, 1, bias=False, name="transition.conv")
        x = b.avg_pool(x, 2, name="transition.pool")
    b.output(x, "output")
    return b.model({"zoo.model": "densenet_block"})


# ---- dense prediction ----------------------------------------------------------------------------
def _double_conv(b: Builder, x: str, channels: int, name: str) -> str:
    x = b.conv_bn(x, channels, 3, name=f"{name}.conv1")
    return b.conv_bn(x, channels, 3, name=f"{name}.conv2")


def unet(batch=1, image_size=256, seed=0, opset=13, in_channels=3, num_classes=2, base=16,
         depth=4):
    """U-Net (Ronneberger et al. 2015) with same-padded convs: a max-pool encoder, a
    ConvTranspose decoder and skip connections concatenated at each level."""
    _require_multiple("unet", image_size, 2 ** depth)
    b = _start("unet", batch, in_channels, image_size, seed, opset, unet.__doc__)
    skips = []
    x = b.input
    for level in range(depth):
        x = _double_conv(b, x, base * 2 ** level, f"down{level + 1}")
        skips.append(x)
        x = b.max_pool(x, 2, name=f"down{level + 1}.pool")
    x = _double_conv(b, x, base * 2 ** depth, "bottleneck")
    for level in reversed(range(depth)):
        channels = base * 2 ** level
        x = b.conv_transpose(x, channels, 2, stride=2, name=f"up{level + 1}.upconv")
        x = b.concat([skips[level], x], name=f"up{level + 1}.concat")
        x = _double_conv(b, x, channels, f"up{level + 1}")
    b.output(b.conv(x, num_classes, 1, name="head"), "mask")
    return b.model({"zoo.model": "unet"})


# YOLOv5's default anchors (width, height in pixels) for strides 8, 16, 32
YOLO_ANCHORS = {8: [(10, 13), (16, 30), (33, 23)], 16: [(30, 61), (62, 45), (59, 119)],
                32: [(116, 90), (156, 198), (373, 326)]}


def _cbs(b: Builder, x: str, channels: int, kernel: int, stride: int, name: str) -> str:
    return b.conv_bn(x, channels, kernel, stride, act="silu", name=name)


def csp_block(b: Builder, x: str, channels: int, name: str) -> str:
    """Cross-stage partial block: split the channels, send one half through a residual
    bottleneck, concatenate both halves and fuse them with a 1x1 conv."""
    half = channels // 2
    x = _cbs(b, x, channels, 1, 1, f"{name}.cv1")
    keep, work = b.split(x, [half, half], name=f"{name}.split")
    h = _cbs(b, work, half, 3, 1, f"{name}.m.cv1")
    h = b.add(work, _cbs(b, h, half, 3, 1, f"{name}.m.cv2"), name=f"{name}.m.add")
    return _cbs(b, b.concat([keep, h], name=f"{name}.concat"), channels, 1, 1, f"{name}.cv2")


def _detect(b: Builder, x: str, stride: int, num_classes: int, name: str) -> tuple[str, str]:
    """One detection head: a 1x1 conv to anchors * (4 + 1 + classes), decoded YOLOv5-style into
    pixel boxes (cx, cy, w, h) [N, A*H*W, 4] and scores objectness * class [N, A*H*W, C]."""
    anchors = np.array(YOLO_ANCHORS[stride], dtype=np.float32)
    a, per_anchor = len(anchors), 5 + num_classes
    raw = b.conv(x, a * per_anchor, 1, name=f"{name}.conv")
    _, _, h, w = b.shape(raw)
    raw = b.reshape(raw, [0, a, per_anchor, h * w], name=f"{name}.reshape")
    xy, wh, obj, cls = b.split(raw, [2, 2, 1, num_classes], axis=2, name=f"{name}.split")
    gy, gx = np.divmod(np.arange(h * w, dtype=np.float32), w)
    grid = np.stack([gx, gy]).reshape(1, 1, 2, h * w)
    # cxcy = (2 * sigmoid(t) - 0.5 + grid) * stride
    xy = b.mul_const(b.sigmoid(xy, name=f"{name}.xy.sigmoid"), 2.0 * stride, name=f"{name}.xy.mul")
    xy = b.add_const(xy, (grid - 0.5) * stride, name=f"{name}.xy.add")
    # wh = (2 * sigmoid(t)) ** 2 * anchor
    wh = b.mul_const(b.sigmoid(wh, name=f"{name}.wh.sigmoid"), 2.0, name=f"{name}.wh.mul")
    wh = b.mul(wh, wh, name=f"{name}.wh.square")
    wh = b.mul_const(wh, anchors.reshape(1, a, 2, 1), name=f"{name}.wh.anchor")
    boxes = b.concat([xy, wh], axis=2, name=f"{name}.boxes")
    boxes = b.transpose(boxes, (0, 1, 3, 2), name=f"{name}.boxes.transpose")
    boxes = b.reshape(boxes, [0, -1, 4], name=f"{name}.boxes.reshape")
    scores = b.mul(b.sigmoid(obj, name=f"{name}.obj.sigmoid"),
                   b.sigmoid(cls, name=f"{name}.cls.sigmoid"), name=f"{name}.scores")
    scores = b.transpose(scores, (0, 1, 3, 2), name=f"{name}.scores.transpose")
    scores = b.reshape(scores, [0, -1, num_classes], name=f"{name}.scores.reshape")
    return boxes, scores


def yolo_head(batch=1, image_size=256, seed=0, opset=13, num_classes=80, width=16):
    """A small YOLOv5-style detector: a strided conv/CSP backbone with SiLU (x * Sigmoid(x)), a
    top-down feature pyramid (Resize upsampling, Concat) and decoded heads at strides 8, 16, 32."""
    _require_multiple("yolo_head", image_size, 32)
    b = _start("yolo_head", batch, 3, image_size, seed, opset, yolo_head.__doc__)
    w = width
    x = _cbs(b, b.input, w, 3, 2, "stem")
    x = csp_block(b, _cbs(b, x, 2 * w, 3, 2, "stage2.down"), 2 * w, "stage2.csp")
    p3 = csp_block(b, _cbs(b, x, 4 * w, 3, 2, "stage3.down"), 4 * w, "stage3.csp")
    p4 = csp_block(b, _cbs(b, p3, 8 * w, 3, 2, "stage4.down"), 8 * w, "stage4.csp")
    p5 = csp_block(b, _cbs(b, p4, 16 * w, 3, 2, "stage5.down"), 16 * w, "stage5.csp")

    t5 = _cbs(b, p5, 8 * w, 1, 1, "neck.lateral5")
    up = b.resize(t5, 2.0, name="neck.up5")
    t4 = csp_block(b, b.concat([up, p4], name="neck.concat4"), 8 * w, "neck.fuse4")
    t4_lateral = _cbs(b, t4, 4 * w, 1, 1, "neck.lateral4")
    up = b.resize(t4_lateral, 2.0, name="neck.up4")
    t3 = csp_block(b, b.concat([up, p3], name="neck.concat3"), 4 * w, "neck.fuse3")

    heads = [_detect(b, feat, stride, num_classes, f"detect.p{level}")
             for level, (feat, stride) in enumerate([(t3, 8), (t4, 16), (t5, 32)], 3)]
    b.output(b.concat([h[0] for h in heads], axis=1, name="detect.boxes"), "boxes")
    b.output(b.concat([h[1] for h in heads], axis=1, name="detect.scores"), "scores")
    return b.model({"zoo.model": "yolo_head"})
