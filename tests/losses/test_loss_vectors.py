"""Every reference vector of tests/losses/loss_vectors.json (float64): loss rtol 1e-9, gradient atol 1e-6."""

from __future__ import annotations

import copy
import math
import random
from typing import Optional

import pytest
import torch
from loss_cases import (
    BUNDLED_VECTORS_PATH,
    load_vectors,
    run_vector,
    tensor_like,
    vector_loss_name,
    vector_to_call,
)

from raypo.config import LambdaConfig
from raypo.losses import (
    get_loss_spec,
    lipo_psi_from_ranks,
    list_losses,
    listwise_loss,
    mallows_phi_link,
    neg_log_dispersion,
    targets_from_ratings,
)
from raypo.losses.nca import nca_soft_labels
from raypo.losses.pairwise import resolve_simpo_gamma
from raypo.train.lambda_schedules import TableSchedule, table_sample_index

VECTORS = load_vectors()
LOSS_VECTORS = [v for v in VECTORS if v["expected"].get("loss") is not None]


def _skipped_batch(v: dict) -> bool:
    """A loss vector whose batch value is None because every prompt is skipped (docs/loss_reference.md §5:
    MPO)."""
    if v["expected"].get("loss") is not None or vector_loss_name(v) not in list_losses():
        return False
    per_prompt = v["expected"].get("per_prompt")
    if per_prompt is not None:
        return all(x is None for x in per_prompt)
    return vector_loss_name(v) in ("mpo", "wmpo")


SKIPPED_VECTORS = [v for v in VECTORS if _skipped_batch(v)]


