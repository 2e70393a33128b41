"""A start that cannot work fails at once on the driver (exit 2, every problem named with its fix), a failed
start does not poison its run name, and a second `raypo train` on a running run name is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from raypo.cli import main
from raypo.config import ConfigError, load_config
from raypo.train.run_lock import LOCK_FILE, RunLockedError, acquire_run_lock, release_run_lock
from raypo.train.run_record import RECORD_NAME, check_or_write_run_record


def _config(tmp_path, text: str = "{}\n"):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the start gets as far as starting (or joining) Ray."""
    import raypo.train.trainer as trainer

    def refuse(cfg):
        raise AssertionError("Ray was started; the check should have stopped the start before")

    monkeypatch.setattr(trainer, "init_ray", refuse)


# ----------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_yaml_config_is_refused(tmp_path, text, capsys):
    assert main(["train", _config(tmp_path, text), "--dry-run"]) == 2
    assert "is empty" in capsys.readouterr().err


def test_every_config_problem_is_listed_at_once(tmp_path):
    text = "train:\n  bogus: 1\n  max_steps: lots\noptimizer:\n  lr: fast\nloss:\n  beta: -1\n"
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, text))
    problems = err.value.problems
    assert any("unknown key 'train.bogus'" in p for p in problems)
    assert any("'train.max_steps' has the wrong type" in p for p in problems)
    assert any("'optimizer.lr' has the wrong type" in p for p in problems)
    assert any("loss.beta=-1.0 must be > 0" in p for p in problems)


# ----------------------------------------------------------------------------------------------------
# Driver-side checks, before Ray


def _train(tmp_path, *overrides: str) -> list[str]:
    return ["train", _config(tmp_path), f"checkpoint.storage_path={tmp_path / 'runs'}",
            "checkpoint.run_name=pre", *overrides]


def test_missing_data_and_model_paths_are_config_errors_before_ray(tmp_path, capsys, no_ray):
    started = time.time()
    rc = main(_train(tmp_path, f"data.train_path={tmp_path / 'nope.jsonl'}",
                     f"model.path={tmp_path / 'no_model'}"))
    err = capsys.readouterr().err
    assert rc == 2 and time.time() - started < 30
    assert f"data.train_path='{tmp_path / 'nope.jsonl'}' does not exist" in err
    assert f"model.path='{tmp_path / 'no_model'}' does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "pre" / RECORD_NAME).exists()  # nothing recorded for a failed start


@pytest.mark.parametrize("overrides, key", [
    (["lambdas.schedule=fixed", "lambdas.weights=[0.5,0.5]"], "lambdas.weights=[0.5, 0.5] has 2 entries"),
    (["lambdas.schedule=dirichlet", "lambdas.alpha=[1,1,1]"], "lambdas.alpha=[1.0, 1.0, 1.0] has 3 entries"),
    (["lambdas.schedule=gaussian", "lambdas.gaussian_mean=[1.0]"], "lambdas.gaussian_mean=[1.0] has 1"),
])
def test_lambdas_of_the_wrong_length_for_the_data_are_config_errors(tmp_path, capsys, overrides, key,
                                                                    no_ray):
    """Synthetic data has 4 dimensions; lambda_dpo weights them."""
    rc = main(_train(tmp_path, "loss.name=lambda_dpo", "data.train_path=synthetic://default", *overrides))
    err = capsys.readouterr().err
    assert rc == 2 and key in err and "the data has 4 dimensions (helpfulness" in err


def test_lambda_length_from_the_parquet_schema_metadata(tmp_path, capsys, no_ray):
    data = tmp_path / "d.parquet"
    assert main(["data", "synth", str(data), "--num-prompts", "4"]) == 0
    rc = main(_train(tmp_path, "loss.name=lambda_dpo", f"data.train_path={data}", "lambdas.schedule=fixed",
                     "lambdas.weights=[1.0]"))
    assert rc == 2 and "lambdas.weights=[1.0] has 1 entries but the data has 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# A failed start does not poison its run name


def test_a_record_without_a_checkpoint_is_replaced_saying_so(tmp_path, capsys):
    base = [f"checkpoint.storage_path={tmp_path}", "checkpoint.run_name=r"]
    check_or_write_run_record(load_config(None, [*base, "data.train_path=/typo/data.jsonl"]), "r")
    fixed = load_config(None, [*base, "data.train_path=synthetic://default"])
    assert check_or_write_run_record(fixed, "r") is False  # a new run, not a conflict
    assert "no checkpoint" in capsys.readouterr().out
    record = json.loads((tmp_path / "r" / RECORD_NAME).read_text())
    assert record["config"]["data.train_path"] == "synthetic://default"


# ----------------------------------------------------------------------------------------------------
# One driver per run name


def _hold_lock(run_dir) -> subprocess.Popen:
    code = ("import sys, time, fsspec; from raypo.train.run_lock import acquire_run_lock; "
            "acquire_run_lock(sys.argv[1], fsspec.filesystem('file')); print('locked', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_train_on_a_running_run_name_is_refused(tmp_path, capsys, no_ray):
    run_dir = tmp_path / "runs" / "pre"
    holder = _hold_lock(run_dir)
    try:
        assert main(_train(tmp_path)) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err and str(run_dir / LOCK_FILE) in err
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and is replaced
    import fsspec

    fs = fsspec.filesystem("file")
    me = acquire_run_lock(str(run_dir), fs)
    assert "replacing the stale lock" in capsys.readouterr().out
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    release_run_lock(str(run_dir), fs, me)
    assert not (run_dir / LOCK_FILE).exists()


def test_the_lock_works_on_s3(s3, tmp_s3_prefix):
    fs = s3.s3fs()
    run_dir = f"{tmp_s3_prefix}/r"
    other = {"pid": 1, "host": "another-host", "started": time.time(), "token": "x"}
    fs.pipe(f"{run_dir}/{LOCK_FILE}", json.dumps(other).encode())
    with pytest.raises(RunLockedError, match="on host another-host"):
        acquire_run_lock(run_dir, fs)
    fs.rm(f"{run_dir}/{LOCK_FILE}")
    me = acquire_run_lock(run_dir, fs)
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        acquire_run_lock(run_dir, fs)  # even the same process cannot take it twice
    release_run_lock(run_dir, fs, me)
    assert not fs.exists(f"{run_dir}/{LOCK_FILE}")


# ----------------------------------------------------------------------------------------------------
# Secrets in job specs, by value


@pytest.mark.parametrize("value", ["hf_" + "a1B2" * 8, "AKIA" + "ABCDEFGHIJ234567", "ASIA" + "Z" * 16,
                                   "ghp_" + "x9" * 18, "sk-" + "proj_" + "q" * 30])
def test_a_secret_value_under_a_harmless_name_is_flagged(tmp_path, value, capsys):
    spec = {"name": "demo", "entrypoint": "train",
            "config": {"loss": {"name": "dpo"}, "checkpoint": {"storage_path": "/tmp/runs"}},
            "runtime_env": {"env_vars": {"MY_SETTING": value}}}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    assert main(["submit", str(path), "--print-ray-cli"]) == 2
    err = capsys.readouterr().err
    assert "runtime_env.env_vars.MY_SETTING holds a value shaped like an access token" in err
    assert value not in err  # the message never repeats the secret
