"""MPO's partition statistic (MPO paper, Table 7) and W-MPO's signed weighting (its Appendix D, Eq. 14-16),
against hand computation in float64."""

from __future__ import annotations

import math

import pytest
import torch

from raypo.losses import LossHyperparameterError
from raypo.losses.labels import mpo_sets, mpo_threshold
from raypo.losses.mpo import mpo_denominator, mpo_loss, wmpo_loss

F64 = torch.float64


def test_thresholds_of_one_list():
    s = torch.tensor([[0.0, 1.0, 2.0, 10.0, float("nan")]], dtype=F64)
    valid = ~torch.isnan(s)
    s0 = torch.where(valid, s, torch.zeros_like(s))
    assert mpo_threshold(s0, valid, "mean").item() == pytest.approx(13 / 4)
    assert mpo_threshold(s0, valid, "median").item() == pytest.approx(1.5)  # mean of the two middle ones
    odd = torch.tensor([[5.0, 1.0, 3.0]], dtype=F64)
    assert mpo_threshold(odd, torch.ones_like(odd, dtype=torch.bool), "median").item() == 3.0
    ten = torch.arange(10, dtype=F64).unsqueeze(0) ** 2  # 0, 1, 4, ..., 81: 10 % trims one from each end
    trimmed = mpo_threshold(ten, torch.ones_like(ten, dtype=torch.bool), "trimmed_mean").item()
    assert trimmed == pytest.approx(sum(i * i for i in range(1, 9)) / 8)


def test_the_median_moves_a_response_across_the_partition():
    scores = torch.tensor([[0.0, 1.0, 2.0, 10.0]], dtype=F64)
    mean_pos, _, _ = mpo_sets(scores)  # mean 3.25: only the outlier is above it
    median_pos, _, _ = mpo_sets(scores, threshold="median")  # median 1.5: the two upper ones
    assert mean_pos.tolist() == [[False, False, False, True]]
    assert median_pos.tolist() == [[False, False, True, True]]
    mask = torch.ones_like(scores, dtype=torch.bool)
    assert mpo_denominator(mask, scores, dtype=F64, threshold="median").item() == 1.0


def test_mpo_with_the_median_matches_the_set_contrast_by_hand():
    policy = torch.tensor([[0.3, -0.2, 0.5, 0.1]], dtype=F64)
    ref = torch.zeros_like(policy)
    scores = torch.tensor([[0.0, 1.0, 2.0, 10.0]], dtype=F64)
    beta = 0.5
    r = [beta * p for p in policy[0].tolist()]
    expected = math.log(sum(math.exp(x) for x in r)) - math.log(math.exp(r[2]) + math.exp(r[3]))
    out = mpo_loss(policy, ref, scores=scores, beta=beta, threshold="median")
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_signed_and_absolute_weightings_by_hand():
    policy = torch.tensor([[0.3, -0.2, 0.5]], dtype=F64)
    ref = torch.tensor([[0.1, 0.0, 0.2]], dtype=F64)
    scores = torch.tensor([[1.0, 2.0, 6.0]], dtype=F64)  # mean 3: Y+ = {2}
    beta, alpha = 0.2, 0.5
    s = [beta * (p - q) for p, q in zip(policy[0].tolist(), ref[0].tolist())]
    dev = [x - 3.0 for x in scores[0].tolist()]
    for weighting, shift in (("absolute", [abs(d) for d in dev]), ("signed", dev)):
        r = [a + alpha * b for a, b in zip(s, shift)]
        expected = math.log(sum(math.exp(x) for x in r)) - r[2]
        out = wmpo_loss(policy, ref, scores=scores, beta=beta, alpha=alpha, weighting=weighting)
        assert out.loss.item() == pytest.approx(expected, rel=1e-12), weighting
    signed = wmpo_loss(policy, ref, scores=scores, beta=beta, alpha=alpha, weighting="signed").loss
    absolute = wmpo_loss(policy, ref, scores=scores, beta=beta, alpha=alpha).loss
    assert signed.item() < absolute.item()  # signed deviations push the below-mean responses down


@pytest.mark.parametrize("kwargs", [{"threshold": "mode"}, {"weighting": "squared"}])
def test_unknown_options_name_the_choices(kwargs):
    x = torch.zeros(1, 3, dtype=F64)
    with pytest.raises(LossHyperparameterError, match="is not one of"):
        mpo_loss(x, x, scores=torch.tensor([[1.0, 2.0, 3.0]], dtype=F64), **kwargs)


