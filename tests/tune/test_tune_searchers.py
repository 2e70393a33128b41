"""``tune.search_alg: optuna`` and ``hyperopt`` on a real Ray Tune run: raypo's search space goes through
the searcher, the suggestions respect it, ASHA and the metric/mode wiring work with it, and the results
table reads the trials.

Each trial here is a stand-in for a training run (a function reporting a metric that rises with beta), so
the test costs seconds; tests/tune/test_tune_e2e.py runs real training trials with the default searcher.
"""

from __future__ import annotations

import textwrap

import pytest

import raypo.tune as raypo_tune
from raypo.config import load_config
from raypo.tune import TrialSetup, build_tuner, plan_sweep, results_table

pytestmark = pytest.mark.integration

METRIC = "eval/pairwise_accuracy"


@pytest.mark.parametrize("search_alg", ["optuna", "hyperopt"])
def test_searcher_drives_a_real_tune_run_with_asha(search_alg, ray_cluster, tmp_path, monkeypatch):
    pytest.importorskip(search_alg)
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{path: "tiny://llama"}}
        data: {{train_path: "synthetic://default?num_prompts=16&seed=0", eval_fraction: 0.25}}
        loss: {{name: dpo, beta: 0.1}}
        train: {{max_steps: 4, eval_every: 1}}
        checkpoint: {{storage_path: {tmp_path / "sweeps"}, run_name: {search_alg}}}
        tune:
          search_space:
            loss.beta: {{loguniform: [0.01, 0.5]}}
            loss.name: {{choice: [dpo, ipo]}}
          search_alg: {search_alg}
          num_samples: 6
          metric: {METRIC}
          mode: max
          scheduler: asha
          grace_period: 1
          reduction_factor: 2
          max_concurrent_trials: 1
        """))
    sweep = plan_sweep(load_config(path, []), str(path))

    def stand_in_trial(config):
        """4 steps; the metric grows with beta, ipo gets a bonus. Defined here so that Ray pickles it by
        value (workers cannot import a test module)."""
        from ray import tune

        for step in range(1, 5):
            bonus = 0.1 if config["loss.name"] == "ipo" else 0.0
            tune.report({METRIC: config["loss.beta"] * step / 4 + bonus, "step": step})

    monkeypatch.setattr(raypo_tune, "make_trainable", lambda setup: stand_in_trial)
    setup = TrialSetup(base={}, dims=sweep.dims, train_runs=sweep.train_runs, metric=METRIC,
                       reference_cache=None)
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
