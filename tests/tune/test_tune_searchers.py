"""Real Ray Tune runs of raypo's sweep machinery with stand-in trials:

* ``tune.search_alg: optuna`` and ``hyperopt``: raypo's search space goes through the searcher, the
  suggestions respect it, ASHA and the metric/mode wiring work with it, and the results table reads the
  trials;
* a sweep stored on ``s3://`` (the loopback S3 server): Tune's experiment state, the results table, the best
  config and the plots land in the bucket, and ``--resume`` restores from there keeping finished trials.

Each trial here is a stand-in for a training run (a function reporting a metric that rises with beta), so
the test costs seconds; tests/tune/test_tune_e2e.py runs real training trials with the default searcher.
"""

from __future__ import annotations

import textwrap

import pytest

import raypo.tune.sweep as raypo_tune
from raypo.config import load_config
from raypo.tune.results import report_results, results_table
from raypo.tune.sweep import build_tuner, plan_sweep, run_sweep
from raypo.tune.trials import TrialSetup

pytestmark = pytest.mark.integration

METRIC = "eval/pairwise_accuracy"


def stand_in_trainable(setup):
    """Replaces :func:`raypo.tune.trials.make_trainable` in :mod:`raypo.tune.sweep`: a trial of 4 steps whose
    metric grows with beta (ipo gets a bonus). Defined inside, so Ray pickles it by value (workers cannot
    import a test module)."""

    def trial(config):
        from ray import tune

        for step in range(1, 5):
            bonus = 0.1 if config["loss.name"] == "ipo" else 0.0
            tune.report({METRIC: config["loss.beta"] * step / 4 + bonus, "step": step})

    return trial


def sweep_yaml(storage: str, run_name: str, search_alg: str, num_samples: int) -> str:
    return textwrap.dedent(f"""\
        model: {{path: "tiny://llama"}}
        data: {{train_path: "synthetic://default?num_prompts=16&seed=0", eval_fraction: 0.25}}
        loss: {{name: dpo, beta: 0.1}}
        train: {{max_steps: 4, eval_every: 1}}
        checkpoint: {{storage_path: "{storage}", run_name: {run_name}}}
        tune:
          search_space:
            loss.beta: {{loguniform: [0.01, 0.5]}}
            loss.name: {{choice: [dpo, ipo]}}
          search_alg: {search_alg}
          num_samples: {num_samples}
          metric: {METRIC}
          mode: max
          scheduler: asha
          grace_period: 1
          reduction_factor: 2
          max_concurrent_trials: 1
        """)


@pytest.mark.parametrize("search_alg", ["optuna", "hyperopt"])
def test_searcher_drives_a_real_tune_run_with_asha(search_alg, ray_cluster, tmp_path, monkeypatch):
    pytest.importorskip(search_alg)
    path = tmp_path / "sweep.yaml"
    path.write_text(sweep_yaml(str(tmp_path / "sweeps"), search_alg, search_alg, num_samples=6))
    sweep = plan_sweep(load_config(path, []), str(path))
    setup = TrialSetup(base={}, dims=sweep.dims, train_runs=sweep.train_runs, metric=METRIC,
                       reference_cache=None)
    monkeypatch.setattr(raypo_tune, "make_trainable", stand_in_trainable)
    grid = build_tuner(sweep, setup, max_concurrent=1).fit()

    assert len(grid) == 6 and not grid.errors
    experiment = tmp_path / "sweeps" / search_alg
    # Tune saves a searcher's state only for a real search algorithm (random/grid save "basic-variant-state")
    assert list(experiment.glob("searcher-state-*.pkl"))
    assert not list(experiment.glob("basic-variant-state-*"))
    points = [(r.config["loss.beta"], r.config["loss.name"]) for r in grid]
    assert all(0.01 <= beta <= 0.5 and name in ("dpo", "ipo") for beta, name in points)
    assert len({beta for beta, _ in points}) == 6  # sampled by the searcher, not a grid
    steps = [int(r.metrics["step"]) for r in grid]
    assert min(steps) < 4 and max(steps) == 4  # ASHA stopped at least one trial, and let the best finish

    best = grid.get_best_result(metric=METRIC, mode="max", scope="all")
    finals = {(r.config["loss.beta"], r.config["loss.name"]): r.metrics[METRIC] for r in grid}
    assert finals[(best.config["loss.beta"], best.config["loss.name"])] == max(finals.values())

    table = results_table(sweep, grid)
    assert len(table) == 6 and list(table[METRIC])[0] == pytest.approx(max(finals.values()))


def test_sweep_on_s3_writes_results_there_and_resumes_from_there(ray_cluster, s3, tmp_s3_prefix, tmp_path,
                                                                 monkeypatch, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(sweep_yaml(tmp_s3_prefix, "s3sweep", "random", num_samples=3))
    sweep = plan_sweep(load_config(path, []), str(path))
    assert sweep.uri == f"{tmp_s3_prefix}/s3sweep"
    monkeypatch.setattr(raypo_tune, "make_trainable", stand_in_trainable)

    grid = run_sweep(sweep)
    assert len(grid) == 3 and not grid.errors
    assert report_results(sweep, grid) == 0
    fs = s3.s3fs()
    root = sweep.uri.removeprefix("s3://")
    assert fs.glob(f"{root}/experiment_state-*.json")  # Tune's own state is in the bucket
    assert fs.exists(f"{root}/raypo_sweep.yaml")
    table = fs.cat(f"{root}/results/results.csv").decode()
    assert len(table.strip().splitlines()) == 4 and METRIC in table.splitlines()[0]
    best_yaml = tmp_path / "best.yaml"
    best_yaml.write_bytes(fs.cat(f"{root}/results/best_config.yaml"))
    best = load_config(best_yaml, [])  # the best config is a ready-to-run raypo config
    top = grid.get_best_result(metric=METRIC, mode="max", scope="all").config
    assert best.loss.beta == pytest.approx(top["loss.beta"]) and best.loss.name == top["loss.name"]
    plots = [p for p in fs.ls(f"{root}/results") if p.endswith(".png")]
    assert plots and all(fs.cat(p).startswith(b"\x89PNG") for p in plots)

    before = {r.path: r.metrics[METRIC] for r in grid}
    resumed = run_sweep(sweep, resume=True)  # Tuner.restore from the bucket; nothing left to run
    assert "resuming the sweep at s3://" in capsys.readouterr().out
    assert {r.path: r.metrics[METRIC] for r in resumed} == before
