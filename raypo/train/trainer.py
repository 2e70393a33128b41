"""Trainer assembly on the driver: datasets, Ray Train's TorchTrainer, storage, callbacks, export.

This is the thin Ray glue around :func:`raypo.train.recipe.train_loop_per_worker`; everything that runs on the
workers lives there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from raypo.config import RaypoConfig, to_dict
from raypo.errors import RunError


@dataclass
class PreparedDatasets:
    """Tokenised train and eval datasets prepared outside :func:`build_trainer`.

    A sweep tokenises the data and computes the reference log-probs once, into a Parquet cache that every
    trial reads (:mod:`raypo.tune.sweep`); such a trial hands the datasets in here instead of rebuilding them.
    They must carry ``ref_logps`` (and ``ref_entropy`` for MallowsPO) when ``train.reference=precomputed``.
    """

    train: Any
    eval: Any
    dimensions: list[str]
    data_report: Optional[dict[str, Any]] = None  # ValidationReport.to_dict(), kept with the run
    dispersion: Optional[Any] = None  # MallowsPO's c for this data (raypo.train.dispersion), or None


@dataclass
class TrainResult:
    run_dir: str
    checkpoint: Optional[str]
    export_dir: Optional[str]
    metrics: dict[str, Any]


def run_name(cfg: RaypoConfig) -> str:
    """A deterministic name (never a timestamp), so a restarted driver finds the run's checkpoints."""
    return cfg.checkpoint.run_name or f"raypo-{cfg.loss.name}"


def storage_location(cfg: RaypoConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig.

    Local paths are made absolute. ``s3://`` paths use pyarrow's S3 filesystem, pointed at a custom endpoint
    (MinIO, a loopback test server) when ``data.s3.endpoint_url`` or ``AWS_ENDPOINT_URL`` names one.
    """
    path = cfg.checkpoint.storage_path
    if not path.startswith("s3://"):
        return str(Path(os.path.expanduser(path)).resolve()), None
    endpoint = cfg.data.s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    if not endpoint:
        return path, None
    from pyarrow import fs

    scheme, _, host = endpoint.partition("://")
    region = cfg.data.s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    s3 = fs.S3FileSystem(endpoint_override=host, scheme=scheme or "https", region=region)
    return path.removeprefix("s3://"), s3


def local_run_directory(cfg: RaypoConfig) -> str:
    """Where the driver writes the run's metric history and TensorBoard files: the run directory for local
    storage, ``~/raypo_runs/<run_name>`` when checkpoints go to S3."""
    storage_path, storage_fs = storage_location(cfg)
    remote = storage_fs is not None or "://" in storage_path
    base = os.path.expanduser("~/raypo_runs") if remote else storage_path
    return os.path.join(base, run_name(cfg))


def worker_run_directory(cfg: RaypoConfig) -> str:
    """The run's local directory as rank 0 is told it: with checkpoints on S3 it is unexpanded
    (``~/raypo_runs/<run_name>``), so the node rank 0 runs on puts it in its own home, not at the driver's
    home path, which on a cluster exists only on the driver's machine (docs/cluster.md); with local
    storage it is the run directory itself, which every node must share anyway."""
    storage_path, storage_fs = storage_location(cfg)
    if storage_fs is not None or "://" in storage_path:
        return f"~/raypo_runs/{run_name(cfg)}"
    return local_run_directory(cfg)


def resolve_model_paths(cfg: RaypoConfig) -> tuple[str, str]:
    """Local (or hub id) paths of the policy and reference models; ``tiny://`` models are built here."""
    from raypo.model.loading import resolve_model_source
    from raypo.storage import s3_options_of

    options = s3_options_of(cfg.data.s3)
    policy = resolve_model_source(cfg.model.path, storage_options=options)
    ref = policy
    if cfg.model.reference_path:
        ref = resolve_model_source(cfg.model.reference_path, storage_options=options)
    return policy, ref


def model_sources(cfg: RaypoConfig) -> tuple[str, str]:
    """Policy and reference as every node resolves them for itself.

    ``s3://`` and ``tiny://`` stay URIs: each process that loads a model (training workers, tokenising and
    reference-scoring actors) copies or builds it into its own node's cache
    (:func:`raypo.model.loading.resolve_model_source`, idempotent and lock-safe), so a worker on a node that
    joined an autoscaling cluster after the driver resolved the model still finds it. Local paths and
    Hugging Face ids are used as given.
    """
    policy = str(cfg.model.path)
    return policy, str(cfg.model.reference_path or policy)


# Forwarded from the driver to a cluster's processes through Ray's runtime_env. Ray keeps a runtime_env in
# its control store and shows it in the dashboard and job state, so secrets (AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN, HF_TOKEN, ...) are never put there: processes of a local cluster inherit them from the
# driver's environment, and the nodes of a remote cluster use their own (instance roles, the image, a job
# spec's forward_env).
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "HF_HOME",
                  "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# WANDB_*/MLFLOW_*: the trackers run on rank 0 (WANDB_MODE, MLFLOW_TRACKING_URI, ...); their keys and
# tokens are left out by _looks_secret and read from each node's own environment.
_FORWARDED_PREFIXES = ("RAYPO_", "AWS_ENDPOINT_URL_", "WANDB_", "MLFLOW_")


def driver_environment() -> dict[str, str]:
    """The driver's non-secret settings for the cluster's processes (see ``_FORWARDED_ENV``)."""
    return {k: v for k, v in os.environ.items()
            if (k in _FORWARDED_ENV or k.startswith(_FORWARDED_PREFIXES)) and not _looks_secret(k)}


def _looks_secret(name: str) -> bool:
    return any(word in name for word in ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "API_KEY", "AUTH",
                                         "CREDENTIAL"))


