"""A lambda-conditioned run end to end: training evaluates at each one-hot, the model and its conditioning
rule travel with the export, ``raypo eval`` scores a run directory, a checkpoint and an export (locally and
on Ray Data, with the plot), plain transformers reproduces its log-probs, ``raypo generate`` conditions on
lambda, and bad input gets a clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raypo.cli.main import main
from raypo.config import load_config
from raypo.data.synthetic import DIMENSIONS
from raypo.train.trainer import run_training

pytestmark = pytest.mark.e2e

EVAL_DATA = "synthetic://default?num_prompts=12&seed=9"


@pytest.fixture(scope="module")
def conditioned_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    storage = str(tmp_path_factory.mktemp("steer"))
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", "model.dtype=float32",
        "data.train_path=synthetic://default?num_prompts=24&seed=3", "data.eval_fraction=0.25",
        "data.max_prompt_length=64", "data.max_response_length=32",
        "loss.name=lambda_dpo", "loss.beta=0.1", "lambdas.condition=prompt",
        "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "train.micro_batch_size=2", "train.max_steps=3",
        "train.epochs=3", "train.eval_every=3", "scaling.num_workers=2", "logging.tensorboard=false",
        f"checkpoint.storage_path={storage}", "checkpoint.run_name=steer", "checkpoint.every_steps=3",
        f"checkpoint.export_path={storage}/steer/export"])
    return run_training(cfg)


def _eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_training_evaluates_at_every_one_hot(conditioned_run):
    rows = [json.loads(line) for line in open(os.path.join(conditioned_run.run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/pairwise_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3]
    for dim in DIMENSIONS:
        assert all(f"eval_at_{dim}/pairwise_accuracy/{dim}" in r for r in evals)
    # the policy sees lambda: at step 0 the one-hot evaluations already differ from the uniform one
    first = evals[0]
    assert any(first[f"eval_at_{d}/loss"] != first["eval/loss"] for d in DIMENSIONS)


def test_the_export_carries_the_conditioning(conditioned_run):
    card = json.load(open(os.path.join(conditioned_run.export_dir, "raypo_model.json")))
    cond = json.load(open(os.path.join(conditioned_run.export_dir, "raypo_conditioning.json")))
    assert card["dimensions"] == list(DIMENSIONS) and card["loss"] == "lambda_dpo" and card["beta"] == 0.1
    assert cond["dimensions"] == list(DIMENSIONS) and "{weights}" in cond["template"]


def test_eval_on_run_checkpoint_and_export_agree(conditioned_run, capsys):
    by_export = _eval_json(capsys, conditioned_run.export_dir, "--data", EVAL_DATA, "--local")
    assert by_export["dimensions"] == list(DIMENSIONS) and by_export["conditioned"] is True
    assert by_export["num_prompts"] == 12
    lambdas = [r["lambda"] for r in by_export["results"]]
    assert lambdas == [[1.0 if i == k else 0.0 for i in range(4)] for k in range(4)] + [[0.25] * 4]
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
    assert len(on_ray["results"]) == 3 * 2 + 1  # e1 -> e2 -> e3 -> e4, 3 points per edge
    assert on_ray["results"][0]["lambda"] == [1.0, 0.0, 0.0, 0.0]
    assert on_ray["results"][1]["lambda"] == [0.5, 0.5, 0.0, 0.0]
    local = _eval_json(capsys, conditioned_run.export_dir, "--data", EVAL_DATA, "--local",
                       "--lambda", "1,0,0,0", "--lambda", "0.5,0.5,0,0")
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
    lam = [0.1, 0.2, 0.3, 0.4]
    rows, _, _ = build_rows(DataConfig(train_path=EVAL_DATA, eval_fraction=0.0), model.path)
    spec = ScorerSpec(model.path, model.reference, model.conditioning.to_dict(), (tuple(lam), (1, 0, 0, 0)))
    policy, _ = ListScorer(spec).score(rows[:2])
    assert policy[0][0] != policy[0][1]  # the policy's log-probs depend on lambda
    tok = AutoTokenizer.from_pretrained(conditioned_run.export_dir)
    lm = AutoModelForCausalLM.from_pretrained(conditioned_run.export_dir, dtype=torch.float32).eval()
    row = rows[0]
    text = tok.apply_chat_template(json.loads(row["prompt_messages"]), preference_weights=lam,
                                   add_generation_prompt=True, tokenize=False)
    assert "helpfulness 0.10, honesty 0.20" in text
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

    args = ["generate", conditioned_run.export_dir, "--lambda", "honesty=1", "--prompt",
            "cats: what is 2 plus 3? Be brief.", "--max-new-tokens", "6", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["lambda"] == [0.0, 1.0, 0.0, 0.0] and isinstance(first["response"], str)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first  # greedy: the same
    rows = conditioned_rows(resolve_eval_model(conditioned_run.export_dir),
                            [{"prompt_id": "p", "prompt": [{"role": "user", "content": "hi"}]}], [0, 1, 0, 0])
    assert rows[0]["prompt"][-1]["content"].endswith("honesty 1.00, instruction_following 0.00, "
                                                      "truthfulness 0.00.")


@pytest.mark.parametrize("args, message", [
    (["--lambda", "0.5,0.5"], "2 weights but the model has 4 dimensions"),
    (["--lambda", "0.9,0.9,0,0"], "not 1"),
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