def _assert_close_given(got: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    """Compares where the expected value is given (null / NaN entries, e.g. at padding, are not)."""
    given = ~torch.isnan(expected)
    torch.testing.assert_close(got[given], expected[given], **tol)


def check_loss_vector(v: dict) -> None:
    """Loss (rel 1e-9) and gradient w.r.t. the policy log-probs (atol 1e-6), or an all-skipped batch."""
    out, grad = run_vector(v)
    exp = v["expected"]
    assert out.loss.dtype == torch.float64
    if exp.get("loss") is None:  # every prompt skipped: the batch value is None in the spec, 0 here
        assert out.denominator.item() == 0.0 and out.loss.item() == 0.0
        assert out.metrics["all_skipped"].item() == 1.0
    else:
        assert out.loss.item() == pytest.approx(exp["loss"], rel=1e-9, abs=1e-12)
    if exp.get("grad_logp_theta") is not None:
        _assert_close_given(grad, tensor_like(exp["grad_logp_theta"], grad.shape), atol=1e-6, rtol=0)
    assert torch.isfinite(grad).all()


def _hparam(call, key: str):
    """The vector's value of hyperparameter ``key``, else the loss's default."""
    return call.hparams.get(key, get_loss_spec(call.name).defaults.get(key))


def _implied_pair_argument(call, grad_w: torch.Tensor, phi: Optional[torch.Tensor]
                           ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """For an N = 2 [chosen, rejected] vector: ``(f, g)`` where ``g`` is the argument of the loss's link
    recovered from the vector's per-prompt gradient w.r.t. the chosen log-prob (``grad_w``) and ``f`` maps
    raypo's implicit-reward margin ``m = s_w - s_l [B]`` to the same quantity (a callable of m); None where
    the loss (or its hyperparameters) has no closed-form inverse here.

    * DPO / MallowsPO-theta (eps = 0): L = -log sigmoid(z), z = phi * (m - beta * h),
      dL/dlt_w = -beta * phi * sigmoid(-z), so z = logit(1 - p), p = -grad_w / (beta * phi).
    * SimPO (sigmoid, eps = 0): z = m - gamma, dL/da_w = -beta * sigmoid(-z).
    * IPO: L = (D - 1/(2 tau))^2, D = m / beta, dL/dlt_w = 2 (D - 1/(2 tau)), so D = 1/(2 tau) + grad_w / 2.
    * MallowsPO IPO ("mallowspo"): L = (phi * D - 1/(2 beta))^2, D = m / beta - h, dL/dlt_w =
      2 phi (phi * D - 1/(2 beta)), so phi * D = 1/(2 beta) + grad_w / (2 phi).
    """
    beta = _hparam(call, "beta")
    name = call.name

    def logit_of_complement(p: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-p) - torch.log(p)

    if name in ("dpo", "mallows_theta"):
        if _hparam(call, "label_smoothing") or (name == "mallows_theta" and _hparam(call, "if_mixing_alpha")):
            return None
        h = _hparam(call, "home_advantage") or 0.0
        ph = torch.ones_like(grad_w) if phi is None else phi
        return (lambda m: ph * (m - beta * h)), logit_of_complement(-grad_w / (beta * ph))
    if name == "simpo":
        if _hparam(call, "label_smoothing") or _hparam(call, "loss_type") != "sigmoid":
            return None
        gamma = resolve_simpo_gamma(beta, call.hparams.get("gamma"), call.hparams.get("gamma_beta_ratio"))
        return (lambda m: m - gamma), logit_of_complement(-grad_w / beta)
    if name == "ipo":
        return (lambda m: m / beta), 1.0 / (2.0 * beta) + grad_w / 2.0
    if name == "mallows_ipo" and phi is not None:
        if _hparam(call, "variant") != "mallowspo" or _hparam(call, "if_mixing_alpha"):
            return None
        h = _hparam(call, "home_advantage") or 0.0
        return (lambda m: phi * (m / beta - h)), 1.0 / (2.0 * beta) + grad_w / (2.0 * phi)
    return None


def check_vector_derived(v: dict) -> int:
    """Implicit rewards, targets, soft labels, per-dimension losses, dispersions, derived hyperparameters and
    the pair margins that the vector lists or implies; returns how many quantities were checked."""
    out, _ = run_vector(v)
    derived, exp = v.get("derived") or {}, v["expected"]
    call = vector_to_call(v)
    checked = 0
    if "s" in derived:
        s = tensor_like(derived["s"], out.rewards.shape)
        _assert_close_given(out.rewards, s, atol=1e-6, rtol=0)  # the vector rounds s to 7 digits
        checked += 1
    if "targets" in derived:  # [b, k, i]
        ratings = call.kwargs["scores"]
        temperature = call.hparams.get("temperature", 1.0)
        t = targets_from_ratings(ratings, call.kwargs.get("mask"), temperature=temperature)
        expected = tensor_like(derived["targets"], t.transpose(1, 2).shape).transpose(1, 2)
        _assert_close_given(t, expected, atol=1e-11, rtol=0)
        checked += 1
    if "soft_labels" in derived:
        scores = call.kwargs["scores"]
        mask = call.kwargs.get("mask", torch.ones_like(call.policy, dtype=torch.bool)) & ~torch.isnan(scores)
        q = nca_soft_labels(scores, mask,
                            temperature_alpha=call.hparams.get("temperature_alpha", 1e-4),
                            first_bonus=call.hparams.get("first_bonus", 0.01))
        _assert_close_given(q, tensor_like(derived["soft_labels"], q.shape), atol=1e-11, rtol=0)
        checked += 1
    if exp.get("L_k") is not None:
        per_dim = out.metrics["L_k_sum"] / out.denominator
        _assert_close_given(per_dim, tensor_like(exp["L_k"], per_dim.shape), atol=1e-11, rtol=0)
        checked += 1
    if exp.get("per_prompt") is not None:  # null = a skipped prompt (docs/loss_reference.md §5)
        given = [x for x in exp["per_prompt"] if x is not None]
        assert out.numerator.item() == pytest.approx(sum(given), rel=1e-9, abs=1e-12)
        checked += 1

    phi = None
    if "neg_log_dispersion_phi" in derived and "Hbar_w" in v["inputs"]:
        # MallowsPO's dispersion phi = -c log((Hbar_w + Hbar_l) / 2), from the vector's entropies and c.
        inp = v["inputs"]
        hw = torch.tensor(inp["Hbar_w"], dtype=torch.float64).reshape(-1)
        hl = torch.tensor(inp["Hbar_l"], dtype=torch.float64).reshape(-1)
        phi = neg_log_dispersion((hw, hl), c=v["params"]["c"])
        expected_phi = tensor_like(derived["neg_log_dispersion_phi"], phi.shape)
        torch.testing.assert_close(phi, expected_phi, atol=1e-11, rtol=0)
        # The loss at the vector's own phi (not the one raypo derived from Hbar) is the vector's loss.
        kwargs = dict(call.kwargs, dispersion=expected_phi.expand(call.policy.shape[0]).clone())
        at_phi = listwise_loss(call.name, call.policy, call.ref, **kwargs, **call.hparams)
        assert at_phi.loss.item() == pytest.approx(exp["loss"], rel=1e-9)
        phi = expected_phi.expand(call.policy.shape[0])
        checked += 1

    if call.name == "simpo" and v["params"].get("gamma_beta_ratio") is not None:
        # SimPO's margin from the ratio alone: gamma = gamma_beta_ratio * beta (the vector lists both).
        beta, ratio = _hparam(call, "beta"), v["params"]["gamma_beta_ratio"]
        if v["params"].get("gamma") is not None:
            assert resolve_simpo_gamma(beta, None, ratio) == pytest.approx(v["params"]["gamma"], rel=1e-12)
        hparams = {k: x for k, x in call.hparams.items() if k != "gamma"}
        from_ratio = listwise_loss(call.name, call.policy, call.ref, **call.kwargs, **hparams)
        assert from_ratio.loss.item() == pytest.approx(exp["loss"], rel=1e-9, abs=1e-12)
        checked += 1

    pairwise_n2 = (call.policy.shape[-1] == 2 and "scores" not in call.kwargs and "mask" not in call.kwargs
                   and exp.get("loss") is not None and exp.get("grad_logp_theta") is not None)
    if pairwise_n2:
        # The vector's loss and gradient fix the argument of the loss's link per prompt; raypo's implicit
        # rewards (column 0 chosen) must give the same argument through the loss's formula.
        grad = tensor_like(exp["grad_logp_theta"], call.policy.shape)
        per_prompt_grad_w = grad[:, 0] * out.denominator  # the batch value is the mean over prompts
        implied = _implied_pair_argument(call, per_prompt_grad_w, phi)
        if implied is not None:
            f, arg = implied
            margin = out.rewards[:, 0] - out.rewards[:, 1]
            assert out.metrics["rewards_chosen_sum"].item() == pytest.approx(out.rewards[:, 0].sum().item())
            assert out.metrics["rewards_rejected_sum"].item() == pytest.approx(out.rewards[:, 1].sum().item())
            assert out.metrics["reward_accuracy_sum"].item() == float((margin > 0).sum())
            assert math.isfinite(arg.sum().item())
            torch.testing.assert_close(f(margin), arg, atol=1e-6, rtol=1e-6)
            checked += 1
    return checked


def test_vector_file_is_not_empty() -> None:
    assert VECTORS and LOSS_VECTORS


@pytest.mark.parametrize("v", LOSS_VECTORS, ids=[v["id"] for v in LOSS_VECTORS])
def test_loss_vector(v: dict) -> None:
    check_loss_vector(v)


@pytest.mark.parametrize("v", LOSS_VECTORS, ids=[v["id"] for v in LOSS_VECTORS])
def test_vector_derived_quantities(v: dict) -> None:
    if check_vector_derived(v) == 0:  # only a held-back vector may list nothing beyond its loss and gradient
        assert v not in BUNDLED, f"{v['id']}: no derived quantity checked"
        pytest.skip(f"{v['id']}: the vector lists no derived quantity")


def test_all_skipped_vectors() -> None:
    for v in SKIPPED_VECTORS:
        check_loss_vector(v)
        check_vector_derived(v)


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
    sched = TableSchedule(LambdaConfig(schedule="table", seed=v["params"]["seed"],
                                       table=v["inputs"]["table_lambdas"], table_probs=probs))
    lam = sched.sample(20, dtype=torch.float64)
    assert sched.last_indices == expected
    rows = torch.tensor(v["inputs"]["table_lambdas"], dtype=torch.float64)
    torch.testing.assert_close(lam, rows[expected])


# Vector forms a held-back file may use --------------------------------------------------------------


# Built from the bundled copy of the spec's vectors, whatever RAYPO_LOSS_VECTORS points at.
BUNDLED = load_vectors(BUNDLED_VECTORS_PATH)


def _vector(vid: str) -> dict:
    return copy.deepcopy(next(v for v in BUNDLED if v["id"] == vid))


def _forms_lipo_padding() -> list[dict]:
    """lipo_point_sigmoid_N8_rax (rax: mean over valid items, padding-invariant) with 3 padded responses."""
    base = _vector("lipo_point_sigmoid_N8_rax")
    out = []
    for form in ("null_01_mask", "null_bool_mask", "null_no_mask", "na_string"):
        v = copy.deepcopy(base)
        inp = v["inputs"]
        pad = ["N/A"] * 3 if form == "na_string" else [None] * 3
        inp["logp_theta"] = inp["logp_theta"] + [None] * 3
        inp["logp_ref"] = inp["logp_ref"] + [None] * 3
        inp["psi"] = inp["psi"] + pad
        if form != "null_no_mask":
            flags = [True] * 8 + [False] * 3
            inp["mask"] = flags if form == "null_bool_mask" else [int(f) for f in flags]
        v["derived"]["s"] = v["derived"]["s"] + [None] * 3
        grad_pad = [0.0] * 3 if form == "na_string" else [None] * 3
        v["expected"]["grad_logp_theta"] = v["expected"]["grad_logp_theta"] + grad_pad
        v["id"] = f"{v['id']}_{form}"
        out.append(v)
    return out


def _forms_mpo_skipped_prompt() -> list[dict]:
    """mpo_N4_alpha0 plus a prompt whose scores are all equal (skipped: per_prompt null,
    docs/loss_reference.md §5), padded with
    nulls or given as a shorter (ragged) row."""
    base = _vector("mpo_N4_alpha0")
    second_theta, second_ref = [-150.25, -149.5, -160.0], [-151.0, -150.75, -158.5]
    out = []
    for form in ("padded", "ragged"):
        v = copy.deepcopy(base)
        inp, exp = v["inputs"], v["expected"]
        tail = [None] if form == "padded" else []
        inp["logp_theta"] = [inp["logp_theta"], second_theta + tail]
        inp["logp_ref"] = [inp["logp_ref"], second_ref + tail]
        inp["scores"] = [inp["scores"], [2.0, 2.0, 2.0] + tail]
        exp["grad_logp_theta"] = [exp["grad_logp_theta"], [0.0, 0.0, 0.0] + tail]
        exp["per_prompt"] = [exp["per_prompt"][0], None]
        v["derived"]["s"] = [v["derived"]["s"], [None] * 4]
        v["id"] = f"mpo_N4_alpha0_plus_skipped_{form}"
        out.append(v)
    all_skipped = copy.deepcopy(base)
    all_skipped["inputs"].update(logp_theta=[second_theta], logp_ref=[second_ref], scores=[[2.0, 2.0, 2.0]])
    all_skipped["expected"] = {"loss": None, "grad_logp_theta": [[0.0, 0.0, 0.0]], "per_prompt": [None]}
    all_skipped["derived"] = {}
    all_skipped["id"] = "mpo_all_skipped"
    return [*out, all_skipped]


def _forms_lambda_dpo_na() -> list[dict]:
    """The official lambda-DPO vector with a rating of 1.0 given as "N/A" / null / "" (docs/loss_reference.md
    §3.2: a missing
    rating becomes default_rating = 1.0, so every expected value stays the same)."""
    out = []
    for missing in ("N/A", None, ""):
        v = _vector("lambda_dpo_B1N4_table_row0_official_eps")
        ratings = v["inputs"]["ratings[b,k,i]"]
        assert ratings[0][0][1] == 1.0 and ratings[0][3][0] == 1.0
        ratings[0][0][1] = missing
        ratings[0][3][0] = missing
        v["id"] = f"{v['id']}_missing_{missing!r}"
        out.append(v)
    return out


FORMS = _forms_lipo_padding() + _forms_mpo_skipped_prompt() + _forms_lambda_dpo_na()


@pytest.mark.parametrize("v", FORMS, ids=[v["id"] for v in FORMS])
def test_vector_adapter_accepts_null_padding_na_ratings_and_null_per_prompt(v: dict) -> None:
    """Held-back vectors may give null (or "N/A") at padded positions, "N/A" for a missing rating, ragged
    rows, bool masks, and null per_prompt entries for skipped prompts: the adapter maps them to the spec's
    meaning (padding masked, missing rating = 1.0, skipped prompts not summed)."""
    check_loss_vector(v)
    check_vector_derived(v)
    if v["id"].startswith("mpo_N4_alpha0_plus_skipped"):
        out, _ = run_vector(v)
        assert out.denominator.item() == 1.0 and out.metrics["num_skipped"].item() == 1.0
