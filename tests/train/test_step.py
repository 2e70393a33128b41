"""The worker loop's step on one process: every loss trains, rewards are exactly zero at step 0, the step
normalises globally, and labels reach each loss in the form it needs."""

from __future__ import annotations

import pytest
import torch

from raypo.config import load_config
from raypo.losses.registry import LOSS_REGISTRY, get_loss_spec
from raypo.model.batch import collate_listwise
from raypo.train.engines import build_engines
from raypo.train.objective import Objective, loss_labels
from raypo.train.recipe import ListwiseRecipe
from raypo.train.reference import reference_outputs

pytestmark = pytest.mark.integration

LOSS_PARAMS = {"wmpo": {"alpha": 0.1}, "lipo_lambda": {"scale": "valid"}}


def make_cfg(loss: str, *overrides: str):
    params = [f"loss.params.{k}={v}" for k, v in LOSS_PARAMS.get(loss, {}).items()]
    # these tests drive the step without the driver, which is what calibrates dispersion_c=auto
    # (tests/train/test_dispersion.py covers the calibration)
    calibrated = ["loss.dispersion_c=0.29"] if loss.startswith("mallows") else []
    return load_config(None, [f"loss.name={loss}", "model.dtype=float32", "train.micro_batch_size=4",
                              "optimizer.lr=1e-3", "optimizer.warmup_steps=0", *params, *calibrated,
                              *overrides])


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
    setup = Objective.from_config(cfg, dims)
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=True, total_steps=3)
    from raypo.train.lambda_schedules import build_lambda_schedule

    schedule = build_lambda_schedule(cfg.lambdas, num_dims=len(dims)) if setup.spec.needs_lambda else None
    before = flat_params(engines.policy)
    losses = []
    for batch in batches(rows)[:3]:
        sums = ListwiseRecipe(cfg, setup, engines, schedule=schedule).train_step([batch])
        num, den = sums["train/loss_numerator"][0], sums["train/loss_denominator"][0]
        losses.append(float(num / den) if den > 0 else 0.0)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    after = flat_params(engines.policy)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after), f"{loss}: no parameter moved in 3 steps"


def test_rewards_are_exactly_zero_at_step_zero_online(tiny_model_dir, tokenized_rows, single_process_group):
    from raypo.model.listwise import grouped_logprobs

    rows, dims = tokenized_rows
    cfg = make_cfg("lipo_lambda")
    setup = Objective.from_config(cfg, dims)
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=True, total_steps=1)
    batch = batches(rows)[0]
    ref = reference_outputs(setup, engines.reference, batch, True, torch.device("cpu"))
    policy = grouped_logprobs(engines.policy, batch).logps
    out = setup.loss(batch, policy, ref.logps, ref.dispersion, None, torch.device("cpu"))
    mask = batch.response_mask()
    assert torch.equal(out.rewards[mask], torch.zeros_like(out.rewards[mask]))


@pytest.mark.parametrize("chunk", [0, 2])
def test_rewards_are_exactly_zero_at_step_zero_precomputed(tiny_model_dir, tokenized_rows,
                                                           single_process_group, chunk):
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
    setup = Objective.from_config(cfg, dims)
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=False, total_steps=1)
    assert engines.reference is None
    batch = batches(scored)[1]  # groups 4..7: scored across two of the stage's batches
    sums = ListwiseRecipe(cfg, setup, engines, schedule=None).train_step([batch])
    reward_sum, count = sums["train/reward_abs_mean"]
    kl_sum, _ = sums["train/kl_per_token"]
    assert float(count) == float(batch.response_mask().sum()) > 0
    assert float(reward_sum) == 0.0 and float(kl_sum) == 0.0


def test_step_normalises_over_the_whole_step(tiny_model_dir, tokenized_rows, single_process_group):
    """Two micro-batches with different denominators: the step's loss is sum(num) / sum(den), not the
    mean of the two micro-batch losses."""
    rows, dims = tokenized_rows
    cfg = make_cfg("lipo_pair_logistic", "train.grad_accum_steps=2")
    setup = Objective.from_config(cfg, dims)
    a, b = collate_listwise(rows[:1]), collate_listwise(rows[1:4])
    dens = [setup.denominator(x, None, torch.device("cpu")) for x in (a, b)]
    assert dens[0] != dens[1]
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=True, total_steps=1)
    sums = ListwiseRecipe(cfg, setup, engines, schedule=None).train_step([a, b])
    assert float(sums["train/loss_denominator"][0]) == pytest.approx(sum(dens))