@dataclass
class EpochPlan:
    """How one epoch of ``rows`` prompts is consumed by ``workers`` ranks in steps of
    ``micro_batch_size * grad_accum_steps`` prompts per rank.

    Ray Data's equal split gives each rank floor(rows / workers) rows; each rank trains only whole
    micro-batches, and every rank stops when any rank runs out (they must agree on the step count). The
    prompts beyond that are not trained in this epoch: a different set each epoch, as the order is
    reshuffled per epoch.
    """

    rows: int
    steps: int
    trained: int

    @property
    def left_over(self) -> int:
        return self.rows - self.trained


def epoch_plan(rows: int, cfg: RaypoConfig) -> EpochPlan:
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    steps = (rows // cfg.scaling.num_workers) // per_step
    return EpochPlan(rows=rows, steps=steps, trained=steps * per_step * cfg.scaling.num_workers)


def describe_epochs(rows: int, cfg: RaypoConfig) -> str:
    """One line on how the training prompts are consumed; :class:`RunError` when no step fits."""
    plan = epoch_plan(rows, cfg)
    t, workers = cfg.train, cfg.scaling.num_workers
    batch = f"{workers} worker(s) x {t.micro_batch_size} prompt(s) x {t.grad_accum_steps} micro-batch(es)"
    if plan.steps == 0:
        raise RunError(f"the training split has {rows} prompts, fewer than one global batch ({batch} = "
                       f"{workers * t.micro_batch_size * t.grad_accum_steps}); lower train.micro_batch_size "
                       "or train.grad_accum_steps, use fewer workers (scaling.num_workers), or add data")
    line = f"raypo: {rows} training prompts, {plan.steps} step(s) per epoch of {batch}"
    if plan.left_over:
        line += (f"; {plan.left_over} prompt(s) per epoch do not fill a step and are left out of that epoch "
                 "(a different set each epoch)")
    return line


def prepare_datasets(cfg: RaypoConfig, *, reference_cache: Optional[str] = None,
                     with_entropy: Optional[bool] = None) -> PreparedDatasets:
    """Read, validate and tokenise ``cfg.data`` (printing the data report), and add the reference
    log-probs when they are precomputed: from ``reference_cache`` (default ``train.reference_cache``), or
    scored here without a cache. ``with_entropy``: also MallowsPO's entropies (None: when the loss needs
    them). ``raypo train`` and a sweep's shared reference stage both prepare their data here."""
    from raypo.data.pipeline import build_datasets

    resolve_model_paths(cfg)  # fail fast on a bad model path, and fill the driver node's cache
    policy_path, ref_path = model_sources(cfg)
    train_ds, eval_ds, report = build_datasets(cfg.data, tokenizer_path=policy_path)
    print(report.format(), flush=True)
    cache = reference_cache or (cfg.train.reference_cache if cfg.train.reference == "precomputed" else None)
    if cache:
        from raypo.train.reference_cache import cached_reference_logprobs

        train_ds, eval_ds = (cached_reference_logprobs(ds, cfg, ref_path, cache, with_entropy=with_entropy)
                             if ds.count() else ds for ds in (train_ds, eval_ds))
    elif cfg.train.reference == "precomputed":
        from raypo.train.reference import add_reference_logprobs

        train_ds, eval_ds = (add_reference_logprobs(ds, cfg, ref_path, with_entropy=with_entropy)
                             for ds in (train_ds, eval_ds))
    from raypo.train.dispersion import resolve_dispersion  # MallowsPO's c from the reference entropies

    dispersion = resolve_dispersion(cfg, train_ds, ref_path,
                                    scored=bool(cache) or cfg.train.reference == "precomputed")
    return PreparedDatasets(train_ds, eval_ds, list(report.dimensions or []), report.to_dict(), dispersion)


def build_trainer(cfg: RaypoConfig, *, callbacks: Optional[list] = None,
                  precomputed_datasets: Optional[PreparedDatasets] = None,
                  report_metric: Optional[str] = None):
    """A ready-to-fit TorchTrainer for ``cfg`` (used by ``raypo train`` and by each Tune trial).

    ``precomputed_datasets``: use these tokenised datasets (e.g. a sweep's shared reference cache) instead
    of reading, tokenising and scoring ``cfg.data`` here. ``report_metric``: a Tune trial's metric; every
    logged row that carries it is reported to Ray Train (and so to Tune's scheduler), not only those due by
    ``logging.report_interval_s``. Rank 0 writes the per-step rows (:mod:`raypo.train.metrics_log`).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raypo.data.splits import data_config, trainer_datasets
    from raypo.train.callbacks import ProgressCallback
    from raypo.train.recipe import train_loop_per_worker
    from raypo.train.trackers import check_tracker_packages

    check_tracker_packages(cfg)  # a missing tracker client is a config error here, not on rank 0 later
    policy_path, ref_path = model_sources(cfg)
    if precomputed_datasets is None:
        precomputed_datasets = prepare_datasets(cfg)
    else:
        resolve_model_paths(cfg)  # fail fast on a bad model path, and fill the driver node's cache
    train_ds, eval_ds = precomputed_datasets.train, precomputed_datasets.eval
    dimensions = list(precomputed_datasets.dimensions)
    print(describe_epochs(train_ds.count(), cfg), flush=True)
    has_eval = eval_ds.count() > 0
    datasets = trainer_datasets(train_ds, eval_ds, epochs=cfg.train.epochs, seed=cfg.data.shuffle_seed)
    storage_path, storage_fs = storage_location(cfg)
    name = run_name(cfg)
    local_run_dir = local_run_directory(cfg)
    from raypo.train.dispersion import calibrated_config  # loss.dispersion_c=auto -> the run's number

    cfg = calibrated_config(cfg, precomputed_datasets.dispersion, train_ds, ref_path, local_run_dir)
    write_run_files(local_run_dir, cfg, precomputed_datasets.data_report)
    all_callbacks = [ProgressCallback(), *(callbacks or [])]

    scaling = ray.train.ScalingConfig(
        num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=dict(cfg.scaling.resources_per_worker) or None,
        placement_strategy=cfg.scaling.placement_strategy)
    run_config = ray.train.RunConfig(
        name=name, storage_path=storage_path, storage_filesystem=storage_fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures,
                                               controller_failure_limit=cfg.checkpoint.max_start_timeouts),
        callbacks=all_callbacks, worker_runtime_env={"env_vars": driver_environment()})
    base = f"{cfg.checkpoint.storage_path.rstrip('/')}/{name}"
    loop_config = {"config": to_dict(cfg), "policy_path": policy_path, "ref_path": ref_path,
                   "has_eval": has_eval, "dimensions": dimensions, "report_metric": report_metric,
                   "run_dir": worker_run_directory(cfg), "run_name": name, "checkpoint_base": base,
                   # with checkpoints on S3 the history is also kept beside them (metrics_log)
                   "remote_metrics_path": f"{base}/metrics.jsonl" if "://" in base else None}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling, run_config=run_config, datasets=datasets,
        dataset_config=data_config(datasets))


def write_run_files(local_run_dir: str, cfg: RaypoConfig, data_report: Optional[dict[str, Any]]) -> None:
    """``config.yaml`` (the full config) and ``data_report.json`` beside the run's metric history, for
    ``raypo report`` (:mod:`raypo.report.artifacts`)."""
    import json

    from raypo.config import to_yaml

    os.makedirs(local_run_dir, exist_ok=True)
    files = {"config.yaml": to_yaml(cfg)}
    if data_report is not None:
        files["data_report.json"] = json.dumps(data_report, indent=1, default=str)
    for name, text in files.items():
        tmp = os.path.join(local_run_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(local_run_dir, name))


def write_run_summary(cfg: RaypoConfig, result: TrainResult, wall_s: float) -> None:
    """``raypo_summary.json``: how the run ended (final checkpoint, export, wall time, last metrics)."""
    import json

    path = os.path.join(local_run_directory(cfg), "raypo_summary.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    summary = {"run_name": run_name(cfg), "run_dir": result.run_dir, "checkpoint": result.checkpoint,
               "export_dir": result.export_dir, "wall_s": wall_s,
               "metrics": {k: v for k, v in (result.metrics or {}).items()
                           if isinstance(v, (int, float, str))}}
    from raypo.train.dispersion import read_record

    if (dispersion := read_record(local_run_directory(cfg))) is not None:  # MallowsPO's calibrated c
        summary["dispersion"] = dispersion
    with open(f"{path}.tmp", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    os.replace(f"{path}.tmp", path)


def init_ray(cfg: RaypoConfig) -> None:
    import ray

    from raypo.train.quiet import QUIET_ENV, quiet

    quiet()
    if ray.is_initialized():
        return
    env = driver_environment()
    if os.environ.get("RAYPO_VERBOSE") != "1":
        env = {**QUIET_ENV, **env}
    # A Ray job's driver finds its cluster in RAY_ADDRESS; otherwise start a private local cluster rather
    # than attach to whatever `ray start` left running on this machine.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    # Inside a Ray job the job's runtime_env already reaches every worker, and Ray refuses a driver
    # runtime_env that overlaps it.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    pinned_port = None
    if address == "local" and not in_job:
        # Ray's State API, which Train's placement-group cleaner uses to free the workers of a run whose
        # controller died (a Tune trial stopped early), finds its cluster from RAY_ADDRESS or else fails
        # when several Ray instances run on the machine; so the new cluster's GCS port is fixed here and
        # its address handed to every process of the cluster.
        pinned_port = _free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(pinned_port)
        env["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{pinned_port}"
    try:
        ray.init(address=address, num_cpus=cfg.ray.num_cpus if address == "local" else None,
                 runtime_env=None if in_job else {"env_vars": env}, logging_level=logging.WARNING,
                 configure_logging=True)
    finally:
        if pinned_port is not None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _completed_run(cfg: RaypoConfig, checkpoint: str, step: int) -> TrainResult:
    """A run that already reached ``train.max_steps``: nothing to train; export its last checkpoint (if
    asked) and report its last metrics."""
    from raypo.train.callbacks import read_metrics

    name = run_name(cfg)
    print(f"raypo: run {name!r} is already complete (step {step} of train.max_steps={cfg.train.max_steps}); "
          f"nothing to train. Raise train.max_steps to continue it, or set checkpoint.run_name to start a "
          "new run.", flush=True)
    export_dir = _export(cfg, checkpoint)
    metrics: dict[str, Any] = {}
    history = os.path.join(local_run_directory(cfg), "metrics.jsonl")
    if os.path.exists(history):
        for record in read_metrics(history):
            metrics.update(record)
    return TrainResult(run_dir=f"{cfg.checkpoint.storage_path.rstrip('/')}/{name}", checkpoint=checkpoint,
                       export_dir=export_dir, metrics=metrics)


def _export(cfg: RaypoConfig, checkpoint: str) -> Optional[str]:
    """Export ``checkpoint`` (local or s3://) to ``checkpoint.export_path`` (local or s3://); None when no
    export is asked."""
    if not cfg.checkpoint.export_path:
        return None
    from raypo.train.checkpoint import export_checkpoint

    target = cfg.checkpoint.export_path
    if "://" in target:
        return _export_to_remote(checkpoint, target, cfg)
    export_dir = str(Path(os.path.expanduser(target)).resolve())
    export_checkpoint(checkpoint, export_dir)
    return export_dir


def _export_to_remote(checkpoint: str, uri: str, cfg: RaypoConfig) -> str:
    """Export into a local temporary directory, then upload its files to ``uri`` (``s3://``): Hugging
    Face's ``save_pretrained`` writes local files only, and on a cluster the driver's disk is not where the
    model is wanted. Files of an earlier export that the new one does not have are removed afterwards."""
    import shutil
    import tempfile

    from raypo.storage import fsspec_for
    from raypo.train.checkpoint import export_checkpoint

    local = tempfile.mkdtemp(prefix="raypo_export_")
    try:
        export_checkpoint(checkpoint, os.path.join(local, "export"))
        fs = fsspec_for(uri, cfg.data.s3)
        base = uri.rstrip("/")
        names = sorted(os.path.relpath(os.path.join(d, f), os.path.join(local, "export"))
                       for d, _, files in os.walk(os.path.join(local, "export")) for f in files)
        for name in names:
            fs.put_file(os.path.join(local, "export", name), f"{base}/{name}")
        stale = [k for k in (fs.find(base) if fs.exists(base) else [])
                 if os.path.relpath(k, base.split("://", 1)[-1]) not in names]
        if stale:
            fs.rm(stale)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return base


def run_training(cfg: RaypoConfig) -> TrainResult:
    """Fit, then export the final checkpoint to Hugging Face format if ``checkpoint.export_path`` is set.

    A run name that already holds a run resumes it only if the run-defining config is the same
    (:mod:`raypo.train.run_record`); otherwise :class:`~raypo.train.run_record.RunConflictError`. Before
    Ray starts: the driver-side checks (:mod:`raypo.train.preflight`), the run's lock
    (:mod:`raypo.train.run_lock`) and the verification of its latest checkpoint
    (:mod:`raypo.train.checkpoint_integrity`).
    """
    from raypo.storage import fsspec_for
    from raypo.train.preflight import preflight
    from raypo.train.run_lock import run_lock
    from raypo.train.run_record import run_directory

    preflight(cfg)  # bad paths and lambda lengths: a config error now, not on the workers in a minute
    run_dir = run_directory(cfg, run_name(cfg))
    with run_lock(run_dir, fsspec_for(run_dir, cfg.data.s3)):  # one driver per run name
        return _run_training_locked(cfg)


def _startup_timeout(exc: BaseException) -> Optional[BaseException]:
    """The worker-group start timeout behind a failed ``fit()`` (Ray Train wraps it in a ControllerError)."""
    seen: set[int] = set()
    todo: list[Optional[BaseException]] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e).__name__ == "WorkerGroupStartupTimeoutError":
            return e
        todo += [getattr(e, "controller_failure", None), e.__cause__, e.__context__]
    return None


def _fit(trainer, cfg: RaypoConfig):
    """``trainer.fit()``; a worker group that could not be placed becomes a :class:`RunError` that says
    what was asked for, how long it waited and that the checkpoints are kept (docs/cluster.md)."""
    try:
        return trainer.fit()
    except Exception as exc:
        timeout = _startup_timeout(exc)
        if timeout is None:
            raise
        from raypo.train.run_record import latest_checkpoint

        s = cfg.scaling
        per_worker = dict(s.resources_per_worker) or ({"GPU": 1} if s.use_gpu else {"CPU": 1})
        latest = latest_checkpoint(cfg, run_name(cfg))
        kept = (f"its latest checkpoint, step {latest[1]} at {latest[0]}, is kept" if latest is not None
                else "it had no checkpoint yet")
        tries = cfg.checkpoint.max_start_timeouts + 1
        raise RunError(
            f"the run stopped: its {s.num_workers} worker(s) of {per_worker} (placement "
            f"{s.placement_strategy}) could not all be placed, {tries} time(s) in a row ({timeout}). "
            f"Nothing is lost: {kept}, and running the same command again resumes from it once the "
            "cluster has room. To wait longer, raise checkpoint.max_start_timeouts (-1: wait as long as "
            "it takes) or RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; or lower scaling.num_workers") from exc


def _run_training_locked(cfg: RaypoConfig) -> TrainResult:
    from raypo.train.run_record import check_or_write_run_record, latest_checkpoint

    name = run_name(cfg)
    resumed = check_or_write_run_record(cfg, name)
    latest = latest_checkpoint(cfg, name)  # verified; a damaged one is set aside or refused
    if latest is not None and latest[1] >= cfg.train.max_steps:
        return _completed_run(cfg, *latest)
    if resumed:
        print(f"raypo: run {name!r} exists with the same config; resuming it from its latest checkpoint "
              "(set checkpoint.run_name to start a new run)", flush=True)
    started = time.time()
    init_ray(cfg)
    result = _fit(build_trainer(cfg), cfg)
    ckpt = result.checkpoint
    export_dir = None
    if ckpt is not None and cfg.checkpoint.export_path:
        with ckpt.as_directory() as local:
            export_dir = _export(cfg, local)
    done = TrainResult(run_dir=f"{cfg.checkpoint.storage_path.rstrip('/')}/{run_name(cfg)}",
                       checkpoint=ckpt.path if ckpt is not None else None, export_dir=export_dir,
                       metrics=dict(result.metrics or {}))
    write_run_summary(cfg, done, time.time() - started)
    return done
