"""Shared pieces of the loss library: the output type, input checking and masked tensor helpers.

Every loss works on per-response sequence log-probs ``[B, N]`` and a validity mask ``[B, N]``. Padded
entries may hold anything (0, NaN, -inf): they are replaced by 0 before any arithmetic, so they can neither
leak into a loss nor produce NaN gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

# A finite stand-in for -inf. exp(NEG_FILL - x) underflows to exactly 0 for any realistic x, and unlike
# -inf it never produces inf - inf = NaN in a forward or backward pass.
NEG_FILL = -1e30


@dataclass
class LossOutput:
    """What every loss returns.

    Attributes:
        loss: scalar, ``numerator / max(denominator, 1)``; the batch value of docs/loss_reference.md
            (§0.3 and the loss's section) whenever ``denominator > 0``, and exactly 0 (still attached to
            the graph) when every prompt was skipped.
        numerator: differentiable scalar; sum of per-unit losses (per prompt, per pair or per item).
        denominator: scalar without grad; the number of units. Numerators and denominators of several
            micro-batches (or data-parallel ranks) add up to those of the concatenated batch, so the
            trainer normalises globally with ``sum(numerators) / sum(denominators)``.
        metrics: detached scalar (or ``[m]``) tensors, all sums or counts so they aggregate by addition,
            except ``all_skipped`` (1.0 when the denominator is 0).
        rewards: detached implicit rewards ``s [B, N]`` as this loss defines them (0 at padding), for
            :func:`raypo.losses.metrics.ranking_metrics`.
    """

    loss: Tensor
    numerator: Tensor
    denominator: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    rewards: Optional[Tensor] = None


class LossHyperparameterError(ValueError):
    """A loss was given an unknown, missing or out-of-range hyperparameter or input."""


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return compute_dtype_of(t.dtype)


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """:func:`compute_dtype` for log-probs of dtype ``dtype`` (without a tensor)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_mask(name: str, mask: Optional[Tensor], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """The validity mask of :func:`prepare_inputs`: bool ``shape`` on ``device``; None = all real."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.shape != shape:
        raise LossHyperparameterError(
            f"{name}: mask has shape {tuple(mask.shape)} but policy_logps has {tuple(shape)}"
        )
    return mask.to(device=device, dtype=torch.bool)


def label_like(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A stand-in for the log-probs where only labels are read: ``mask``'s shape and device, ``dtype``.

    An expanded 0-d tensor (no storage of its own, never read), for the label checks that take ``like``
    (:func:`scalar_labels`) when a denominator is computed without log-probs.
    """
    return torch.empty((), dtype=dtype, device=mask.device).expand(mask.shape)


def prepare_inputs(
    name: str, policy_logps: Tensor, ref_logps: Optional[Tensor], mask: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Checks shapes, builds the mask and zeroes padded entries.

    Returns ``(policy, ref, mask)`` with policy/ref in the compute dtype and ``mask`` bool ``[B, N]``.
    """
    if policy_logps.dim() != 2:
        raise LossHyperparameterError(
            f"{name}: policy_logps must be [B, N] (one sequence log-prob per response), "
            f"got shape {tuple(policy_logps.shape)}"
        )
    dtype = compute_dtype(policy_logps)
    if ref_logps is None:
        ref_logps = torch.zeros_like(policy_logps)
    if ref_logps.shape != policy_logps.shape:
        raise LossHyperparameterError(
            f"{name}: ref_logps has shape {tuple(ref_logps.shape)} but policy_logps has "
            f"{tuple(policy_logps.shape)}; pass zeros for reference-free losses"
        )
    mask = prepare_mask(name, mask, policy_logps.shape, policy_logps.device)
    policy = torch.where(mask, policy_logps.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    ref = torch.where(mask, ref_logps.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    return policy, ref, mask


def scalar_labels(name: str, scores: Optional[Tensor], like: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Validates scalar labels ``[B, N]``; NaN labels mark the response invalid.

    Returns ``(labels, mask)`` with labels in ``like``'s dtype, 0 where invalid.
    """
    if scores is None:
        raise LossHyperparameterError(
            f"{name}: needs scores [B, N] (one scalar label per response: psi, rating or reward)"
        )
    if scores.dim() != 2 or scores.shape != like.shape:
        raise LossHyperparameterError(
            f"{name}: scores must be [B, N] = {tuple(like.shape)} scalar labels, got {tuple(scores.shape)}; "
            "per-dimension ratings [B, N, m] must first be reduced, e.g. with "
            "raypo.losses.labels.lipo_psi_from_ratings or aggregate_ratings"
        )
    labels = scores.to(device=like.device, dtype=like.dtype)
    mask = mask & ~torch.isnan(labels)
    labels = torch.where(mask, labels, torch.zeros((), dtype=like.dtype, device=like.device))
    return labels, mask


def detached_count(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A count as a float scalar without grad (denominators and metrics)."""
    return x.detach().to(dtype).sum()


def finish(
    numerator: Tensor,
    denominator: Tensor,
    metrics: dict[str, Tensor],
    rewards: Optional[Tensor],
) -> LossOutput:
    """Builds the :class:`LossOutput`, with a well-defined 0 loss when nothing was counted.

    ``max(denominator, 1)`` is exact whenever the denominator is a positive count; when it is 0 the
    numerator is an empty sum (0, still attached to the graph), so ``backward()`` works and yields zero
    gradients instead of NaN.
    """
    denominator = denominator.detach()
    loss = numerator / denominator.clamp(min=1.0)
    metrics = {k: v.detach() for k, v in metrics.items()}
    metrics["all_skipped"] = (denominator == 0).to(denominator.dtype)
    return LossOutput(
        loss=loss,
        numerator=numerator,
        denominator=denominator,
        metrics=metrics,
        rewards=None if rewards is None else rewards.detach(),
    )


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``log sum_{mask} exp(x)`` along ``dim``; rows without a valid entry give about ``NEG_FILL``."""
    filled = torch.where(mask, x, torch.full((), NEG_FILL, dtype=x.dtype, device=x.device))
    return torch.logsumexp(filled, dim=dim)


def masked_log_softmax(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """log softmax restricted to the valid entries; 0 at masked entries (never -inf)."""
    out = x - masked_logsumexp(x, mask, dim=dim).unsqueeze(dim)
    return torch.where(mask, out, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_softmax(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """softmax restricted to the valid entries; exactly 0 at masked entries."""
    return torch.where(mask, masked_log_softmax(x, mask, dim).exp(), torch.zeros((), dtype=x.dtype,
                                                                                  device=x.device))


def pair_mask(mask: Tensor) -> Tensor:
    """``[B, N, N]``: both responses of the pair (i, j) are valid."""
    return mask.unsqueeze(-1) & mask.unsqueeze(-2)


def row_has_valid(mask: Tensor) -> Tensor:
    """``[B]``: the prompt has at least one real response (fully padded rows never count)."""
    return mask.any(dim=-1)


def check_choice(name: str, key: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise LossHyperparameterError(f"{name}: {key}={value!r} is not one of {choices}")


def check_positive(name: str, key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise LossHyperparameterError(f"{name}: {key}={value!r} must be a number > 0")


def check_range(name: str, key: str, value: float, lo: float, hi: float) -> None:
    if not (isinstance(value, (int, float)) and lo <= value <= hi):
        raise LossHyperparameterError(f"{name}: {key}={value!r} must be in [{lo}, {hi}]")

