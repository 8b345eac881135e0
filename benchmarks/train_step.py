"""One training step (forward + backward + SGD update) of ResNet-18, cnncompile vs PyTorch eager.

    .venv/bin/python benchmarks/train_step.py                       # batch 8, 112x112
    .venv/bin/python benchmarks/train_step.py --update-doc docs/BENCHMARKS.md

cnncompile (targets cpu and reference) and PyTorch train the same network from the same weights:
the zoo's ResNet-18 (ONNX) compiled by cnncompile.compile_training, and the same architecture
written in torch.nn.functional with the zoo's initializers loaded into it; cross-entropy loss, SGD
with momentum 0.9 and weight decay. Before timing, the first step's loss and gradients of the two
are compared, so that the timings are of the same computation. Steps are timed in alternating
blocks in one process (cnncompile.bench); each engine's figure is the median step. Every engine
gets the same number of threads (--threads, default the machine's cores): PyTorch's intra-op pool,
Numba's and NumPy's BLAS.

--update-doc writes the result under the "Training step" heading at the end of the doc (between
the markers train_step:begin / train_step:end), leaving the rest of the file alone.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import cnncompile  # noqa: E402
from cnncompile import bench, zoo  # noqa: E402

BEGIN, END = "<!-- train_step:begin -->", "<!-- train_step:end -->"
HEADING = "## Training step"
WIDTH = 100
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4


def torch_resnet18(weights: dict):
    """ResNet-18 in torch.nn.functional over the zoo's initializers (torchvision's names)."""
    import torch
    import torch.nn.functional as F

    params = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()
              if not k.endswith(("running_mean", "running_var"))}
    buffers = {k: torch.tensor(v) for k, v in weights.items()
               if k.endswith(("running_mean", "running_var"))}

    def bn(x, name):
        return F.batch_norm(x, buffers[f"{name}.running_mean"], buffers[f"{name}.running_var"],
                            params[f"{name}.weight"], params[f"{name}.bias"], training=True,
                            momentum=0.1, eps=1e-5)

    def conv(x, name, stride=1, padding=None):
        weight = params[f"{name}.weight"]
        pad = weight.shape[-1] // 2 if padding is None else padding
        return F.conv2d(x, weight, params.get(f"{name}.bias"), stride=stride, padding=pad)

    def block(x, name, stride):
        out = F.relu(bn(conv(x, f"{name}.conv1", stride), f"{name}.bn1"))
        out = bn(conv(out, f"{name}.conv2"), f"{name}.bn2")
        if f"{name}.downsample.0.weight" in params:
            x = bn(conv(x, f"{name}.downsample.0", stride, 0), f"{name}.downsample.1")
        return F.relu(out + x)

    def forward(x):
        x = F.relu(bn(conv(x, "conv1", 2, 3), "bn1"))
        x = F.max_pool2d(x, 3, 2, 1)
        for stage in range(1, 5):
            for i in range(2):
                x = block(x, f"layer{stage}.{i}", 2 if stage > 1 and i == 0 else 1)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.linear(x, params["fc.weight"], params["fc.bias"])

    return forward, params


def run(batch: int, image_size: int, targets: list[str], runs: int, blocks: int,
        threads: int) -> dict:
    import numba
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    model = zoo.build("resnet18", batch=batch, image_size=image_size)
    weights = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    labels = rng.integers(0, 1000, batch)

    forward, params = torch_resnet18(weights)
    optimizer = torch.optim.SGD(params.values(), lr=LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    xt, yt = torch.tensor(x), torch.tensor(labels)
    optimizer.zero_grad()
    loss = F.cross_entropy(forward(xt), yt)
    loss.backward()
    reference_grads = {k: p.grad.numpy().copy() for k, p in params.items()}

    def torch_step():
        optimizer.zero_grad()
        loss = F.cross_entropy(forward(xt), yt)
        loss.backward()
        optimizer.step()
        return loss.item()

    engines, compiled = {}, {}
    for target in targets:
        start = time.perf_counter()
        trainer = cnncompile.compile_training(
            model, loss="cross_entropy", target=target,
            optimizer=cnncompile.optim.SGD(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
            input_shapes={"input": (batch, 3, image_size, image_size)})
        seconds = time.perf_counter() - start
        # the same computation: first-step loss and gradients agree before anything is timed
        grads = trainer.gradients(x, labels)
        worst = max(bench.rel_l2(grads[k], g) for k, g in reference_grads.items())
        graph = trainer.module.graph
        compiled[target] = {
            "compile_seconds": seconds, "loss": trainer.loss(x, labels), "max_grad_rel_l2": worst,
            "nodes": len(graph.nodes),
            "arena_bytes": getattr(graph.meta.get("memory_plan"), "arena_bytes", None)}
        engines[f"cnncompile {target}"] = lambda trainer=trainer: trainer.step(x, labels)
    engines["pytorch"] = torch_step
    with bench.blas_threads(threads):
        timings = bench.time_alternating(engines, runs=runs, warmup=1, blocks=blocks)
    return {"batch": batch, "image_size": image_size, "threads": threads,
            "torch": torch.__version__, "torch_loss": loss.item(), "compiled": compiled,
            "median_s": {k: t.median for k, t in timings.items()},
            "spread": {k: t.spread for k, t in timings.items()},
            "runs": runs, "machine": bench.machine_info()}


def markdown(r: dict, command: str) -> str:
    m = r["machine"]
    theirs = r["median_s"]["pytorch"]
    rows = []
    for target, c in r["compiled"].items():
        ours = r["median_s"][f"cnncompile {target}"]
        rows.append(f"| cnncompile, target {target} | {ours * 1e3:.0f} ms | "
                    f"{r['spread'][f'cnncompile {target}']:.2f} | {ours / theirs:.2f}x |")
    rows.append(f"| PyTorch eager | {theirs * 1e3:.0f} ms | {r['spread']['pytorch']:.2f} | 1x |")
    notes = []
    for target, c in r["compiled"].items():
        arena = c["arena_bytes"]
        arena_text = f", a {arena / 2 ** 20:.0f} MiB arena" if arena else ""
        notes.append(f"target {target}: compiled in {c['compile_seconds']:.1f} s "
                     f"({c['nodes']} nodes after the pass pipeline{arena_text}); first-step loss "
                     f"{c['loss']:.5f} (PyTorch {r['torch_loss']:.5f}), largest relative L2 "
                     f"difference of a parameter gradient from PyTorch's "
                     f"{c['max_grad_rel_l2']:.1e}")
    intro = textwrap.fill(
        f"Measured {r['date']} by `{command}`: ResNet-18, batch {r['batch']}, "
        f"{r['image_size']}x{r['image_size']}, cross-entropy, SGD (momentum {MOMENTUM}, weight "
        f"decay {WEIGHT_DECAY}); one step = forward + backward + update; median of {r['runs']} "
        f"steps per engine, timed alternately in one process. Machine: {m['cpu']}, {m['cores']} "
        f"cores, {r['threads']} thread(s) per engine, NumPy {m['numpy']}, PyTorch "
        f"{r['torch']}.", WIDTH, break_on_hyphens=False)
    return "\n".join([
        intro,
        "",
        "| engine | step (median) | p90 / median | vs PyTorch |",
        "| --- | ---: | ---: | ---: |",
        *rows,
        "",
        *[textwrap.fill(f"- {n}.", WIDTH, subsequent_indent="  ", break_on_hyphens=False)
          for n in notes],
    ])


def update_doc(path: str, text: str) -> None:
    section = f"{BEGIN}\n{text}\n{END}"
    doc = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + section + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + f"\n\n{HEADING}\n\n{section}\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--targets", default="cpu,reference",
                        help="comma-separated cnncompile targets to time (default: cpu,reference)")
    parser.add_argument("--runs", type=int, default=10, help="timed steps per engine")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for every engine: PyTorch's, Numba's and NumPy's BLAS "
                             "(default: the machine's cores)")
    parser.add_argument("--update-doc", metavar="MD", help="write the section into this file")
    args = parser.parse_args(argv)
    result = run(args.batch, args.image_size, args.targets.split(","), args.runs, args.blocks,
                 args.threads)
    result["date"] = datetime.date.today().isoformat()
    command = "benchmarks/train_step.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    command = command.replace(f" --update-doc {args.update_doc}", "") if args.update_doc \
        else command
    text = markdown(result, command)
    print(text)
    if args.update_doc:
        update_doc(args.update_doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
