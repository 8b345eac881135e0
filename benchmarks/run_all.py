"""The benchmark behind docs/BENCHMARKS.md: six zoo models at batch 1 and 8, against onnxruntime.

    .venv/bin/python benchmarks/run_all.py --update-doc docs/BENCHMARKS.md

For every model and batch: cnncompile (target cpu, opt-level 2) and onnxruntime (2 threads) timed
in one process in alternating blocks (cnncompile.bench), the per-layer profile and the layers that
lose the most time against the machine's GEMM ceiling, and the compile time cold (a fresh
NUMBA_CACHE_DIR, in a new process) and warm (a second process on that cache). First the harness
validates itself: onnxruntime against a second onnxruntime session must read ~1.00.

Writes benchmarks/results/latest.json and latest.md; --update-doc replaces the part of the doc
between its "run_all:begin" and "run_all:end" markers with latest.md. Takes 10-20 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from cnncompile import bench, zoo  # noqa: E402

#: model -> image size (the issue's sizes: 224x224, U-Net 256x256)
MODELS = {"resnet18": 224, "resnet50": 224, "mobilenetv2": 224, "vgg11": 224, "squeezenet": 224,
          "unet": 256}
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
            "dirty": bool(dirty), "dirty_files": dirty}


def compile_times(model: str, batch: int, image_size: int) -> dict:
    """Cold: a new process with an empty Numba cache; warm: a second process on that cache."""
    script = os.path.join(HERE, "compile_time.py")
    result = {}
    with tempfile.TemporaryDirectory(prefix="cnncompile-numba-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, CNNCOMPILE_PROGRESS="0")
        for kind in ("cold", "warm"):
            proc = subprocess.run([sys.executable, script, model, "--batch", str(batch),
                                   "--image-size", str(image_size)], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"compile_time.py {model} failed:\n{proc.stderr}")
            result[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def why_behind(entry: dict, count: int = 2) -> str:
    """The layers losing the most time against the GEMM ceiling, as a short table cell."""
    parts = []
    for r in bench.worst_layers(entry.get("layers", []), count):
        what = r["algorithm"] or r["op"]
        if r["impl"] == bench.REFERENCE:
            what += ", NumPy ref"
        pct = f", {r['pct_ceiling']:.0f}% of ceiling" if r["pct_ceiling"] is not None else ""
        parts.append(f"`{r['name']}` ({what}) {r['ms']:.1f} ms{pct}")
    return "; ".join(parts)


def load_range(results: dict) -> str:
    loads = [results["machine"].get("load_average")]
    loads += [row.get("load_average") for row in results["rows"]]
    loads = [x for x in loads if x is not None]
    return f"{min(loads):.1f} .. {max(loads):.1f}" if loads else "unknown"


def load_note(results: dict) -> str:
    loads = [row.get("load_average") or 0.0 for row in results["rows"]]
    if max(loads, default=0.0) > (results["machine"]["cores"] or 1):
        return "above the core count other work shared the machine: noisy, slower numbers"
    return "the benchmark's own threads count; nothing else competed for long"


def markdown(results: dict) -> str:
    m = results["machine"]
    g = results["git"]
    dirty = g["dirty_files"]
    listed = f" ({', '.join(dirty)})" if len(dirty) <= 5 else ""
    state = f"`{g['commit']}`" + (f" + uncommitted changes in {len(dirty)} files{listed}"
                                  if g["dirty"] else " (clean tree)")
    check = results["self_check"]
    lines = [f"Measured {results['date']} by `{results['command']}` (took "
             f"{results['seconds'] / 60:.0f} min).", "",
             f"- machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, NumPy "
             f"{m['numpy']} with {m['blas']}; onnxruntime {results['onnxruntime']}",
             f"- GEMM ceiling: {m['gemm_ceiling_gflops']:.0f} GFLOP/s (np.matmul 2048^3 float32, "
             "fastest of 5)",
             f"- kernel state: {state}",
             f"- load: 1-minute load average {load_range(results)} on {m['cores']} cores while "
             f"measuring ({load_note(results)})",
             f"- timing: {results['runs']} timed runs per engine at most ({results['budget_s']:g}"
             f" s each at most, 5 at least) in {results['blocks']} alternating blocks, "
             f"{results['warmup']} warm-up calls per block; {results['threads']} threads for "
             "every engine", "",
             "Harness self-check (onnxruntime against a second onnxruntime session, same method): "
             f"ratio of medians **{check['ratio']:.3f}** on ResNet-18 batch 1 ({check['runs']} runs"
             f" each); per-block ratios {check['block_ratio_min']:.2f} .. "
             f"{check['block_ratio_max']:.2f}; p90/median {check['a']['spread']:.2f} and "
             f"{check['b']['spread']:.2f}.", "",
             "| model | input | GFLOP | cnncompile ms | onnxruntime ms | cnncompile / ORT | "
             "PyTorch eager ms | cnncompile / PyTorch | compile cold / warm s | NumPy-ref nodes | "
             "where the time goes (worst layers vs GEMM ceiling) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results["rows"]:
        ours, theirs = row["engines"]["cnncompile"], row["engines"]["onnxruntime"]
        ratio = row["ratios"]["onnxruntime"]["latency_ratio"]
        verdict = f"**{ratio:.2f}**" if ratio <= 1 else f"{ratio:.2f}"
        torch_ms, torch_ratio = "-", row.get("skipped", {}).get("torch", "-")[:60]
        if "torch" in row["engines"]:
            torch_ms = f"{row['engines']['torch']['median_ms']:.1f}"
            value = row["ratios"]["torch"]["latency_ratio"]
            torch_ratio = f"**{value:.2f}**" if value <= 1 else f"{value:.2f}"
        ct = row["compile"]
        lines.append(
            f"| {row['model']} | {row['batch']}x{row['image_size']}x{row['image_size']} | "
            f"{row['gflop']:.2f} | {ours['median_ms']:.1f} (p90 {ours['p90_ms']:.1f}) | "
            f"{theirs['median_ms']:.1f} (p90 {theirs['p90_ms']:.1f}) | {verdict} | "
            f"{torch_ms} | {torch_ratio} | "
            f"{ct['cold']['compile_with_jit_s']:.1f} / {ct['warm']['compile_with_jit_s']:.1f} | "
            f"{row['reference_nodes']}/{row['nodes']} | {why_behind(row)} |")
    for row in results["failed"]:
        lines.append(f"| {row['model']} | {row['batch']}x{row['image_size']}x{row['image_size']} "
                     f"| | failed | | | | | | | {row['error'][:200]} |")
    cold_import = max((r["compile"]["cold"]["import_s"] for r in results["rows"]), default=0.0)
    lines += ["", "cnncompile / ORT is the ratio of median latencies: below 1 cnncompile is "
              "faster; cnncompile / PyTorch likewise, against PyTorch eager (one "
              "torch.nn.functional call per node of the imported graph, `inference_mode`, "
              "cnncompile/backends/torch_eager.py), timed in the same alternating blocks. Compile times are `cnncompile.compile` plus the first call's extra time "
              "over a steady call (zero once the backend compiles its kernels at compile time), "
              f"without importing cnncompile (at most {cold_import:.1f} s cold).", ""]
    lines.append("Worst layers per model and batch (time beyond what the GEMM ceiling needs for "
                 "their FLOPs):")
    lines.append("")
    for row in results["rows"]:
        worst = bench.worst_layers(row.get("layers", []), 5)
        cells = []
        for r in worst:
            pct = f"{r['pct_ceiling']:.0f}%" if r["pct_ceiling"] is not None else "-"
            cells.append(f"`{r['name']}` {r['op']}/{r['algorithm'] or '-'} "
                         f"{'NumPy ref' if r['impl'] == bench.REFERENCE else r['impl']} "
                         f"{r['ms']:.2f} ms ({pct})")
        lines.append(f"- {row['model']} b{row['batch']}: layers sum to {row['layer_sum_ms']:.1f} "
                     f"ms (the whole run beside them: {row['profile_run_ms']:.1f} ms); "
                     + "; ".join(cells))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated zoo names (default: the six of the table)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per engine at most")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="seconds of timed runs per engine and batch at most")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, help="override every model's image size "
                        "(a quick check of the script; the table uses the models' own)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--update-doc", metavar="FILE", help="replace the generated part of FILE")
    parser.add_argument("--render", metavar="JSON",
                        help="measure nothing: write the markdown of an earlier latest.json")
    args = parser.parse_args()
    if args.render:
        with open(args.render, encoding="utf-8") as f:
            text = markdown(json.load(f))
        if args.update_doc:
            update_doc(args.update_doc, text)
        print(text)
        return

    import onnxruntime

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    compare = ["onnxruntime"]
    if importlib.util.find_spec("torch") is not None:
        compare.append("torch")
    batches = [int(b) for b in args.batches.split(",")]
    started = time.time()

    def log(text: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {text}", file=sys.stderr, flush=True)

    results = {"date": datetime.date.today().isoformat(),
               "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
               "git": git_state(), "machine": bench.machine_info(),
               "onnxruntime": onnxruntime.__version__, "runs": args.runs,
               "budget_s": args.budget, "warmup": args.warmup, "blocks": args.blocks,
               "threads": args.threads, "rows": [], "failed": []}
    log("harness self-check on resnet18")
    check_model = zoo.build("resnet18", image_size=args.image_size or MODELS["resnet18"])
    results["self_check"] = bench.self_check(check_model, batch=1, runs=args.runs,
                                             warmup=args.warmup, blocks=args.blocks,
                                             threads=args.threads)
    for name in models:
        size = args.image_size or MODELS.get(name) or zoo.default_image_size(name)
        proto = zoo.build(name, image_size=size)
        for batch in batches:
            log(f"{name} batch {batch}: compile times (cold, warm)")
            try:
                compile = compile_times(name, batch, size)
                log(f"{name} batch {batch}: timing")
                report = bench.bench_model(proto, batches=[batch], compare=compare,
                                           per_layer=True, runs=args.runs, warmup=args.warmup,
                                           blocks=args.blocks, threads=args.threads,
                                           budget_s=args.budget, model_name=name)
            except Exception as exc:  # a model that fails stays in the table, with its error
                log(f"{name} batch {batch}: FAILED {type(exc).__name__}: {exc}")
                results["failed"].append({"model": name, "batch": batch, "image_size": size,
                                          "error": f"{type(exc).__name__}: {exc}"})
                continue
            entry = report["batches"][0]
            entry.update(model=name, image_size=size, compile=compile)
            results["rows"].append(entry)
            ratio = entry["ratios"]["onnxruntime"]["latency_ratio"]
            log(f"{name} batch {batch}: cnncompile "
                f"{entry['engines']['cnncompile']['median_ms']:.1f} ms, onnxruntime "
                f"{entry['engines']['onnxruntime']['median_ms']:.1f} ms, ratio {ratio:.2f}"
                + (f", PyTorch {entry['engines']['torch']['median_ms']:.1f} ms"
                   if "torch" in entry["engines"] else ""))
    results["peak_rss_bytes"] = bench.peak_rss_bytes()
    results["seconds"] = time.time() - started
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    text = markdown(results)
    with open(os.path.join(args.out, "latest.md"), "w", encoding="utf-8") as f:
        f.write(text)
    if args.update_doc:
        update_doc(args.update_doc, text)
    print(text)


def update_doc(path: str, text: str) -> None:
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers to replace")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{text}{END}{tail}")


if __name__ == "__main__":
    main()
