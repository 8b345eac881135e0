"""A progress bar on stderr for the slow steps of a compile (no dependencies).

    with Progress("compiling kernels", total=30) as bar:
        for name in kernels:
            bar.step(name)          # compiling kernels [####......] 12/30 conv_im2col

On a terminal the bar is redrawn in place (at most ten times a second); a step that ends within
``quiet_seconds`` erases it again, a longer one leaves its last line. Anywhere else (a pipe, a log,
pytest) nothing is drawn while the step runs, and one closing line is written only if the step
took longer than ``quiet_seconds``, so a slow cold compile is explained and a warm one is silent.
The environment variable CNNCOMPILE_PROGRESS=0 turns every bar off; =1 draws it even off a
terminal.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

WIDTH = 20
REDRAW_SECONDS = 0.1


class Progress:
    def __init__(self, title: str, total: int, stream=None, live: bool | None = None,
                 quiet_seconds: float = 1.0, enabled: bool = True):
        self.title = title
        self.total = max(int(total), 0)
        self.stream = stream if stream is not None else sys.stderr
        setting = os.environ.get("CNNCOMPILE_PROGRESS", "").strip()
        self.enabled = enabled and setting != "0"
        if live is None:
            live = setting == "1" or _is_tty(self.stream)
        self.live = live and self.enabled
        self.quiet_seconds = quiet_seconds
        self.done = 0
        self.label = ""
        self.start = time.perf_counter()
        self._drawn_at = 0.0
        self._width = 0       # characters of the line on screen, to erase it
        self._closed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def step(self, label: str = "") -> None:
        """One more item has started: ``label`` names it."""
        self.done = min(self.done + 1, self.total) if self.total else self.done + 1
        self.label = label
        now = time.perf_counter()
        if self.live and (now - self._drawn_at >= REDRAW_SECONDS or self.done == self.total):
            self._draw(self.line())
            self._drawn_at = now

    def line(self, label: str | None = None) -> str:
        label = self.label if label is None else label
        if self.total:
            filled = WIDTH * self.done // self.total
            bar = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done}"
        return f"{self.title} {bar} {label}".rstrip()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        seconds = self.seconds
        if not self.enabled:
            return
        if seconds <= self.quiet_seconds:
            if self._width:
                self._draw("")
            return
        final = self.line(f"done in {seconds:.1f} s")
        if self.live:
            self._draw(final)
            self.stream.write("\n")
        else:
            self.stream.write(final + "\n")
        self.stream.flush()

    def _draw(self, text: str) -> None:
        columns = shutil.get_terminal_size((100, 24)).columns - 1
        text = text[:max(columns, 20)]
        pad = " " * max(self._width - len(text), 0)
        self.stream.write("\r" + text + pad + ("\r" if not text else ""))
        self.stream.flush()
        self._width = len(text)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
