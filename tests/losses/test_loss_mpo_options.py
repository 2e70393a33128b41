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
