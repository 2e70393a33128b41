"""A Ray Tune sweep in which every trial is a full raypo training run (Ray Train + DeepSpeed).

::

    raypo tune CONFIG [key=value ...] [--resume] [--dry-run]      (raypo.cli.tune)

    load_config(CONFIG)         the base config
      | plan_sweep              name, storage, search space checked and parsed (raypo.tune.space)
      | prepare_shared_reference   data tokenised and reference log-probs computed ONCE (the latter into
      |                            raypo.train.reference_cache); the datasets are handed to every trial
      | Tuner(run_trial) / Tuner.restore(...)
      |     run_trial: trial config = base + sampled overrides; build_trainer(..., TuneReportCallback,
      |                shared datasets) .fit()
      | results_table           one row per trial: config, status, last and best metric (raypo.tune.results)
      v
    <sweep>/results/results.csv, best_config.yaml (ready for `raypo train`), metric_vs_*.png

Scheduling
    ASHA's time attribute is the optimizer ``step`` the training loop reports, not Tune's
    ``training_iteration`` (which counts reports: the step-0 baseline evaluation, evaluations,
    checkpoints, time-based reports and, in a trial, every logged row carrying ``tune.metric``; it restarts
    at 1 when a resumed trial continues from a checkpoint).
    ``max_t = train.max_steps``; ``grace_period`` and the rungs count steps. Only the reports that carry
    ``tune.metric`` are forwarded to Tune, so every result Tune sees has the metric (Tune's strict metric
    check) and ASHA decides at evaluations: with an ``eval/`` metric, set ``train.eval_every`` and make
    ``tune.grace_period`` a multiple of it. A trial stopped by ASHA is killed with its Train controller;
    Ray Train's placement-group cleaner releases its workers (this needs ``ray[default]``, i.e. the State
    API, and a cluster address it can find: :func:`raypo.train.trainer.init_ray` pins it), so the next
    trial can start.

Shared reference log-probs
    When ``tune.share_reference`` (default), some loss of the sweep uses a reference, and the search space
    varies no key that changes the data or the reference (``model.*``, ``data.*``, ``train.reference``,
    ``scaling.use_gpu``), the driver tokenises the data and scores it with the reference model once, before
    any trial starts, into the cache of :mod:`raypo.train.reference_cache` (``train.reference_cache``,
    default ``<tune storage>/reference_cache``; entries keyed by the reference model's file contents, the
    tokenised rows and the stage settings, with entropies when any loss of the sweep is a MallowsPO one).
    Every trial then trains with ``train.reference=precomputed`` on the datasets the driver prepared (the
    tokenised rows with the reference columns, held in Ray's object store for the sweep): no trial reads,
    tokenises or scores the data again, and a resumed sweep (a new driver) or another sweep on the same
    model and data finds the cache entries already there.

Resume
    The sweep is named ``checkpoint.run_name`` (default ``tune-<config file stem>``) and lives at
    ``<tune.storage_path or checkpoint.storage_path>/<name>``. ``--resume`` calls ``Tuner.restore(path,
    resume_unfinished=True, resume_errored=True)``: finished trials keep their results; unfinished ones run
    again with the same trial ids, and since each trial's Train run is named after its trial id
    (``trial_<id>`` under ``<sweep>/train_runs``), the rerun resumes from that run's latest checkpoint
    (``checkpoint.every_steps``). Tune does not keep the scheduler's state, so ASHA replays each finished
    trial's reported history into its rungs when the restored sweep re-adds it. The resolved config is
    stored as ``<sweep>/raypo_sweep.yaml``; resuming with a different one is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from raypo.config import RaypoConfig, to_dict, to_yaml
from raypo.errors import ConfigError
from raypo.storage import fsspec_for, read_text, write_text
from raypo.tune.space import (
    SearchDim,
    base_for_trials,
    check_search_space,
    num_trials,
    parse_search_space,
    representative_configs,
)
from raypo.tune.trials import TrialSetup, make_trainable, trial_dirname, trial_history

if TYPE_CHECKING:
    from raypo.train.trainer import PreparedDatasets

#: keys whose change alters the tokenised data or the reference log-probs (no shared cache then)
REFERENCE_KEYS = ("model", "data", "train.reference", "train.reference_cache", "train.reference_batching",
                  "scaling.use_gpu")

# ----------------------------------------------------------------------------------------------------
# The sweep: name, storage, resources
# ----------------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """A planned sweep: the validated base config, its search space, name and storage root."""

    cfg: RaypoConfig
    dims: list[SearchDim]
    name: str
    storage: str  # absolute local path or s3://bucket/prefix

    @property
    def uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def train_runs(self) -> str:
        return f"{self.uri}/train_runs"

    @property
    def results_uri(self) -> str:
        return f"{self.uri}/results"

    @property
    def config_uri(self) -> str:
        return f"{self.uri}/raypo_sweep.yaml"

    def tune_location(self) -> tuple[str, Any]:
        """(experiment path, pyarrow filesystem or None) for ``Tuner.restore`` / ``can_restore``."""
        from raypo.train.trainer import storage_location

        path, fs = storage_location(replace(self.cfg, checkpoint=replace(self.cfg.checkpoint,
                                                                          storage_path=self.storage)))
        return f"{path.rstrip('/')}/{self.name}", fs

    def max_steps(self, point: Mapping[str, Any]) -> int:
        return int(point.get("train.max_steps", self.cfg.train.max_steps))


def sweep_name(cfg: RaypoConfig, config_path: Optional[str]) -> str:
    """``checkpoint.run_name``, else ``tune-<config file stem>``: deterministic, so --resume finds it."""
    if cfg.checkpoint.run_name:
        return cfg.checkpoint.run_name
    return f"tune-{Path(config_path).stem}" if config_path else "tune"


def _absolute(path: str) -> str:
    if "://" in path:
        return path.rstrip("/")
    return str(Path(os.path.expanduser(path)).resolve())


def plan_sweep(cfg: RaypoConfig, config_path: Optional[str] = None) -> Sweep:
    """The :class:`Sweep` of a loaded config, its search space checked first
    (:func:`raypo.tune.space.check_search_space`: syntax, keys, settings, every representative trial
    config). Every way of running a sweep starts here, so a bad one is refused before any Ray work. Raises
    :class:`ConfigError`, also when there is nothing to search."""
    if not cfg.tune.search_space:
        raise ConfigError(["tune.search_space is empty: give at least one key to search, e.g. "
                           "tune.search_space: {loss.beta: {loguniform: [0.01, 0.5]}}"], source=config_path)
    check_search_space(cfg, source=config_path)
    dims, _ = parse_search_space(cfg.tune.search_space, cfg)
    storage = _absolute(cfg.tune.storage_path or cfg.checkpoint.storage_path)
    return Sweep(cfg=cfg, dims=dims, name=sweep_name(cfg, config_path), storage=storage)


def resources_per_trial(cfg: RaypoConfig) -> tuple[str, float]:
    """(resource, amount) one trial's workers hold: GPUs on a GPU cluster, else CPUs."""
    s = cfg.scaling
    resource = "GPU" if s.use_gpu else "CPU"
    return resource, s.num_workers * float(s.resources_per_worker.get(resource, 1.0))


