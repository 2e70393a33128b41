"""End to end: ``raypo tune`` from the CLI on a local 2-CPU Ray cluster, every trial a Ray Train + DeepSpeed
ZeRO-3 run of a tiny Llama (1 CPU worker, 4 steps), killed mid-way and resumed, then a training run whose
learned lambda scheduler is fitted from the sweep's results.

One sweep serves every test (a trial costs about a minute here). Its 2 x 2 grid runs in this order, one
trial at a time (Tune expands grids with the alphabetically first key, lambdas.weights, varying fastest)::

    trial 0  lambda uniform,   lr 1e-3   learns: eval accuracy ~0.85 at step 2, ~0.9 at step 4
    trial 1  lambda Dirichlet, lr 1e-3   learns
    trial 2  lambda uniform,   lr 1e-30  cannot move: accuracy 0 at step 2 < ASHA's cutoff -> stopped early
    trial 3  lambda Dirichlet, lr 1e-30  the driver is killed (process group) once its step-1 checkpoint is
                                         committed; after --resume it continues from its latest checkpoint

ASHA (time attribute = step, grace period 2, reduction factor 2) compares trials at the evaluations of
steps 2 and 4. Trial 3 starting at all after trial 2 was stopped shows that the stopped trial's worker was
released (Ray Train's placement-group cleaner). ``--resume`` must keep trials 0-2 as they are and continue
trial 3 from its checkpoint. Killing the driver's process group takes down the GCS and raylet at once, but
the trial's Train controller and worker notice only after a moment and may commit one more step: trial 3
resumes from step 1 or 2. From step 1 its step-2 evaluation is compared with the rungs ASHA replayed from
trials 0-2 and it is stopped there; from step 2 it runs to the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypo.config import load_config

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
METRIC = "eval/pairwise_accuracy"
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_yaml(model_dir: Path, storage: Path) -> str:
    return textwrap.dedent(f"""\
        defaults: [{REPO / "configs" / "deepspeed" / "zero3_cpu.yaml"}]
        model: {{path: {model_dir}, dtype: float32}}
        data:
          train_path: "synthetic://default?num_prompts=48&seed=0"
          eval_fraction: 0.25
          max_prompt_length: 64
          max_response_length: 32
        loss: {{name: lambda_dpo, beta: 0.1}}
        lambdas: {{schedule: fixed, weights: [0.25, 0.25, 0.25, 0.25]}}
        optimizer: {{lr: 1.0e-3, lr_scheduler: constant, warmup_steps: 0}}
        train: {{micro_batch_size: 4, max_steps: 4, epochs: 1, eval_every: 2}}
        scaling: {{num_workers: 1}}
        logging: {{tensorboard: false, backends: [mlflow]}}
        checkpoint: {{storage_path: {storage}, run_name: e2e, every_steps: 1, keep_last: 2}}
        ray: {{num_cpus: 2}}
        tune:
          search_space:
            lambdas.weights: {{simplex: {{num: 1, include_onehots: false, include_uniform: true, seed: 0}}}}
            optimizer.lr: {{grid_search: [1.0e-3, 1.0e-30]}}
            loss.beta: {{loguniform: [0.05, 0.5]}}
          num_samples: 1
          metric: {METRIC}
          mode: max
          scheduler: asha
          grace_period: 2
          reduction_factor: 2
          max_concurrent_trials: 1
        """)


def trial_states(experiment: Path) -> dict[str, str]:
    """{trial id: status} from Tune's latest persisted experiment state."""
    files = sorted(experiment.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (ValueError, OSError):  # being rewritten
        return {}
    states = {}
    for trial_json, _ in data["trial_data"]:
        trial = json.loads(trial_json)
        states[trial["trial_id"]] = trial["status"]
    return states


def committed_steps(run_dir: Path) -> list[str]:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory):
    """Run the sweep from the CLI, kill it during trial 3, resume it; returns what the tests check."""
    tmp = tmp_path_factory.mktemp("tune_e2e")
    storage = tmp / "sweeps"
    config = tmp / "sweep.yaml"
    config.write_text(sweep_yaml(tiny_model_dir, storage))
    experiment = storage / "e2e"
    cmd = [sys.executable, "-m", "raypo.cli", "tune", str(config)]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune's state file kept fresh for the kill
    first_log = tmp / "first.log"
    start = time.time()
    with open(first_log, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        kept: dict[str, dict[str, bytes]] = {}
        try:
            deadline = time.time() + 900
            while time.time() < deadline:
                states = trial_states(experiment)
                ids = sorted(states, key=lambda t: t.rsplit("_", 1)[1])
                if len(ids) == 4 and all(states[t] == "TERMINATED" for t in ids[:3]) and \
                        "step_00000001" in committed_steps(experiment / "train_runs" / f"trial_{ids[3]}"):
                    kept = {t: tree(experiment / "train_runs" / f"trial_{t}") for t in ids[:3]}
                    kept.update({f"tune/{t}": tree(experiment / f"trial_{t}") for t in ids[:3]})
                    break
                if proc.poll() is not None:
                    pytest.fail("the sweep ended before it could be killed:\n"
                                f"{first_log.read_text()[-4000:]}")
                time.sleep(0.2)
            else:
                pytest.fail(f"trial 3 never reached its step-1 checkpoint:\n{first_log.read_text()[-4000:]}")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_at = time.time() - start
    states_at_kill = trial_states(experiment)
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=900)
    output = resumed.stdout + resumed.stderr
    (tmp / "resumed.log").write_text(output)
    assert resumed.returncode == 0, output[-6000:]
    print(f"sweep: killed after {killed_at:.0f} s, resumed run took {time.time() - start - killed_at:.0f} s")
    final = trial_states(experiment)
    return {"storage": storage, "experiment": experiment, "kept": kept, "states_at_kill": states_at_kill,
            "ids": sorted(final, key=lambda t: t.rsplit("_", 1)[1]), "final_states": final,
            "first": first_log.read_text(), "resumed": output,
            "table": pd.read_csv(experiment / "results" / "results.csv")}


