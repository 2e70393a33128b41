"""The worker loop's step on one process: every loss trains, rewards are exactly zero at step 0, the step
normalises globally, and labels reach each loss in the form it needs."""

from __future__ import annotations

import pytest
import torch

from raypo.config import load_config
from raypo.losses.registry import LOSS_REGISTRY, get_loss_spec
from raypo.packing import collate_listwise
from raypo.train.labels import loss_labels
from raypo.train.loop import (
    build_engines,
    denominator_of,
    loss_setup,
    micro_batch_loss,
    reference_outputs,
    train_step,
)

pytestmark = pytest.mark.integration

LOSS_PARAMS = {"wmpo": {"alpha": 0.1}, "lipo_lambda": {"scale": "valid"}}


def make_cfg(loss: str, *overrides: str):
    params = [f"loss.params.{k}={v}" for k, v in LOSS_PARAMS.get(loss, {}).items()]
    return load_config(None, [f"loss.name={loss}", "model.dtype=float32", "train.micro_batch_size=4",
                              "optimizer.lr=1e-3", "optimizer.warmup_steps=0", *params, *overrides])


def batches(rows, size=4):
    return [collate_listwise(rows[i:i + size]) for i in range(0, len(rows) - size + 1, size)]


def flat_params(engine):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().flatten().clone() for p in params])


@pytest.mark.parametrize("loss", sorted(LOSS_REGISTRY))
def test_every_loss_trains_a_few_steps(loss, tiny_model_dir, tokenized_rows, single_process_group):
    rows, dims = tokenized_rows
    cfg = make_cfg(loss)
    setup = loss_setup(cfg, dims)
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=True, total_steps=3)
    from raypo.lambdas import build_lambda_schedule

    schedule = build_lambda_schedule(cfg.lambdas, num_dims=len(dims)) if setup.spec.needs_lambda else None
    before = flat_params(engines.policy)
    losses = []
    for batch in batches(rows)[:3]:
        sums = train_step(cfg, setup, engines, [batch], schedule, torch.device("cpu"), world_size=1)
        num, den = sums["train/loss_numerator"][0], sums["train/loss_denominator"][0]
        losses.append(float(num / den) if den > 0 else 0.0)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    after = flat_params(engines.policy)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after), f"{loss}: no parameter moved in 3 steps"


def test_rewards_are_exactly_zero_at_step_zero_online(tiny_model_dir, tokenized_rows, single_process_group):
    from raypo.listwise_model import grouped_logprobs

    rows, dims = tokenized_rows
    cfg = make_cfg("lipo_lambda")
    setup = loss_setup(cfg, dims)
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=True, total_steps=1)
    batch = batches(rows)[0]
    ref = reference_outputs(setup, engines, batch, True, torch.device("cpu"))
    policy = grouped_logprobs(engines.policy, batch).logps
    out = micro_batch_loss(setup, batch, policy, ref, None, torch.device("cpu"))
    mask = batch.response_mask()
    assert torch.equal(out.rewards[mask], torch.zeros_like(out.rewards[mask]))


@pytest.mark.parametrize("chunk", [0, 2])
def test_rewards_are_exactly_zero_at_step_zero_precomputed(tiny_model_dir, tokenized_rows, single_process_group,
                                                           chunk):
    """Reference log-probs scored by the precompute stage in batches of 3 groups, a step over batches of 4:
    the step-0 rewards and KL estimate are exactly zero (direct path and response chunks)."""
    import pyarrow as pa

    from raypo.train.reference import ReferenceScorer

    rows, dims = tokenized_rows
    cfg = make_cfg("lipo_lambda", "train.reference=precomputed", f"train.response_chunk_size={chunk}")
    scorer = ReferenceScorer(str(tiny_model_dir), "float32", cfg.model.attention, cfg.model.prefix_sharing,
                             with_entropy=False)
    table = pa.Table.from_pylist(rows[:12])
    scored = pa.concat_tables([scorer(table.slice(i, 3)) for i in range(0, 12, 3)]).to_pylist()
    setup = loss_setup(cfg, dims)
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=False, total_steps=1)
    assert engines.reference is None
    batch = batches(scored)[1]  # groups 4..7: scored across two of the stage's batches
    sums = train_step(cfg, setup, engines, [batch], None, torch.device("cpu"), world_size=1)
    reward_sum, count = sums["train/reward_abs_mean"]
    kl_sum, _ = sums["train/kl_per_token"]
    assert float(count) == float(batch.response_mask().sum()) > 0
    assert float(reward_sum) == 0.0 and float(kl_sum) == 0.0


def test_step_normalises_over_the_whole_step(tiny_model_dir, tokenized_rows, single_process_group):
    """Two micro-batches with different denominators: the step's loss is sum(num) / sum(den), not the
    mean of the two micro-batch losses."""
    rows, dims = tokenized_rows
    cfg = make_cfg("lipo_pair_logistic", "train.grad_accum_steps=2")
    setup = loss_setup(cfg, dims)
    a, b = collate_listwise(rows[:1]), collate_listwise(rows[1:4])
    dens = [denominator_of(setup, x, None, torch.device("cpu")) for x in (a, b)]
    assert dens[0] != dens[1]
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=True, total_steps=1)
    sums = train_step(cfg, setup, engines, [a, b], None, torch.device("cpu"), world_size=1)
    assert float(sums["train/loss_denominator"][0]) == pytest.approx(sum(dens))


def test_labels_follow_each_loss_kind():
    scores = torch.tensor([[[5.0, 1.0], [3.0, float("nan")], [1.0, 2.0]]])
    extras = {"scores": scores, "psi": torch.tensor([[0.9, 0.5, 0.1]])}
    assert loss_labels(get_loss_spec("lambda_dpo"), extras).shape == (1, 3, 2)
    assert torch.equal(loss_labels(get_loss_spec("lipo_lambda"), extras), extras["psi"])
    mpo = loss_labels(get_loss_spec("mpo"), extras)
    assert torch.allclose(mpo, torch.tensor([[3.0, 3.0, 1.5]]))  # mean of the available ratings
    ranks_only = {"ranks": torch.tensor([[2.0, 1.0, 3.0]])}
    assert torch.equal(loss_labels(get_loss_spec("dpo"), ranks_only), -ranks_only["ranks"])
    with pytest.raises(ValueError, match="per-dimension ratings"):
        loss_labels(get_loss_spec("lambda_dpo"), ranks_only)


def test_export_builds_a_plain_model_while_an_engine_lives_in_the_process(tiny_model_dir, tokenized_rows,
                                                                          single_process_group, tmp_path):
    """transformers remembers the last HfDeepSpeedConfig process-wide; export must not build under it."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    from raypo.train.checkpoint import TrainState, export_checkpoint, save_checkpoint

    cfg = make_cfg("dpo")
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=False, total_steps=1)
    assert is_deepspeed_zero3_enabled()
    local = save_checkpoint(engines.policy, TrainState(global_step=1), rank=0, hf_config=engines.hf_config,
                            tokenizer=engines.tokenizer)
    out = export_checkpoint(local, str(tmp_path / "export"))
    assert is_deepspeed_zero3_enabled()  # the process's setting is restored afterwards
    model = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name  # no step was taken: the export equals the initial weights
