"""Rank 0's per-step metrics: ``metrics.jsonl``, the trackers (TensorBoard, ...) and the console line.

Written on the worker, not from Ray Train's reports: a report costs a wait on Ray Train's controller (it polls
each worker's one-slot result queue about every 2 s), so the loop reports to Ray only when Ray needs it
(checkpoints, evaluations, the metric a Tune scheduler decides on, and every ``logging.report_interval_s``)
while every logged step lands here at once.

The history is the run's local directory (:func:`raypo.train.trainer.local_run_directory`: the run
directory for local storage, ``~/raypo_runs/<run_name>`` when checkpoints go to S3); with S3 storage a copy
of ``metrics.jsonl`` is also kept beside the checkpoints (refreshed at every Ray report and at the end), and
a rank 0 on a node without the local file starts from that copy.

Resume (a driver restart or a worker failure) continues from the latest checkpoint, so the rows written
after it are superseded: the history is cut back to the resumed step (rows with ``step`` <= that step stay;
all of them go when no checkpoint exists), and TensorBoard's events from the next step on are purged, so
every step has one row.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

from raypo.progress import format_duration
from raypo.train.callbacks import format_progress

METRICS_FILE = "metrics.jsonl"


def truncate_history(path: str, keep_through: int) -> int:
    """Drop the rows of ``path`` whose ``step`` is above ``keep_through`` (unreadable lines go too);
    returns how many were dropped. Atomic: a temporary file renamed over the old one."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                step = int(json.loads(line).get("step", 0))
            except (ValueError, AttributeError, TypeError):
                dropped += 1
                continue
            if step <= keep_through:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


class MetricsLog:
    """Rank 0's writer of the run's per-step rows."""

    def __init__(self, cfg: Any, run_dir: str, run_name: str, *, keep_through: int,
                 remote_path: Optional[str] = None) -> None:
        from raypo.train.trackers import build_trackers

        self.cfg, self.max_steps, self.remote_path = cfg, cfg.train.max_steps, remote_path
        run_dir = os.path.expanduser(run_dir)  # "~/raypo_runs/<run>" is this node's home (S3 storage)
        self.path = os.path.join(run_dir, METRICS_FILE)
        os.makedirs(run_dir, exist_ok=True)
        self._fetch_remote_copy()
        existed = os.path.exists(self.path)
        dropped = truncate_history(self.path, keep_through)
        if dropped:
            print(f"raypo: metrics history cut back to step {max(keep_through, 0)} (the resumed step): "
                  f"{dropped} superseded row(s) dropped from {self.path}", flush=True)
        # Events at or after purge_step are hidden by TensorBoard: the superseded steps of a resumed run.
        self.trackers = build_trackers(cfg, run_dir, run_name,
                                       purge_step=keep_through + 1 if existed else None)
        self._file = open(self.path, "a")
        self._start = time.time()
        self._first: Optional[tuple[int, float]] = None  # (step, time) of this process's first row

    def _fetch_remote_copy(self) -> None:
        if self.remote_path is None or os.path.exists(self.path):
            return
        from raypo.storage import read_text

        text = read_text(self.remote_path, self.cfg.data.s3)
        if text:
            with open(self.path, "w") as f:
                f.write(text)

    def write(self, metrics: dict[str, Any], *, checkpoint: Optional[str] = None) -> None:
        """One row: appended to ``metrics.jsonl``, sent to every tracker, printed as the progress line."""
        row = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = int(row.get("step", 0))
        for tracker in list(self.trackers):
            try:
                tracker.log(row, step)
            except Exception as exc:  # a tracker's server or disk: metrics.jsonl keeps every row anyway
                self.trackers.remove(tracker)
                sys.stderr.write(f"raypo: {type(tracker).__name__} failed at step {step} and is switched off "
                                 f"for the rest of the run ({type(exc).__name__}: {exc}); {self.path} still "
                                 "has every row\n")
        line = format_progress(row, self.max_steps)
        left = self._eta(step)
        if left is not None:
            line += f" | eta {format_duration(left)}"
        if checkpoint:
            line += f" | checkpoint {checkpoint}"
        # sys.stdout, not print: Ray Train's patched print would both log and tee the line (shown twice)
        sys.stdout.write(f"[raypo {time.time() - self._start:7.1f}s] {line}\n")
        sys.stdout.flush()

    def _eta(self, step: int) -> Optional[float]:
        """Seconds to ``train.max_steps`` at the pace measured since the first row this process wrote
        (evaluations and checkpoints included: what the user waits for)."""
        now = time.time()
        if self._first is None:
            self._first = (step, now)
            return None
        first_step, first_time = self._first
        if step <= first_step or step >= self.max_steps:
            return None
        return (now - first_time) / (step - first_step) * (self.max_steps - step)

    def sync(self) -> None:
        """Refresh the copy beside the checkpoints (S3 storage only)."""
        if self.remote_path is None:
            return
        from raypo.storage import write_text

        self._file.flush()
        with open(self.path) as f:
            write_text(self.remote_path, f.read(), self.cfg.data.s3)

    def close(self) -> None:
        self.sync()
        self._file.close()
        for tracker in self.trackers:
            tracker.close()
