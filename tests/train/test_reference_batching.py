"""``train.reference_batching``: with a precomputed reference, ``per_group`` scores (stage) and trains
(policy) one prompt group per forward, so step-0 rewards are exactly zero (tests/train/test_step.py);
``batched`` runs one forward per stage batch and per micro-batch, so the step needs B times fewer policy
forwards (each regathers the ZeRO-3 parameters) and step-0 rewards are zero to float rounding."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raypo.config import load_config
from raypo.errors import ConfigError
from raypo.model.batch import collate_listwise
from raypo.train.engines import build_engines
from raypo.train.objective import Objective
from raypo.train.recipe import ListwiseRecipe
from raypo.train.reference import ReferenceScorer


def _cfg(*overrides: str):
    return load_config(None, ["loss.name=lipo_lambda", "loss.params.scale=valid", "model.dtype=float32",
                              "train.micro_batch_size=4", "optimizer.lr=1e-3", "optimizer.warmup_steps=0",
                              "train.reference=precomputed", *overrides])


def _count_forwards(engine) -> list[int]:
    calls, forward = [0], engine.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    engine.forward = counted
    return calls


def _step_zero(cfg, rows, dims, model_dir, per_group_stage: bool):
    """Reference values from the stage in batches of 3 groups, then one step over groups 4..7 (scored
    across two stage batches): (sums, policy forwards)."""
    scorer = ReferenceScorer(str(model_dir), cfg.model.dtype, cfg.model.attention, cfg.model.prefix_sharing,
                             with_entropy=False, per_group=per_group_stage)
    table = pa.Table.from_pylist(rows[:12])
    scored = pa.concat_tables([scorer(table.slice(i, 3)) for i in range(0, 12, 3)]).to_pylist()
    engines = build_engines(cfg, str(model_dir), str(model_dir), world_size=1, needs_online_reference=False,
                            total_steps=1)
    calls = _count_forwards(engines.policy)
    batch = collate_listwise(scored[4:8])
    sums = ListwiseRecipe(cfg, Objective.from_config(cfg, dims), engines, schedule=None).train_step([batch])
    return sums, calls[0], batch


@pytest.mark.integration
@pytest.mark.parametrize("chunk", [0, 2])
def test_batched_reference_is_zero_to_rounding_at_step_zero_with_fewer_forwards(
        tiny_model_dir, tokenized_rows, single_process_group, chunk):
    rows, dims = tokenized_rows
    sums, calls, batch = _step_zero(_cfg(f"train.response_chunk_size={chunk}", "train.reference_batching="
                                         "batched"), rows, dims, tiny_model_dir, per_group_stage=False)
    exact, exact_calls, _ = _step_zero(_cfg(f"train.response_chunk_size={chunk}"), rows, dims, tiny_model_dir,
                                       per_group_stage=True)
    reward_sum, count = sums["train/reward_abs_mean"]
    assert float(count) == float(batch.response_mask().sum()) > 0
    # beta * |policy - reference| summed log-probs of ~-100: float32 rounding, far below any trained reward
    assert float(reward_sum / count) < 1e-5
    assert abs(float(sums["train/kl_per_token"][0])) < 1e-5
    assert float(exact["train/reward_abs_mean"][0]) == 0.0  # per_group: exactly zero, same data
    groups = batch.num_groups
    if chunk == 0:
        assert (calls, exact_calls) == (1, groups)  # one policy forward per micro-batch, not per group
    else:  # the graph-free scoring pass per micro-batch, not per group; then the response chunks
        chunks = -(-batch.num_responses // chunk)
        assert (calls, exact_calls) == (1 + chunks, groups + chunks)
    assert int(sums["perf/forwards"][0]) == 1


def test_the_stage_scores_as_the_config_says(monkeypatch):
    """``add_reference_logprobs`` hands ``per_group`` to the stage's actors from the config."""
    from raypo.train import reference

    seen = []

    class FakeDataset:
        def map_batches(self, fn, **kwargs):
            seen.append(kwargs["fn_constructor_kwargs"])
            return self

        def materialize(self):
            return self

        def count(self):
            return 0

    for mode, per_group in (("per_group", True), ("batched", False)):
        reference.add_reference_logprobs(FakeDataset(), _cfg(f"train.reference_batching={mode}"), "tiny://x")
        assert seen[-1] == {"per_group": per_group}
    assert _cfg().train.reference_batching == "per_group"  # the default: exact zeros (docs/performance.md)


