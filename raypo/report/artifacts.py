"""What a run directory and a sweep directory hold, read into plain Python for the report.

A run directory (``<checkpoint.storage_path>/<run_name>``, or ``~/raypo_runs/<run_name>`` when checkpoints
go to S3) holds, as written by :func:`raypo.train.trainer.build_trainer` and ``run_training``:

* ``metrics.jsonl``: one JSON object per report (``step``, ``train/*``, ``eval/*``, ``perf/*``);
* ``config.yaml``: the full config the run was started with (``raypo_run.json``: its run-defining part);
* ``data_report.json``: the data report (rows accepted and rejected by reason, per split);
* ``raypo_summary.json``: the end of the run (final checkpoint, export path, wall time);
* ``step_*/``: checkpoints.

A sweep directory (``<tune.storage_path>/<sweep name>``) holds ``raypo_sweep.yaml``,
``results/results.csv`` (one row per trial) with the sweep's plots, and ``train_runs/trial_*/`` run
directories.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from raypo.errors import RunError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
DATA_REPORT_FILE = "data_report.json"
SUMMARY_FILE = "raypo_summary.json"
RECORD_FILE = "raypo_run.json"
SWEEP_CONFIG_FILE = "raypo_sweep.yaml"


@dataclass
class RunArtifacts:
    """One training run's files, loaded. ``metrics`` is one dict per step (a later report of a step
    replaces an earlier one, so a resumed run has one row per step)."""

    path: Path
    name: str
    metrics: list[dict[str, Any]]
    config_yaml: Optional[str] = None
    record: Optional[dict[str, Any]] = None
    data_report: Optional[dict[str, Any]] = None
    summary: Optional[dict[str, Any]] = None
    checkpoints: list[str] = field(default_factory=list)
    skipped_lines: int = 0

    def keys(self) -> set[str]:
        return {k for m in self.metrics for k, v in m.items() if _is_number(v)}

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a metric, skipping the steps that did not report it."""
        points = [(int(m["step"]), float(m[key])) for m in self.metrics
                  if "step" in m and _is_number(m.get(key))]
        return [s for s, _ in points], [v for _, v in points]

    def dimensions(self) -> list[str]:
        """The preference dimensions named in the per-dimension metrics (``eval/<metric>/<dim>``)."""
        dims = {k.split("/", 2)[2] for k in self.keys()
                if k.startswith(("eval/", "train/")) and k.count("/") == 2}
        if self.data_report and self.data_report.get("dimensions"):
            order = list(self.data_report["dimensions"])
            return [d for d in order if d in dims] + sorted(dims - set(order))
        return sorted(dims)


@dataclass
class SweepArtifacts:
    """A sweep's results table, its plots and its trials' runs."""

    path: Path
    name: str
    config_yaml: Optional[str]
    table: list[dict[str, str]]
    plots: dict[str, bytes]
    trials: list[RunArtifacts]
    best_config_yaml: Optional[str] = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); the report cannot read it. Restore the file or "
                       "delete it to report without it.") from exc


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The per-step metrics of ``metrics.jsonl``, one dict per step (the last report of a step wins), and
    the number of unreadable lines (e.g. a line cut short by a killed driver), which are skipped."""
    by_step: dict[int, dict[str, Any]] = {}
    unstepped: list[dict[str, Any]] = []
    skipped = 0
    if not path.is_file():
        return [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(record, dict):
                skipped += 1
            elif _is_number(record.get("step")):
                by_step.setdefault(int(record["step"]), {}).update(record)
            else:
                unstepped.append(record)
    return [by_step[s] for s in sorted(by_step)] + unstepped, skipped


def is_run_directory(path: Path) -> bool:
    return any((path / name).exists() for name in (METRICS_FILE, RECORD_FILE, SUMMARY_FILE))


def is_sweep_directory(path: Path) -> bool:
    return (path / SWEEP_CONFIG_FILE).is_file() or (path / "results" / "results.csv").is_file()


def load_run(path: Path) -> RunArtifacts:
    metrics, skipped = read_metrics(path / METRICS_FILE)
    config = path / CONFIG_FILE
    checkpoints = sorted((p.name for p in path.glob("step_*") if p.is_dir()),
                         key=lambda n: int(n.split("_")[-1]) if n.split("_")[-1].isdigit() else -1)
    return RunArtifacts(path=path, name=path.name, metrics=metrics,
                        config_yaml=config.read_text() if config.is_file() else None,
                        record=_read_json(path / RECORD_FILE),
                        data_report=_read_json(path / DATA_REPORT_FILE),
                        summary=_read_json(path / SUMMARY_FILE), checkpoints=checkpoints,
                        skipped_lines=skipped)


def load_sweep(path: Path) -> SweepArtifacts:
    results = path / "results"
    table: list[dict[str, str]] = []
    if (results / "results.csv").is_file():
        with open(results / "results.csv", newline="") as f:
            table = list(csv.DictReader(f))
    plots = {p.name: p.read_bytes() for p in sorted(results.glob("*.png"))} if results.is_dir() else {}
    runs = path / "train_runs"
    trials = [load_run(p) for p in sorted(runs.iterdir()) if p.is_dir() and is_run_directory(p)] \
        if runs.is_dir() else []
    config = path / SWEEP_CONFIG_FILE
    best = results / "best_config.yaml"
    return SweepArtifacts(path=path, name=path.name,
                          config_yaml=config.read_text() if config.is_file() else None, table=table,
                          plots=plots, trials=trials,
                          best_config_yaml=best.read_text() if best.is_file() else None)


def load(path: str) -> RunArtifacts | SweepArtifacts:
    """A run or a sweep directory; :class:`RunError` naming what was expected when it is neither."""
    if path.startswith("s3://"):
        raise RunError(f"raypo report reads a local directory, not {path}: a run whose checkpoints go to S3 "
                       "keeps its metrics in ~/raypo_runs/<run_name> on the driver (pass that), or copy the "
                       "run directory down first (e.g. `aws s3 sync`).")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise RunError(f"raypo report: {path} is not a directory; pass a run directory "
                       "(<checkpoint.storage_path>/<run_name>) or a sweep directory")
    if is_sweep_directory(root):
        return load_sweep(root.resolve())
    if is_run_directory(root):
        return load_run(root.resolve())
    raise RunError(f"raypo report: {path} is neither a run directory (no {METRICS_FILE}, {RECORD_FILE} or "
                   f"{SUMMARY_FILE}) nor a sweep directory (no {SWEEP_CONFIG_FILE} or results/results.csv); "
                   "pass <checkpoint.storage_path>/<run_name> of a `raypo train` run, or the directory of a "
                   "`raypo tune` sweep")
