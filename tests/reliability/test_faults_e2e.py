"""Fault cases end to end (Ray Train, DeepSpeed ZeRO-3 on gloo, 2 CPU workers, a tiny Llama): a killed
worker, a killed driver, a resume mid-epoch, and a damaged latest checkpoint all end with the weights of
the uninterrupted run.

Every run trains the same 8 prompts for 4 steps, 2 steps per epoch, with lambda-DPO and a per-prompt
Dirichlet lambda, so the interrupted runs must match the uninterrupted one to float32 rounding only if a
resume continues mid-epoch at the right micro-batch and with the lambda sequence where it stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fault_helpers import wait_for_committed_checkpoint

from raypo.config import load_config
from raypo.testing import exported_weights, max_abs_diff
from raypo.testing import short_run_overrides as _short_run_overrides
from raypo.train.trainer import run_training

pytestmark = pytest.mark.e2e

STEPS = 4


def base_overrides(model_dir: Path, storage: str, name: str) -> list[str]:
    """raypo.testing's short deterministic run on 8 prompts (2 steps per epoch), lambda-DPO with a
    per-prompt lambda drawn from Dirichlet(1)."""
    drop = ("data.train_path", "loss.name", "loss.params", "train.epochs")
    kept = [o for o in _short_run_overrides(model_dir, storage, name, STEPS) if not o.startswith(drop)]
    return kept + ["data.train_path=synthetic://default?num_prompts=8&seed=2", "loss.name=lambda_dpo",
                   "lambdas.schedule=uniform", "lambdas.per=prompt", "train.epochs=2"]
# Runs differ only in the order floating-point sums are taken, far below the size of the update itself.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def baseline_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    """The uninterrupted reference run: (config, result, exported weights)."""
    storage = str(tmp_path_factory.mktemp("runs"))
    cfg = load_config(None, base_overrides(tiny_model_dir, storage, "baseline"))
    result = run_training(cfg)
    return cfg, result, exported_weights(result.export_dir)


@pytest.fixture(scope="module")
def baseline(baseline_run):
    _, result, weights = baseline_run
    return result, weights


def history_steps(run_dir) -> list[int]:
    from raypo.train.callbacks import read_metrics

    return [r["step"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def test_worker_killed_mid_run_resumes_to_the_same_weights(baseline, tiny_model_dir, tmp_path, monkeypatch):
    """Rank 1 killed right after step 4, before that step's checkpoint: the run resumes from step 3, one
    micro-batch into epoch 2, and must continue with the data and the lambda draws where they stopped; the
    history's row of step 4 written before the kill is superseded and must not stay beside the new one.
    Rank 1 waits 6 s before it dies (RAYPO_FAIL_DELAY_S), three of Ray Train's 2 s report rounds, so that
    step 3's checkpoint is committed: killed at once, the run could resume from an earlier step or from
    nothing and still end with the same weights, which would not test the resume mid-epoch."""
    _, weights = baseline
    marker = tmp_path / "killed"
    monkeypatch.setenv("RAYPO_FAIL_AT_STEP", "4")
    monkeypatch.setenv("RAYPO_FAIL_MARKER", str(marker))
    monkeypatch.setenv("RAYPO_FAIL_DELAY_S", "6")
    cfg = load_config(None, base_overrides(tiny_model_dir, str(tmp_path), "worker_kill")
                      + ["checkpoint.max_failures=1"])
    result = run_training(cfg)
    assert marker.read_text().startswith("killed rank 1 after step 4")
    # resumed from step 3: its checkpoint was written before the kill and not again after it
    killed_at = marker.stat().st_mtime_ns
    manifests = {step: Path(result.run_dir, f"step_{step:08d}", "raypo_manifest_r0.json").stat().st_mtime_ns
                 for step in (3, 4)}
    assert manifests[3] < killed_at < manifests[4], (manifests, killed_at)
    assert result.metrics["step"] == STEPS
    assert max_abs_diff(exported_weights(result.export_dir), weights) < TOLERANCE
    assert history_steps(result.run_dir) == list(range(1, STEPS + 1))  # one row per step


def _s3_keys(s3, prefix: str) -> list[str]:
    return s3.s3fs().find(f"{s3.bucket}/{prefix}")


def test_driver_stopped_mid_run_resumes_from_s3(baseline, ray_cluster, s3, tiny_model_dir, tmp_path):
    """`raypo train` with checkpoints on the loopback S3 endpoint, killed after its second checkpoint, then
    run again with the same command: it continues from that checkpoint and ends where the baseline does.
    Both drivers attach to the session's running cluster (a driver restarted on a long-lived cluster); the
    killed driver's job, its Train controller and workers, is torn down by the cluster.

    The first run's workers hold after step 2 (RAYPO_HOLD_AFTER_STEP) and the driver is killed once Ray
    Train has listed that checkpoint in its snapshot: a checkpoint's files on S3 come before the controller
    commits it, and a driver killed in between leaves nothing to resume from."""
    _, weights = baseline
    address = ray_cluster.get_runtime_context().gcs_address
    storage = f"s3://{s3.bucket}/driver_restart"
    overrides = base_overrides(tiny_model_dir, storage, "restart")
    overrides = [o for o in overrides if not o.startswith("checkpoint.export_path")]
    overrides.append(f"checkpoint.export_path={tmp_path / 'export'}")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({}))
    cmd = [sys.executable, "-m", "raypo.cli", "train", str(cfg_path), *overrides, f"ray.address={address}"]
    env = {**os.environ, "RAY_ADDRESS": address}  # where Ray's State API (Train's cleaner) looks
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**env, "RAYPO_HOLD_AFTER_STEP": "2"})
    fs = s3.s3fs()
    try:
        wait_for_committed_checkpoint(fs, f"{s3.bucket}/driver_restart/restart", step=2, proc=proc,
                                      log=tmp_path / "first.log", timeout=600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    keys = _s3_keys(s3, "driver_restart/restart")
    assert not any("step_00000004" in k for k in keys), "the first run finished before it was stopped"

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert re.search(r"resuming from \S+/step_00000002 at step 2 ", second.stdout + second.stderr), \
        second.stdout[-3000:]
    assert max_abs_diff(exported_weights(str(tmp_path / "export")), weights) < TOLERANCE
    # one row per step after the restart: locally, and in the copy kept beside the checkpoints on S3
    from raypo.train.trainer import local_run_directory

    assert history_steps(local_run_directory(load_config(None, overrides))) == list(range(1, STEPS + 1))
    fs.invalidate_cache()  # the listings cached while waiting for the checkpoint predate the copy
    remote = fs.cat_file(f"{s3.bucket}/driver_restart/restart/metrics.jsonl").decode().splitlines()
    assert [int(json.loads(line)["step"]) for line in remote] == list(range(1, STEPS + 1))


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(baseline_run, capsys):
    """A truncated ZeRO-3 optimizer shard in the last checkpoint: with checkpoint.on_corrupt=fail the start
    is refused naming the file; by default the checkpoint is set aside, Ray's list is rewritten, and the run
    resumes from the step before, retrains the last step and ends with the same weights. Runs last: it
    damages the baseline run's own checkpoint."""
    from raypo.cli import main
    from raypo.train.checkpoint_integrity import SNAPSHOT_FILE

    cfg, result, weights = baseline_run
    run_dir = Path(result.run_dir)
    last = run_dir / f"step_{STEPS:08d}"
    shard = next(last.rglob("zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    args = ["train", str(_empty_config(run_dir)), *base_overrides_of(cfg)]

    assert main([*args, "checkpoint.on_corrupt=fail"]) == 1
    err = capsys.readouterr().err
    assert shard.name in err and "truncated" in err and "Traceback" not in err

    kept = run_dir / f"step_{STEPS - 1:08d}" / "raypo_manifest_r0.json"
    kept_mtime = kept.stat().st_mtime_ns
    export = run_dir.parent / "fallback_export"
    assert main([*args, f"checkpoint.export_path={export}"]) == 0
    out = capsys.readouterr().out
    assert shard.name in out and f"corrupt_step_{STEPS:08d}" in out
    assert (run_dir / f"corrupt_step_{STEPS:08d}").is_dir() and last.is_dir()  # set aside, then rewritten
    # resumed from step 3, not from scratch (which would have rewritten step 3 too)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert f"step_{STEPS:08d}" in (run_dir / SNAPSHOT_FILE).read_text()
    assert max_abs_diff(exported_weights(str(export)), weights) < TOLERANCE


def _empty_config(where: Path) -> Path:
    path = where.parent / "cli.yaml"
    path.write_text("{}\n")
    return path


def base_overrides_of(cfg) -> list[str]:
    run_dir = Path(cfg.checkpoint.storage_path)
    return base_overrides(Path(cfg.model.path), str(run_dir), cfg.checkpoint.run_name)
