"""Every reference vector of spec/loss_vectors.json (float64): loss rtol 1e-9, gradient atol 1e-6."""

from __future__ import annotations

import random

import pytest
import torch
from loss_cases import load_vectors, run_vector, vector_to_call

from raypo.lambdas import LambdaScheduleConfig, TableSchedule, table_sample_index
from raypo.losses import lipo_psi_from_ranks, mallows_phi_link, targets_from_ratings
from raypo.losses.nca import nca_soft_labels

VECTORS = load_vectors()
LOSS_VECTORS = [v for v in VECTORS if v["expected"].get("loss") is not None]


def test_vector_file_is_not_empty() -> None:
    assert VECTORS and LOSS_VECTORS


@pytest.mark.parametrize("v", LOSS_VECTORS, ids=[v["id"] for v in LOSS_VECTORS])
def test_loss_vector(v: dict) -> None:
    out, grad = run_vector(v)
    exp = v["expected"]
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(exp["loss"], rel=1e-9, abs=1e-12)
    expected_grad = torch.tensor(exp["grad_logp_theta"], dtype=torch.float64).reshape(grad.shape)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("v", LOSS_VECTORS, ids=[v["id"] for v in LOSS_VECTORS])
def test_vector_derived_quantities(v: dict) -> None:
    """Implicit rewards, targets, soft labels and per-dimension losses where the vector lists them."""
    out, _ = run_vector(v)
    derived, exp = v.get("derived") or {}, v["expected"]
    call = vector_to_call(v)
    if "s" in derived:
        s = torch.tensor(derived["s"], dtype=torch.float64).reshape(out.rewards.shape)
        torch.testing.assert_close(out.rewards, s, atol=1e-6, rtol=0)  # the vector rounds s to 7 digits
    if "targets" in derived:  # [b, k, i]
        ratings = call.kwargs["scores"]
        temperature = call.hparams.get("temperature", 1.0)
        t = targets_from_ratings(ratings, call.kwargs.get("mask"), temperature=temperature)
        expected = torch.tensor(derived["targets"], dtype=torch.float64).transpose(1, 2)
        torch.testing.assert_close(t, expected, atol=1e-11, rtol=0)
    if "soft_labels" in derived:
        mask = call.kwargs.get("mask", torch.ones_like(call.policy, dtype=torch.bool))
        q = nca_soft_labels(call.kwargs["scores"], mask,
                            temperature_alpha=call.hparams.get("temperature_alpha", 1e-4),
                            first_bonus=call.hparams.get("first_bonus", 0.01))
        expected = torch.tensor(derived["soft_labels"], dtype=torch.float64).reshape(q.shape)
        torch.testing.assert_close(q, expected, atol=1e-11, rtol=0)
    if "L_k" in exp:
        per_dim = out.metrics["L_k_sum"] / out.denominator
        torch.testing.assert_close(per_dim, torch.tensor(exp["L_k"], dtype=torch.float64), atol=1e-11, rtol=0)
    if "per_prompt" in exp:
        assert out.numerator.item() == pytest.approx(sum(exp["per_prompt"]), rel=1e-9)


def _by_fn(fn: str) -> list[dict]:
    return [v for v in VECTORS if v["fn"] == fn]


@pytest.mark.parametrize("v", _by_fn("lipo_psi_from_ranks"), ids=lambda v: v["id"])
def test_psi_from_ranks_vector(v: dict) -> None:
    ranks = torch.tensor(v["inputs"]["ranks(1=best)"], dtype=torch.float64)
    psi = lipo_psi_from_ranks(ranks)
    expected = torch.tensor(v["expected"]["psi"], dtype=torch.float64)
    torch.testing.assert_close(psi, expected, atol=1e-11, rtol=0)


@pytest.mark.parametrize("v", _by_fn("mallows_phi_link"), ids=lambda v: v["id"])
def test_mallows_link_vector(v: dict) -> None:
    d = torch.tensor(v["inputs"]["d"], dtype=torch.float64)
    g = mallows_phi_link(d, v["params"]["phi"])
    torch.testing.assert_close(g, torch.tensor(v["expected"]["g"], dtype=torch.float64), atol=1e-11, rtol=0)


@pytest.mark.parametrize("v", _by_fn("TableLambdaScheduler.sample_index"), ids=lambda v: v["id"])
def test_table_scheduler_vector(v: dict) -> None:
    expected = v["expected"]["first_20_row_indices"]
    probs = v["inputs"]["table_probs"]
    rand = random.Random(v["params"]["seed"])
    assert [table_sample_index(rand, probs) for _ in range(20)] == expected
    # Through the schedule object: per-prompt draws consume one random() each, in order.
    sched = TableSchedule(LambdaScheduleConfig(schedule="table", seed=v["params"]["seed"],
                                               table=v["inputs"]["table_lambdas"], table_probs=probs))
    lam = sched.sample(20, dtype=torch.float64)
    assert sched.last_indices == expected
    rows = torch.tensor(v["inputs"]["table_lambdas"], dtype=torch.float64)
    torch.testing.assert_close(lam, rows[expected])
