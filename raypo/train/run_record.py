"""The run record: which config a named run was started with, so a later start resumes only the same run.

A run's name (``checkpoint.run_name``) is deterministic so that a restarted driver finds its checkpoints
and resumes. The flip side: starting a *different* run under a name that already holds checkpoints would
silently continue the old run (and with another worker count, fail deep inside DeepSpeed). So the first
start writes ``<storage_path>/<run_name>/raypo_run.json`` with the run-defining part of the config, and
every later start compares against it:

* same run-defining config: resume (the settings that may change on a resume are listed in
  :data:`RESUMABLE`: more steps or epochs, evaluation cadence, checkpointing, logging, cluster address);
* anything else differs: refuse before any cluster work, naming each differing key with both values and
  the two ways out (a new ``checkpoint.run_name``, or deleting the old run);
* unless the run holds no checkpoint yet (an earlier start failed before training): then there is
  nothing to resume, and the record is replaced with the new config (saying so).
"""

from __future__ import annotations

import json
import os
from typing import Any

from raypo.config import RaypoConfig, to_dict
from raypo.errors import RunError

RECORD_NAME = "raypo_run.json"

# Keys (dotted) and whole sections that may differ between the starts of one run.
RESUMABLE = ("train.max_steps", "train.epochs", "train.eval_every", "train.eval_batches",
             "train.reference_cache", "scaling.resources_per_worker", "scaling.placement_strategy",
             "data.max_reject_fraction", "data.quarantine_path")
RESUMABLE_SECTIONS = ("checkpoint", "logging", "tune", "ray", "plan")


class RunConflictError(RunError):
    """A run of this name exists and was started with a different run-defining config."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def run_identity(cfg: RaypoConfig) -> dict[str, Any]:
    """The run-defining settings of ``cfg`` as a flat ``{dotted key: value}`` dict (JSON-compatible)."""
    flat = _flatten(json.loads(json.dumps(to_dict(cfg), default=str)))
    return {k: v for k, v in sorted(flat.items())
            if k.split(".", 1)[0] not in RESUMABLE_SECTIONS and not k.startswith(RESUMABLE)}


def run_directory(cfg: RaypoConfig, name: str) -> str:
    path = cfg.checkpoint.storage_path.rstrip("/")
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    return f"{path}/{name}"


def latest_checkpoint(cfg: RaypoConfig, name: str) -> tuple[str, int] | None:
    """(directory, global step) of the run's newest good checkpoint, or None.

    The one definition shared with Ray Train: the newest checkpoint in Ray's own list whose manifest
    checks out (:func:`raypo.train.checkpoint_integrity.latest_good_checkpoint`); damaged ones are set
    aside or refused according to ``checkpoint.on_corrupt``.
    """
    from raypo.storage import fsspec_for
    from raypo.train.checkpoint_integrity import latest_good_checkpoint

    run_dir = run_directory(cfg, name)
    fs = fsspec_for(run_dir, cfg.data.s3)
    if not fs.exists(run_dir):
        return None
    return latest_good_checkpoint(run_dir, fs, getattr(cfg.checkpoint, "on_corrupt", "fallback"))


def _has_checkpoint(run_dir: str, fs) -> bool:
    from raypo.train.checkpoint_integrity import listed_checkpoints, read_snapshot

    return bool(listed_checkpoints(read_snapshot(run_dir, fs)))


def check_or_write_run_record(cfg: RaypoConfig, name: str) -> bool:
    """Refuse (:class:`RunConflictError`) a start whose config differs from the recorded one; write the
    record on a first start. Returns True when a record was already there (the run resumes)."""
    from raypo.storage import fsspec_for

    run_dir = run_directory(cfg, name)
    fs = fsspec_for(run_dir, cfg.data.s3)
    record_path = f"{run_dir}/{RECORD_NAME}"
    current = run_identity(cfg)
    if fs.exists(record_path):
        with fs.open(record_path, "r") as f:
            recorded = json.load(f).get("config", {})
        differences = [(k, recorded.get(k, "<unset>"), current.get(k, "<unset>"))
                       for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
        if differences and not _has_checkpoint(run_dir, fs):
            # an earlier start stopped before its first checkpoint (a typo in a path, say): nothing to
            # resume, so the name is free again
            print(f"raypo: run {name!r} at {run_dir} has a record but no checkpoint (its earlier start "
                  f"stopped before training); replacing the record with this config "
                  f"({', '.join(k for k, _, _ in differences[:5])} changed)", flush=True)
            _write_record(fs, record_path, name, current)
            return False
        if differences:
            shown = "\n".join(f"  - {k}: {old!r} in the existing run, {new!r} now"
                              for k, old, new in differences[:20])
            more = f"\n  ... and {len(differences) - 20} more" if len(differences) > 20 else ""
            raise RunConflictError(
                f"checkpoint.run_name={name!r} already holds a run at {run_dir} that was started with a "
                f"different config, so it cannot be resumed with this one:\n{shown}{more}\n"
                f"Start a new run with another name (checkpoint.run_name={name}-2), or delete {run_dir} to "
                "start this name over. (Only more steps or epochs, evaluation, checkpointing and logging "
                "settings may change when a run resumes.)")
        return True
    fs.makedirs(run_dir, exist_ok=True)
    _write_record(fs, record_path, name, current)
    return False


def _write_record(fs, record_path: str, name: str, current: dict[str, Any]) -> None:
    with fs.open(record_path, "w") as f:
        json.dump({"run_name": name, "config": current}, f, indent=1, sort_keys=True)
