"""Progress of long stages (data conversion and validation, tokenisation, the reference stage).

On a terminal a stage shows a live line (rows done of the total when known, rows/s, ETA), and Ray Data's
own per-operator progress bars are switched on for the stages that run on Ray Data. Anywhere else (CI, a
``ray job submit`` log, output piped to a file) a stage prints one line when it ends, so logs stay short.
``RAYPO_PROGRESS=1`` forces the live line, ``RAYPO_PROGRESS=0`` keeps every stage to its closing line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Optional, TextIO, TypeVar

T = TypeVar("T")

#: environment variables that mark a non-interactive run even when a pseudo-terminal is attached
_CI_VARIABLES = ("CI", "GITHUB_ACTIONS", "BUILDKITE", "JENKINS_URL", "RAY_JOB_ID")


def interactive(stream: Optional[TextIO] = None) -> bool:
    """Live progress on ``stream`` (default stderr): a terminal, not CI or a Ray job, unless overridden."""
    forced = os.environ.get("RAYPO_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    stream = stream or sys.stderr
    if any(os.environ.get(v) for v in _CI_VARIABLES):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def eta(done: float, total: float, elapsed: float) -> Optional[float]:
    """Seconds left at the rate so far; None before any progress or without a total."""
    if not total or done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)


class Progress:
    """Counts the units of one stage; a live line on a terminal, one closing line everywhere.

    ``total`` (None: unknown) and ``unit`` ("rows", "prompts", ...) only shape the text."""

    def __init__(self, stage: str, total: Optional[int] = None, unit: str = "rows",
                 stream: Optional[TextIO] = None, live: Optional[bool] = None, min_interval_s: float = 0.2):
        self.stage, self.total, self.unit = stage, total, unit
        self.stream = stream or sys.stderr
        self.live = interactive(self.stream) if live is None else live
        self.min_interval_s = min_interval_s
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"
        text = f"raypo: {self.stage}: {count} {self.unit}, {rate:,.0f} {self.unit}/s"
        left = eta(self.done, self.total or 0, elapsed)
        return text + (f", eta {format_duration(left)}" if left is not None else "")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.live and now - self._last_draw >= self.min_interval_s:
            self._last_draw = now
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()

    def close(self, note: str = "") -> str:
        """Print (and return) the stage's closing line: units, time and rate."""
        elapsed = time.monotonic() - self.start
        rate = f" ({self.done / elapsed:,.0f} {self.unit}/s)" if elapsed > 0 and self.done else ""
        text = f"raypo: {self.stage}: {self.done:,} {self.unit} in {elapsed:.1f}s{rate}{note}"
        self.stream.write(("\r" if self.live else "") + text + ("\033[K" if self.live else "") + "\n")
        self.stream.flush()
        return text


def track(items: Iterable[T], stage: str, total: Optional[int] = None, unit: str = "rows",
          stream: Optional[TextIO] = None) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress`; the closing line is printed when the iteration ends."""
    progress = Progress(stage, total, unit, stream)
    try:
        for item in items:
            yield item
            progress.advance()
    finally:
        progress.close()


@contextlib.contextmanager
def ray_data_stage(stage: str, unit: str = "rows", stream: Optional[TextIO] = None):
    """A stage that runs on Ray Data: its progress bars on a terminal for the stage's duration, and one
    closing line (the caller sets ``.done`` to the units handled) either way."""
    progress = Progress(stage, unit=unit, stream=stream, live=False)
    ctx = None
    if interactive(progress.stream):
        try:
            import ray.data

            ctx = ray.data.DataContext.get_current()
            saved, ctx.enable_progress_bars = ctx.enable_progress_bars, True
        except Exception:  # an older Ray without the knob: no bars, the closing line still comes
            ctx = None
    try:
        yield progress
    finally:
        if ctx is not None:
            ctx.enable_progress_bars = saved
    progress.close()
