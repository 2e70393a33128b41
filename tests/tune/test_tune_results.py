"""Sweep results without running a sweep: the table (one row per trial, lambda columns, status), the best
config as a ready-to-run YAML, the plots, local and s3:// storage, and the learned lambda scheduler fitted
from the written table."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest

from raypo.config import load_config
from raypo.train.lambda_schedules import from_results_table, read_results_table
from raypo.tune.results import (
    STATUS_COMPLETED,
    STATUS_ERROR,
    STATUS_STOPPED,
    best_row,
    format_table,
    sort_table,
    trial_row,
    write_results,
)
from raypo.tune.sweep import plan_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def lambda_sweep(tmp_path, storage: str):
    path = tmp_path / "probe.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{path: tiny://llama}}
        data: {{train_path: "synthetic://default?num_prompts=16&seed=0"}}
        loss: {{name: lambda_dpo, beta: 0.1}}
        lambdas: {{schedule: fixed, weights: [0.25, 0.25, 0.25, 0.25]}}
        train: {{max_steps: 8, eval_every: 4}}
        checkpoint: {{storage_path: {storage}, run_name: probe}}
        tune:
          search_space:
            lambdas.weights: {{simplex: {{num: 2, include_onehots: true, include_uniform: true}}}}
            loss.beta: {{loguniform: [0.01, 0.5]}}
            loss.name: {{choice: [lambda_dpo]}}
          grace_period: 4
        """))
    return plan_sweep(load_config(path), str(path))


def fake_rows(sweep):
    """Seven trials as Tune reports them: the last result and the history of reported metrics."""
    metric = sweep.cfg.tune.metric
    lambdas = [list(p) for p in sweep.dims[0].points]
    rng = np.random.default_rng(0)
    rows = []
    for i, lam in enumerate(lambdas):
        # a score that prefers the second dimension, so the fitted scheduler has something to find
        score = 0.5 + 0.4 * lam[1] - 0.1 * lam[3]
        stopped = i in (2, 5)  # ASHA stopped them at step 4
        history = [{metric: 0.0, "step": 0}, {metric: score - 0.05, "step": 4}]
        if not stopped:
            history.append({metric: score, "step": 8})
        last = {**history[-1], "eval/loss": 1 - score, "train/loss": 0.7, "trial_id": f"t_{i:05d}"}
        point = {"lambdas.weights": lam, "loss.beta": float(rng.uniform(0.01, 0.5)),
                 "loss.name": "lambda_dpo"}
        error = "RuntimeError: boom\nTraceback..." if i == 6 else None
        rows.append(trial_row(sweep, f"t_{i:05d}", point, last if i != 6 else {}, history if i != 6 else [],
                              error))
    return sort_table(pd.DataFrame(rows), metric, "max")


def test_table_has_a_row_per_trial_with_status_lambdas_and_metrics(tmp_path):
    sweep = lambda_sweep(tmp_path, str(tmp_path / "runs"))
    df = fake_rows(sweep)
    assert len(df) == 7
    assert set(df["status"]) == {STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERROR}
    assert [c for c in df.columns if c.startswith("lambda_")] == [f"lambda_{k}" for k in range(4)]
    metric = "eval/pairwise_accuracy"
    scored = df[df[metric].notna()]
    assert list(scored[metric]) == sorted(scored[metric], reverse=True)  # best first
    assert df[df["status"] == STATUS_ERROR]["error"].item() == "RuntimeError: boom"
    assert (df["train_run"].str.startswith(f"{sweep.uri}/train_runs/trial_t_")).all()
    text = format_table(df, sweep)
    assert "stopped early" in text and "loss.beta" in text and f"best {metric}" in text


def test_best_trial_is_the_best_completed_one_and_its_config_trains(tmp_path):
    sweep = lambda_sweep(tmp_path, str(tmp_path / "runs"))
    df = fake_rows(sweep)
    metric = "eval/pairwise_accuracy"
    # a trial stopped early with a higher (earlier) score does not win over completed ones
    df.loc[df["status"] == STATUS_STOPPED, metric] = 0.99
    best = best_row(df, metric, "max")
    assert best["status"] == STATUS_COMPLETED
    out = write_results(sort_table(df, metric, "max"), sweep)
    text = open(out.best_config).read()
    assert text.startswith(f"# Best trial {best['trial_id']} of sweep probe")
    cfg = load_config(out.best_config)
    assert cfg.tune.search_space == {}
    assert cfg.checkpoint.run_name == "probe-best"
    assert cfg.lambdas.weights == pytest.approx([best[f"lambda_{k}"] for k in range(4)])
    assert cfg.loss.beta == pytest.approx(best["loss.beta"])
    assert cfg.train.max_steps == 8 and cfg.lambdas.schedule == "fixed"


def test_plots_against_beta_and_each_lambda_axis_are_written(tmp_path):
    sweep = lambda_sweep(tmp_path, str(tmp_path / "runs"))
    out = write_results(fake_rows(sweep), sweep)
    names = sorted(p.rsplit("/", 1)[1] for p in out.plots)
    assert names == ["metric_vs_lambda.png", "metric_vs_loss.beta.png", "metric_vs_loss.name.png"]
    for p in out.plots:
        assert open(p, "rb").read(8) == PNG
    assert out.table == f"{sweep.uri}/results/results.csv"


def test_learned_scheduler_fits_the_written_table(tmp_path):
    sweep = lambda_sweep(tmp_path, str(tmp_path / "runs"))
    df = fake_rows(sweep)
    out = write_results(df, sweep)
    cols = [f"lambda_{k}" for k in range(4)]
    points = read_results_table(out.table, cols, "eval/pairwise_accuracy")
    assert len(points) == 6  # the errored trial has no score
    sched = from_results_table(out.table, cols, "eval/pairwise_accuracy", degree=1, num_candidates=50,
                               tau=100.0, seed=0)
    # the table's scores are linear in lambda: a degree-1 fit reproduces them and prefers dimension 1
    for lam, score in points:
        assert sched.predict([lam])[0] == pytest.approx(score, abs=0.05 + 1e-9)
    best = sched.candidates[int(np.argmax(sched.probs))]
    assert int(np.argmax(best)) == 1


def test_results_go_to_s3_and_the_learned_scheduler_reads_them_there(s3, tmp_path):
    sweep = lambda_sweep(tmp_path, f"s3://{s3.bucket}/sweeps")
    out = write_results(fake_rows(sweep), sweep)
    assert out.table == f"s3://{s3.bucket}/sweeps/probe/results/results.csv"
    keys = s3.s3fs().find(f"{s3.bucket}/sweeps/probe/results")
    assert {k.rsplit("/", 1)[1] for k in keys} == {"results.csv", "best_config.yaml", "metric_vs_lambda.png",
                                                   "metric_vs_loss.beta.png", "metric_vs_loss.name.png"}
    points = read_results_table(out.table, [f"lambda_{k}" for k in range(4)], "eval/pairwise_accuracy")
    assert len(points) == 6
