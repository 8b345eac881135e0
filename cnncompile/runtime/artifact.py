"""The compiled artifact: ``cnncompile.save(module, DIR)`` and ``cnncompile compile MODEL -o DIR``
write it, ``cnncompile.load(DIR)`` runs it again without the model, the importer or the passes.

DIR holds no pickles:

    module.py       the generated source (``Module.source``): kernel imports, the arena, run()
    constants.npz   the arrays it binds by name (weights, pre-packed and transformed weights)
    graph.json      the signature (inputs and outputs with dtypes and shapes), target, opset,
                    cnncompile version, the memory plan's totals and how each constant is stored
    graph.txt       the optimized IR as text, for people (``load`` does not read it)

``load`` execs module.py with the constants through the CPU backend's own loader, so the loaded
module runs the same code on the same arrays as the one that was saved: bit-identical outputs.
The artifact belongs to the cnncompile version that wrote it (the kernels it imports may change
between versions), and ``load`` refuses any other.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from ..errors import UserError
from ..ir.graph import Graph, Value
from ..ir.types import TensorType
from .module import Module

FORMAT = 1
SOURCE, CONSTANTS, SIGNATURE, IR_TEXT = "module.py", "constants.npz", "graph.json", "graph.txt"
REQUIRED = (SOURCE, CONSTANTS, SIGNATURE)


def save(module: Module, path: str | os.PathLike, ir_text: bool = True) -> str:
    """Write ``module`` (compiled for target "cpu") to the folder ``path``; returns the folder."""
    from .. import __version__

    generated = getattr(module.executor, "generated", None)
    if generated is None or module.source is None:
        raise UserError(f"only modules compiled for target 'cpu' can be saved; this one is for "
                        f"target '{module.target}' (compile with target='cpu')")
    folder = os.fspath(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"cannot save the compiled module to {folder}: it is a file, not a folder")
    graph = module.graph
    arrays, stored = {}, {}
    for name, array in generated.constants.items():
        arrays[name], stored[name] = _storable(np.asarray(array))
    doc = {
        "format": FORMAT,
        "cnncompile_version": __version__,
        "name": graph.name,
        "target": module.target,
        "opset": graph.opset,
        "layout": graph.meta.get("layout"),
        "filename": generated.filename,
        "inputs": [_signature(v) for v in graph.inputs],
        "outputs": [_signature(v) for v in graph.outputs],
        "memory_plan": (_plan_summary(graph.meta.get("memory_plan"))
                        or graph.meta.get("memory_plan_summary")),  # a loaded module's
        "constants": {"count": len(arrays), "bytes": int(sum(a.nbytes for a in arrays.values())),
                      "stored_as": {k: v for k, v in stored.items() if v is not None}},
    }
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, SOURCE), "w", encoding="utf-8") as f:
            f.write(generated.source)
        _write_npz(os.path.join(folder, CONSTANTS), arrays)
        with open(os.path.join(folder, SIGNATURE), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        if ir_text and graph.nodes:
            with open(os.path.join(folder, IR_TEXT), "w", encoding="utf-8") as f:
                f.write(str(graph) + "\n")
    except OSError as exc:
        raise UserError(f"cannot save the compiled module to {folder}: "
                        f"{exc.strerror or exc}") from None
    return folder


def load(path: str | os.PathLike, threads: int | None = None) -> Module:
    """The module saved in folder ``path``, ready to run (its kernels compiled or loaded from
    Numba's cache now, not on the first call)."""
    from .. import __version__
    from ..backends.cpu.backend import CpuBackend
    from ..backends.cpu.codegen import GeneratedModule

    folder = os.fspath(path)
    hint = "write it again with 'cnncompile compile MODEL -o DIR' or cnncompile.save(module, DIR)"
    if not os.path.isdir(folder):
        raise UserError(f"cannot load a compiled module from {folder}: no such folder; {hint}")
    missing = [name for name in REQUIRED if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(f"cannot load a compiled module from {folder}: {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing (a compiled module is "
                        f"{', '.join(REQUIRED)}); {hint}")
    doc = _read_json(os.path.join(folder, SIGNATURE), hint)
    if doc.get("format") != FORMAT or "cnncompile_version" not in doc:
        raise UserError(f"{os.path.join(folder, SIGNATURE)} is not a compiled-module signature "
                        f"of format {FORMAT}; {hint}")
    if doc["cnncompile_version"] != __version__:
        raise UserError(f"{folder} was compiled by cnncompile {doc['cnncompile_version']}, but "
                        f"this is cnncompile {__version__}; the generated code calls kernels "
                        f"that may have changed, so recompile the model with this version "
                        f"('cnncompile compile MODEL -o {folder}')")
    if doc.get("target") != "cpu":
        raise UserError(f"{folder}: target '{doc.get('target')}' cannot be loaded (only 'cpu')")
    try:
        with open(os.path.join(folder, SOURCE), encoding="utf-8") as f:
            source = f.read()
        with np.load(os.path.join(folder, CONSTANTS), allow_pickle=False) as archive:
            constants = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a compiled module from {folder}: {exc}; {hint}") from None
    stored = doc.get("constants", {}).get("stored_as", {})
    for name, dtype in stored.items():
        if name in constants:
            constants[name] = constants[name].view(_dtype(dtype, folder))
    graph = _signature_graph(doc, folder)
    filename = doc.get("filename") or f"<cnncompile-generated {graph.name} (loaded)>"
    generated = GeneratedModule(source, constants, filename)
    try:
        backend = CpuBackend.from_generated(graph, generated, threads=threads)
    except (SyntaxError, KeyError, ImportError, NameError) as exc:
        raise UserError(f"{os.path.join(folder, SOURCE)} does not run with its constants "
                        f"({type(exc).__name__}: {exc}); {hint}") from None
    return Module(graph, backend, "cpu")


# ---- helpers -------------------------------------------------------------------------------------
def _signature(value: Value) -> dict:
    return {"name": value.name, "dtype": value.type.dtype.name, "shape": list(value.type.shape)}


def _plan_summary(plan) -> dict | None:
    if plan is None:
        return None
    return {"arena_bytes": plan.arena_bytes, "lower_bound_bytes": plan.lower_bound_bytes,
            "naive_bytes": plan.naive_bytes, "tensors": len(plan.tensors),
            "in_place": plan.in_place_count, "elided_concats": plan.elided_concats,
            "summary": plan.summary()}


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """numpy.savez without its keyword clashes (a constant could be named 'file')."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)


def _storable(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """An array .npy stores without a pickle, and the dtype to view it as again (None: its own).
    ml_dtypes' types (bfloat16, float8...) are written as unsigned integers of their width."""
    if array.dtype.kind == "O":
        raise UserError("a constant of dtype object cannot be saved without a pickle")
    if np.dtype(array.dtype.str) == array.dtype:
        return array, None
    raw = np.ascontiguousarray(array).view(np.dtype(f"u{array.dtype.itemsize}"))
    return raw, array.dtype.name


def _dtype(name: str, folder: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes
        if hasattr(ml_dtypes, name):
            return np.dtype(getattr(ml_dtypes, name))
        raise UserError(f"{folder}: unknown dtype '{name}' in {SIGNATURE}") from None


def _read_json(path: str, hint: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}; {hint}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a JSON object; {hint}")
    return doc


def _signature_graph(doc: dict, folder: str) -> Graph:
    """A graph with the saved inputs and outputs and no nodes: what Module checks inputs against
    and names outputs by."""
    graph = Graph(doc.get("name", "loaded"), int(doc.get("opset", 0)))
    graph.meta = {"target": "cpu", "layout": doc.get("layout"), "artifact": folder,
                  "memory_plan_summary": doc.get("memory_plan")}
    try:
        for entry in doc["inputs"]:
            graph.add_input(entry["name"], _type(entry, folder))
        by_name = {v.name: v for v in graph.inputs}
        for entry in doc["outputs"]:
            graph.outputs.append(by_name.get(entry["name"])
                                 or Value(entry["name"], _type(entry, folder)))
    except (KeyError, TypeError) as exc:
        raise UserError(f"{os.path.join(folder, SIGNATURE)}: inputs/outputs are malformed "
                        f"({exc!r})") from None
    return graph


def _type(entry: dict, folder: str) -> TensorType:
    return TensorType(_dtype(entry["dtype"], folder), tuple(entry["shape"]))
