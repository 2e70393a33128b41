"""Sweep planning without Ray: the search-space format, its mapping to Ray Tune, validation of every trial
config before anything starts (keys, samplers and values named with a fix), trial configs, concurrency and
the reference-sharing decision, the shipped configs/tune/ examples and the CLI's --dry-run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from raypo.cli import main
from raypo.cli.tune import load_sweep
from raypo.config import ConfigError, load_config, to_dict, to_yaml
from raypo.tune.simplex import simplex_points
from raypo.tune.space import (
    apply_overrides,
    base_for_trials,
    num_trials,
    parse_search_space,
    representative_points,
    trial_overrides,
)
from raypo.tune.sweep import check_resume_config, derive_max_concurrent_trials, plan_sweep, share_decision
from raypo.tune.trials import TrialSetup, trial_config

REPO = Path(__file__).resolve().parents[2]
BASE = ["model.path=tiny://llama", "data.train_path=synthetic://default?num_prompts=16&seed=0",
        "train.max_steps=20", "train.eval_every=5", "loss.name=dpo", "loss.beta=0.1"]


def sweep_config(tmp_path: Path, tune_yaml: str, extra: str = ""):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(extra) + "tune:\n" + textwrap.indent(textwrap.dedent(tune_yaml), "  "))
    return path


def load(tmp_path: Path, tune_yaml: str, extra: str = "", overrides: tuple[str, ...] = ()):
    """The sweep's config through ``raypo tune``'s entry point, which checks the search space."""
    return load_sweep(sweep_config(tmp_path, tune_yaml, extra), [*BASE, *overrides]).cfg


def problems_of(tmp_path: Path, tune_yaml: str, extra: str = "", overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, tune_yaml, extra, overrides)
    return "\n".join(err.value.problems)


# ----------------------------------------------------------------------------------------------------
# Format and Ray Tune mapping
# ----------------------------------------------------------------------------------------------------


def test_every_sampler_maps_to_its_ray_tune_domain(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    cfg = load(tmp_path, """\
        search_space:
          loss.beta: {loguniform: [0.01, 0.5]}
          optimizer.lr: {uniform: [1.0e-5, 1.0e-4]}
          optimizer.weight_decay: {quniform: [0.0, 0.1, 0.01]}
          train.micro_batch_size: {randint: [1, 5]}
          loss.name: {choice: [dpo, ipo]}
          train.seed: {grid_search: [0, 1, 2]}
        """)
    dims, problems = parse_search_space(cfg.tune.search_space, cfg)
    assert problems == []
    domains = {d.key: d.domain() for d in dims}
    assert isinstance(domains["loss.beta"], Float)
    assert isinstance(domains["loss.beta"].get_sampler(), LogUniform)
    assert (domains["loss.beta"].lower, domains["loss.beta"].upper) == (0.01, 0.5)
    assert isinstance(domains["optimizer.lr"], Float)
    assert isinstance(domains["train.micro_batch_size"], Integer)
    assert isinstance(domains["loss.name"], Categorical) and domains["loss.name"].categories == ["dpo", "ipo"]
    assert domains["train.seed"] == {"grid_search": [0, 1, 2]}
    assert num_trials(cfg, dims) == 4 * 3


def test_nested_form_and_command_line_override_are_the_flat_form(tmp_path):
    cfg = load(tmp_path, """\
        search_space:
          loss.beta: {grid_search: [0.1, 0.2]}
          loss:
            params:
              label_smoothing: {uniform: [0.0, 0.2]}
        """, overrides=("tune.search_space.loss.beta.choice=[0.05,0.3]",))
    dims, _ = parse_search_space(cfg.tune.search_space, cfg)
    by_key = {d.key: d for d in dims}
    assert set(by_key) == {"loss.beta", "loss.params.label_smoothing"}
    assert by_key["loss.beta"].sampler == "choice"  # the command line came last and wins
    assert by_key["loss.beta"].args == (0.05, 0.3)


def test_the_job_spec_sweep_uses_this_format():
    from raypo.launch.jobspec import job_config, load_job

    cfg = job_config(load_job(REPO / "jobs" / "sweep_beta_llama8b.yaml"))
    sweep = plan_sweep(cfg, "jobs/sweep_beta_llama8b.yaml")
    assert [(d.key, d.sampler, d.args) for d in sweep.dims] == [
        ("loss.beta", "grid_search", (0.01, 0.03, 0.1, 0.3))]
    assert num_trials(cfg, sweep.dims) == 4
    assert sweep.uri == "s3://YOUR-BUCKET/raypo_sweeps/sweep-beta-mpo-llama8b"


# ----------------------------------------------------------------------------------------------------
# Validation: keys, samplers, values
# ----------------------------------------------------------------------------------------------------


def test_unknown_keys_are_named_with_did_you_mean(tmp_path):
    text = problems_of(tmp_path, "search_space:\n  loss.bta: {loguniform: [0.01, 0.5]}\n"
                                 "  optimiser.lr: {loguniform: [1.0e-6, 1.0e-4]}\n")
    assert "unknown key 'loss.bta': did you mean 'loss.beta'?" in text
    assert "unknown key 'optimiser': did you mean 'optimizer'?" in text


def test_unknown_samplers_and_bad_arguments_name_the_fix(tmp_path):
    text = problems_of(tmp_path, """\
        search_space:
          loss.beta: {logunifrom: [0.01, 0.5]}
          optimizer.lr: {loguniform: [0.0, 1.0e-4]}
          train.seed: {randint: [0.5, 3]}
          optimizer.weight_decay: {uniform: [0.1, 0.0]}
          train.max_steps: {choice: []}
          loss.params.label_smoothing: 0.1
          lambdas.weights: {simplx: {num: 3}}
        """)
    assert "unknown sampler 'logunifrom': did you mean 'loguniform'?" in text
    assert "a log-scale range needs low > 0" in text
    assert "randint takes integers" in text
    assert "low must be < high" in text
    assert "must be a non-empty list" in text
    assert "tune.search_space.loss.params.label_smoothing=0.1 is not a search spec" in text
    assert "'simplx': did you mean 'simplex'?" in text


def test_reserved_keys_are_refused(tmp_path):
    text = problems_of(tmp_path, """\
        search_space:
          checkpoint.run_name: {choice: [a, b]}
          tune.num_samples: {choice: [1, 2]}
        """)
    assert "checkpoint.run_name: cannot be searched (each trial's run is named after its trial id)" in text
    assert "tune.num_samples: cannot be searched" in text


def test_every_trial_config_is_validated_with_the_sampled_values_named(tmp_path):
    text = problems_of(tmp_path, """\
        search_space:
          loss.name: {choice: [dpo, dpoo]}
          loss.beta: {grid_search: [0.1, -1.0]}
        """)
    assert "the trial with loss.name=dpo, loss.beta=-1 is invalid: loss.beta=-1.0 must be > 0" in text
    assert "loss.name='dpoo' is not one of" in text and "did you mean 'dpo'?" in text


def test_loss_parameters_must_fit_every_sampled_loss_unless_bundled(tmp_path):
    text = problems_of(tmp_path, """\
        search_space:
          loss.name: {choice: [dpo, wmpo]}
          loss.params.alpha: {loguniform: [0.01, 1.0]}
        """)
    assert "unknown key 'loss.params.alpha' for loss dpo" in text
    cfg = load(tmp_path, """\
        search_space:
          loss: {choice: [{name: dpo}, {name: wmpo, params: {alpha: 0.1}}]}
          loss.beta: {loguniform: [0.01, 0.5]}
        """)
    dims, _ = parse_search_space(cfg.tune.search_space, cfg)
    assert trial_overrides(dims, {"loss": {"name": "wmpo", "params": {"alpha": 0.1}}, "loss.beta": 0.2}) == {
        "loss.name": "wmpo", "loss.params.alpha": 0.1, "loss.beta": 0.2}


def test_sweep_settings_that_cannot_work_are_refused(tmp_path):
    asha = problems_of(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\nscheduler: asha\n"
                                 "grace_period: 50\n", overrides=("train.eval_every=0",))
    assert "tune.scheduler=asha compares trials at evaluations, but train.eval_every=0" in asha
    assert "tune.grace_period=50 is more than train.max_steps=20" in asha
    no_eval = problems_of(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\n",
                          overrides=("data.eval_fraction=0.0",))
    assert "tune.metric=eval/pairwise_accuracy needs held-out data" in no_eval
    grid = problems_of(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\nsearch_alg: grid\n")
    assert "tune.search_alg=grid needs grid_search or simplex, got loguniform" in grid
    optuna = problems_of(tmp_path, "search_space:\n  loss.beta: {grid_search: [0.1, 0.2]}\n"
                                   "  lambdas.alpha: {choice: [[1, 1], [2, 2]]}\nsearch_alg: optuna\n")
    assert "optuna cannot run a grid (grid_search)" in optuna and "optuna takes only scalar choices" in optuna
    fields = problems_of(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\n"
                                   "reduction_factor: 1\nmetric: accuracy\n")
    assert "tune.reduction_factor=1 must be >= 2" in fields
    assert "tune.metric='accuracy' is not a reported metric" in fields


# ----------------------------------------------------------------------------------------------------
# Lambda search: simplex grids, concentrations
# ----------------------------------------------------------------------------------------------------


def test_simplex_grid_is_onehots_uniform_and_seeded_dirichlet_draws():
    points = simplex_points(4, num=5, include_onehots=True, include_uniform=True, seed=3)
    assert points[:4] == [[1.0 if j == k else 0.0 for j in range(4)] for k in range(4)]
    assert points[4] == [0.25] * 4
    assert len(points) == 10
    assert all(min(p) >= 0 and abs(sum(p) - 1) < 5e-4 for p in points)
    assert points == simplex_points(4, num=5, seed=3)  # seeded
    assert points[5:] != simplex_points(4, num=5, seed=4)[5:]


def test_lambda_grid_dims_come_from_the_data_and_need_a_fixed_lambda_schedule(tmp_path):
    space = "search_space:\n  lambdas.weights: {simplex: {num: 2, include_onehots: false}}\n"
    cfg = load(tmp_path, space, overrides=("loss.name=lambda_dpo", "lambdas.schedule=fixed",
                                           "lambdas.weights=[0.25,0.25,0.25,0.25]"))
    dims, _ = parse_search_space(cfg.tune.search_space, cfg)
    assert len(dims[0].points) == 3 and all(len(p) == 4 for p in dims[0].points)  # synthetic data: m = 4
    text = problems_of(tmp_path, space, overrides=("loss.name=lambda_dpo",))
    assert "trials use lambdas.schedule=uniform, which ignores lambdas.weights; set lambdas.schedule: " \
        "fixed" in text
    text = problems_of(tmp_path, space, overrides=("lambdas.schedule=fixed",
                                                    "lambdas.weights=[0.25,0.25,0.25,0.25]"))
    assert "loss dpo takes no lambda" in text
    text = problems_of(tmp_path, space, overrides=("data.train_path=/data/x.parquet", "loss.name=lambda_dpo",
                                                    "lambdas.schedule=fixed"))
    assert "give simplex.dims (e.g. 4) or set data.dimensions" in text


def test_repeat_turns_a_sampled_concentration_into_a_symmetric_vector(tmp_path):
    cfg = load(tmp_path, """\
        search_space:
          lambdas.schedule: {choice: [uniform, dirichlet]}
          lambdas.alpha: {loguniform: [0.2, 5.0], repeat: 4}
        """, overrides=("loss.name=lambda_dpo",))
    dims, _ = parse_search_space(cfg.tune.search_space, cfg)
    overrides = trial_overrides(dims, {"lambdas.schedule": "dirichlet", "lambdas.alpha": 0.5})
    assert overrides == {"lambdas.schedule": "dirichlet", "lambdas.alpha": [0.5, 0.5, 0.5, 0.5]}
    # the ends of the range were validated as [0.2]*4 and [5.0]*4 with both schedules
    assert len(representative_points(dims)) == 4


# ----------------------------------------------------------------------------------------------------
# Trial configs, concurrency, reference sharing, resume check
# ----------------------------------------------------------------------------------------------------


def test_a_trial_config_is_the_base_plus_its_sample_named_after_the_trial(tmp_path):
    cfg = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\n",
               overrides=("checkpoint.export_path=/tmp/x",))
    sweep = plan_sweep(cfg, str(tmp_path / "sweep.yaml"))
    assert sweep.name == "tune-sweep"
    setup = TrialSetup(base=base_for_trials(cfg), dims=sweep.dims, train_runs=sweep.train_runs,
                       metric=cfg.tune.metric, reference_cache="/cache", group=sweep.name)
    trial = trial_config(setup, {"loss.beta": 0.0421}, "abc12_00003")
    assert trial.loss.beta == 0.0421
    assert trial.logging.group == "tune-sweep"  # the trials' tracker runs are grouped by the sweep
    assert trial.checkpoint.run_name == "trial_abc12_00003"
    assert trial.checkpoint.storage_path == f"{sweep.uri}/train_runs"
    assert trial.checkpoint.export_path is None
    assert (trial.train.reference, trial.train.reference_cache) == ("precomputed", "/cache")
    assert trial.tune.search_space == {}  # a trial is a plain training run
    assert to_dict(trial)["optimizer"] == to_dict(cfg)["optimizer"]
    plain = trial_config(TrialSetup(setup.base, setup.dims, setup.train_runs, setup.metric, None), {}, "x")
    assert plain.train.reference == cfg.train.reference


def test_max_concurrent_trials_is_cluster_gpus_over_gpus_per_trial(tmp_path):
    cfg = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\n",
               overrides=("scaling.use_gpu=true", "scaling.num_workers=8"))
    assert derive_max_concurrent_trials(cfg, {"GPU": 16.0, "CPU": 192.0}) == 2
    assert derive_max_concurrent_trials(cfg, {"GPU": 23.0}) == 2
    assert derive_max_concurrent_trials(cfg, {"CPU": 8.0}) == 1  # autoscaling from zero GPUs: one at a time
    cpu = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\n",
               overrides=("scaling.num_workers=1",))
    assert derive_max_concurrent_trials(cpu, {"CPU": 2.0}) == 2
    fixed = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\n"
                           "max_concurrent_trials: 3\n")
    assert derive_max_concurrent_trials(fixed, {"CPU": 2.0}) == 3


def test_reference_is_shared_only_when_trials_see_the_same_model_and_data(tmp_path):
    def decision(space: str, *overrides: str):
        cfg = load(tmp_path, f"search_space:\n{textwrap.indent(space, '  ')}", overrides=overrides)
        return share_decision(plan_sweep(cfg))

    share, entropy, _ = decision("loss.beta: {loguniform: [0.01, 0.5]}\n")
    assert share and not entropy
    share, entropy, _ = decision("loss.name: {choice: [dpo, mallows_theta]}\n")
    assert share and entropy  # one cache with entropies serves both losses
    share, _, why = decision("data.max_response_length: {choice: [16, 32]}\n")
    assert not share and "varies data.max_response_length" in why
    share, _, why = decision("loss.beta: {loguniform: [0.01, 0.5]}\n", "loss.name=simpo")
    assert not share and "no loss in the sweep uses reference log-probs" in why
    share, _, why = decision("loss.beta: {loguniform: [0.01, 0.5]}\n", "tune.share_reference=false")
    assert not share and "tune.share_reference is false" in why


def test_resume_refuses_a_different_config(tmp_path):
    cfg = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\n")
    sweep = plan_sweep(cfg)
    stored = to_yaml(cfg)
    check_resume_config(sweep, stored)  # same config: fine
    changed_ray = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\n",
                       overrides=("ray.num_cpus=4", "tune.max_concurrent_trials=2"))
    check_resume_config(plan_sweep(changed_ray), stored)
    other = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.9]}\n",
                 overrides=("optimizer.lr=1e-4",))
    with pytest.raises(ConfigError, match=r"started with another config .*optimizer.lr: 5e-06 -> 0.0001"):
        check_resume_config(plan_sweep(other), stored)


def test_apply_overrides_merges_dotted_keys_into_nested_sections():
    raw = {"loss": {"name": "dpo", "beta": 0.1, "params": {"x": 1}}, "train": {"max_steps": 5}}
    out = apply_overrides(raw, {"loss.beta": 0.3, "loss.params.y": 2})
    assert out == {"loss": {"name": "dpo", "beta": 0.3, "params": {"x": 1, "y": 2}},
                   "train": {"max_steps": 5}}
    assert raw["loss"]["beta"] == 0.1


# ----------------------------------------------------------------------------------------------------
# Shipped configs and the CLI
# ----------------------------------------------------------------------------------------------------

SWEEPS = sorted(p for p in (REPO / "configs" / "tune").glob("*.yaml") if "learned" not in p.name)


def test_the_issue_s_example_sweeps_are_shipped():
    assert {"beta_dpo_vs_lipo.yaml", "wmpo_alpha_beta.yaml", "lambda_dpo_schedule.yaml",
            "lambda_dpo_probe.yaml"} <= {p.name for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_pass_dry_run(path, capsys):
    assert main(["tune", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"sweep {load_config(path).checkpoint.run_name} at" in out
    assert "reference log-probs: shared" in out


def test_shipped_learned_scheduler_config_trains_from_the_probe_results():
    cfg = load_config(REPO / "configs" / "tune" / "lambda_dpo_learned.yaml")
    probe = load_config(REPO / "configs" / "tune" / "lambda_dpo_probe.yaml")
    assert cfg.lambdas.schedule == "learned"
    assert cfg.lambdas.learned.results_path == \
        f"{probe.checkpoint.storage_path}/{probe.checkpoint.run_name}/results/results.csv"
    assert cfg.lambdas.learned.score_column == probe.tune.metric


def test_cli_refuses_a_config_without_a_search_space(tmp_path, capsys):
    path = tmp_path / "plain.yaml"
    path.write_text("loss:\n  name: dpo\n")
    assert main(["tune", str(path), "--dry-run"]) == 2
    assert "tune.search_space is empty" in capsys.readouterr().err


def test_cli_dry_run_prints_the_plan(tmp_path, capsys):
    path = sweep_config(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\nnum_samples: 3\n")
    assert main(["tune", str(path), *BASE, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trials: 3 (num_samples=3)" in out
    assert "loss.beta: loguniform(0.01, 0.5)" in out
    assert "ASHA on the optimizer step (grace_period=1, reduction_factor=2, max_t=20)" in out


def test_optuna_search_takes_the_space_and_a_missing_searcher_names_the_fix(tmp_path, monkeypatch):
    import importlib.util

    from raypo.tune.sweep import build_search_algorithm, param_space

    cfg = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\n"
                         "  loss.name: {choice: [dpo, ipo]}\nsearch_alg: optuna\n")
    if importlib.util.find_spec("optuna") is not None:
        from ray.tune.search.optuna import OptunaSearch

        searcher = build_search_algorithm(cfg)
        assert isinstance(searcher, OptunaSearch)
        space = OptunaSearch.convert_search_space(param_space(plan_sweep(cfg).dims))
        assert set(space) == {"loss.beta", "loss.name"}
    monkeypatch.setitem(__import__("sys").modules, "hyperopt", None)  # as if not installed
    hyper = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\nsearch_alg: hyperopt\n")
    with pytest.raises(ConfigError, match="needs the hyperopt package on the driver: pip install hyperopt"):
        build_search_algorithm(hyper)


def test_asha_rungs_are_replayed_from_finished_trials_after_a_restore(tmp_path):
    """Tune's experiment state keeps the trials but not the scheduler: after Tuner.restore the finished
    trials are re-added, and raypo's ASHA replays their reported history into its rungs."""
    import json as _json
    from types import SimpleNamespace

    from pyarrow import fs

    from raypo.tune.sweep import build_scheduler

    cfg = load(tmp_path, "search_space:\n  loss.beta: {loguniform: [0.01, 0.5]}\ngrace_period: 5\n")
    metric = cfg.tune.metric

    def finished(trial_id: str, history: list[tuple[int, float]]):
        path = tmp_path / trial_id
        path.mkdir()
        lines = [_json.dumps({"step": s, metric: m}) + "\n" for s, m in history]
        (path / "result.json").write_text("".join(lines))
        return SimpleNamespace(trial_id=trial_id, status="TERMINATED", path=str(path), last_result={},
                               storage=SimpleNamespace(storage_filesystem=fs.LocalFileSystem()))

    def resumed_scheduler(replay: bool):
        sched = build_scheduler(cfg)
        if not replay:
            from ray.tune.schedulers import AsyncHyperBandScheduler

            sched = AsyncHyperBandScheduler(time_attr="step", max_t=20, grace_period=5, reduction_factor=2)
        sched.set_search_properties(metric, "max")
        for i, score in enumerate((0.8, 0.9)):
            history = [(0, 0.0), (5, score), (10, score), (20, score)]
            sched.on_trial_add(None, finished(f"t{i}{replay}", history))
        new = SimpleNamespace(trial_id=f"new{replay}", status="PENDING")
        sched.on_trial_add(None, new)
        return sched.on_trial_result(None, new, {"step": 5, metric: 0.1})

    assert resumed_scheduler(replay=True) == "STOP"  # compared with the finished trials' step-5 scores
    assert resumed_scheduler(replay=False) == "CONTINUE"  # plain ASHA forgot them
