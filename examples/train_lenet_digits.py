"""Train LeNet-5 (built by cnncompile's zoo) on scikit-learn's bundled handwritten digits.

    python examples/train_lenet_digits.py                  # 12 epochs, writes loss_curve.png
    python examples/train_lenet_digits.py --epochs 3 --target reference

Nothing is downloaded: the 1797 8x8 digit images ship with scikit-learn (the ``examples`` extra).
Each image is scaled up 3x (24x24) and padded to LeNet's 32x32, as MNIST's 28x28 digits are padded.
The forward pass, the loss and the backward pass are one graph compiled by cnncompile; SGD with
momentum updates the weights in NumPy. The last line printed is ``test accuracy: 0.9xx``.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import sys
import time
import zlib

import numpy as np

import cnncompile
from cnncompile import zoo


def load_digits_32(test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 32, 32) standardised with the
    training set's mean and std, int64 labels; a stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    images = np.kron(images, np.ones((1, 3, 3), np.float32))          # 8x8 -> 24x24
    images = np.pad(images, [(0, 0), (4, 4), (4, 4)])[:, None]        # -> 1x32x32
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype(np.int64), test_size=test_fraction, random_state=seed,
        stratify=digits.target)
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std).astype(np.float32), y_train, \
        ((x_test - mean) / std).astype(np.float32), y_test


def train(epochs: int = 12, batch: int = 32, lr: float = 0.05, momentum: float = 0.9,
          weight_decay: float = 5e-4, shift: int = 2, target: str = "cpu", seed: int = 0,
          progress: bool = True):
    """SGD with momentum and weight decay, the learning rate on a cosine from lr to 0, each batch
    shifted by up to ``shift`` pixels (a cheap augmentation the 1437 training images need).
    Returns (per-step losses, per-epoch mean losses, test accuracy, the TrainingModule)."""
    x_train, y_train, x_test, y_test = load_digits_32(seed=seed)
    model = zoo.build("lenet5", batch=batch, seed=seed)
    optimizer = cnncompile.optim.SGD(lr=lr, momentum=momentum, weight_decay=weight_decay)
    trainer = cnncompile.compile_training(model, loss="cross_entropy", optimizer=optimizer,
                                          input_shapes={"input": (batch, 1, 32, 32)},
                                          target=target, seed=seed)
    rng = np.random.default_rng(seed)
    steps = len(x_train) // batch                 # the step is compiled for one batch size
    losses, epoch_losses = [], []
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        bar = ProgressBar(f"epoch {epoch + 1:2d}/{epochs}", steps, enabled=progress)
        for i in range(steps):
            done = (epoch * steps + i) / (epochs * steps)
            optimizer.lr = lr * 0.5 * (1.0 + math.cos(math.pi * done))
            pick = order[i * batch:(i + 1) * batch]
            images = x_train[pick]
            if shift:
                images = np.roll(images, tuple(rng.integers(-shift, shift + 1, 2)), axis=(2, 3))
            losses.append(trainer.step(images, y_train[pick]))
            bar.update(i + 1, f"loss {np.mean(losses[-(i + 1):]):.4f}")
        epoch_losses.append(float(np.mean(losses[-steps:])))
        bar.close(f"loss {epoch_losses[-1]:.4f}")
    predictions = trainer.predict(x_test).argmax(axis=1)
    accuracy = float(np.mean(predictions == y_test))
    return losses, epoch_losses, accuracy, trainer


class ProgressBar:
    """One line on stderr, redrawn in place: 'epoch  3/15 [#########.........] 12/44 loss 0.31'."""

    def __init__(self, title: str, total: int, width: int = 28, enabled: bool = True):
        self.title, self.total, self.width, self.enabled = title, total, width, enabled
        # redrawing in place only makes sense on a terminal; a log gets one line per epoch
        self.live = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        if not self.live:
            return
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r{self.title} [{bar}] {done}/{self.total} {note}")
        sys.stderr.flush()

    def close(self, note: str = "") -> None:
        if self.enabled:
            self.live = True
            self.update(self.total, f"{note} ({time.perf_counter() - self.start:.1f}s)\n")


# ---- a loss curve as a PNG, without matplotlib ---------------------------------------------------
# 3x5 bitmaps of the characters the axis labels need, one row of three bits per line
GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "e": "000111111100111",
    "p": "000111101111100", "o": "000111101101111", "c": "000111100100111",
    "h": "100100111101101", "l": "110010010010111", "s": "000111110011111",
    " ": "000000000000000", "-": "000000111000000",
}


def write_png(path: str, pixels: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as a PNG: signature, IHDR, one zlib IDAT, IEND."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def _text(img: np.ndarray, x: int, y: int, text: str, scale: int = 2, color=(60, 60, 60)) -> None:
    for k, char in enumerate(text):
        bits = GLYPHS.get(char, GLYPHS[" "])
        for i, bit in enumerate(bits):
            if bit == "1":
                top = y + (i // 3) * scale
                left = x + (k * 4 + i % 3) * scale
                img[top:top + scale, left:left + scale] = color


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, steps)).astype(int)
    ys = np.rint(np.linspace(y0, y1, steps)).astype(int)
    for dy in (0, 1):  # two pixels thick
        img[np.clip(ys + dy, 0, img.shape[0] - 1), np.clip(xs, 0, img.shape[1] - 1)] = color


def plot_losses(path: str, losses, epoch_losses, width: int = 640, height: int = 360) -> None:
    """Per-step loss (light) and per-epoch mean (dark) on a log scale, epochs along x."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, width - 20, 34, height - 44
    values = np.log10(np.maximum(np.asarray(losses, np.float64), 1e-6))
    low, high = np.floor(values.min()), np.ceil(values.max())
    high = max(high, low + 1)

    def to_x(step):
        return left + step / max(len(losses), 1) * (right - left)

    def to_y(v):
        return bottom - (v - low) / (high - low) * (bottom - top)

    for decade in np.arange(low, high):
        for mantissa in (1, 2, 5):
            tick = decade + np.log10(mantissa)
            _line(img, left - 5, to_y(tick), right, to_y(tick), (235, 235, 235))
            _text(img, 4, int(to_y(tick)) - 5, f"{10 ** tick:.3g}")
    _text(img, 4, int(to_y(high)) - 5, f"{10 ** high:.3g}")
    for i in range(1, len(losses)):
        _line(img, to_x(i - 1), to_y(values[i - 1]), to_x(i), to_y(values[i]), (150, 190, 230))
    per_epoch = len(losses) / max(len(epoch_losses), 1)
    points = [(to_x((e + 0.5) * per_epoch), to_y(np.log10(max(v, 1e-6))))
              for e, v in enumerate(epoch_losses)]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        _line(img, x0, y0, x1, y1, (20, 60, 160))
    label_every = max(1, len(epoch_losses) // 5)
    for e in range(len(epoch_losses) + 1):
        x = to_x(e * per_epoch)
        _line(img, x, bottom, x, bottom + 4, (0, 0, 0))
        if e % label_every == 0:
            _text(img, int(x) - 4 * len(str(e)) + 1, bottom + 10, str(e))
    _line(img, left, bottom, right, bottom, (0, 0, 0))
    _line(img, left, top - 10, left, bottom, (0, 0, 0))
    _text(img, (left + right) // 2 - 24, bottom + 26, "epochs")
    _text(img, 4, 6, "loss")
    write_png(path, img)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--target", default="cpu", choices=["cpu", "reference"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="loss_curve.png", metavar="PNG",
                        help="where to write the loss curve ('' for none)")
    parser.add_argument("--export", default="", metavar="ONNX",
                        help="also write the trained model there")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    losses, epoch_losses, accuracy, trainer = train(args.epochs, args.batch, args.lr,
                                                    target=args.target, seed=args.seed)
    seconds = time.perf_counter() - start
    print(f"{len(losses)} steps of batch {args.batch} in {seconds:.1f}s "
          f"(compile included), final epoch loss {epoch_losses[-1]:.4f}")
    if args.plot:
        plot_losses(args.plot, losses, epoch_losses)
        print(f"loss curve: {os.path.abspath(args.plot)}")
    if args.export:
        trainer.export(args.export)
        print(f"trained model: {os.path.abspath(args.export)}")
    print(f"test accuracy: {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
