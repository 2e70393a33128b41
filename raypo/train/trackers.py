"""Experiment trackers: where a run's metrics go besides ``metrics.jsonl`` (``logging.backends``).

* ``tensorboard``: event files under ``<run dir>/tensorboard`` (tensorboardX), the default.
* ``mlflow``: the MLflow client (``mlflow`` or ``mlflow-skinny``, extra ``raypo[trackers]``). The tracking
  URI is ``logging.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store beside the runs
  (``sqlite:///<storage_path>/mlflow.db``), so it works with no server and no network.
* ``wandb``: the W&B client (extra ``raypo[trackers]``). ``WANDB_MODE=offline`` keeps the run on disk
  (under ``<run dir>/wandb``) for a later ``wandb sync``.

Every tracker gets the same metric names and steps as ``metrics.jsonl``, and the run's config as
parameters (MLflow: flattened dotted keys; W&B: the nested config). A tracker run is named after the raypo
run; the trials of a sweep carry the sweep's name as their group (``logging.group``: an MLflow tag and
the W&B group). Credentials (``WANDB_API_KEY``, ``MLFLOW_TRACKING_TOKEN``, ...) are read by the clients from
each node's environment and are never put in a runtime_env.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Optional, Protocol

from raypo.config import RaypoConfig, to_dict
from raypo.errors import ConfigError

BACKENDS = ("tensorboard", "mlflow", "wandb")


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric metrics (``step`` itself excluded)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(cfg: RaypoConfig) -> dict[str, str]:
    """The config as ``{dotted key: value}`` strings (MLflow parameters are strings of <= 6000 chars)."""
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = json.dumps(value, default=str)[:6000] if not isinstance(value, str) else value

    walk(to_dict(cfg), "")
    return out


class TensorBoardTracker:
    def __init__(self, log_dir: str, purge_step: Optional[int] = None):
        from tensorboardX import SummaryWriter

        # purge_step: a resumed run hides the events it wrote from that step on (superseded steps)
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(tracker_metric_name(key), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _import(backend: str, module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ConfigError([f"logging.backends includes {backend!r} but the {module} package is not "
                           f"installed; install it with `pip install 'raypo[trackers]'` (or pip install "
                           f"{module}), or remove {backend!r} from logging.backends"]) from exc


def mlflow_tracking_uri(cfg: RaypoConfig) -> str:
    """``logging.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file beside the runs
    (``~/raypo_runs/mlflow.db`` when the runs are on S3)."""
    if cfg.logging.mlflow_tracking_uri:
        return cfg.logging.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    storage = cfg.checkpoint.storage_path
    base = os.path.expanduser("~/raypo_runs") if "://" in storage else os.path.expanduser(storage)
    os.makedirs(base, exist_ok=True)
    return f"sqlite:///{os.path.abspath(base)}/mlflow.db"


def tracker_metric_name(key: str) -> str:
    """``key`` as MLflow and TensorBoard allow it (alphanumerics and ``_-. :/``; TensorBoard would warn and
    write ``train/ndcg_1``): ``train/ndcg@1`` -> ``train/ndcg_at_1``, the same name in both."""
    key = key.replace("@", "_at_")
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)


class MlflowTracker:
    """One MLflow run per raypo run, resumed (same run id) when the raypo run resumes."""

    def __init__(self, cfg: RaypoConfig, run_name: str, group: Optional[str]):
        mlflow = _import("mlflow", "mlflow")
        self.client = mlflow.tracking.MlflowClient(mlflow_tracking_uri(cfg))
        experiment = cfg.logging.mlflow_experiment or "raypo"
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        existing = self.client.search_runs([experiment_id], f"tags.`raypo.run_name` = '{run_name}'",
                                           max_results=1)
        if existing:
            self.run_id = existing[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"raypo.run_name": run_name, "mlflow.runName": run_name}
            if group:
                tags["raypo.group"] = group
            self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in flat_params(cfg).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(tracker_metric_name(k), v, now, step) for k, v in scalars(metrics).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """One W&B run per raypo run; its id is the run name, so a resumed raypo run resumes the W&B run."""

    def __init__(self, cfg: RaypoConfig, run_name: str, group: Optional[str], run_dir: str):
        wandb = _import("wandb", "wandb")
        os.makedirs(run_dir, exist_ok=True)
        self.run = wandb.init(project=cfg.logging.wandb_project or "raypo", entity=cfg.logging.wandb_entity,
                              name=run_name, id=_wandb_id(run_name, group), group=group, dir=run_dir,
                              config=to_dict(cfg), resume="allow", reinit="create_new")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_name: str, group: Optional[str]) -> str:
    """A W&B run id (letters, digits, ``-_``; at most 64 characters) from the run and group names."""
    raw = f"{group}-{run_name}" if group else run_name
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)[:64]


def check_tracker_packages(cfg: RaypoConfig) -> None:
    """On the driver, before any cluster work: the client of every chosen backend is installed."""
    for backend, module in (("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tensorboardX")):
        if backend in cfg.logging.backends:
            _import(backend, module)


def build_trackers(cfg: RaypoConfig, run_dir: str, run_name: str, *,
                   purge_step: Optional[int] = None) -> list[Tracker]:
    """The trackers of ``logging.backends`` for one run writing to the local directory ``run_dir``
    (``purge_step``: TensorBoard hides the events of a resumed run from that step on)."""
    backends = [b for b in cfg.logging.backends if b != "tensorboard" or cfg.logging.tensorboard]
    trackers: list[Tracker] = []
    for backend in dict.fromkeys(backends):
        if backend == "tensorboard":
            trackers.append(TensorBoardTracker(os.path.join(run_dir, "tensorboard"), purge_step))
        elif backend == "mlflow":
            trackers.append(MlflowTracker(cfg, run_name, cfg.logging.group))
        elif backend == "wandb":
            trackers.append(WandbTracker(cfg, run_name, cfg.logging.group, run_dir))
    return trackers