def row(sweep, index: int) -> pd.Series:
    table = sweep["table"]
    return table[table["trial_id"] == sweep["ids"][index]].iloc[0]


def test_asha_stopped_the_weak_trials_early_and_the_next_trial_started(sweep):
    table = sweep["table"]
    assert len(table) == 4 and set(table["trial_id"]) == set(sweep["ids"])
    assert not (table["status"] == "error").any()
    for i in (0, 1):
        assert row(sweep, i)["status"] == "completed" and row(sweep, i)["step"] == 4
    assert row(sweep, 2)["status"] == "stopped early" and row(sweep, 2)["step"] == 2
    assert row(sweep, 2)[METRIC] < min(row(sweep, 0)[METRIC], row(sweep, 1)[METRIC])
    # trial 3 ran (it committed a checkpoint before the kill) after trial 2 was stopped: the stopped
    # trial's worker was released
    assert sweep["states_at_kill"][sweep["ids"][2]] == "TERMINATED"


def test_killed_sweep_resumes_keeping_finished_trials_and_continuing_the_rest(sweep):
    experiment, ids = sweep["experiment"], sweep["ids"]
    states = sweep["states_at_kill"]
    assert [states[t] for t in ids] == ["TERMINATED", "TERMINATED", "TERMINATED", "RUNNING"]
    assert "resuming the sweep" in sweep["resumed"]
    # finished trials were not run again: their Train runs and Tune results are byte for byte as at the kill
    for t in ids[:3]:
        assert tree(experiment / "train_runs" / f"trial_{t}") == sweep["kept"][t]
        assert tree(experiment / f"trial_{t}") == sweep["kept"][f"tune/{t}"]
    # the interrupted trial continued from its latest checkpoint
    resumed_at = re.search(rf"trial_{ids[3]}/step_0000000(\d) at step (\d)", sweep["resumed"])
    assert resumed_at and resumed_at.group(1) == resumed_at.group(2) and int(resumed_at.group(1)) >= 1
    if resumed_at.group(1) == "1":  # its step-2 evaluation met the rungs replayed from trials 0-2
        assert row(sweep, 3)["status"] == "stopped early" and row(sweep, 3)["step"] == 2
    else:
        assert row(sweep, 3)["status"] == "completed" and row(sweep, 3)["step"] == 4
    assert len(ids) == 4 and set(sweep["final_states"].values()) == {"TERMINATED"}


def test_reference_log_probs_were_computed_once_for_all_trials(sweep):
    assert "reference log-probs: computed 2 cache entries" in sweep["first"]
    assert "reference log-probs: found in the cache" in sweep["resumed"]
    # the data was read and tokenised once per driver: every trial trained on the driver's datasets
    for log, trials in ((sweep["first"], 4), (sweep["resumed"], 1)):
        assert log.count("raypo: data train (read, validate, tokenize)") == 1
        assert log.count("raypo: data: the sweep's tokenised datasets (36 train, 12 eval rows") == trials
    cache = sweep["storage"] / "reference_cache"
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 2  # train and eval splits
    for entry in entries:  # one data directory each: no trial (nor the resumed driver) scored again
        assert (entry / "manifest.json").is_file()
        assert len([p for p in entry.iterdir() if p.is_dir()]) == 1


def test_results_table_best_config_and_plots_are_written(sweep):
    results = sweep["experiment"] / "results"
    table = sweep["table"]
    assert {"optimizer.lr", "lambdas.weights", "loss.beta", "lambda_0", "lambda_3", METRIC,
            f"best {METRIC}", "eval/loss"} <= set(table.columns)
    assert table.iloc[0]["optimizer.lr"] == pytest.approx(1e-3)  # best first
    assert "stopped early" in sweep["resumed"] and "results table:" in sweep["resumed"]
    best = load_config(results / "best_config.yaml")
    assert best.optimizer.lr == pytest.approx(1e-3)
    assert best.loss.beta == pytest.approx(table.iloc[0]["loss.beta"])
    assert best.tune.search_space == {} and best.checkpoint.run_name == "e2e-best"
    for name in ("metric_vs_loss.beta.png", "metric_vs_optimizer.lr.png", "metric_vs_lambda.png"):
        assert (results / name).read_bytes()[:8] == PNG, name


