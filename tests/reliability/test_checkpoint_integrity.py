"""Checkpoint manifests and the one definition of a run's latest checkpoint, on checkpoint directories laid
out as Ray Train merges them (every rank's files and manifest in one directory, Ray's list beside them).
The real ZeRO-3 case (a truncated optimizer shard) is in test_faults_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from raypo.config import load_config
from raypo.train.checkpoint_integrity import (
    SNAPSHOT_FILE,
    CorruptCheckpointError,
    latest_good_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from raypo.train.run_record import latest_checkpoint

FS = fsspec.filesystem("file")


def _rank_part(tmp: Path, rank: int, step: int) -> Path:
    part = tmp / f"rank{rank}_step{step}"
    (part / "ds" / f"step{step}").mkdir(parents=True)
    (part / "ds" / f"step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(
        bytes(range(256)) * (rank + 4))
    if rank == 0:
        (part / "raypo_state.json").write_text(json.dumps({"global_step": step}))
        (part / "ds" / "latest").write_text(f"step{step}")
    write_manifest(str(part), rank=rank, world_size=2, global_step=step)
    return part


def _checkpoint(run_dir: Path, step: int, tmp: Path) -> Path:
    """Both ranks' parts merged into ``run_dir/step_<step>``, as Ray Train uploads them."""
    target = run_dir / f"step_{step:08d}"
    for rank in (0, 1):
        FS.put(str(_rank_part(tmp, rank, step)) + "/", str(target), recursive=True)
    return target


def _snapshot(run_dir: Path, steps: list[int]) -> None:
    results = [{"version": 0, "checkpoint_dir_name": f"step_{s:08d}", "metrics": {"step": s}} for s in steps]
    (run_dir / SNAPSHOT_FILE).write_text(json.dumps({
        "ray_version": "x", "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(steps))),
        "latest_checkpoint_result": results[-1], "pending_training_results": [],
        "pending_validation_specs": [], "current_report_index": len(steps),
        "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": []}))


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    for step in (3, 4):
        _checkpoint(run_dir, step, tmp_path / "parts")
    _snapshot(run_dir, [3, 4])
    return run_dir


def test_a_complete_checkpoint_verifies(run):
    verdict = verify_checkpoint(str(run / "step_00000004"), FS)
    assert verdict.good and verdict.step == 4


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "bytes, its manifest says"), ("flip", "SHA-256"), ("delete", "is missing"),
    ("drop_rank", "raypo_manifest_r1.json is missing")])
def test_each_kind_of_damage_names_the_file(run, damage, expected):
    ckpt = run / "step_00000004"
    shard = ckpt / "ds" / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[7] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    else:
        (ckpt / "raypo_manifest_r1.json").unlink()
    verdict = verify_checkpoint(str(ckpt), FS)
    assert not verdict.good and expected in verdict.problem
    if damage != "drop_rank":
        assert str(shard) in verdict.problem


def test_fallback_sets_the_damaged_one_aside_and_keeps_ray_s_list_consistent(run, capsys):
    shard = run / "step_00000004" / "ds" / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="zero_pp_rank_1"):
        latest_good_checkpoint(str(run), FS, "fail")
    assert (run / "step_00000004").exists()  # refusing changes nothing
    path, step = latest_good_checkpoint(str(run), FS, "fallback")
    assert (path, step) == (str(run / "step_00000003"), 3)
    assert "zero_pp_rank_1" in capsys.readouterr().out
    assert not (run / "step_00000004").exists() and (run / "corrupt_step_00000004").is_dir()
    snapshot = json.loads((run / SNAPSHOT_FILE).read_text())
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == ["step_00000003"]
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "step_00000003"
    assert snapshot["checkpoint_report_indices"] == [0]


def test_a_finished_run_without_its_state_file_is_not_complete(run):
    """raypo and Ray agree on the latest checkpoint: one whose raypo_state.json is gone is damaged, so the
    run resumes from step 3 instead of being taken as finished at step 4 (or restarted from nothing)."""
    (run / "step_00000004" / "raypo_state.json").unlink()
    cfg = load_config(None, [f"checkpoint.storage_path={run.parent}", "checkpoint.run_name=r"])
    assert latest_checkpoint(cfg, "r") == (str(run / "step_00000003"), 3)


def test_no_ray_list_means_no_checkpoint(run):
    """A step directory Ray does not list is not resumed from by Ray, so it is not the latest either."""
    (run / SNAPSHOT_FILE).unlink()
    cfg = load_config(None, [f"checkpoint.storage_path={run.parent}", "checkpoint.run_name=r"])
    assert latest_checkpoint(cfg, "r") is None
