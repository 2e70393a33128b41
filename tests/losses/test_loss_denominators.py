"""Label-only denominators: ``LossSpec.denominator`` / ``loss_denominator`` equal
``listwise_loss(...).denominator`` exactly, for every registered loss, without evaluating the loss."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import pytest
import torch
from loss_cases import ALL_LOSSES, M_DIMS, RATED, load_vectors, make_case, vector_loss_name, vector_to_call

from raypo.losses import (
    LOSS_REGISTRY,
    LossHyperparameterError,
    get_loss_spec,
    listwise_loss,
    loss_denominator,
)

REDUCTIONS = ("rax", "paper", "per_list_mean", "sum")
PAIR_LOSSES = ("dpo", "ipo", "slic", "simpo", "mallows_theta", "mallows_ipo", "mallows_phi",
               "ultrafb_best_worst_dpo")

#: Hyperparameter settings per loss; every setting that can change a denominator is here.
SETTINGS: dict[str, list[dict[str, Any]]] = {
    "dpo": [{}, {"temperature": 0.5}, {"beta": 0.3, "label_smoothing": 0.1}],
    "ipo": [{}, {"temperature": 3.0}],
    "slic": [{}, {"margin": 0.5, "temperature": 0.2}],
    "simpo": [{}, {"loss_type": "hinge", "gamma": 0.3}, {"temperature": 2.0}],
    "lipo_pair_logistic": [{"reduction": r} for r in REDUCTIONS],
    "lipo_pair_hinge": [{"reduction": r} for r in REDUCTIONS],
    "lipo_list_mle": [{"reduction": r} for r in REDUCTIONS],
    "lipo_softmax": [{"reduction": r, "normalize_labels": n} for r in REDUCTIONS for n in (True, False)],
    "lipo_point_mse": [{"reduction": r} for r in REDUCTIONS],
    "lipo_point_sigmoid": [{"reduction": r} for r in REDUCTIONS],
    "lipo_lambda": [{"reduction": r} for r in REDUCTIONS]
    + [{"reduction": "per_list_mean", "scale": "valid", "normalize": True, "topn": 2},
       {"reduction": "sum", "scale": "none", "normalize": True}, {"weighting": "constant"}],
    "lambda_dpo": [{}, {"temperature": 2.0, "eps": 0.0}, {"default_rating": 3.0}],
    "ultrafb_best_worst_dpo": [{}, {"temperature": 0.3}, {"temperature": 5.0}],
    "mallows_theta": [{"beta": 0.5}, {"beta": 0.5, "reference_free": False, "temperature": 0.5}],
    "mallows_ipo": [{}, {"variant": "rainbowpo"}, {"temperature": 2.0}],
    "mallows_phi": [{"beta": 0.3}, {"beta": 0.3, "temperature": 0.5}, {"link": "sigmoid"},
                    {"link": "polynomial", "poly_range_mode": "fixed"}],
    "mpo": [{}, {"alpha": 0.2}, {"selection": "top_bottom"}, {"selection": "top_bottom", "k": 1},
            {"reference_free": True}, {"reference_free": True, "threshold": "median", "gamma": 0.1}],
    "wmpo": [{"alpha": 0.5}, {"alpha": 0.5, "selection": "top_bottom", "k": 2, "weighting": "signed"}],
    "infonca": [{}, {"temperature_alpha": 0.3, "first_bonus": 0.0}],
    "nca": [{}, {"variant": "listwise", "temperature_alpha": 0.3}, {"variant": "pair"},
            {"variant": "biased", "beta": 0.2}],
}

CASES = [(name, hp) for name in ALL_LOSSES for hp in SETTINGS[name]]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, hp = case
    return name + "".join(f"-{k}={v}" for k, v in hp.items())


def test_every_loss_has_settings() -> None:
    assert set(SETTINGS) == set(ALL_LOSSES)
    for name in ALL_LOSSES:
        assert get_loss_spec(name).denominator_fn is not None, name


def _label_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k in ("mask", "scores", "lam", "dispersion")}


def _check(name: str, policy: torch.Tensor, ref: Optional[torch.Tensor], kw: dict[str, Any],
           hp: dict[str, Any]) -> torch.Tensor:
    """Asserts the label-only denominator equals the loss's, exactly (value, dtype, device, no grad)."""
    out = listwise_loss(name, policy, ref, **kw, **hp)
    labels = _label_kwargs(kw)
    shape = None if labels.get("mask") is not None or labels.get("scores") is not None else policy.shape
    got = loss_denominator(name, **labels, shape=shape, dtype=policy.dtype, device=policy.device, **hp)
    via_spec = get_loss_spec(name).denominator(labels.get("mask"), labels.get("scores"), labels.get("lam"),
                                               shape=shape, dtype=policy.dtype, **hp)
    for d in (got, via_spec):
        assert d.dtype == out.denominator.dtype and d.device == out.denominator.device
        assert d.dim() == 0 and not d.requires_grad
        assert torch.equal(d, out.denominator), (name, hp, d, out.denominator)
    return got