def test_learned_lambda_scheduler_fitted_from_the_sweep_trains(sweep, ray_cluster, tiny_model_dir, tmp_path,
                                                              capsys):
    """The sweep's best config, as written, trains (here with the learned scheduler fitted from the sweep's
    table in place of its fixed lambda, and fewer steps); ``raypo lambdas fit`` on the sweep's results.csv
    (a probe sweep: lambda fixed per trial) prints the table that training samples from."""
    from raypo.cli.main import main
    from raypo.train.lambda_schedules import from_results_table
    from raypo.train.trainer import run_training

    table_path = sweep["experiment"] / "results" / "results.csv"
    learned = ["lambdas.schedule=learned", f"lambdas.learned.results_path={table_path}",
               f"lambdas.learned.score_column={METRIC}", "lambdas.learned.degree=1",
               "lambdas.learned.num_candidates=4", "lambdas.learned.tau=100", "lambdas.seed=0"]
    best_config = sweep["experiment"] / "results" / "best_config.yaml"
    cfg = load_config(best_config, ["train.max_steps=2", f"checkpoint.storage_path={tmp_path}",
                                    "checkpoint.run_name=learned", *learned])
    assert cfg.loss.name == "lambda_dpo" and cfg.optimizer.lr == pytest.approx(1e-3)
    result = run_training(cfg)
    assert result.metrics["step"] == 2 and METRIC in result.metrics
    state = json.loads((Path(result.checkpoint) / "raypo_state.json").read_text())["lambda_state"]
    assert state["schedule"] == "learned"
    fitted = from_results_table(str(table_path), [f"lambda_{k}" for k in range(4)], METRIC, degree=1,
                                num_candidates=4, tau=100.0, seed=0)
    np.testing.assert_allclose(state["candidates"], fitted.candidates, rtol=1e-12)
    np.testing.assert_allclose(state["probs"], fitted.probs, rtol=1e-9)
    np.testing.assert_allclose(state["weights"], fitted.weights, rtol=1e-9, atol=1e-12)
    assert state["num_samples"] == 2  # one lambda draw per step
    capsys.readouterr()  # drop the training run's output
    assert main(["lambdas", "fit", str(table_path), "--degree", "1", "--candidates", "dirichlet:4",
                 "--score-column", METRIC, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["residuals"]) == len(sweep["table"]) and len(printed["features"]) == 5
    np.testing.assert_allclose([c["lambda"] for c in printed["candidates"]], state["candidates"], rtol=1e-12)
    np.testing.assert_allclose([c["p"] for c in printed["candidates"]], state["probs"], rtol=1e-9)
    np.testing.assert_allclose(printed["weights"], state["weights"], rtol=1e-9, atol=1e-12)


def test_raypo_report_on_the_sweep(sweep, curve_pixels):
    """``raypo report`` on this real sweep: the results table, the sweep's plots and the tuned metric of
    every trial against the step, with curves drawn."""
    import base64
    import re

    from raypo.cli.main import main

    out = sweep["experiment"] / "report.html"
    assert main(["report", str(sweep["experiment"])]) == 0
    page = out.read_text()
    for trial_id in sweep["ids"]:
        assert f"<td>{trial_id}</td>" in page
    assert "stopped early" in page and "Best trial&#x27;s config" in page
    images = dict(re.findall(r"alt='([^']+)' src='data:image/png;base64,([^']+)'", page))
    assert {"metric vs lambda", f"trials {METRIC.replace('/', '_').replace('_', ' ')}"} <= set(images)
    assert all(curve_pixels(base64.b64decode(png)) > 100 for png in images.values())


def test_each_trial_logs_one_mlflow_run_grouped_by_the_sweep(sweep):
    """logging.backends: [mlflow] in a sweep: one MLflow run per trial (the killed trial resumes its own),
    tagged with the sweep's name, in the SQLite store beside the trials' runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{sweep['experiment'] / 'train_runs'}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("raypo").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(f"trial_{t}" for t in sweep["ids"])
    assert {r.data.tags["raypo.group"] for r in runs} == {"e2e"}
    table = sweep["table"].set_index("trial_id")
    for r in runs:
        steps = {m.step for m in client.get_metric_history(r.info.run_id, "train/loss")}
        last = int(table.loc[r.info.run_name.removeprefix("trial_"), "step"])
        # every step the trial trained, once; a trial stopped by ASHA may have trained a step or two past
        # its last report to Tune before it was stopped
        assert set(range(1, last + 1)) <= steps == set(range(1, max(steps) + 1)), (r.info.run_name, steps)
        assert float(r.data.params["optimizer.lr"]) == pytest.approx(table.loc[
            r.info.run_name.removeprefix("trial_"), "optimizer.lr"])
