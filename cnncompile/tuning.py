"""The autotuning cache: one JSON file of measured decisions, so a second tune times nothing.

The file is ``$XDG_CACHE_HOME/cnncompile/tuning.json`` (``~/.cache/...``) unless the environment
variable CNNCOMPILE_TUNING_CACHE names another. Each entry is filed under the SHA-1 of its key,
and keeps the key itself so that the file can be read:

    {"format": 1, "entries": {"3f2a...": {
        "key": {"op": "FusedConv", "inputs": [[1, 64, 56, 56], [64, 64, 3, 3], [64]],
                "outputs": [[1, 64, 56, 56]], "attrs": {...}, "layout": "", "dtype": "float32",
                "cpu": "skylake-avx512", "cpu_features": "5e0b9c1a42d7e3f0", "threads": 2,
                "version": "0.1.0"},
        "algorithm": "winograd_f2x2_3x3",
        "candidates": {"im2col_gemm": {"ms": 1.92, "rel_err": 2.1e-07}, ...},
        "tuned_at": "2025-01-31T10:02:11"}}}

A decision holds for one machine (CPU name and feature set), thread count and cnncompile version
only: the key changes with any of them. Writes merge with what another process wrote meanwhile
and replace the file atomically; an unreadable file counts as empty and is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from functools import lru_cache

import numpy as np

FORMAT = 1
ENV = "CNNCOMPILE_TUNING_CACHE"


def cache_path() -> str:
    if os.environ.get(ENV):
        return os.path.expanduser(os.environ[ENV])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "cnncompile", "tuning.json")


@lru_cache(maxsize=1)
def cpu_identity() -> tuple[str, str]:
    """(LLVM's name of the host CPU, a digest of its feature flags)."""
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features().flatten()
    enabled = ",".join(sorted(f for f in features.split(",") if f.startswith("+")))
    return llvm.get_host_cpu_name(), hashlib.sha1(enabled.encode()).hexdigest()[:16]


def _plain(value):
    """Attribute values as JSON (arrays by their type and a digest: a key, not a copy)."""
    if isinstance(value, np.ndarray):
        digest = hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
        return f"array {value.dtype}{list(value.shape)} {digest}"
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def tuning_key(node, threads: int | None = None) -> dict:
    """What a measured decision depends on: the op, every input and output shape, the attributes
    and layout, the dtype, the CPU, the thread count and the cnncompile version."""
    from . import __version__

    if threads is None:
        import numba
        threads = numba.get_num_threads()
    cpu, features = cpu_identity()
    return {
        "op": node.op,
        "inputs": [None if v is None else list(v.type.shape) for v in node.inputs],
        "outputs": [list(v.type.shape) for v in node.outputs],
        "attrs": _plain(node.attrs),
        "layout": node.annotations.get("layout", ""),
        "dtype": node.inputs[0].type.dtype.name,
        "cpu": cpu,
        "cpu_features": features,
        "threads": int(threads),
        "version": __version__,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _dumps(entries: dict[str, dict]) -> str:
    """The file's text: one entry per line, so that it can be read and diffed."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
             for k, v in sorted(entries.items())]
    return '{"format": %d, "entries": {\n%s\n}}\n' % (FORMAT, ",\n".join(lines))


class TuningCache:
    """The decisions in one JSON file; ``get`` and ``put`` take a key from ``tuning_key``."""

    def __init__(self, path: str | None = None):
        self.path = path or cache_path()
        self.entries: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return {}
        entries = doc.get("entries")
        return dict(entries) if isinstance(entries, dict) else {}

    def get(self, key: dict) -> dict | None:
        entry = self.entries.get(key_digest(key))
        if not isinstance(entry, dict) or entry.get("key") != key or "algorithm" not in entry:
            return None
        return entry

    def put(self, key: dict, algorithm: str, candidates: dict[str, dict]) -> dict:
        entry = {"key": key, "algorithm": algorithm, "candidates": candidates,
                 "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.entries[key_digest(key)] = entry
        return entry

    def save(self) -> None:
        """Merge with the file as it is now and replace it in one step. A cache that cannot be
        written (read-only home) only costs a later re-tune, so that is not an error."""
        folder = os.path.dirname(os.path.abspath(self.path))
        temp = None
        try:
            os.makedirs(folder, exist_ok=True)
            merged = self._read()
            merged.update(self.entries)
            handle, temp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=folder)
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                f.write(_dumps(merged))
            os.replace(temp, self.path)
            temp = None
            self.entries = merged
        except OSError:
            pass
        finally:
            if temp is not None and os.path.exists(temp):
                os.remove(temp)

    def __len__(self) -> int:
        return len(self.entries)