def test_the_options_are_checked_from_yaml_before_training():
    from raypo.config import load_config
    from raypo.errors import ConfigError

    cfg = load_config(None, ["loss.name=wmpo", "loss.params.alpha=0.1", "loss.params.weighting=signed",
                             "loss.params.threshold=trimmed_mean"])
    assert cfg.loss.params == {"alpha": 0.1, "weighting": "signed", "threshold": "trimmed_mean"}
    with pytest.raises(ConfigError, match=r"loss.params.threshold='avg' is not one of mean, median"):
        load_config(None, ["loss.name=mpo", "loss.params.threshold=avg"])


# ----------------------------------------------------------------------------------------------------
# Reference-free MPO (the MPO paper's reference-free variant: SimPO's reward and margin)
# ----------------------------------------------------------------------------------------------------


def _lists(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    policy = -1.5 + 0.3 * torch.randn(3, n, generator=g, dtype=F64)  # per-token means
    ref = -1.4 + 0.3 * torch.randn(3, n, generator=g, dtype=F64)
    scores = torch.rand(3, n, generator=g, dtype=F64)
    return policy, ref, scores


def test_reference_free_mpo_by_hand():
    policy, ref, scores = _lists()
    beta, gamma = 2.0, 0.3
    out = mpo_loss(policy, ref, scores=scores, beta=beta, reference_free=True, gamma=gamma)
    want = []
    for b in range(3):
        pos = scores[b] > scores[b].mean()
        r = beta * policy[b] - gamma * pos.to(F64)  # ref_logps are ignored
        want.append(torch.logsumexp(r, 0) - torch.logsumexp(r[pos], 0))
    assert out.loss.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-14)
    assert mpo_loss(policy, None, scores=scores, beta=beta, reference_free=True, gamma=gamma).loss.item() \
        == pytest.approx(out.loss.item(), rel=0)
    # the default margin is SimPO's gamma = 0.25 * beta; with the reference it is 0 (plain MPO)
    default = mpo_loss(policy, ref, scores=scores, beta=beta, reference_free=True)
    assert default.loss.item() == pytest.approx(
        mpo_loss(policy, ref, scores=scores, beta=beta, reference_free=True, gamma=0.5).loss.item(), rel=0)
    assert mpo_loss(policy, ref, scores=scores).loss.item() == pytest.approx(
        mpo_loss(policy, ref, scores=scores, gamma=0.0).loss.item(), rel=0)


def test_reference_free_mpo_of_two_is_simpo():
    from raypo.losses import listwise_loss

    policy, _, scores = _lists(1, n=2)
    p1, p2 = policy.clone().requires_grad_(True), policy.clone().requires_grad_(True)
    mpo = listwise_loss("mpo", p1, None, scores=scores, beta=2.0, reference_free=True)
    simpo = listwise_loss("simpo", p2, None, scores=scores, beta=2.0)
    assert mpo.loss.item() == pytest.approx(simpo.loss.item(), rel=1e-13)
    (g1,) = torch.autograd.grad(mpo.loss, p1)
    (g2,) = torch.autograd.grad(simpo.loss, p2)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-15)


def test_reference_free_mpo_reads_length_normalised_logps():
    from raypo.losses import get_loss_spec

    spec = get_loss_spec("mpo")
    assert spec.logp_reduction_for({"reference_free": True}) == "mean"
    assert not spec.uses_reference({"reference_free": True})
    assert spec.logp_reduction_for({"reference_free": True, "length_normalization": False}) == "sum"
    with pytest.raises(LossHyperparameterError, match="gamma"):
        mpo_loss(*_lists()[:2], scores=_lists()[2], reference_free=True, gamma=-0.1)


# ----------------------------------------------------------------------------------------------------
# Top-k / bottom-k selection, the middle discarded (raypo's option)
# ----------------------------------------------------------------------------------------------------


def test_top_bottom_sets():
    s = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [3.0, 2.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0],
                      [3.0, 2.0, 2.0, 1.0, float("nan")]], dtype=F64)
    pos, neg, counted = mpo_sets(s, selection="top_bottom")  # k = n // 2: only the median is dropped
    assert pos.tolist()[0] == [True, True, False, False, False]
    assert neg.tolist()[0] == [False, False, False, True, True]
    assert pos.tolist()[1] == [True, True, False, False, False] and counted.tolist()[1]
    assert counted.tolist() == [True, True, False, False]  # row 3: a 2 in each set, a tie across them
    pos1, neg1, counted1 = mpo_sets(s, selection="top_bottom", k=1)
    assert pos1.tolist()[3] == [True, False, False, False, False]
    assert neg1.tolist()[3] == [False, False, False, True, False]
    assert counted1.tolist() == [True, True, False, True]
    big, _, _ = mpo_sets(s, selection="top_bottom", k=10)  # capped at n // 2
    assert torch.equal(big, pos)