def test_the_policy_follows_the_batching_mode():
    from types import SimpleNamespace

    engines = SimpleNamespace(hf_config=None)
    modes = {(ref, mode): ListwiseRecipe(load_config(None, [f"train.reference={ref}",
                                                            f"train.reference_batching={mode}"]),
                                         None, engines).per_group
             for ref in ("online", "precomputed") for mode in ("per_group", "batched")}
    assert modes == {("online", "per_group"): False, ("online", "batched"): False,
                     ("precomputed", "per_group"): True, ("precomputed", "batched"): False}


def test_an_unknown_batching_mode_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.reference_batching='batch' is not one of per_group, "
                                          r"batched.*batched"):
        load_config(None, ["train.reference_batching=batch"])


def test_the_cache_key_holds_the_batching_mode(tiny_model_dir):
    from raypo.train.reference_cache import CacheKey, reference_cache_key, row_digest, stage_settings

    settings = {"with_entropy": False, "dtype": "float32", "attention": "auto", "prefix_sharing": True,
                "batch_size": 8}
    digests = [row_digest([1, 2], [[3], [4]])]
    per_group = reference_cache_key(digests, str(tiny_model_dir), **settings)
    batched = reference_cache_key(digests, str(tiny_model_dir), **settings, batching="batched")
    assert per_group.digest != batched.digest
    assert batched.components()["batching"] == "batched"
    # per_group entries keep the key they had before the setting existed (all entries were per group)
    legacy = {k: v for k, v in per_group.components().items()}
    assert "batching" not in legacy and set(legacy) == set(CacheKey.__dataclass_fields__) - {"batching"}
    assert stage_settings(_cfg("train.reference_batching=batched"))["batching"] == "batched"
    assert stage_settings(_cfg())["batching"] == "per_group"


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["per_group", "batched"])
def test_evaluation_runs_the_same_forwards_on_every_rank(mode, tiny_model_dir, tokenized_rows,
                                                         single_process_group, monkeypatch):
    """Ranks keep different eval rows, so their eval batches hold different group counts; per group, a rank
    pads with discarded forwards to the count of the rank with the most (here a simulated other rank with 4
    batches of 4 groups against this rank's one batch of 2), so ZeRO-3's collectives match."""
    from raypo.train import recipe as recipe_module

    rows, dims = tokenized_rows
    cfg = _cfg(f"train.reference_batching={mode}")
    scorer = ReferenceScorer(str(tiny_model_dir), "float32", cfg.model.attention, cfg.model.prefix_sharing,
                             with_entropy=False, per_group=mode == "per_group")
    batch = collate_listwise(scorer(pa.Table.from_pylist(rows[:2])).to_pylist())
    engines = build_engines(cfg, str(tiny_model_dir), str(tiny_model_dir), world_size=1,
                            needs_online_reference=False, total_steps=1)
    events, forward = [], engines.policy.forward

    def counted(*args, **kwargs):
        events.append("forward")
        return forward(*args, **kwargs)

    def agreed_max(value, device):  # a collective: never inside a forward, never between a rank's forwards
        events.append("agree")
        return max(value, 4)

    engines.policy.forward = counted
    monkeypatch.setattr(recipe_module.collectives, "agreed_max", agreed_max)
    recipe = ListwiseRecipe(cfg, Objective.from_config(cfg, dims), engines, schedule=None)
    metrics = recipe.evaluate_at([batch], None, "eval/")
    # 4 batches (3 zero-weight repeats); per group: the group count agreed first, then 4 forwards
    per_batch = ["agree"] + ["forward"] * 4 if mode == "per_group" else ["forward"]
    assert events == ["agree"] + per_batch * 4
    assert metrics["eval/reward_abs_mean"] < 1e-5  # only the real batch counts: step 0
