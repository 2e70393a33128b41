"""Label rules (docs/losses.md "LiPO labels", "Lambda weight", "Missing ratings", "One score per response"):
LiPO psi rules, the LiPO paper's Lambda-weight ablations, the missing-rating rule of every loss family."""

from __future__ import annotations

import math

import pytest
import torch

from raypo.losses import listwise_loss, ranking_metrics
from raypo.losses.label_rules import impute_ratings, lipo_psi, reduce_ratings
from raypo.losses.labels import best_worst, mpo_sets

D64 = torch.float64
NAN = math.nan


def _lipo_lambda_grad(psi: torch.Tensor) -> torch.Tensor:
    policy = torch.tensor([[-10.0, -11.0, -9.5]], dtype=D64, requires_grad=True)
    ref = torch.full((1, 3), -10.0, dtype=D64)
    out = listwise_loss("lipo_lambda", policy, ref, scores=psi, beta=0.5)
    (grad,) = torch.autograd.grad(out.loss, policy)
    return grad


@pytest.mark.parametrize("rule,differ", [("raw", True), ("bradley_terry", True), ("win_rate", False),
                                         ("ranks", False), ("minmax", False)])
def test_lipo_label_magnitudes_reach_the_gradient_only_under_magnitude_keeping_rules(rule, differ) -> None:
    """LiPO's motivating pair of lists: (0.99, 0.5, 0.01) and (0.51, 0.5, 0.49) order the responses alike."""
    wide = lipo_psi(torch.tensor([[0.99, 0.5, 0.01]], dtype=D64), rule=rule, temperature=0.1)
    narrow = lipo_psi(torch.tensor([[0.51, 0.5, 0.49]], dtype=D64), rule=rule, temperature=0.1)
    g_wide, g_narrow = _lipo_lambda_grad(wide), _lipo_lambda_grad(narrow)
    assert g_wide.abs().sum() > 0 and g_narrow.abs().sum() > 0
    if differ:
        assert (g_wide - g_narrow).abs().max() > 1e-3
    else:
        torch.testing.assert_close(g_wide, g_narrow, rtol=0, atol=0)


def test_lipo_psi_rules_by_hand() -> None:
    s = torch.tensor([[3.0, 1.0, 1.0, NAN]], dtype=D64)
    # win_rate: row means of 1[>] + 0.5 1[=] over the 3 rated responses; the unrated one is NaN.
    torch.testing.assert_close(lipo_psi(s)[0, :3], torch.tensor([2.5 / 3, 1.0 / 3, 1.0 / 3], dtype=D64))
    assert math.isnan(lipo_psi(s)[0, 3].item())
    sig = torch.sigmoid(torch.tensor(2.0 / 0.5, dtype=D64)).item()
    bt = lipo_psi(s, rule="bradley_terry", temperature=0.5)[0, :3]
    torch.testing.assert_close(bt, torch.tensor([(0.5 + 2 * sig) / 3, (1 - sig + 1.0) / 3,
                                                 (1 - sig + 1.0) / 3], dtype=D64))
    torch.testing.assert_close(lipo_psi(s, rule="minmax")[0, :3], torch.tensor([1.0, 0.0, 0.0], dtype=D64))
    torch.testing.assert_close(lipo_psi(s, rule="raw")[0, :3], s[0, :3])
    # ranks: mean ranks (1, 2.5, 2.5) of K = 3 -> (K - rank) / (K - 1).
    torch.testing.assert_close(lipo_psi(s, rule="ranks")[0, :3], torch.tensor([1.0, 0.25, 0.25], dtype=D64))
    # matrix: the diagonal is taken as 0.5 whatever it holds; padding is left out of K.
    w = torch.tensor([[[9.0, 0.8, 0.6], [0.2, 9.0, 0.3], [0.4, 0.7, 9.0]]], dtype=D64)
    mask = torch.tensor([[True, True, False]])
    psi = lipo_psi(torch.zeros(1, 3, dtype=D64), mask, rule="matrix", win_probs=w)
    torch.testing.assert_close(psi[0, :2], torch.tensor([(0.5 + 0.8) / 2, (0.2 + 0.5) / 2], dtype=D64))
    with pytest.raises(ValueError, match="win_probs"):
        lipo_psi(torch.zeros(1, 3, dtype=D64), rule="matrix")