def _random_batch(name: str, seed: int, dtype: torch.dtype, batch: int = 8, n: int = 5) -> dict[str, Any]:
    """Padding (a fully padded row, a single-response row), NaN labels, ties (whole rows and partial)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n, generator=g) < 0.75
    mask[0] = True
    mask[1] = False  # fully padded
    mask[2] = False
    mask[2, 1] = True  # one valid response
    if name in RATED:
        scores = torch.randint(1, 6, (batch, n, M_DIMS), generator=g).to(torch.float64)
        scores[3] = 4.0  # every response rated the same: tied aggregate
        scores[4, :, 0] = math.nan  # missing ratings
        scores[5, 2, 1] = math.nan
    else:
        scores = torch.randint(0, 3, (batch, n), generator=g).to(torch.float64)  # many partial ties
        scores[3] = 0.25  # all tied
        scores[4, 1] = math.nan  # NaN = invalid response
        scores[5, :] = math.nan
        scores[5, 0] = 1.0  # one non-NaN label left
        scores[6] = torch.rand(n, generator=g, dtype=torch.float64)  # distinct
    kw: dict[str, Any] = {"mask": mask, "scores": scores.to(dtype)}
    if name == "lambda_dpo":
        e = -torch.log(torch.rand(batch, M_DIMS, generator=g, dtype=torch.float64))
        kw["lam"] = (e / e.sum(-1, keepdim=True)).to(dtype)
    if name.startswith("mallows"):
        kw["dispersion"] = (0.5 + torch.rand(batch, generator=g, dtype=torch.float64)).to(dtype)
    return kw


def _logps(shape: torch.Size, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    ref = -20.0 + 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    policy = ref + 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    return policy.to(dtype), ref.to(dtype)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_denominator_matches_loss_random(case: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
    name, hp = case
    for seed in range(4):
        kw = _random_batch(name, seed, dtype)
        policy, ref = _logps(kw["mask"].shape, seed, dtype)
        _check(name, policy, ref, kw, hp)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_denominator_matches_loss_cases(case: tuple[str, dict[str, Any]]) -> None:
    name, hp = case
    for seed, full in ((0, False), (1, True), (2, False)):
        c = make_case(name, seed=seed, full=full)
        _check(name, c.policy, c.ref, c.kwargs(), {**c.hparams, **hp})
        c32 = make_case(name, seed=seed, full=full, dtype=torch.float32)
        _check(name, c32.policy, c32.ref, c32.kwargs(), {**c32.hparams, **hp})


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_denominator_ignores_logps(case: tuple[str, dict[str, Any]]) -> None:
    name, hp = case
    kw = _random_batch(name, 7, torch.float64)
    values = set()
    for seed in (1, 2):
        policy, ref = _logps(kw["mask"].shape, seed, torch.float64)
        values.add(_check(name, policy, ref, kw, hp).item())
        values.add(listwise_loss(name, policy, ref, **kw, **hp).denominator.item())
    assert len(values) == 1


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_denominator_does_not_call_the_loss(case: tuple[str, dict[str, Any]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    name, hp = case
    kw = _label_kwargs(_random_batch(name, 3, torch.float32))
    expected = listwise_loss(name, *_logps(kw["mask"].shape, 3, torch.float32), **kw, **hp).denominator

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name}: the loss function was called")

    spec = dataclasses.replace(get_loss_spec(name), fn=boom)
    monkeypatch.setitem(LOSS_REGISTRY, name, spec)
    assert torch.equal(spec.denominator(kw["mask"], kw["scores"], kw.get("lam"), **hp), expected)
    assert torch.equal(loss_denominator(name, **kw, **hp), expected)


@pytest.mark.parametrize("name", ["dpo", "ipo", "slic", "simpo", "mallows_theta", "mallows_ipo",
                                  "mallows_phi", "nca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_pairwise_columns_without_scores(name: str, dtype: torch.dtype) -> None:
    """N = 2 [chosen, rejected] without scores: a pair with a padded side is skipped."""
    mask = torch.tensor([[True, True], [True, False], [False, False], [False, True], [True, True]])
    policy, ref = _logps(mask.shape, 0, dtype)
    kw: dict[str, Any] = {"mask": mask}
    if name.startswith("mallows"):
        kw["dispersion"] = torch.full((5,), 0.8, dtype=dtype)
    hps = [{"variant": "pair"}, {"variant": "biased"}] if name == "nca" else [{}]
    for hp in hps:
        assert _check(name, policy, ref, kw, hp).item() == 2.0
        # mask=None: every pair usable; the shape then comes from shape=.
        kw_none = {k: v for k, v in kw.items() if k != "mask"}
        assert _check(name, policy, ref, kw_none, hp).item() == 5.0


@pytest.mark.parametrize("name", PAIR_LOSSES + ("lambda_dpo",))
def test_rated_pairwise_best_worst(name: str) -> None:
    """``[B, N, m]`` ratings: the aggregate's best / worst; tied aggregates and short lists are skipped."""
    g = torch.Generator().manual_seed(5)
    batch, n = 6, 4
    ratings = torch.randint(1, 6, (batch, n, 3), generator=g).to(torch.float64)
    ratings[0] = torch.tensor([[5.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 5.0], [1.0, 1.0, 5.0]])
    ratings[1] = 2.0
    ratings[2, :, 1] = math.nan
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[3, 1:] = False
    mask[4] = False
    kw: dict[str, Any] = {"mask": mask, "scores": ratings}
    if name == "lambda_dpo":
        kw["lam"] = torch.full((3,), 1.0 / 3, dtype=torch.float64)
    if name.startswith("mallows"):
        kw["dispersion"] = torch.ones(batch, dtype=torch.float64)
    policy, ref = _logps(mask.shape, 5, torch.float64)
    for temperature in (0.1, 1.0, 10.0):
        _check(name, policy, ref, kw, {"temperature": temperature})
    # mask=None: the shape comes from the ratings.
    _check(name, policy, ref, {k: v for k, v in kw.items() if k != "mask"}, {})


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_rating_temperature_changes_the_count(name: str) -> None:
    """A small rating temperature makes one-hot targets, so A = [5, 1] and B = [1, 4] tie (0.5 each)."""
    ratings = torch.tensor([[[5.0, 1.0], [1.0, 4.0]], [[5.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    kw: dict[str, Any] = {"scores": ratings}
    if name.startswith("mallows"):
        kw["dispersion"] = torch.ones(2, dtype=torch.float64)
    policy, ref = _logps(ratings.shape[:2], 0, torch.float64)
    counts = [_check(name, policy, ref, kw, {"temperature": t}).item() for t in (1.0, 0.01)]
    assert counts == [2.0, 1.0]


@pytest.mark.parametrize("variant", ["pair", "biased"])
def test_nca_pair_variants_with_ratings(variant: str) -> None:
    kw = _random_batch("ultrafb_best_worst_dpo", 2, torch.float64)
    policy, ref = _logps(kw["mask"].shape, 2, torch.float64)
    _check("nca", policy, ref, kw, {"variant": variant})


def test_float32_rounding_ties() -> None:
    """Labels that differ only in float64 tie in float32: the count follows the compute dtype."""
    scores = torch.tensor([[0.5, 0.5 + 1e-12, 0.2], [0.1, 0.1 + 1e-12, 0.1]], dtype=torch.float64)
    for name in ("lipo_pair_logistic", "lipo_lambda", "mpo", "dpo"):
        counts = {}
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            policy, ref = _logps(scores.shape, 0, dtype)
            counts[dtype] = _check(name, policy, ref, {"scores": scores}, {}).item()
        if name == "lipo_pair_logistic":
            assert counts[torch.float32] == 2.0 and counts[torch.float64] == 5.0
        assert counts[torch.bfloat16] == counts[torch.float32]


def test_all_skipped_and_sum_reduction() -> None:
    """Nothing to count gives 0 (also for reduction="sum", whose denominator is otherwise 1)."""
    scores = torch.full((3, 4), 0.5, dtype=torch.float64)
    policy, ref = _logps(scores.shape, 0, torch.float64)
    for name in ("lipo_pair_logistic", "lipo_pair_hinge", "lipo_lambda"):
        for reduction in REDUCTIONS:
            d = _check(name, policy, ref, {"scores": scores}, {"reduction": reduction}).item()
            assert d == (3.0 if reduction == "paper" else 0.0)
    for name in ("mpo", "dpo", "ultrafb_best_worst_dpo"):
        s = scores.unsqueeze(-1).expand(3, 4, 2) if name == "ultrafb_best_worst_dpo" else scores
        assert _check(name, policy, ref, {"scores": s}, {}).item() == 0.0
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for name in ("lipo_point_mse", "lipo_list_mle", "infonca", "nca"):
        for hp in ([{"reduction": r} for r in REDUCTIONS] if name.startswith("lipo") else [{}]):
            assert _check(name, policy, ref, {"mask": mask, "scores": scores}, hp).item() == 0.0


VECTORS = [v for v in load_vectors() if vector_loss_name(v) in ALL_LOSSES]


def _runnable(v: dict[str, Any]) -> bool:
    try:
        call = vector_to_call(v)
        listwise_loss(call.name, call.policy, call.ref, **call.kwargs, **call.hparams)
    except Exception:  # construction / link vectors that are not loss calls
        return False
    return True


RUNNABLE_VECTORS = [v for v in VECTORS if _runnable(v)]


def test_vectors_run() -> None:
    # Not every loss has a runnable vector (the random cases above cover all of them).
    assert len({vector_loss_name(v) for v in RUNNABLE_VECTORS}) >= 10


@pytest.mark.parametrize("v", RUNNABLE_VECTORS, ids=[v["id"] for v in RUNNABLE_VECTORS])
def test_denominator_matches_vectors(v: dict[str, Any]) -> None:
    call = vector_to_call(v)
    _check(call.name, call.policy, call.ref, call.kwargs, call.hparams)


def test_errors_match_the_loss() -> None:
    mask = torch.ones(2, 3, dtype=torch.bool)
    scores = torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(LossHyperparameterError, match="reduction"):
        loss_denominator("lipo_pair_logistic", mask=mask, scores=scores, reduction="mean")
    with pytest.raises(LossHyperparameterError, match="did you mean"):
        loss_denominator("lipo_softmax", mask=mask, scores=scores, reductoin="sum")
    with pytest.raises(LossHyperparameterError, match="variant"):
        loss_denominator("nca", mask=mask, scores=scores, variant="nope")
    with pytest.raises(LossHyperparameterError, match="lam"):
        loss_denominator("dpo", mask=mask, scores=scores, lam=torch.ones(2))
    with pytest.raises(LossHyperparameterError, match="lam"):
        loss_denominator("lambda_dpo", mask=mask, scores=scores.unsqueeze(-1))
    with pytest.raises(LossHyperparameterError, match="lam must be"):
        loss_denominator("lambda_dpo", mask=mask, scores=scores.unsqueeze(-1), lam=torch.ones(4))
    with pytest.raises(LossHyperparameterError, match="needs scores"):
        loss_denominator("mpo", mask=mask)
    with pytest.raises(LossHyperparameterError, match="N = 2"):
        loss_denominator("dpo", mask=mask)
    with pytest.raises(LossHyperparameterError, match="shape"):
        loss_denominator("dpo")
    with pytest.raises(LossHyperparameterError, match="mask has shape"):
        loss_denominator("infonca", mask=mask, scores=scores, shape=(3, 2))
    with pytest.raises(LossHyperparameterError, match="dispersion"):
        loss_denominator("dpo", mask=mask, scores=scores, dispersion=torch.ones(2))
    # mallows_* accept (and ignore) a dispersion, but do not need one before the forward pass.
    assert loss_denominator("mallows_phi", mask=mask, scores=scores).item() == 2.0