def derive_max_concurrent_trials(cfg: RaypoConfig, cluster: Mapping[str, float]) -> int:
    """``tune.max_concurrent_trials``, or the cluster's GPUs (CPUs without GPUs) // those of one trial.

    At least 1: an autoscaling cluster that starts without GPU nodes still runs one trial at a time (set
    the value to let the autoscaler add nodes for more).
    """
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resource, per_trial = resources_per_trial(cfg)
    return max(1, int(float(cluster.get(resource, 0.0)) // per_trial)) if per_trial > 0 else 1


# ----------------------------------------------------------------------------------------------------
# Shared reference log-probs
# ----------------------------------------------------------------------------------------------------


def _varies_reference(dims: list[SearchDim]) -> Optional[str]:
    for d in dims:
        for prefix in REFERENCE_KEYS:
            if d.key == prefix or d.key.startswith(prefix + ".") or prefix.startswith(d.key + "."):
                return d.key
    return None


def reference_needs(configs: list[RaypoConfig]) -> tuple[bool, bool]:
    """(any trial uses reference log-probs, any trial needs the reference entropy) over trial configs."""
    from raypo.losses.registry import get_loss_spec

    uses = entropy = False
    for c in configs:
        spec = get_loss_spec(c.loss.name)
        hparams = {**c.loss.params, **({"beta": c.loss.beta} if c.loss.beta is not None else {})}
        entropy |= spec.needs_dispersion
        uses |= spec.uses_reference(hparams) or spec.needs_dispersion
    return uses, entropy


def share_decision(sweep: Sweep) -> tuple[bool, bool, str]:
    """(share, with_entropy, why): whether the trials read one precomputed reference cache."""
    if not sweep.cfg.tune.share_reference:
        return False, False, "tune.share_reference is false: each trial keeps its train.reference setting"
    key = _varies_reference(sweep.dims)
    if key is not None:
        return False, False, f"the search space varies {key}, so trials do not share data and reference"
    configs, _ = representative_configs(sweep.cfg, sweep.dims)
    uses, entropy = reference_needs(configs or [sweep.cfg])
    if not uses:
        return False, False, "no loss in the sweep uses reference log-probs"
    return True, entropy, f"computed once into {reference_cache_dir(sweep)}, read by every trial"


def reference_cache_dir(sweep: Sweep) -> str:
    """``train.reference_cache`` when set, else ``<tune storage>/reference_cache``."""
    return _absolute(sweep.cfg.train.reference_cache) if sweep.cfg.train.reference_cache else \
        f"{sweep.storage.rstrip('/')}/reference_cache"


def prepare_shared_reference(sweep: Sweep) -> tuple[Optional[str], Optional[PreparedDatasets]]:
    """Tokenise the sweep's data and score it with the reference model once, into the reference cache
    (:func:`raypo.train.reference_cache.cached_reference_logprobs`; a resumed sweep finds it there).

    Returns (cache directory, the prepared datasets): the trials train on these datasets as they are (no
    trial reads or tokenises the data again); (None, None) when trials do not share them (printed with the
    reason). The datasets' blocks live in Ray's object store, owned by this driver, for the sweep's
    lifetime. Needs Ray."""
    from raypo.train.trainer import prepare_datasets

    share, with_entropy, why = share_decision(sweep)
    if not share:
        print(f"raypo: reference log-probs: {why}", flush=True)
        return None, None
    cfg = sweep.cfg
    cache_dir = reference_cache_dir(sweep)
    print(f"raypo: reference log-probs: preparing them once for all trials (cache {cache_dir})", flush=True)
    start = time.time()
    before = _cache_entries(cache_dir, cfg.data.s3)
    prepared = prepare_datasets(cfg, reference_cache=cache_dir, with_entropy=with_entropy)
    new = len(_cache_entries(cache_dir, cfg.data.s3) - before)
    how = f"computed {new} cache entries" if new else "found in the cache"
    print(f"raypo: reference log-probs: {how} in {time.time() - start:.1f} s; the tokenised data is shared "
          "by every trial", flush=True)
    # MallowsPO's c depends on each trial's loss settings: every trial calibrates its own
    return cache_dir, replace(prepared, dispersion=None)


def _cache_entries(cache_dir: str, s3_cfg: Any) -> set[str]:
    """The complete entries (with a manifest) of a reference cache directory."""
    fs = fsspec_for(cache_dir, s3_cfg)
    return set(fs.glob(f"{cache_dir.rstrip('/')}/*/manifest.json")) if fs.exists(cache_dir) else set()


# ----------------------------------------------------------------------------------------------------
# The tuner: scheduler, searcher, resume
# ----------------------------------------------------------------------------------------------------


def _resumable_asha_class():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import AsyncHyperBandScheduler

    class ResumableASHA(AsyncHyperBandScheduler):
        """ASHA whose rungs survive ``Tuner.restore``: Tune keeps the trials but not the scheduler's
        records, so the (step, metric) history of each finished trial is replayed into the rungs when the
        restored sweep re-adds it; resumed trials are then compared with the finished ones again."""

        def on_trial_add(self, tune_controller, trial) -> None:
            super().on_trial_add(tune_controller, trial)
            if trial.status != Trial.TERMINATED:
                return
            bracket = self._trial_info[trial.trial_id]
            for result in trial_history(trial):
                if self._time_attr in result and self._metric in result:
                    bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])

    return ResumableASHA


