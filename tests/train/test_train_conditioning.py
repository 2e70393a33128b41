"""Lambda conditioning in the training step (raypo.train.conditioning): the policy sees each prompt with
its lambda, the reference the plain prompt, in both reference modes and under token-budget packing."""

from __future__ import annotations

import json

import pytest
import torch

from raypo.data.conditioning import conditioned_prompt_ids
from raypo.model.batch import collate_listwise
from raypo.train.conditioning import BatchConditioner, conditioning_of, with_reference_columns
from raypo.train.engines import build_engines
from raypo.train.lambda_schedules import build_lambda_schedule
from raypo.train.objective import Objective
from raypo.train.recipe import ListwiseRecipe
from raypo.train.reference import reference_outputs

pytestmark = pytest.mark.integration

LAM = [0.4, 0.2, 0.3, 0.1]
FIXED = ["lambdas.schedule=fixed", f"lambdas.weights=[{','.join(map(str, LAM))}]"]


def make_cfg(loss: str, *overrides: str):
    from raypo.config import load_config

    return load_config(None, [f"loss.name={loss}", "model.dtype=float32", "optimizer.lr=1e-3",
                              "optimizer.warmup_steps=0", *overrides])


def flat_params(engine):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().flatten().clone() for p in params])


def score_reference(rows, model_dir):
    """The rows with ``ref_logps`` of their plain prompts from the precompute stage."""
    import pyarrow as pa

    from raypo.train.reference import ReferenceScorer

    scorer = ReferenceScorer(str(model_dir), "float32", "auto", True, with_entropy=False)
    return scorer(pa.Table.from_pylist(rows)).to_pylist()


def _train(cfg, dims, model_dir, steps, *, condition: bool):
    objective = Objective.from_config(cfg, dims)
    engines = build_engines(cfg, str(model_dir), str(model_dir), world_size=1,
                            needs_online_reference=cfg.train.reference == "online", total_steps=len(steps))
    recipe = ListwiseRecipe(cfg, objective, engines, schedule=build_lambda_schedule(cfg.lambdas,
                                                                                     num_dims=len(dims)))
    if condition:
        recipe.conditioner = BatchConditioner(conditioning_of(cfg, dims), engines.tokenizer)
    losses = []
    for step in steps:
        sums = recipe.train_step(step)
        losses.append(float(sums["train/loss_numerator"][0] / sums["train/loss_denominator"][0]))
    return losses, flat_params(engines.policy), recipe


def _prerendered(rows, cond, tokenizer):
    """The rows with their prompts already rendered at LAM (what conditioning must amount to)."""
    out = []
    for r in rows:
        ids = conditioned_prompt_ids(tokenizer, json.loads(r["prompt_messages"]), LAM, cond, r["prompt_ids"])
        out.append({**r, "prompt_ids": ids, "prompt_length": len(ids)})
    return out


@pytest.mark.parametrize("budget", [0, 400])
def test_conditioning_equals_training_on_prompts_rendered_with_lambda(budget, tiny_model_dir, tokenized_rows,
                                                                      single_process_group):
    """Precomputed reference on the plain prompts: a conditioned run (fixed lambda) takes exactly the
    steps of an unconditioned run on rows whose prompts were rendered with that lambda beforehand, with and
    without token-budget packing; the reference values are the plain prompts' in both."""
    from raypo.model.loading import load_tokenizer

    rows, dims = tokenized_rows
    data = score_reference(rows[:12], tiny_model_dir)
    common = ["train.reference=precomputed", "train.micro_batch_size=3", "train.grad_accum_steps=2",
              f"train.token_budget={budget}", *FIXED]
    cfg = make_cfg("lambda_dpo", *common, "lambdas.condition=prompt")
    cond = conditioning_of(cfg, dims)
    pre = _prerendered(data, cond, load_tokenizer(str(tiny_model_dir)))
    assert all(len(a["prompt_ids"]) > len(b["prompt_ids"]) for a, b in zip(pre, data))
    steps = [[collate_listwise(data[i:i + 3]), collate_listwise(data[i + 3:i + 6])] for i in (0, 6)]
    steps_pre = [[collate_listwise(pre[i:i + 3]), collate_listwise(pre[i + 3:i + 6])] for i in (0, 6)]
    loss_c, w_c, _ = _train(cfg, dims, tiny_model_dir, steps, condition=True)
    loss_p, w_p, _ = _train(make_cfg("lambda_dpo", *common), dims, tiny_model_dir, steps_pre, condition=False)
    assert loss_c == pytest.approx(loss_p, rel=1e-6)
    assert float((w_c - w_p).abs().max()) < 1e-6
    # and conditioning changed the training: the plain prompts give other steps
    loss_plain, w_plain, _ = _train(make_cfg("lambda_dpo", *common), dims, tiny_model_dir, steps,
                                    condition=False)
    assert float((w_plain - w_c).abs().max()) > 1e-4


def test_the_online_reference_scores_the_plain_prompt(tiny_model_dir, tokenized_rows, single_process_group):
    """Online reference: the values a conditioned step uses are the reference's on the plain prompts,
    equal to those of an unconditioned run and to the precompute stage's (one forward per group there:
    equal to float rounding); the step itself runs and is finite."""
    rows, dims = tokenized_rows
    cfg = make_cfg("lambda_dpo", "lambdas.condition=prompt", *FIXED)
    objective = Objective.from_config(cfg, dims)
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=True, total_steps=1)
    plain = collate_listwise(rows[:4])
    carried = with_reference_columns(objective, engines.reference, plain, prefix_sharing=True,
                                     per_group=False)
    unconditioned = reference_outputs(objective, engines.reference, plain, True, torch.device("cpu"))
    mask = plain.response_mask()
    assert torch.equal(carried.extras["ref_logps"][mask], unconditioned.raw_logps[mask])
    stage = collate_listwise(score_reference(rows[:4], tiny_model_dir)).extras["ref_logps"]
    assert torch.allclose(carried.extras["ref_logps"][mask], stage[mask], atol=1e-4)
    conditioner = BatchConditioner(conditioning_of(cfg, dims), engines.tokenizer)
    seen = conditioner(carried, torch.tensor(LAM))
    assert seen.prompt_ids != plain.prompt_ids and seen.response_ids == plain.response_ids
    used = reference_outputs(objective, engines.reference, seen, True, torch.device("cpu"))
    assert torch.equal(used.raw_logps[mask], unconditioned.raw_logps[mask])  # not the conditioned prompt's
    recipe = ListwiseRecipe(cfg, objective, engines, schedule=build_lambda_schedule(cfg.lambdas, num_dims=4))
    recipe.conditioner = conditioner
    sums = recipe.train_step([plain])
    assert torch.isfinite(sums["train/loss_numerator"][0])
    files = recipe.model_files()
    assert files["raypo_conditioning.json"]["dimensions"] == dims
    assert files["raypo_model.json"]["conditioning"] == "prompt"
    assert "preference_weights" in engines.tokenizer.chat_template  # saved with every checkpoint


def test_conditioning_needs_a_loss_that_weights_by_lambda():
    from raypo.config import load_config
    from raypo.errors import ConfigError

    with pytest.raises(ConfigError, match="does not weight dimensions by lambda"):
        load_config(None, ["loss.name=dpo", "lambdas.condition=prompt"])
    with pytest.raises(ConfigError, match="condition_template must contain"):
        load_config(None, ["lambdas.condition=prompt", "lambdas.condition_template=no weights here"])
    load_config(None, ["loss.name=mpo", "loss.score_reduction=lambda", "lambdas.condition=prompt"])