def test_top_bottom_discards_the_middle_by_hand():
    policy, ref, scores = _lists(2, n=5)
    p = policy.clone().requires_grad_(True)
    beta = 0.5
    out = mpo_loss(p, ref, scores=scores, beta=beta, selection="top_bottom")
    want = []
    for b in range(3):
        order = torch.argsort(scores[b], descending=True, stable=True)
        top, bottom = order[:2], order[3:]
        r = beta * (policy[b] - ref[b])
        want.append(torch.logsumexp(r[torch.cat([top, bottom])], 0) - torch.logsumexp(r[top], 0))
    assert out.loss.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-14)
    (grad,) = torch.autograd.grad(out.loss, p)
    median = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, 2]
    assert torch.equal(grad.gather(1, median[:, None]), torch.zeros(3, 1, dtype=F64))  # out of the contrast
    assert out.metrics["num_discarded"].item() == 3.0
    # the threshold selection keeps the middle response in the contrast
    (g_thr,) = torch.autograd.grad(mpo_loss(p, ref, scores=scores, beta=beta).loss, p)
    assert bool((g_thr.gather(1, median[:, None]) != 0).all())


def test_top_bottom_k1_is_dpo_between_best_and_worst():
    from raypo.losses import listwise_loss

    policy, ref, scores = _lists(3, n=5)
    mpo = listwise_loss("mpo", policy, ref, scores=scores, beta=0.3, selection="top_bottom", k=1)
    dpo = listwise_loss("dpo", policy, ref, scores=scores, beta=0.3)
    assert mpo.loss.item() == pytest.approx(dpo.loss.item(), rel=1e-13)


def test_top_bottom_denominator_matches_the_loss():
    from raypo.losses import loss_denominator

    s = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [3.0, 2.0, 2.0, 1.0, 0.0], [1.0] * 5,
                      [3.0, 2.0, 2.0, 1.0, float("nan")]], dtype=F64)
    policy = torch.randn(4, 5, dtype=F64)
    for k in (None, 1, 2):
        out = mpo_loss(policy, torch.zeros_like(policy), scores=s, selection="top_bottom", k=k)
        den = loss_denominator("mpo", scores=s, dtype=F64, selection="top_bottom", k=k)
        assert torch.equal(den, out.denominator)
    assert out.denominator.item() == 2.0  # k = 2: rows 0 and 1


def test_top_bottom_options_are_checked():
    policy, ref, scores = _lists()
    with pytest.raises(LossHyperparameterError, match="selection"):
        mpo_loss(policy, ref, scores=scores, selection="top")
    with pytest.raises(LossHyperparameterError, match="k=0"):
        mpo_loss(policy, ref, scores=scores, selection="top_bottom", k=0)
    with pytest.raises(LossHyperparameterError, match="only read by selection=top_bottom"):
        mpo_loss(policy, ref, scores=scores, k=1)


def test_mpo_options_from_yaml():
    from raypo.config import load_config
    from raypo.errors import ConfigError

    cfg = load_config(None, ["loss.name=mpo", "loss.params.selection=top_bottom", "loss.params.k=2",
                             "loss.params.reference_free=true", "loss.params.gamma=0.5", "loss.beta=2.0"])
    assert cfg.loss.params == {"selection": "top_bottom", "k": 2, "reference_free": True, "gamma": 0.5}
    with pytest.raises(ConfigError, match=r"loss.params.selection='top' is not one of threshold, top_bottom"):
        load_config(None, ["loss.name=mpo", "loss.params.selection=top"])
    with pytest.raises(ConfigError, match=r"loss.params.k=2 is only read with loss.params.selection"):
        load_config(None, ["loss.name=wmpo", "loss.params.alpha=0.1", "loss.params.k=2"])
    with pytest.raises(ConfigError, match=r"loss.params.k=0 must be an integer >= 1"):
        load_config(None, ["loss.name=mpo", "loss.params.selection=top_bottom", "loss.params.k=0"])
    with pytest.raises(ConfigError, match=r"loss.params.gamma=-1"):
        load_config(None, ["loss.name=mpo", "loss.params.gamma=-1"])