@pytest.mark.parametrize("weighting", ["dcg", "constant_gain", "constant_discount", "constant"])
def test_lipo_lambda_weight_ablations_by_hand(weighting) -> None:
    """LiPO paper Sec. 5: DCG weight, constant delta-gain, constant delta-discount, constant weight."""
    psi = torch.tensor([[1.0, 0.5, 0.0]], dtype=D64)
    policy = torch.tensor([[-9.0, -10.0, -11.5]], dtype=D64)  # s ranks the responses 1, 2, 3
    ref = torch.full((1, 3), -10.0, dtype=D64)
    beta = 0.5
    s = [beta * (p + 10.0) for p in policy[0].tolist()]
    gain = [2.0 ** p - 1.0 for p in psi[0].tolist()]
    disc = [1.0 / math.log2(1.0 + r) for r in (1, 2, 3)]
    total = 0.0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        dg = 1.0 if weighting == "constant_gain" else abs(gain[i] - gain[j])
        dd = 1.0 if weighting == "constant_discount" else abs(disc[i] - disc[j])
        delta = 1.0 if weighting == "constant" else 3 * dg * dd  # C = padded N = 3
        total += delta * math.log1p(math.exp(-(s[i] - s[j])))
    out = listwise_loss("lipo_lambda", policy, ref, scores=psi, beta=beta, weighting=weighting)
    assert out.loss.item() == pytest.approx(total / 3, rel=1e-12)


def test_lipo_lambda_rejects_an_unknown_weighting() -> None:
    with pytest.raises(ValueError, match="weighting"):
        listwise_loss("lipo_lambda", torch.zeros(1, 2), torch.zeros(1, 2), scores=torch.tensor([[1.0, 0.0]]),
                      weighting="ndcg")


# The example: ratings [[5, -], [4, 4], [3, 3]] (response 0 lacks its second rating).
EXAMPLE = torch.tensor([[[5.0, NAN], [4.0, 4.0], [3.0, 3.0]]], dtype=D64)
POLICY = torch.tensor([[-10.0, -9.0, -10.5]], dtype=D64)
REF = torch.full((1, 3), -10.0, dtype=D64)
LAM = torch.tensor([0.3, 0.7], dtype=D64)


def _ce(targets: list[float], s: list[float]) -> float:
    lse = math.log(sum(math.exp(x) for x in s))
    return -sum(t * (x - lse) for t, x in zip(targets, s))


def _softmax(x: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in x)
    return [math.exp(v) / z for v in x]


