"""A lambda-conditioned run end to end: training evaluates at each one-hot, the model and its conditioning
rule travel with the export, ``raypo eval`` scores a run directory, a checkpoint and an export (locally and
on Ray Data, with the plot), plain transformers reproduces its log-probs, ``raypo generate`` conditions on
lambda, and bad input gets a clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from raypo.cli.main import main
from raypo.config import load_config
from raypo.data.synthetic_steer import STEER_DIMENSIONS
from raypo.train.trainer import run_training

pytestmark = pytest.mark.e2e

STEER_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "steer_quickstart.yaml"
# The config's table schedule cut down to the one-hots and the inner points of one edge, helpfulness <->
# conciseness (the two dimensions that disagree on every pair differing in detail or keyword): a third of
# the shipped table's edges, learned in two thirds of its steps. Measured on EVAL_DATA at step 400:
# diagonal 0.910 / 0.947 / 1.000 against at most 0.615 / 0.449 / 0.676; along the trained edge, towards
# conciseness 0.053 -> 0.372 -> 0.794 -> 0.874 -> 0.947 and towards helpfulness 0.125 -> 0.167 -> 0.247 ->
# 0.632 -> 0.910. 200 steps are too few to be safe: on the training eval split the helpfulness diagonal
# was not best until step 250 (docs/steering.md), and the same 200-step run that steered in one
# environment did not in another.
EDGE_TABLE = "[[1,0,0],[0,1,0],[0,0,1],[0.75,0.25,0],[0.5,0.5,0],[0.25,0.75,0]]"
TRAINED_EDGE = ("helpfulness", "conciseness")
STEPS = 400

EVAL_DATA = "synthetic://steer?num_prompts=48&seed=9"
DIMENSIONS = STEER_DIMENSIONS


def _train(storage: str, run_name: str, *overrides: str):
    """configs/steer_quickstart.yaml (the steering data, raypo.data.synthetic_steer: every two dimensions
    conflict on some pairs) with the one-edge table above."""
    cfg = load_config(str(STEER_CONFIG), [
        f"lambdas.table={EDGE_TABLE}", "logging.tensorboard=false",
        f"checkpoint.storage_path={storage}", f"checkpoint.run_name={run_name}",
        f"checkpoint.export_path={storage}/{run_name}/export", *overrides])
    return run_training(cfg)


@pytest.fixture(scope="module")
def conditioned_run(ray_cluster, tmp_path_factory):
    return _train(str(tmp_path_factory.mktemp("steer")), "steer", f"train.max_steps={STEPS}",
                  f"train.eval_every={STEPS}", f"checkpoint.every_steps={STEPS}")


@pytest.fixture(scope="module")
def unconditioned_run(ray_cluster, tmp_path_factory):
    """The same data and objective, lambdas.condition=none: the policy never sees lambda (a few steps do:
    there is nothing for more steps to change about that)."""
    return _train(str(tmp_path_factory.mktemp("plain")), "plain", "lambdas.condition=none",
                  "train.max_steps=4", "train.eval_every=4", "checkpoint.every_steps=4")


def _eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_training_evaluates_at_every_one_hot(conditioned_run):
    rows = [json.loads(line) for line in open(os.path.join(conditioned_run.run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/pairwise_accuracy" in r]
    assert [r["step"] for r in evals] == [0, STEPS]
    for dim in DIMENSIONS:
        assert all(f"eval_at_{dim}/pairwise_accuracy/{dim}" in r for r in evals)
    # the policy sees lambda: at step 0 the one-hot evaluations already differ from the uniform one
    first = evals[0]
    assert any(first[f"eval_at_{d}/loss"] != first["eval/loss"] for d in DIMENSIONS)


def test_the_export_carries_the_conditioning(conditioned_run):
    card = json.load(open(os.path.join(conditioned_run.export_dir, "raypo_model.json")))
    cond = json.load(open(os.path.join(conditioned_run.export_dir, "raypo_conditioning.json")))
    assert card["dimensions"] == list(DIMENSIONS) and card["loss"] == "lambda_dpo" and card["beta"] == 1.0
    assert cond["dimensions"] == list(DIMENSIONS) and "{weights}" in cond["template"]


def test_the_conditioned_model_steers_and_the_unconditioned_one_does_not(conditioned_run, unconditioned_run,
                                                                        capsys):
    """On held-out steering data, A[k][j] (accuracy on dimension j at lambda = e_k) ranks every dimension best
    at its own one-hot, strictly and by at least 0.1 (every two dimensions conflict on some pairs); the same
    objective without conditioning gives the same row at every lambda."""
    from raypo.eval.steering import format_steering

    report = _eval_json(capsys, conditioned_run.export_dir, "--data", EVAL_DATA, "--local",
                        "--steering")["steering"]
    assert report["steers"], format_steering(report)
    for x in report["diagonal"]:
        assert x["own"] >= x["best_other"] + 0.1, format_steering(report)
    plain = _eval_json(capsys, unconditioned_run.export_dir, "--data", EVAL_DATA, "--local",
                       "--steering")["steering"]
    assert all(row == plain["matrix"][0] for row in plain["matrix"]) and not plain["steers"]


def test_accuracy_rises_along_the_trained_edge(conditioned_run, capsys):
    """Moving lambda from one end of the trained edge to the other raises the accuracy on the dimension
    moved towards over 5 points, monotonically within the report's tolerance (0.02: one pair of the
    eval set's few hundred) and by at least 0.3 from end to end, in both directions."""
    from raypo.eval.steering import format_steering

    report = _eval_json(capsys, conditioned_run.export_dir, "--data", EVAL_DATA, "--local",
                        "--steering")["steering"]
    edges = [e for e in report["edges"] if {e["from"], e["to"]} == set(TRAINED_EDGE)]
    assert len(edges) == 2, format_steering(report)
    for edge in edges:
        assert len(edge["values"]) == 5 and edge["monotone"], format_steering(report)
        assert edge["values"][-1] >= edge["values"][0] + 0.3, format_steering(report)


