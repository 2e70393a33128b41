"""The objective's label rules from YAML keys (docs/losses.md "Missing ratings", "One score per response",
"LiPO labels"): the loss and its denominator see the same labels, under both missing-rating rules."""

from __future__ import annotations

import math

import pytest
import torch

from raypo.config import ConfigError, config_from_dict
from raypo.model.batch import ListwiseBatch
from raypo.train.objective import Objective

NAN = math.nan


def _batch() -> ListwiseBatch:
    # Prompt 0 is the example [[5, -], [4, 4], [3, 3]]; prompt 1 has no rating in dimension 1 and
    # only one in dimension 0 (no usable dimension under drop).
    scores = torch.tensor([[[5.0, NAN], [4.0, 4.0], [3.0, 3.0]],
                           [[2.0, NAN], [NAN, NAN], [NAN, NAN]]])
    return ListwiseBatch([[1, 2], [3]], [[[4], [5, 6], [7]], [[8], [9], [10, 11]]], num_responses=3,
                         extras={"scores": scores})


def _objective(loss: dict) -> Objective:
    return Objective.from_config(config_from_dict({"loss": loss}), ["a", "b"])


@pytest.mark.parametrize("rule,expected_den", [("drop", 1.0), ("impute", 2.0)])
def test_lambda_dpo_rule_reaches_loss_and_denominator(rule, expected_den) -> None:
    obj = _objective({"name": "lambda_dpo", "missing_ratings": rule})
    assert obj.hparams["missing_ratings"] == rule
    batch, lam = _batch(), torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    logps = torch.tensor([[-3.0, -5.0, -2.0], [-4.0, -5.0, -6.0]])
    out = obj.loss(batch, logps, torch.zeros_like(logps), None, lam, torch.device("cpu"))
    assert obj.denominator(batch, lam, torch.device("cpu")) == out.denominator.item() == expected_den


@pytest.mark.parametrize("name", ["lipo_lambda", "mpo", "dpo"])
def test_scalar_losses_follow_the_rule(name) -> None:
    cpu = torch.device("cpu")
    drop, imp = _objective({"name": name}), _objective({"name": name, "missing_ratings": "impute"})
    batch = _batch().select_groups(0, 1)
    labels_drop, labels_imp = drop.labels(batch, cpu), imp.labels(batch, cpu)
    # drop: response 0 (rating 5) is best; impute: its missing rating is 1.0, mean 3 = tied worst.
    assert labels_drop[0].argmax().item() == 0
    assert labels_imp[0, 0].item() == pytest.approx(labels_imp[0, 2].item())
    logps = torch.tensor([[-3.0, -5.0, -2.0]])
    for obj in (drop, imp):
        out = obj.loss(batch, logps, torch.zeros_like(logps), None, None, cpu)
        assert obj.denominator(batch, None, cpu) == out.denominator.item()


def test_metric_labels_follow_the_rule() -> None:
    cpu = torch.device("cpu")
    scalar, per_dim = _objective({"name": "mpo", "missing_ratings": "impute"}).metric_labels(_batch(), cpu)
    assert not torch.isnan(per_dim).any() and scalar[0, 0].item() == 3.0
    scalar, per_dim = _objective({"name": "mpo"}).metric_labels(_batch(), cpu)
    assert math.isnan(per_dim[0, 0, 1].item()) and scalar[0, 0].item() == 5.0


def test_lambda_score_reduction_draws_lambda_and_weights_scores() -> None:
    obj = _objective({"name": "mpo", "score_reduction": "lambda"})
    assert obj.needs_lambda and not _objective({"name": "mpo"}).needs_lambda
    batch = _batch().select_groups(0, 1)
    labels = obj.labels(batch, torch.device("cpu"), torch.tensor([[0.0, 1.0]]))
    assert math.isnan(labels[0, 0].item()) and labels[0, 1:].tolist() == [4.0, 3.0]


def test_lipo_label_rule_from_yaml() -> None:
    obj = _objective({"name": "lipo_lambda", "lipo_labels": "raw"})
    psi = obj.labels(_batch().select_groups(0, 1), torch.device("cpu"))
    assert psi[0].tolist() == [5.0, 4.0, 3.0]


@pytest.mark.parametrize("loss,match", [
    ({"missing_ratings": "zero"}, "loss.missing_ratings"),
    ({"score_reduction": "max"}, "loss.score_reduction"),
    ({"lipo_labels": "softmax"}, "loss.lipo_labels"),
    ({"lipo_label_temperature": 0.0}, "loss.lipo_label_temperature"),
    ({"name": "lipo_lambda", "params": {"weighting": "ndcg"}}, "loss.params.weighting"),
    ({"params": {"missing_ratings": "impute"}}, "move it to loss.missing_ratings"),
])
def test_bad_label_rules_are_refused(loss, match) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"loss": loss})