def build_scheduler(cfg: RaypoConfig):
    from ray.tune.schedulers import FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_t ends by itself (its function returns) instead of
    # being killed at its last report.
    return _resumable_asha_class()(time_attr="step", max_t=cfg.train.max_steps,
                                   grace_period=cfg.tune.grace_period,
                                   reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


def build_search_algorithm(cfg: RaypoConfig):
    """None (Tune's random/grid variant generator), or an Optuna / HyperOpt searcher."""
    name = cfg.tune.search_alg
    if name in ("random", "grid"):
        return None
    try:
        if name == "optuna":
            import optuna  # noqa: F401  (OptunaSearch imports it lazily; fail here with the fix)
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(seed=cfg.train.seed)
        import hyperopt  # noqa: F401
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=cfg.train.seed)
    except ImportError as exc:
        raise ConfigError([f"tune.search_alg={name} needs the {name} package on the driver: pip install "
                           f"{name} (or pip install 'raypo[tune]', or use tune.search_alg=random)"]) from exc


def param_space(dims: list[SearchDim]) -> dict[str, Any]:
    return {d.key: d.domain() for d in dims}


def build_tuner(sweep: Sweep, setup: TrialSetup, max_concurrent: int):
    from ray import tune

    path, fs = sweep.tune_location()
    storage_path = path.rsplit("/", 1)[0]
    cfg = sweep.cfg
    tune_config = tune.TuneConfig(
        metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=build_scheduler(cfg),
        search_alg=build_search_algorithm(cfg), num_samples=cfg.tune.num_samples,
        max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname)
    run_config = tune.RunConfig(name=sweep.name, storage_path=storage_path, storage_filesystem=fs,
                                failure_config=tune.FailureConfig(max_failures=0), verbose=1)
    return tune.Tuner(make_trainable(setup), param_space=param_space(sweep.dims), tune_config=tune_config,
                      run_config=run_config)