def test_labels_follow_each_loss_kind():
    scores = torch.tensor([[[5.0, 1.0], [3.0, float("nan")], [1.0, 2.0]]])
    extras = {"scores": scores, "psi": torch.tensor([[0.9, 0.5, 0.1]])}
    assert loss_labels(get_loss_spec("lambda_dpo"), extras).shape == (1, 3, 2)
    # LiPO psi is computed at training time by loss.lipo_labels (win_rate of the mean available rating
    # (3, 3, 1.5)); the tokenised psi column is not read.
    mask = torch.ones(1, 3, dtype=torch.bool)
    psi = loss_labels(get_loss_spec("lipo_lambda"), extras, mask=mask)
    torch.testing.assert_close(psi, torch.tensor([[2 / 3, 2 / 3, 1 / 6]]))
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

    from raypo.model.loading import without_zero3_init
    from raypo.train.checkpoint import TrainState, export_checkpoint, save_checkpoint

    cfg = make_cfg("dpo")
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=False, total_steps=1)
    assert is_deepspeed_zero3_enabled()
    local = save_checkpoint(engines.policy, TrainState(global_step=1), rank=0, hf_config=engines.hf_config,
                            tokenizer=engines.tokenizer)
    out = export_checkpoint(local, str(tmp_path / "export"))
    assert is_deepspeed_zero3_enabled()  # the process's setting is restored afterwards
    with without_zero3_init():  # whole models to compare, not ZeRO-3 partitions
        model = AutoModelForCausalLM.from_pretrained(out)
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert a.numel() > 0 and torch.equal(a, b), name  # no step was taken: the export is the initial model


