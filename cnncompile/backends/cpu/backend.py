"""The CPU backend: generated Python calling Numba kernels on views of one preallocated arena."""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import re
import sys
import threading
import warnings

import numpy as np

from ...ir.graph import Graph
from .codegen import GeneratedModule, generate, load_generated
from .emitters import emit_node
from .threads import thread_limit


class CpuBackend:
    """A compiled graph's generated module. ``reuse_outputs``: every run writes its outputs into
    the same arrays (a caller that consumes them before the next run, like the training step,
    saves allocating them: fresh pages cost a fault each on first write, measured 2-3x on a
    weight gradient kernel of ResNet-18's training step)."""

    name = "cpu"
    preferred_layout = "NCHW"
    reuse_outputs = False
    _outs = None

    def __init__(self, graph: Graph, threads: int | None = None, warm_up: bool = True):
        self.graph = graph
        self.threads = threads
        self.generated = load_generated(generate(graph, emit_node))
        self._run = self.generated.run
        # One arena per module: runs of the same module must not overlap.
        self._lock = threading.Lock()
        self.warm_up_error: Exception | None = None
        if warm_up:
            self.warm_up()

    @classmethod
    def from_generated(cls, graph: Graph, generated: GeneratedModule,
                       threads: int | None = None, warm_up: bool = True) -> "CpuBackend":
        self = cls.__new__(cls)
        self.graph, self.threads = graph, threads
        self.generated = load_generated(generated)
        self._run = self.generated.run
        self._lock = threading.Lock()
        self.warm_up_error = None
        if warm_up:
            self.warm_up()
        return self

    def warm_up(self, progress: bool = True) -> None:
        """Pay Numba's JIT (or its on-disk cache load) now rather than in the first call: run once
        on zeros, with a progress bar over the kernel calls. Kernels take shapes as arguments, so
        these are the signatures every later call uses. A model that cannot run on zeros (say, an
        index input) skips it; its kernels then compile on the first real call.

        With compile workers (see ``compile_workers``) the first run records the signatures it
        would compile instead, skipping those calls; they compile in parallel, one process per
        kernel function at a time, into Numba's disk cache, and a second run loads them."""
        names = kernel_names(self.generated.namespace)
        total = count_calls(self.generated.source, names)
        if not total or not all(v.type.is_static for v in self.graph.inputs):
            return
        zeros = [np.zeros(v.type.shape, dtype=v.type.dtype) for v in self.graph.inputs]
        if compile_workers() == 0:
            self.warm_up_error = self._counted_run(zeros, names, total, progress)
            return
        recording = SignatureRecorder(self.generated.namespace)
        with recording:
            error = self._counted_run(zeros, names, total, progress, self._call)
        if not recording.skipped:
            self.warm_up_error = error  # every call ran: that was the warm-up
            return
        precompile(recording.jobs(), progress)
        self.warm_up_error = self._counted_run(zeros, names, total, progress)

    def _counted_run(self, zeros, names, total, progress, call=None) -> Exception | None:
        """One run on zeros with a progress bar over its kernel calls; returns its error."""
        from ...runtime.progress import Progress

        namespace = self.generated.namespace
        saved = {name: namespace[name] for name in names}
        bar = Progress("compiling kernels", total, enabled=progress)

        def counted(name, fn):
            label = name[2:] if name.startswith("k_") else name

            def call(*args, **kwargs):
                bar.step(label)
                return fn(*args, **kwargs)
            return call

        # run() reads its kernels as module globals at call time, so swapping them counts calls.
        namespace.update({name: counted(name, fn) for name, fn in saved.items()})
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                (call or self.run)(zeros)
        except Exception as exc:  # noqa: BLE001  (the first real call reports real errors)
            return exc
        finally:
            namespace.update(saved)
            bar.close()
        return None

    def kernel_signatures(self) -> dict:
        """{kernel function name: [Numba signatures]} that a run of this module calls, found
        without compiling anything (calls are skipped, so later kernels see garbage)."""
        zeros = [np.zeros(v.type.shape, dtype=v.type.dtype) for v in self.graph.inputs]
        recording = SignatureRecorder(self.generated.namespace, run=False)
        with recording, warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            self._call(zeros)
        return {f"{d.py_func.__module__}.{d.py_func.__name__}": sigs
                for d, sigs in recording.seen.items()}

    @property
    def source(self) -> str:
        return self.generated.source

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with RUNS.shared():
            return self._call(inputs)

    def _call(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock, thread_limit(self.threads):
            if not self.reuse_outputs:
                return list(self._run(*inputs))
            if self._outs is None:
                self._outs = [np.empty(v.type.shape, v.type.dtype) if v.type.is_static else None
                              for v in self.graph.outputs]
            return list(self._run(*inputs, _outs=self._outs))


KERNEL_PACKAGE = "cnncompile.backends.cpu.kernels"


def kernel_names(namespace: dict) -> list[str]:
    """Globals of a generated module that are kernels (Numba or drivers from the kernels
    package), as opposed to NumPy references and helpers."""
    names = []
    for name, value in namespace.items():
        module = getattr(getattr(value, "py_func", value), "__module__", None) or ""
        if callable(value) and module.startswith(KERNEL_PACKAGE):
            names.append(name)
    return names


def count_calls(source: str, names: list[str]) -> int:
    """Kernel calls in run(): it is straight-line code, so call sites are calls."""
    if not names:
        return 0
    start = re.search(r"^def run\(", source, re.MULTILINE)
    if start is None:
        return 0
    body = source[start.end():]
    end = re.search(r"^def ", body, re.MULTILINE)  # a profiled twin of run may follow it
    body = body if end is None else body[:end.start()]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\(")
    return sum(len(pattern.findall(line)) for line in body.splitlines()
               if not line.lstrip().startswith("#"))


# ---- compiling kernels in parallel -------------------------------------------------------------
# Numba compiles one function at a time per process (a global lock), and a cold ResNet-50 needs a
# dozen parallel kernels of 1-5 s each. So the warm-up records the signatures it needs first and
# hands whole kernel functions to worker processes that fill Numba's disk cache; the main process
# compiles its share meanwhile. Numba writes a function's cache index without a lock, so no two
# processes compile the same function, and saves are serialised anyway (``_lock_cache_saves``)
# for the helpers that several kernels call.

def compile_workers() -> int:
    """Worker processes for a cold compile: CNNCOMPILE_COMPILE_WORKERS, else one per core beyond
    the first (at most 3); 0 compiles everything in this process."""
    setting = os.environ.get("CNNCOMPILE_COMPILE_WORKERS", "").strip()
    if setting.isdigit():
        return int(setting)
    if os.name != "posix":
        return 0
    return max(0, min((os.cpu_count() or 1) - 1, 3))


class RunGate:
    """Runs of compiled modules hold it shared; a warm-up's recording run (which swaps kernels
    process-wide) holds it alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._runs = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._runs += 1
        try:
            yield
        finally:
            with self._cond:
                self._runs -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            while self._exclusive or self._runs:
                self._cond.wait()
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


RUNS = RunGate()


class SignatureRecorder:
    """While active (``with``), every Numba dispatcher a kernel module or the generated module
    holds as a global is replaced by a stand-in that notes the signature of each call. Calls
    whose signature is compiled or in the disk cache run, until the first one that is not: that
    one and every later one are skipped (no kernel then reads what a skipped one did not write).
    The stand-ins are process-wide, so no other module runs meanwhile (``RUNS``); calls from
    threads other than this one and the drivers' helper threads go to the real dispatcher. With
    ``run=False`` every call is skipped: ``seen`` then lists the signatures of a run without
    compiling any."""

    def __init__(self, namespace: dict, run: bool = True):
        self.namespace = namespace
        self.thread = threading.get_ident()
        self._lock = threading.Lock()
        self._gate = None
        self.skipped = not run      # run=False: skip every call, compile and load nothing
        self.missing: dict = {}     # dispatcher -> [signatures to compile]
        self.seen: dict = {}        # dispatcher -> [every signature called with]
        self._known: dict = {}      # (dispatcher, signature) -> available without compiling
        self._swapped: list = []    # (globals dict, name, dispatcher)

    def __enter__(self) -> "SignatureRecorder":
        from numba.core.dispatcher import Dispatcher

        self._gate = RUNS.exclusive()
        self._gate.__enter__()
        try:
            spaces = [self.namespace] + [vars(m) for name, m in list(sys.modules.items())
                                         if name.startswith(KERNEL_PACKAGE) and m is not None]
            for space in spaces:
                for name, value in list(space.items()):
                    if isinstance(value, Dispatcher):
                        self._swapped.append((space, name, value))
                        space[name] = _StandIn(value, self)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for space, name, value in self._swapped:
            space[name] = value
        self._swapped.clear()
        self._gate.__exit__(*exc)
        return False

    def call(self, dispatcher, args, kwargs):
        if threading.get_ident() != self.thread:
            return dispatcher(*args, **kwargs)
        if kwargs:
            raise _Unrecordable("keyword arguments")
        signature = tuple(dispatcher.typeof_pyval(a) for a in args)
        with self._lock:
            if signature not in self.seen.setdefault(dispatcher, []):
                self.seen[dispatcher].append(signature)
            key = (dispatcher, signature)
            if key not in self._known:
                self._known[key] = _available(dispatcher, signature)
            if not self._known[key]:
                if signature not in self.missing.setdefault(dispatcher, []):
                    self.missing[dispatcher].append(signature)
            run = self._known[key] and not self.skipped
            self.skipped = self.skipped or not run
        return dispatcher(*args) if run else None

    def jobs(self) -> list["CompileJob"]:
        return [CompileJob(d, sigs) for d, sigs in self.missing.items()]


class _Unrecordable(Exception):
    pass


class _StandIn:
    def __init__(self, dispatcher, recorder: SignatureRecorder):
        self.dispatcher = dispatcher
        self.recorder = recorder

    def __call__(self, *args, **kwargs):
        return self.recorder.call(self.dispatcher, args, kwargs)

    def __getattr__(self, name):
        return getattr(self.dispatcher, name)


def _available(dispatcher, signature) -> bool:
    """Whether calling with ``signature`` needs no compile: compiled, or in the disk cache."""
    if signature in dispatcher.overloads:
        return True
    cache = dispatcher._cache
    try:
        key = cache._index_key(signature, dispatcher.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001  (no disk cache, or another Numba: compile it here)
        return False


class CompileJob:
    """The signatures one kernel function needs, and where a worker process finds it."""

    def __init__(self, dispatcher, signatures: list):
        self.dispatcher = dispatcher
        self.signatures = signatures
        fn = dispatcher.py_func
        module = sys.modules.get(fn.__module__)
        self.spec = (fn.__module__, getattr(module, "__file__", None), fn.__name__, signatures)
        cached = hasattr(dispatcher._cache, "_cache_file")
        self.portable = cached and module is not None and getattr(module, fn.__name__, None) \
            is dispatcher
        # parfor lowering makes a parallel kernel several times slower to compile; a kernel
        # module may say more (COMPILE_WEIGHTS: name -> cold seconds measured), so that the
        # slowest go to the workers first
        weight = 3 if dispatcher.targetoptions.get("parallel") else 1
        weight = getattr(module, "COMPILE_WEIGHTS", {}).get(fn.__name__, weight)
        self.cost = weight * len(signatures)

    @property
    def label(self) -> str:
        return self.dispatcher.py_func.__name__

    def compile(self) -> None:
        for signature in self.signatures:
            self.dispatcher.compile(signature)


def precompile(jobs: list[CompileJob], progress: bool = True) -> None:
    """Compile ``jobs`` (into Numba's disk cache, and this process), shared between this process
    and ``compile_workers()`` worker processes."""
    from ...runtime.progress import Progress

    if not jobs:
        return
    workers = min(compile_workers(), sum(job.portable for job in jobs) - 1)
    queue = collections.deque(sorted(jobs, key=lambda job: (not job.portable, -job.cost)))
    lock = threading.Lock()
    processes = "process" if workers < 1 else f"{workers + 1} processes"
    bar = Progress(f"compiling kernels ({processes})", len(jobs), enabled=progress)

    def take(worker: bool) -> CompileJob | None:
        """The largest job left, whoever asks (longest first: the last job to start is a small
        one); those only this process can compile come last. Taking from both ends instead left
        ResNet-50's second-largest kernel (7 s) to start last, at 12 s of 19."""
        with lock:
            if not queue or (worker and not queue[0].portable):
                return None
            job = queue.popleft()
            bar.step(job.label)
            return job

    feeders = [threading.Thread(target=_feed_worker, args=(take,), daemon=True)
               for _ in range(max(workers, 0))]
    for thread in feeders:
        thread.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _compile_shared_helpers()
            job = take(False)
            while job is not None:
                try:
                    job.compile()
                except Exception:  # noqa: BLE001  (the warm-up run compiles it again and reports)
                    pass
                job = take(False)
    finally:
        for thread in feeders:
            thread.join()
        bar.close()


def _compile_shared_helpers() -> None:
    """The epilogue's activation_row, which most kernels call: compiled (or loaded) here first,
    while the workers start, so that they find it in the cache instead of each compiling it."""
    from numba import types

    from .kernels.epilogue import activation_row

    row = types.Array(types.float32, 1, "C")
    activation_row.compile((row, types.int64, types.Array(types.float64, 1, "C")))


def _feed_worker(take) -> None:
    """Run one worker process and keep it busy with jobs from ``take`` until none is left. A job
    a worker fails (or dies) on is left to the warm-up run, which compiles it in this process."""
    import subprocess

    job = take(True)
    if job is None:
        return
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    import numba

    # Numba read its cache directory when first imported; os.environ may have changed since.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               NUMBA_CACHE_DIR=numba.config.CACHE_DIR)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    command = [sys.executable, "-c",
               "from cnncompile.backends.cpu.backend import compile_worker; compile_worker()"]
    try:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, env=env)
    except OSError:
        return
    try:
        while job is not None:
            pickle.dump(job.spec, process.stdin)
            process.stdin.flush()
            pickle.load(process.stdout)
            job = take(True)
    except (OSError, EOFError, pickle.UnpicklingError):
        pass
    finally:
        try:
            process.stdin.close()
            process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()


def compile_worker() -> None:
    """A worker process: compile the kernel functions it is sent (pickled (module, file, name,
    signatures) on stdin) into Numba's disk cache, answering each with its error or None."""
    import importlib
    import importlib.util

    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else prints must not mix into the replies
    warnings.simplefilter("ignore")
    while True:
        try:
            module_name, path, name, signatures = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        error = None
        try:
            module = sys.modules.get(module_name)
            if module is None:
                try:
                    module = importlib.import_module(module_name)
                except ImportError:
                    # a generated kernel (elementwise chains) lives in a file of the cache dir
                    spec = importlib.util.spec_from_file_location(module_name, path)
                    module = importlib.util.module_from_spec(spec)
                    sys.modules[module_name] = module
                    spec.loader.exec_module(module)
            dispatcher = getattr(module, name)
            for signature in signatures:
                dispatcher.compile(signature)
        except Exception as exc:  # noqa: BLE001  (reported; the main process compiles it)
            error = repr(exc)
        pickle.dump(error, replies)
        replies.flush()


def _lock_cache_saves() -> None:
    """Serialise Numba's cache saves across processes with a lock file per function: a save
    reads the function's index, adds its entry and writes it back, so two unlocked saves of
    different signatures can lose one, or pair an index entry with the other's data file."""
    try:
        import fcntl

        from numba.core.caching import IndexDataCacheFile
    except ImportError:
        return
    save = IndexDataCacheFile.save
    if getattr(save, "cnncompile_locked", False):
        return

    def locked_save(self, key, data):
        with open(self._index_path + ".lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return save(self, key, data)

    locked_save.cnncompile_locked = True
    IndexDataCacheFile.save = locked_save


_lock_cache_saves()