def test_lambda_dpo_drop_rule_on_the_example() -> None:
    beta = 0.1
    s = [beta * (p - r) for p, r in zip(POLICY[0].tolist(), REF[0].tolist())]
    # Dimension 0: all three rated. Dimension 1: response 0 is dropped from its target and its softmax.
    expected = 0.3 * _ce(_softmax([5.0, 4.0, 3.0]), s) + 0.7 * _ce(_softmax([4.0, 3.0]), s[1:])
    out = listwise_loss("lambda_dpo", POLICY, REF, scores=EXAMPLE, lam=LAM, beta=beta, eps=0.0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    # impute (official): the missing rating is 1.0, in the full softmax.
    official = 0.3 * _ce(_softmax([5.0, 4.0, 3.0]), s) + 0.7 * _ce(_softmax([1.0, 4.0, 3.0]), s)
    imp = listwise_loss("lambda_dpo", POLICY, REF, scores=EXAMPLE, lam=LAM, beta=beta, eps=0.0,
                        missing_ratings="impute")
    assert imp.loss.item() == pytest.approx(official, rel=1e-12)


def test_lambda_dpo_all_missing_dimension_drops_out_instead_of_pulling_to_uniform() -> None:
    ratings = EXAMPLE.clone()
    ratings[0, :, 1] = NAN  # dimension 1 has no rating at all
    one = torch.ones(1, dtype=D64)
    only_dim0 = listwise_loss("lambda_dpo", POLICY, REF, scores=ratings[..., :1], lam=one)
    out = listwise_loss("lambda_dpo", POLICY, REF, scores=ratings, lam=LAM)
    # lambda renormalised over the remaining dimension: exactly the one-dimension loss, no uniform target.
    assert out.loss.item() == pytest.approx(only_dim0.loss.item(), rel=1e-12)
    assert out.metrics["num_dims_dropped"].item() == 1.0
    # A second prompt with no usable dimension adds nothing and is not counted.
    two = torch.cat([ratings, torch.full_like(ratings, NAN)])
    both = listwise_loss("lambda_dpo", POLICY.repeat(2, 1), REF.repeat(2, 1), scores=two, lam=LAM)
    assert both.denominator.item() == 1.0 and both.metrics["num_skipped"].item() == 1.0
    assert both.loss.item() == pytest.approx(only_dim0.loss.item(), rel=1e-12)
    from raypo.losses import loss_denominator
    assert loss_denominator("lambda_dpo", scores=two, lam=LAM).item() == 1.0
    assert loss_denominator("lambda_dpo", scores=two, lam=LAM, missing_ratings="impute").item() == 2.0


def test_scalar_losses_and_metrics_agree_on_the_example() -> None:
    """drop: response 0 scores 5 (its available rating) and is best for LiPO, MPO, DPO and the metrics."""
    scores = reduce_ratings(EXAMPLE)
    torch.testing.assert_close(scores, torch.tensor([[5.0, 4.0, 3.0]], dtype=D64))
    psi = lipo_psi(scores)
    assert psi.argmax().item() == 0
    positive, _, _ = mpo_sets(scores)
    assert positive.tolist() == [[True, False, False]]
    best, worst, _ = best_worst(scores)
    assert (best.item(), worst.item()) == (0, 2)
    dpo = listwise_loss("dpo", POLICY, REF, scores=scores)
    s = 0.1 * (POLICY - REF)[0]
    assert dpo.loss.item() == pytest.approx(math.log1p(math.exp(-(s[0] - s[2]).item())), rel=1e-12)
    # Metrics: per dimension, the unrated response is left out of dimension 1 (2 pairs there, 3 in dim 0).
    m = ranking_metrics(s.unsqueeze(0), EXAMPLE, dim_names=["a", "b"])
    assert m["pairwise_accuracy/a"][1].item() == 3.0 and m["pairwise_accuracy/b"][1].item() == 1.0
    # impute: the missing rating is 1.0, so response 0 scores 3 and ties for worst under LiPO.
    imputed = reduce_ratings(impute_ratings(EXAMPLE))
    torch.testing.assert_close(imputed, torch.tensor([[3.0, 4.0, 3.0]], dtype=D64))
    assert lipo_psi(imputed)[0, 0].item() == pytest.approx(lipo_psi(imputed)[0, 2].item())


def test_lipo_masks_an_unrated_response_out_of_its_pairs() -> None:
    ratings = torch.tensor([[[NAN, NAN], [4.0, 4.0], [3.0, 3.0]]], dtype=D64)
    psi = lipo_psi(reduce_ratings(ratings))
    assert math.isnan(psi[0, 0].item())
    out = listwise_loss("lipo_lambda", POLICY, REF, scores=psi)
    assert out.metrics["num_pairs"].item() == 1.0


def test_lambda_weighted_score_reduction() -> None:
    lam = torch.tensor([[0.25, 0.75]], dtype=D64)
    ratings = torch.tensor([[[5.0, 1.0], [2.0, 4.0], [3.0, NAN]]], dtype=D64)
    out = reduce_ratings(ratings, reduction="lambda", lam=lam)
    # Weighted mean over the available ratings; response 2 has only dimension 0 -> its rating.
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.5, 3.0]], dtype=D64))
    torch.testing.assert_close(reduce_ratings(ratings), torch.tensor([[3.0, 3.0, 3.0]], dtype=D64))
    onehot = reduce_ratings(ratings, reduction="lambda", lam=torch.tensor([0.0, 1.0], dtype=D64))
    assert math.isnan(onehot[0, 2].item())  # rated only in a zero-weight dimension: unrated
    with pytest.raises(ValueError, match="lam"):
        reduce_ratings(ratings, reduction="lambda")
