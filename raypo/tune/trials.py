"""One trial of a sweep: its config (the base config, the sampled values, its own Train run under the
sweep's storage) and the Tune trainable that runs it as a full raypo training run (a Ray Train driver
inside the trial), reporting to Tune only the results that carry ``tune.metric``
(see "Scheduling" in :mod:`raypo.tune.sweep`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from raypo.config import RaypoConfig, config_from_dict
from raypo.tune.space import SearchDim, apply_overrides, describe_point, trial_overrides


@dataclass
class TrialSetup:
    """What every trial of a sweep needs (shipped to the trials with ``tune.with_parameters``)."""

    base: dict[str, Any]  # the base config as plain containers, search space emptied
    dims: list[SearchDim]
    train_runs: str  # storage of the trials' Train runs
    metric: str
    reference_cache: Optional[str]  # the shared reference cache, or None: trials keep train.reference
    # the driver's tokenised datasets with the reference columns (raypo.train.trainer.PreparedDatasets,
    # without MallowsPO's c), set with reference_cache; None: each trial prepares its own data
    shared_data: Optional[Any] = None
    group: Optional[str] = None  # the sweep's name: the tracker group of every trial (logging.group)


def trial_run_name(trial_id: str) -> str:
    """The Train run of a trial: named after the trial id, which ``Tuner.restore`` keeps, so a resumed
    trial finds its checkpoints."""
    return f"trial_{trial_id}"


def trial_config(setup: TrialSetup, point: Mapping[str, Any], trial_id: str) -> RaypoConfig:
    """Base config + the sampled overrides, its Train run named after the trial under the sweep's storage,
    no per-trial export, and ``train.reference=precomputed`` on the shared reference cache when there is
    one."""
    fixed: dict[str, Any] = {"checkpoint.run_name": trial_run_name(trial_id),
                             "checkpoint.storage_path": setup.train_runs, "checkpoint.export_path": None}
    if setup.group is not None:
        fixed["logging.group"] = setup.group
    if setup.reference_cache is not None:
        fixed["train.reference"] = "precomputed"
        fixed["train.reference_cache"] = setup.reference_cache
    raw = apply_overrides(apply_overrides(setup.base, trial_overrides(setup.dims, point)), fixed)
    return config_from_dict(raw, source=f"trial {trial_id}")


def metric_report_callback(metric: str):
    """A ``TuneReportCallback`` that forwards only the reports carrying ``metric`` (see "Scheduling")."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReportCallback(TuneReportCallback):
        def __init__(self, metric: str):
            super().__init__()
            self.metric = metric

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and self.metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReportCallback(metric)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: one training run with the trial's config (a Train driver inside the trial)."""
    from ray import tune

    from raypo.train.trainer import build_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup, config, trial_id)
    point = {d.key: config[d.key] for d in setup.dims if d.key in config}
    print(f"raypo: trial {trial_id}: {describe_point(point)}", flush=True)
    # report_metric: every logged row carrying the metric reaches Tune (ASHA's rungs are steps), not only
    # the ones the loop's time-based reporting would send
    build_trainer(cfg, callbacks=[metric_report_callback(setup.metric)], report_metric=setup.metric,
                  precomputed_datasets=shared_data_for(cfg, setup.shared_data)).fit()


def shared_data_for(cfg: RaypoConfig, shared: Optional[Any]) -> Optional[Any]:
    """The sweep's shared datasets with this trial's MallowsPO calibration (its loss settings decide c;
    the reference entropies are in the datasets); None when the sweep shares none."""
    if shared is None:
        return None
    from dataclasses import replace

    from raypo.train.dispersion import resolve_dispersion
    from raypo.train.trainer import model_sources

    print(f"raypo: data: the sweep's tokenised datasets ({shared.train.count()} train, "
          f"{shared.eval.count()} eval rows, reference columns included)", flush=True)
    _, ref_path = model_sources(cfg)
    return replace(shared, dispersion=resolve_dispersion(cfg, shared.train, ref_path, scored=True))


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


#: The trial actor only drives Ray Train (its controller and workers reserve their own resources).
TRIAL_RESOURCES = {"CPU": 0.01}


def make_trainable(setup: TrialSetup):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), TRIAL_RESOURCES)


def trial_history(trial) -> list[dict[str, Any]]:
    """Every result a Tune trial reported (its ``result.json`` in the sweep's storage), oldest first."""
    from ray.tune.result import EXPR_RESULT_FILE

    fs, path = trial.storage.storage_filesystem, f"{trial.path}/{EXPR_RESULT_FILE}"
    try:
        with fs.open_input_stream(path) as f:
            lines = f.read().decode().splitlines()
    except (OSError, FileNotFoundError):
        return [dict(trial.last_result)] if trial.last_result else []
    return [json.loads(line) for line in lines if line.strip()]

