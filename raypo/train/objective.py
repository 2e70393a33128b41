"""The training objective, bound once at setup: which loss, its hyperparameters, its log-prob reduction, its
label rule, and whether it needs the reference model.

What each loss reads from a collated batch: the data layer carries per-response ``scores`` ([B, N, m]
ratings, NaN = missing), and optionally ``psi`` (LiPO labels) and ``ranks`` (1 = best). Each loss declares
the label kind it needs (:attr:`raypo.losses.registry.LossSpec.labels`, docs/loss_reference.md §0.4):

* ``per_dimension_scores`` (lambda_dpo, ultrafb_best_worst_dpo): the [B, N, m] ratings as they are (the
  loss turns them into softmax targets per dimension).
* ``scalar_scores`` (LiPO, MPO, NCA, ...): LiPO losses take ``psi`` when the data has it; the others take
  the mean of the available ratings, or ``-rank`` for rank-only data.
* ``pairwise_order`` (dpo, ipo, slic, simpo, mallows_*): the same scalar, from which the loss picks the
  best and worst valid responses (column 0 = chosen when N = 2 and no scores exist).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from raypo.config import RaypoConfig
from raypo.losses import LossOutput
from raypo.losses.registry import LossSpec, get_loss_spec
from raypo.model.batch import ListwiseBatch


def scalar_scores(extras: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, N] scalar preference per response (larger is better): the mean of the available ratings, or
    ``-rank`` for rank-only data; NaN where unknown."""
    scores = extras.get("scores")
    if scores is not None and scores.numel() > 0 and not torch.isnan(scores).all():
        if scores.dim() == 2:
            return scores
        valid = ~torch.isnan(scores)
        total = torch.where(valid, scores, torch.zeros_like(scores)).sum(-1)
        count = valid.sum(-1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    ranks = extras.get("ranks")
    if ranks is not None:
        return -ranks
    return None


def loss_labels(spec: LossSpec, extras: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The ``scores`` argument of :func:`raypo.losses.listwise_loss` for this loss."""
    if spec.labels == "per_dimension_scores":
        scores = extras.get("scores")
        if scores is None or scores.dim() != 3:
            raise ValueError(f"loss {spec.name} needs per-dimension ratings [B, N, m] in the data's 'scores' "
                             "column; this dataset has none (use a rated dataset or another loss)")
        return scores
    if spec.family == "lipo" and "psi" in extras and not torch.isnan(extras["psi"]).all():
        return extras["psi"]
    return scalar_scores(extras)


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
        dispersion_c: MallowsPO's c in phi(x) = -c log Hbar(x).
        dim_names: the preference dimensions (per-dimension metrics), or None.
    """

    spec: LossSpec
    hparams: dict[str, Any]
    reduction: str
    uses_reference: bool
    dispersion_c: float
    dim_names: Optional[list[str]]

    @classmethod
    def from_config(cls, cfg: RaypoConfig, dim_names: Optional[list[str]]) -> Objective:
        spec = get_loss_spec(cfg.loss.name)
        hparams = dict(cfg.loss.params)
        if cfg.loss.beta is not None:
            hparams["beta"] = cfg.loss.beta
        spec.check_hparams(hparams)
        return cls(spec=spec, hparams=hparams, reduction=spec.logp_reduction_for(hparams),
                   uses_reference=spec.uses_reference(hparams), dispersion_c=cfg.loss.dispersion_c,
                   dim_names=dim_names)

    @property
    def needs_lambda(self) -> bool:
        return self.spec.needs_lambda

    def needs_reference_model(self) -> bool:
        """A reference forward is needed: for its log-probs, or for MallowsPO's entropies."""
        return self.uses_reference or self.spec.needs_dispersion

    def labels(self, batch: ListwiseBatch, device: torch.device) -> Optional[torch.Tensor]:
        return loss_labels(self.spec, {k: v.to(device) for k, v in batch.extras.items()})

    def loss(self, batch: ListwiseBatch, policy_logps_raw: torch.Tensor, ref_logps: Optional[torch.Tensor],
             dispersion: Optional[torch.Tensor], lam: Optional[torch.Tensor],
             device: torch.device) -> LossOutput:
        """The loss on one micro-batch; ``policy_logps_raw`` are summed log-probs [B, N], ``ref_logps``
        already reduced like the policy's (:func:`raypo.train.reference.reference_outputs`)."""
        mask = batch.response_mask().to(device)
        policy = sequence_logps(policy_logps_raw.float(), batch.num_scored_tokens().to(device),
                                self.reduction)
        kwargs: dict[str, Any] = {}
        if self.spec.needs_lambda:
            kwargs["lam"] = lam
        if self.spec.needs_dispersion:
            kwargs["dispersion"] = dispersion
        return self.spec.fn(policy, ref_logps if self.uses_reference else None, mask=mask,
                            scores=self.labels(batch, device), **kwargs, **self.hparams)

    def denominator(self, batch: ListwiseBatch, lam: Optional[torch.Tensor], device: torch.device) -> float:
        """The loss's denominator (count of prompts, pairs or items) for a batch, from its labels and masks
        alone, so the whole step can be normalised before any forward."""
        mask = batch.response_mask().to(device)
        return float(self.spec.denominator(mask, scores=self.labels(batch, device), lam=lam, **self.hparams))
