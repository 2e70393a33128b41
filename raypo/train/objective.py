"""The training objective, bound once at setup: which loss, its hyperparameters, its log-prob reduction, its
label rule, and whether it needs the reference model.

What each loss reads from a collated batch: the data layer carries per-response ``scores`` ([B, N, m]
ratings, NaN = missing), and optionally ``ranks`` (1 = best) and ``win_probs``. The labels follow the
run's :class:`LabelRules` (``loss.missing_ratings``, ``loss.score_reduction``, ``loss.lipo_labels``;
docs/losses.md). Each loss declares the label kind it needs (:attr:`raypo.losses.registry.LossSpec.labels`,
docs/loss_reference.md §0.4):

* ``per_dimension_scores`` (lambda_dpo, ultrafb_best_worst_dpo): the [B, N, m] ratings after the
  missing-rating rule (the loss turns them into softmax targets per dimension).
* ``scalar_scores`` (LiPO, MPO, NCA, ...): one score per response, the available ratings reduced by
  ``loss.score_reduction`` (or ``-rank`` for rank-only data); LiPO losses take psi computed from it here,
  at training time, by ``loss.lipo_labels`` (the tokenised ``psi`` column is not read).
* ``pairwise_order`` (dpo, ipo, slic, simpo, mallows_*): the same scalar, from which the loss picks the
  best and worst valid responses (column 0 = chosen when N = 2 and no scores exist).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from raypo.config import RaypoConfig
from raypo.losses import LossOutput
from raypo.losses.label_rules import impute_ratings, lipo_psi, reduce_ratings
from raypo.losses.labels import DEFAULT_RATING
from raypo.losses.registry import LossSpec, get_loss_spec
from raypo.model.batch import ListwiseBatch


@dataclass(frozen=True)
class LabelRules:
    """How labels are built from a batch's ratings (docs/losses.md "Missing ratings", "One score per
    response", "LiPO labels"); the ``loss.*`` keys of the same names."""

    missing_ratings: str = "drop"  # drop | impute (missing = default_rating, the official lambda-DPO code)
    score_reduction: str = "mean"  # mean | lambda
    lipo_labels: str = "win_rate"
    lipo_label_temperature: float = 1.0
    default_rating: float = DEFAULT_RATING

    def ratings(self, extras: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The data's ``scores`` ([B, N, m], NaN = missing) after the missing-rating rule."""
        scores = extras.get("scores")
        if scores is None or self.missing_ratings != "impute":
            return scores
        # Padded responses become 1.0 too; every loss and metric masks them by the response mask.
        return impute_ratings(scores, self.default_rating)


def scalar_scores(extras: dict[str, torch.Tensor], rules: LabelRules = LabelRules(),
                  lam: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """[B, N] scalar preference per response (larger is better): the available ratings reduced by
    ``rules.score_reduction`` (mean, or lambda-weighted by ``lam``), or ``-rank`` for rank-only data; NaN
    where unknown (an unrated response, padding)."""
    scores = rules.ratings(extras)
    if scores is not None and scores.numel() > 0 and not torch.isnan(scores).all():
        if scores.dim() == 2:
            return scores
        if rules.score_reduction == "lambda" and lam is None:
            raise ValueError("loss.score_reduction=lambda needs the prompt's lambda draw; none was drawn")
        return reduce_ratings(scores, reduction=rules.score_reduction, lam=lam)
    ranks = extras.get("ranks")
    if ranks is not None:
        return -ranks
    return None


def lipo_labels(extras: dict[str, torch.Tensor], mask: torch.Tensor, rules: LabelRules = LabelRules(),
                lam: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """LiPO psi [B, N] by ``rules.lipo_labels`` from the ranks when every row has them (the LiPO paper's
    rank rule), else from the reduced ratings; NaN at unrated responses, which leave every pair."""
    ranks = extras.get("ranks")
    has_ranks = ranks is not None and not torch.isnan(ranks).all()
    scores = -ranks if has_ranks else scalar_scores(extras, rules, lam)
    if rules.lipo_labels == "matrix":
        scores = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    elif scores is None:
        return None
    return lipo_psi(scores, mask, rule=rules.lipo_labels, temperature=rules.lipo_label_temperature,
                    win_probs=extras.get("win_probs"))


def loss_labels(spec: LossSpec, extras: dict[str, torch.Tensor], rules: LabelRules = LabelRules(),
                lam: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
                ) -> Optional[torch.Tensor]:
    """The ``scores`` argument of :func:`raypo.losses.listwise_loss` for this loss."""
    if spec.labels == "per_dimension_scores":
        scores = rules.ratings(extras)
        if scores is None or scores.dim() != 3:
            raise ValueError(f"loss {spec.name} needs per-dimension ratings [B, N, m] in the data's 'scores' "
                             "column; this dataset has none (use a rated dataset or another loss)")
        return scores
    if spec.family == "lipo":
        if mask is None:
            raise ValueError("loss_labels: LiPO labels need the batch's response mask")
        return lipo_labels(extras, mask, rules, lam)
    return scalar_scores(extras, rules, lam)


def _dispersion_c(cfg: RaypoConfig, spec: LossSpec) -> Optional[float]:
    """``loss.dispersion_c`` as a number for a MallowsPO loss (None for others); ``auto`` must have been
    resolved on the driver (:func:`raypo.train.dispersion.calibrated_config`, called by ``build_trainer``)."""
    if not spec.needs_dispersion:
        return None
    value = cfg.loss.dispersion_c
    if value == "auto":
        raise ValueError("loss.dispersion_c=auto reached the training objective unresolved: the driver "
                         "calibrates it (raypo.train.dispersion.calibrated_config, run by build_trainer); "
                         "pass the calibrated config, or set loss.dispersion_c to a number")
    return float(value)


def sequence_logps(logps: torch.Tensor, num_tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    """Summed log-probs, or divided by the response's token count (length-normalised)."""
    if reduction == "mean":
        return logps / num_tokens.clamp(min=1).to(logps.dtype)
    return logps


@dataclass(frozen=True)
class Objective:
    """``loss.name`` and its hyperparameters, resolved and checked once (not on every micro-batch).

    Attributes:
        spec: the loss's registry entry.
        hparams: the hyperparameters passed to the loss (``loss.params`` with ``loss.beta``).
        reduction: ``"sum"`` or ``"mean"`` (length-normalised) sequence log-probs, as the loss's source.
        uses_reference: the loss reads reference log-probs with these hyperparameters.
        dispersion_c: MallowsPO's c in phi(x) = -c log Hbar(x), the number the driver resolved
            ``loss.dispersion_c`` to (raypo/train/dispersion.py); None for other losses.
        dim_names: the preference dimensions (per-dimension metrics), or None.
    """

    spec: LossSpec
    hparams: dict[str, Any]
    reduction: str
    uses_reference: bool
    dispersion_c: Optional[float]
    dim_names: Optional[list[str]]
    rules: LabelRules = LabelRules()

    @classmethod
    def from_config(cls, cfg: RaypoConfig, dim_names: Optional[list[str]]) -> Objective:
        spec = get_loss_spec(cfg.loss.name)
        hparams = dict(cfg.loss.params)
        if cfg.loss.beta is not None:
            hparams["beta"] = cfg.loss.beta
        if "missing_ratings" in spec.defaults:  # the loss applies the rule itself (lambda_dpo)
            hparams["missing_ratings"] = cfg.loss.missing_ratings
        dispersion_c = _dispersion_c(cfg, spec)
        if dispersion_c is not None:  # the loss takes each pair's phi from ref_entropy with this c
            hparams["dispersion_c"] = dispersion_c
        spec.check_hparams(hparams)
        rules = LabelRules(missing_ratings=cfg.loss.missing_ratings, score_reduction=cfg.loss.score_reduction,
                           lipo_labels=cfg.loss.lipo_labels,
                           lipo_label_temperature=cfg.loss.lipo_label_temperature,
                           default_rating=float(hparams.get("default_rating", DEFAULT_RATING)))
        return cls(spec=spec, hparams=hparams, reduction=spec.logp_reduction_for(hparams),
                   uses_reference=spec.uses_reference(hparams), dispersion_c=dispersion_c,
                   dim_names=dim_names, rules=rules)

    @property
    def needs_lambda(self) -> bool:
        """A lambda is drawn per prompt: the loss weights dimensions, or the scores are lambda-weighted."""
        return self.spec.needs_lambda or (self.rules.score_reduction == "lambda"
                                          and self.spec.labels != "per_dimension_scores")

    def needs_reference_model(self) -> bool:
        """A reference forward is needed: for its log-probs, or for MallowsPO's entropies."""
        return self.uses_reference or self.spec.needs_dispersion

    def labels(self, batch: ListwiseBatch, device: torch.device,
               lam: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        return loss_labels(self.spec, {k: v.to(device) for k, v in batch.extras.items()}, self.rules, lam,
                           batch.response_mask().to(device))

    def metric_labels(self, batch: ListwiseBatch, device: torch.device, lam: Optional[torch.Tensor] = None
                      ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(scalar [B, N], per-dimension [B, N, m] or None)`` labels of the ranking metrics, under the
        same missing-rating rule and score reduction as the loss."""
        extras = {k: v.to(device) for k, v in batch.extras.items()}
        rules = self.rules
        if rules.score_reduction == "lambda" and lam is None:  # no draw (e.g. a rank-only batch)
            rules = replace(rules, score_reduction="mean")
        return scalar_scores(extras, rules, lam), self.rules.ratings(extras)

    def loss(self, batch: ListwiseBatch, policy_logps_raw: torch.Tensor, ref_logps: Optional[torch.Tensor],
             dispersion: Optional[torch.Tensor], lam: Optional[torch.Tensor],
             device: torch.device) -> LossOutput:
        """The loss on one micro-batch; ``policy_logps_raw`` are summed log-probs [B, N], ``ref_logps``
        already reduced like the policy's (:func:`raypo.train.reference.reference_outputs`); ``dispersion``
        (MallowsPO) the per-response entropies Hbar [B, N] of ``ReferenceOutputs.dispersion``, passed as the
        loss's ``ref_entropy`` (it takes each pair's phi with ``dispersion_c``), or a given phi [B]."""
        mask = batch.response_mask().to(device)
        policy = sequence_logps(policy_logps_raw.float(), batch.num_scored_tokens().to(device),
                                self.reduction)
        kwargs: dict[str, Any] = {}
        if self.spec.needs_lambda:
            kwargs["lam"] = lam
        if self.spec.needs_dispersion:  # [B, N] Hbar per response (reference_outputs), or [B] phi given
            kwargs["ref_entropy" if dispersion is not None and dispersion.dim() == 2 else "dispersion"] = \
                dispersion
        return self.spec.fn(policy, ref_logps if self.uses_reference else None, mask=mask,
                            scores=self.labels(batch, device, lam), **kwargs, **self.hparams)

    def denominator(self, batch: ListwiseBatch, lam: Optional[torch.Tensor], device: torch.device) -> float:
        """The loss's denominator (count of prompts, pairs or items) for a batch, from its labels and masks
        alone, so the whole step can be normalised before any forward."""
        mask = batch.response_mask().to(device)
        lam_arg = lam if self.spec.needs_lambda else None
        return float(self.spec.denominator(mask, scores=self.labels(batch, device, lam), lam=lam_arg,
                                           **self.hparams))
