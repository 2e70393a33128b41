"""bench/trainer_loop.py's figures from a run's metric rows (the real run is the benchmark itself; the rows'
timing fields are checked on a real run in tests/train/test_trainer_e2e.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/
from bench.trainer_loop import summarize  # noqa: E402


def _row(step: int, epoch: int, step_s: float, window_s: float, tokens: float) -> dict:
    return {"step": step, "epoch": epoch, "perf/step_s": step_s, "perf/window_s": window_s,
            "perf/tokens_per_s": tokens / window_s, "perf/data_wait_s": window_s - step_s,
            "perf/report_wait_s": 0.0}


def test_summarize_separates_warm_up_and_epoch_starts():
    rows = [{"step": 0, "eval/pairwise_accuracy": 0.0}, _row(1, 0, 5.0, 9.0, 100)]
    rows += [_row(s, 0, 0.9, 1.0, 100) for s in range(2, 8)]
    rows += [_row(8, 1, 0.9, 3.0, 100), _row(9, 1, 0.9, 1.0, 100), {"step": 9, "eval/pairwise_accuracy": 0.8}]
    out = summarize(rows)
    assert out["steps_measured"] == 8  # step 1 is left out
    assert out["loop_efficiency"] == pytest.approx(8 * 0.9 / (7 * 1.0 + 3.0))
    assert out["trainer_over_train_step"] == pytest.approx(out["loop_efficiency"])
    assert out["train_step_tokens_per_s"] == pytest.approx(800 / (8 * 0.9))
    # steady: steps 5-7 and 9 (2-4 warm up, 8 opens epoch 1)
    assert out["steady_loop_efficiency"] == pytest.approx(0.9)
    assert out["epoch_start_data_wait_s"] == [pytest.approx(0.1), pytest.approx(2.1)]
    assert out["final_eval_pairwise_accuracy"] == 0.8
