"""A run name resumes only the run it was started with: the run record refuses a different config."""

from __future__ import annotations

import json

import pytest

from raypo.cli import main
from raypo.config import load_config
from raypo.train.run_record import RECORD_NAME, RunConflictError, check_or_write_run_record, run_identity


def with_checkpoint(run_dir, fs=None):
    """Make the run hold one checkpoint in Ray's list: only then is a different config refused (a record
    without any checkpoint is replaced, see tests/reliability)."""
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "step_00000001", "metrics": {}}],
                "checkpoint_report_indices": [0]}
    path = f"{run_dir}/checkpoint_manager_snapshot.json"
    if fs is None:
        with open(path, "w") as f:
            json.dump(snapshot, f)
    else:
        fs.pipe(path, json.dumps(snapshot).encode())


def cfg_for(storage, *extra):
    return load_config(None, [f"checkpoint.storage_path={storage}", "checkpoint.run_name=r", *extra])


def test_first_start_writes_the_record_and_the_same_run_resumes(tmp_path):
    assert check_or_write_run_record(cfg_for(tmp_path), "r") is False
    record = json.loads((tmp_path / "r" / RECORD_NAME).read_text())
    assert record["config"]["loss.name"] == load_config(None, []).loss.name
    assert "checkpoint.run_name" not in record["config"] and "train.max_steps" not in record["config"]
    # more steps, other checkpoint/eval/logging settings: the same run, resumed
    resumed = cfg_for(tmp_path, "train.max_steps=500", "train.eval_every=7", "checkpoint.keep_last=5",
                      "logging.tensorboard=false")
    assert check_or_write_run_record(resumed, "r") is True


@pytest.mark.parametrize("override, key", [
    ("loss.name=dpo", "loss.name"), ("scaling.num_workers=1", "scaling.num_workers"),
    ("optimizer.lr=0.5", "optimizer.lr"), ("data.train_path=synthetic://default?seed=9", "data.train_path")])
def test_a_different_run_under_the_same_name_is_refused(tmp_path, override, key):
    check_or_write_run_record(cfg_for(tmp_path), "r")
    with_checkpoint(tmp_path / "r")
    with pytest.raises(RunConflictError) as err:
        check_or_write_run_record(cfg_for(tmp_path, override), "r")
    message = str(err.value)
    assert f"- {key}:" in message and "checkpoint.run_name=r-2" in message and str(tmp_path / "r") in message
    assert set(run_identity(cfg_for(tmp_path))) == set(run_identity(cfg_for(tmp_path, override)))


def test_raypo_train_refuses_before_any_cluster_work(tmp_path, capsys):
    check_or_write_run_record(cfg_for(tmp_path), "r")
    with_checkpoint(tmp_path / "r")
    empty = tmp_path / "run.yaml"
    empty.write_text("{}\n")
    rc = main(["train", str(empty), f"checkpoint.storage_path={tmp_path}", "checkpoint.run_name=r",
               "loss.name=ipo"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "loss.name" in err and "Traceback" not in err


def test_s3_run_record(s3, tmp_s3_prefix):
    cfg = cfg_for(tmp_s3_prefix)
    assert check_or_write_run_record(cfg, "r") is False
    assert s3.s3fs().exists(f"{tmp_s3_prefix.removeprefix('s3://')}/r/{RECORD_NAME}")
    with_checkpoint(f"{tmp_s3_prefix.removeprefix('s3://')}/r", s3.s3fs())
    with pytest.raises(RunConflictError):
        check_or_write_run_record(cfg_for(tmp_s3_prefix, "loss.name=dpo"), "r")
