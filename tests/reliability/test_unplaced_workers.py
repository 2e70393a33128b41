"""A worker group that cannot be placed (a lost node that never comes back, a cluster too small) stops the
run after ``checkpoint.max_start_timeouts`` start timeouts with an error that says what was asked for and
that nothing is lost (docs/cluster.md); ``-1`` (the default) keeps waiting, as Ray Train does."""

from __future__ import annotations

import pytest

from raypo.config import load_config
from raypo.errors import RunError
from raypo.testing import short_run_overrides
from raypo.train.trainer import _startup_timeout, run_training

pytestmark = pytest.mark.e2e


def test_workers_that_never_fit_stop_the_run_with_a_clear_error(ray_cluster, tiny_model_dir, tmp_path,
                                                               monkeypatch):
    import ray

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")
    workers = int(ray.cluster_resources()["CPU"]) + 1  # one more than the cluster can ever hold
    cfg = load_config(None, [*short_run_overrides(tiny_model_dir, str(tmp_path), "unplaced", 2),
                             "data.train_path=synthetic://default?num_prompts=8&seed=1",
                             f"scaling.num_workers={workers}", "train.micro_batch_size=1",
                             "checkpoint.max_start_timeouts=0"])
    with pytest.raises(RunError) as err:
        run_training(cfg)
    message = str(err.value)
    assert f"its {workers} worker(s) of {{'CPU': 1}}" in message
    assert "1 time(s) in a row" in message and "timed out after 3.0 seconds" in message
    assert "it had no checkpoint yet" in message and "checkpoint.max_start_timeouts" in message
    assert _startup_timeout(err.value) is not None  # the cause is kept for the traceback


def test_other_failures_are_not_mistaken_for_a_start_timeout():
    class WorkerGroupStartupTimeoutError(Exception):
        pass

    class ControllerError(Exception):
        def __init__(self, failure):
            super().__init__(str(failure))
            self.controller_failure = failure

    assert _startup_timeout(ControllerError(WorkerGroupStartupTimeoutError("t"))) is not None
    assert _startup_timeout(ControllerError(ValueError("x"))) is None
    try:
        raise RuntimeError("outer") from ValueError("inner")
    except RuntimeError as exc:
        assert _startup_timeout(exc) is None


def test_the_limit_is_checked():
    with pytest.raises(Exception, match="checkpoint.max_start_timeouts"):
        load_config(None, ["checkpoint.max_start_timeouts=-2"])