def test_the_steering_benchmark_reports_both_runs(conditioned_run, unconditioned_run, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from bench import steering

    out = tmp_path / "steering.json"
    assert steering.main(["--run-dir", conditioned_run.run_dir, "--control-dir", unconditioned_run.run_dir,
                          "--eval-data", EVAL_DATA, "--points", "3", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["conditioned"]["steering"]["steers"] and not results["control"]["steering"]["steers"]
    assert steering.rows_spread(results["control"]) == 0.0 < steering.rows_spread(results["conditioned"])
    md = out.with_suffix(".md").read_text()
    assert "## Lambda-conditioned" in md and "## Unconditioned twin" in md and "| e(conciseness) |" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_on_run_checkpoint_and_export_agree(conditioned_run, capsys):
    by_export = _eval_json(capsys, conditioned_run.export_dir, "--data", EVAL_DATA, "--local")
    assert by_export["dimensions"] == list(DIMENSIONS) and by_export["conditioned"] is True
    assert by_export["num_prompts"] == 48
    lambdas = [r["lambda"] for r in by_export["results"]]
    assert lambdas == [[1.0 if i == k else 0.0 for i in range(3)] for k in range(3)] + [[1 / 3] * 3]
    for r in by_export["results"]:
        assert set(r["metrics"]) == {"pairwise_accuracy", "ndcg", "kendall_tau"}
        assert all(0.0 <= r["metrics"]["pairwise_accuracy"][d] <= 1.0 for d in DIMENSIONS)
    by_run = _eval_json(capsys, conditioned_run.run_dir, "--data", EVAL_DATA, "--local")
    by_checkpoint = _eval_json(capsys, conditioned_run.checkpoint, "--data", EVAL_DATA, "--local")
    assert os.path.isdir(os.path.join(conditioned_run.checkpoint, "eval_export"))
    for other in (by_run, by_checkpoint):
        assert _close(other["results"], by_export["results"])


def _close(a, b) -> bool:
    return all(abs(x["metrics"][m][d] - y["metrics"][m][d]) < 1e-6
               for x, y in zip(a, b) for m in x["metrics"] for d in x["metrics"][m])


def test_eval_on_ray_data_matches_local_and_draws_the_plot(conditioned_run, capsys, tmp_path):
    png = tmp_path / "front.png"
    on_ray = _eval_json(capsys, conditioned_run.export_dir, "--data", EVAL_DATA, "--plot", str(png),
                        "--points", "3")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(on_ray["results"]) == 3 * 2 - 1  # e1 -> e2 -> e3, 3 points per edge
    assert on_ray["results"][0]["lambda"] == [1.0, 0.0, 0.0]
    assert on_ray["results"][1]["lambda"] == [0.5, 0.5, 0.0]
    local = _eval_json(capsys, conditioned_run.export_dir, "--data", EVAL_DATA, "--local",
                       "--lambda", "1,0,0", "--lambda", "0.5,0.5,0")
    assert _close(on_ray["results"][:2], local["results"])


def test_plain_transformers_gives_raypos_log_probs(conditioned_run, tiny_model_dir):
    """The export, loaded by transformers alone and conditioned through its chat template's
    ``preference_weights``, scores a response as raypo's evaluation does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raypo.config import DataConfig
    from raypo.data.pipeline import build_rows
    from raypo.eval.listwise import ListScorer, ScorerSpec
    from raypo.eval.models import resolve_eval_model

    model = resolve_eval_model(conditioned_run.export_dir)
    lam = [0.2, 0.3, 0.5]
    rows, _, _ = build_rows(DataConfig(train_path=EVAL_DATA, eval_fraction=0.0), model.path)
    spec = ScorerSpec(model.path, model.reference, model.conditioning.to_dict(), (tuple(lam), (1, 0, 0)))
    policy, _ = ListScorer(spec).score(rows[:2])
    assert policy[0][0] != policy[0][1]  # the policy's log-probs depend on lambda
    tok = AutoTokenizer.from_pretrained(conditioned_run.export_dir)
    lm = AutoModelForCausalLM.from_pretrained(conditioned_run.export_dir, dtype=torch.float32).eval()
    row = rows[0]
    text = tok.apply_chat_template(json.loads(row["prompt_messages"]), preference_weights=lam,
                                   add_generation_prompt=True, tokenize=False)
    assert "helpfulness 0.2, conciseness 0.3, politeness 0.5" in text  # the config's '%.1f'
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    for i, (resp, mask) in enumerate(zip(row["response_ids"], row["response_masks"])):
        ids = torch.tensor([prompt + list(resp)])
        with torch.no_grad():
            logp = torch.log_softmax(lm(ids).logits[0, :-1].double(), -1)
        token_logps = logp[len(prompt) - 1:, :].gather(1, torch.tensor(resp)[:, None])[:, 0]
        expected = float((token_logps * torch.tensor(mask, dtype=torch.float64)).sum())
        assert policy[0][0][i] == pytest.approx(expected, abs=1e-4)


def test_generate_conditions_on_lambda(conditioned_run, capsys):
    from raypo.eval.generation import conditioned_rows
    from raypo.eval.models import resolve_eval_model

    args = ["generate", conditioned_run.export_dir, "--lambda", "conciseness=1", "--prompt",
            "cats: what is 2 plus 3?", "--max-new-tokens", "6", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["lambda"] == [0.0, 1.0, 0.0] and isinstance(first["response"], str)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first  # greedy: the same
    rows = conditioned_rows(resolve_eval_model(conditioned_run.export_dir),
                            [{"prompt_id": "p", "prompt": [{"role": "user", "content": "hi"}]}], [0, 1, 0])
    assert rows[0]["prompt"][-1]["content"].endswith("helpfulness 0.0, conciseness 1.0, politeness 0.0.")


@pytest.mark.parametrize("args, message", [
    (["--lambda", "0.5,0.5"], "2 weights but the model has 3 dimensions"),
    (["--lambda", "0.9,0.9,0"], "not 1"),
])
def test_bad_lambdas_are_refused(conditioned_run, capsys, args, message):
    assert main(["eval", conditioned_run.export_dir, "--data", EVAL_DATA, "--local", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_model_raypo_did_not_train_is_refused(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", str(tiny_model_dir), "--data", EVAL_DATA, "--local"]) == 2
    assert "raypo_model.json" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--data", EVAL_DATA, "--local"]) == 2
    assert "not a raypo run directory, checkpoint or export" in capsys.readouterr().err


def test_data_on_other_dimensions_is_refused(conditioned_run, tmp_path, capsys):
    from raypo.data.io import write_records
    from raypo.data.schema import ListwiseRecord

    records = [ListwiseRecord(prompt_id=f"p{i}", prompt=[{"role": "user", "content": f"q{i}"}],
                              responses=["a", "b"], scores=[[1.0, 2.0], [2.0, 1.0]]) for i in range(3)]
    path = write_records(records, str(tmp_path / "two_dims.parquet"), ["clarity", "wit"])
    assert main(["eval", conditioned_run.export_dir, "--data", path, "--local"]) == 2
    err = capsys.readouterr().err
    assert "rated on (clarity, wit)" in err and "trained on (helpfulness" in err