def _comparable(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config without the settings that may change between a sweep and its resume."""
    out = {k: v for k, v in raw.items() if k != "ray"}
    out["tune"] = {k: v for k, v in dict(raw.get("tune", {})).items() if k != "max_concurrent_trials"}
    return out


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def check_resume_config(sweep: Sweep, stored_yaml: str) -> None:
    """Refuse to resume a sweep with a config other than the one it started with."""
    from omegaconf import OmegaConf

    stored = OmegaConf.to_container(OmegaConf.create(stored_yaml), resolve=False)
    diffs = _differences(_comparable(stored), _comparable(to_dict(sweep.cfg)))
    if diffs:
        shown = diffs[:10] + ([f"... and {len(diffs) - 10} more"] if len(diffs) > 10 else [])
        raise ConfigError([f"--resume: the sweep {sweep.name!r} at {sweep.uri} was started with another "
                           "config (" + "; ".join(shown) + "); resume with the same config and overrides, or "
                           "start a new sweep with checkpoint.run_name=<new name>"])


def run_sweep(sweep: Sweep, *, resume: bool = False):
    """Start (or with ``resume`` restore) the sweep and wait for it; returns Tune's ResultGrid."""
    import ray
    from ray import tune

    cfg = sweep.cfg
    path, fs = sweep.tune_location()
    exists = tune.Tuner.can_restore(path, storage_filesystem=fs)
    if exists and not resume:
        raise ConfigError([f"a sweep named {sweep.name!r} already exists at {sweep.uri}: resume it with "
                           "`raypo tune CONFIG --resume`, or start a new one with "
                           "checkpoint.run_name=<new name>"])
    if exists:
        stored = read_text(sweep.config_uri, cfg.data.s3)
        if stored is not None:
            check_resume_config(sweep, stored)
    elif resume:
        print(f"raypo: nothing to resume at {sweep.uri}; starting the sweep", flush=True)
    reference_cache, shared_data = prepare_shared_reference(sweep)
    setup = TrialSetup(base=base_for_trials(cfg), dims=sweep.dims, train_runs=sweep.train_runs,
                       metric=cfg.tune.metric, reference_cache=reference_cache, shared_data=shared_data,
                       group=sweep.name)
    if exists:
        print(f"raypo: resuming the sweep at {sweep.uri} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(path, make_trainable(setup), resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        max_concurrent = derive_max_concurrent_trials(cfg, ray.cluster_resources())
        resource, per_trial = resources_per_trial(cfg)
        print(f"raypo: sweep {sweep.name}: {num_trials(cfg, sweep.dims)} trials, at most {max_concurrent} at "
              f"a time ({per_trial:g} {resource} each), results in {sweep.uri}", flush=True)
        write_text(sweep.config_uri, to_yaml(cfg), cfg.data.s3)
        tuner = build_tuner(sweep, setup, max_concurrent)
    return tuner.fit()


def describe_sweep(sweep: Sweep) -> str:
    """What ``raypo tune --dry-run`` prints: trials, searched keys, scheduler, concurrency, reference."""
    cfg = sweep.cfg
    tu = cfg.tune
    share, _, why = share_decision(sweep)
    lines = [f"sweep {sweep.name} at {sweep.uri}",
             f"  trials: {num_trials(cfg, sweep.dims)} (num_samples={tu.num_samples}), metric {tu.metric} "
             f"({tu.mode}), search {tu.search_alg}"]
    for d in sweep.dims:
        lines.append(f"  {d.key}: {d.describe()}")
    if tu.scheduler == "asha":
        lines.append(f"  scheduler: ASHA on the optimizer step (grace_period={tu.grace_period}, "
                     f"reduction_factor={tu.reduction_factor}, max_t={cfg.train.max_steps})")
    else:
        lines.append("  scheduler: FIFO (every trial runs to the end)")
    concurrent = tu.max_concurrent_trials or "derived from the cluster"
    resource, per_trial = resources_per_trial(cfg)
    lines.append(f"  max concurrent trials: {concurrent} ({per_trial:g} {resource} per trial)")
    lines.append(f"  reference log-probs: {'shared: ' if share else ''}{why}")
    return "\n".join(lines)
