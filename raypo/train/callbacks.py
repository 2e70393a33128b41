"""Driver-side reporting: a console progress line and TensorBoard scalars.

Ray Train calls these on its controller, which runs on the driver's node, after every ``ray.train.report``.
Only rank 0's metrics are used: the worker loop has already all-reduced them across ranks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

from ray.train import UserCallback

PROGRESS_FIELDS = (
    ("train/loss", "loss", ".4f"), ("train/pairwise_accuracy", "acc", ".3f"),
    ("train/reward_margin", "margin", ".3f"), ("train/lr", "lr", ".2e"), ("train/grad_norm", "gnorm", ".3f"),
    ("eval/loss", "eval_loss", ".4f"), ("eval/pairwise_accuracy", "eval_acc", ".3f"),
    ("perf/tokens_per_s", "tok/s", ".0f"),
)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The reports a run wrote to its ``metrics.jsonl``, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_progress(metrics: dict[str, Any], max_steps: int) -> str:
    step = int(metrics.get("step", 0))
    parts = [f"step {step:>5}/{max_steps}"]
    for key, label, fmt in PROGRESS_FIELDS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {value:{fmt}}")
    return " | ".join(parts)


class ProgressCallback(UserCallback):
    """Prints one line per report, appends every report to a JSON-lines file (the run's metric history;
    Ray Train V2 keeps only checkpointed reports) and writes every scalar metric to TensorBoard."""

    def __init__(self, max_steps: int, tensorboard_dir: Optional[str] = None,
                 metrics_path: Optional[str] = None):
        self.max_steps = max_steps
        self.tensorboard_dir = tensorboard_dir
        self.metrics_path = metrics_path
        self._writer = None
        self._start = time.time()

    def _tb(self):
        if self._writer is None and self.tensorboard_dir:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self.tensorboard_dir)
        return self._writer

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        m = metrics[0]
        line = format_progress(m, self.max_steps)
        if checkpoint is not None:
            line += f" | checkpoint {checkpoint.path}"
        print(f"[raypo {time.time() - self._start:7.1f}s] {line}", file=sys.stdout, flush=True)
        if self.metrics_path:
            os.makedirs(os.path.dirname(self.metrics_path), exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float, str))}) + "\n")
        writer = self._tb()
        if writer is not None:
            step = int(m.get("step", 0))
            for key, value in m.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    writer.add_scalar(key, value, step)
            writer.flush()
