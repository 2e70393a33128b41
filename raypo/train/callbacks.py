"""The progress line's format, the metric history's reader, and the driver-side callback.

Ray Train calls :class:`ProgressCallback` on its controller, which runs on the driver's node, after every
``ray.train.report``. The per-step rows are written on rank 0 (:mod:`raypo.train.metrics_log`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

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
    """Says on the driver when Ray Train has committed a checkpoint. The per-step rows (metrics.jsonl,
    trackers, the progress line) are written on rank 0 (:mod:`raypo.train.metrics_log`): Ray Train sees
    only the reports it needs (checkpoints, evaluations, Tune's metric, every few seconds)."""

    def __init__(self) -> None:
        self._start = time.time()

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or checkpoint is None:
            return
        step = int(metrics[0].get("step", 0))
        elapsed = time.time() - self._start
        print(f"[raypo {elapsed:7.1f}s] step {step}: checkpoint committed {checkpoint.path}", file=sys.stdout,
              flush=True)