def test_lora_run_exports_the_merged_model(tiny_model_dir, tokenized_rows, single_process_group, tmp_path):
    """A LoRA policy trained a few steps under ZeRO-3 exports as a plain Hugging Face model whose log-probs
    are the adapted policy's (W = W_0 + alpha / r * B A merged), not the base model's."""
    from transformers import AutoModelForCausalLM

    from raypo.model.listwise import grouped_logprobs
    from raypo.model.loading import without_zero3_init
    from raypo.train.checkpoint import TrainState, export_checkpoint, save_checkpoint

    rows, dims = tokenized_rows
    cfg = make_cfg("lipo_lambda", "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=16",
                   "optimizer.lr=0.05")
    setup = Objective.from_config(cfg, dims)
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=True, total_steps=3)
    for batch in batches(rows)[:3]:
        ListwiseRecipe(cfg, setup, engines, schedule=None).train_step([batch])
    probe = batches(rows)[3]
    with torch.no_grad():
        trained = grouped_logprobs(engines.policy, probe).logps
    local = save_checkpoint(engines.policy, TrainState(global_step=3), rank=0, hf_config=engines.hf_config,
                            tokenizer=engines.tokenizer)
    out = export_checkpoint(local, str(tmp_path / "export"))
    with without_zero3_init():
        exported = AutoModelForCausalLM.from_pretrained(out)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert exported.state_dict().keys() == base.state_dict().keys()
    with torch.no_grad():
        merged = grouped_logprobs(exported, probe).logps
        initial = grouped_logprobs(base, probe).logps
    assert (trained - initial).abs().max() > 1e-3  # the adapter changed the policy
    torch.testing.assert_close(merged, trained, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Token-budget packing and response chunks: the same step, computed another way
# ----------------------------------------------------------------------------------------------------

PER_RESPONSE_ROW_KEYS = ("response_ids", "response_masks", "scores", "psi", "ranks", "response_lengths",
                         "ref_logps", "ref_entropy")


def ragged(rows, keep):
    """The rows with only the first ``keep[i]`` responses of row i (ragged N) and every per-response column
    cut to match."""
    out = []
    for row, n in zip(rows, keep):
        row = dict(row)
        for key in PER_RESPONSE_ROW_KEYS:
            if row.get(key) is not None:
                row[key] = list(row[key])[:n]
        row["num_responses"] = n
        out.append(row)
    return out


RAGGED_N = [2, 4, 3, 2, 4, 3, 4, 2, 3, 3, 2, 4]


def count_forwards(engine) -> list[int]:
    """Count the policy engine's forward calls (each one runs ZeRO-3 collectives)."""
    calls = [0]
    forward = engine.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    engine.forward = counted
    return calls


def run_steps(cfg, dims, model_dir, steps, lambdas: bool):
    """Train ``steps`` (each a list of read micro-batches) on a fresh engine; (losses, weights, forward
    calls, micro-batches per step, optimizer steps)."""
    from raypo.train.lambda_schedules import build_lambda_schedule

    setup = Objective.from_config(cfg, dims)
    engines = build_engines(cfg, str(model_dir), str(model_dir), world_size=1,
                            needs_online_reference=cfg.train.reference == "online", total_steps=len(steps))
    schedule = build_lambda_schedule(cfg.lambdas, num_dims=len(dims)) if lambdas else None
    calls = count_forwards(engines.policy)
    losses, micro = [], []
    for step in steps:
        sums = ListwiseRecipe(cfg, setup, engines, schedule=schedule).train_step(step)
        losses.append(float(sums["train/loss_numerator"][0] / sums["train/loss_denominator"][0]))
        micro.append(int(sums["perf/forwards"][0]))
    return losses, flat_params(engines.policy), calls[0], micro, engines.policy.global_steps


def score_reference(rows, model_dir):
    """The rows with ``ref_logps`` from the precompute stage (one forward per group)."""
    import pyarrow as pa

    from raypo.train.reference import ReferenceScorer

    cfg = make_cfg("lipo_lambda")
    scorer = ReferenceScorer(str(model_dir), "float32", cfg.model.attention, cfg.model.prefix_sharing,
                             with_entropy=False)
    return scorer(pa.Table.from_pylist(rows)).to_pylist()


@pytest.mark.parametrize("variant", ["lipo_lambda", "lambda_dpo", "precomputed"])
def test_token_budget_packing_gives_the_unpacked_step(variant, tiny_model_dir, tokenized_rows,
                                                      single_process_group):
    """Ragged N and lengths, 2 steps of 2 read micro-batches of 3 groups: packed into micro-batches of at
    most 250 padded tokens (3 per step, one of 3 groups), the step gives the same losses and weights as the
    unpacked one; the optimizer steps once per step whatever the number of micro-batches; lambda-DPO's
    per-prompt lambdas (drawn in read order) follow their groups into the packed micro-batches; with a
    precomputed reference (one forward per group) the packed groups run one per micro-batch."""
    rows, dims = tokenized_rows
    data = ragged(rows[:12], RAGGED_N)
    loss, extra = ("lipo_lambda", []) if variant != "lambda_dpo" else \
        ("lambda_dpo", ["lambdas.schedule=uniform", "lambdas.per=prompt"])
    if variant == "precomputed":
        data = score_reference(data, tiny_model_dir)
        extra = ["train.reference=precomputed"]
    steps = [[collate_listwise(data[i:i + 3]), collate_listwise(data[i + 3:i + 6])] for i in (0, 6)]
    common = ["train.micro_batch_size=3", "train.grad_accum_steps=2", *extra]
    plain = run_steps(make_cfg(loss, *common), dims, tiny_model_dir, steps, loss == "lambda_dpo")
    packed = run_steps(make_cfg(loss, *common, "train.token_budget=250"), dims, tiny_model_dir, steps,
                       loss == "lambda_dpo")
    (loss0, w0, calls0, micro0, opt0), (loss1, w1, calls1, micro1, opt1) = plain, packed
    assert micro0 == [2, 2]
    if variant == "precomputed":
        assert micro1 == [6, 6] and calls0 == calls1 == 12  # one forward per group either way
    else:
        assert micro1 == [3, 3]  # packing changed the micro-batches
        assert calls0 == sum(micro0) and calls1 == sum(micro1)  # one policy forward per micro-batch
    assert opt0 == opt1 == 2  # one optimizer step per train_step, for 2, 3 or 6 micro-batches
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    start = flat_params(build_engines(make_cfg(loss), str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                                      needs_online_reference=False, total_steps=1).policy)
    assert float((w0 - start).abs().max()) > 1e-3  # the steps moved the weights
    assert float((w1 - w0).abs().max()) < 1e-5


def test_response_chunks_of_one_give_the_direct_step(tiny_model_dir, tokenized_rows, single_process_group):
    """Response chunks of one response (train.response_chunk_size=1) on ragged N, over a
    step of two micro-batches of different widths: same loss and weights as all responses at once; the
    chunk count (from the agreed maximum N of each micro-batch) sets the forward count."""
    rows, dims = tokenized_rows
    data = ragged(rows[:6], [2, 3, 2, 4, 3, 4])
    step = [collate_listwise(data[:3]), collate_listwise(data[3:])]  # N = 3, then 4
    common = ["train.micro_batch_size=3", "train.grad_accum_steps=2"]
    loss0, w0, calls0, _, _ = run_steps(make_cfg("lipo_lambda", *common), dims, tiny_model_dir, [step], False)
    loss1, w1, calls1, _, _ = run_steps(make_cfg("lipo_lambda", *common, "train.response_chunk_size=1"), dims,
                                        tiny_model_dir, [step], False)
    assert calls0 == 2 and calls1 == (1 + 3) + (1 + 4)  # no-grad pass + one forward per response column
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    assert float((w1 - w0).abs().max()) < 1e-5
