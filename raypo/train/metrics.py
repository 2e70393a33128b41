"""Training and evaluation metrics as (sum, count) pairs: the loss as sum(numerators) / sum(denominators),
ranking metrics of the implicit rewards (per dimension too), a per-token KL estimate, and throughput."""

from __future__ import annotations

import math
from typing import Optional

import torch

from raypo.losses import LossOutput
from raypo.losses.metrics import finalize_metrics, ranking_metrics
from raypo.model.batch import ListwiseBatch
from raypo.train.collectives import MetricSums, all_reduce_metric_sums
from raypo.train.objective import Objective
from raypo.train.perf import FlopsModel, peak_flops
from raypo.train.reference import ReferenceOutputs

_ONE = torch.ones((), dtype=torch.float64)


#: LossOutput.metrics counters logged per step, as fractions of prompts: {loss's key: metric name}.
LOSS_COUNTERS = {"num_skipped": "skipped_prompt_fraction",
                 "num_missing_entropy": "missing_entropy_prompt_fraction"}


def scalar(value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One (sum, count) entry holding ``value``."""
    return torch.tensor(float(value), dtype=torch.float64), _ONE


def batch_metric_sums(objective: Objective, batch: ListwiseBatch, out: LossOutput,
                      policy_logps_raw: torch.Tensor, ref: ReferenceOutputs, prefix: str,
                      device: torch.device, lam: Optional[torch.Tensor] = None) -> MetricSums:
    """Loss, ranking metrics of the implicit rewards, KL estimate and token counts of one micro-batch."""
    mask = batch.response_mask().to(device)
    num_tokens = batch.num_scored_tokens().to(device)
    rewards = out.rewards.detach() if out.rewards is not None else None
    sums: MetricSums = {f"{prefix}loss_numerator": (out.numerator.detach().double().cpu(), _ONE),
                        f"{prefix}loss_denominator": (torch.as_tensor(out.denominator).double().cpu(), _ONE)}
    # Ranking metrics on the mean of the ratings, and per dimension when there are several.
    # The labels follow the objective's missing-rating rule and score reduction (docs/losses.md).
    labels, per_dim = objective.metric_labels(batch, device, lam)
    if rewards is not None and labels is not None:
        sums.update(ranking_metrics(rewards, labels, mask, prefix=prefix))
        if per_dim is not None and per_dim.dim() == 3 and per_dim.shape[-1] > 1:
            names = objective.dim_names if objective.dim_names and \
                len(objective.dim_names) == per_dim.shape[-1] else None
            sums.update(ranking_metrics(rewards, per_dim.to(device), mask, ndcg_ks=(None,), prefix=prefix,
                                        dim_names=names))
    # The loss's own counters, as fractions of the micro-batch's prompts (docs/losses.md): prompts skipped
    # (no usable contrast) and, for MallowsPO with missing_entropy=mean, prompts given phi = 1.
    groups = torch.tensor(float(batch.num_groups), dtype=torch.float64)
    for key, name in LOSS_COUNTERS.items():
        if key in out.metrics:
            sums[f"{prefix}{name}"] = (torch.as_tensor(out.metrics[key]).double().cpu().sum(), groups)
    # KL estimate on the data's responses, per token: mean over tokens of log pi - log pi_ref (k1).
    if objective.uses_reference:
        diff = torch.where(mask, policy_logps_raw.detach().float() - ref.raw_logps,
                           torch.zeros_like(ref.raw_logps))
        sums[f"{prefix}kl_per_token"] = (diff.sum().double().cpu(), num_tokens[mask].sum().double().cpu())
        sums[f"{prefix}reward_abs_mean"] = (rewards.abs()[mask].sum().double().cpu() if rewards is not None
                                            else torch.zeros((), dtype=torch.float64),
                                            mask.sum().double().cpu())
    return sums


def finalize(sums: MetricSums, prefix: str) -> dict[str, float]:
    """Per-metric means, and the loss as sum(numerators) / sum(denominators)."""
    num = sums.pop(f"{prefix}loss_numerator", None)
    den = sums.pop(f"{prefix}loss_denominator", None)
    out = finalize_metrics(sums)
    if num is not None and den is not None:
        out[f"{prefix}loss"] = float(num[0] / den[0]) if float(den[0]) > 0 else 0.0
    return {k: v for k, v in out.items() if isinstance(v, float) and math.isfinite(v)}


def window_metrics(window: MetricSums, elapsed: float, engine, device: torch.device, *, world_size: int = 1,
                   flops_model: Optional[FlopsModel] = None) -> dict[str, float]:
    """The logging window's metrics reduced over ranks: training means, throughput over the window's
    ``elapsed`` wall seconds (evaluations and checkpoints left out), LR, gradient norm, and the model FLOPs
    utilisation on a GPU of :data:`raypo.train.perf.PEAK_BF16_FLOPS` (:mod:`raypo.train.perf`)."""
    reduced = all_reduce_metric_sums(dict(window), device)
    elapsed = max(elapsed, 1e-9)
    zero = (torch.zeros(()), torch.zeros(()))
    tokens = float(reduced.pop("perf/tokens", zero)[0])
    prompts = float(reduced.pop("perf/prompts", zero)[0])
    padded = float(reduced.pop("perf/padded_tokens", zero)[0])
    pairs = float(reduced.pop("perf/attn_pairs", zero)[0])
    metrics = finalize(reduced, "train/")
    metrics["perf/tokens_per_s"] = tokens / elapsed
    metrics["perf/tokens_per_s_per_device"] = tokens / elapsed / max(world_size, 1)
    if padded > 0:  # real tokens / tokens the forwards ran, padding and zero-weight forwards included
        metrics["perf/padding_efficiency"] = tokens / padded
    metrics["perf/samples_per_s"] = prompts / elapsed
    peak = peak_flops(device)
    if flops_model is not None and peak is not None:
        metrics["perf/mfu"] = flops_model.flops(tokens, pairs) / (elapsed * max(world_size, 1) * peak)
    lr = engine.get_lr()
    metrics["train/lr"] = float(lr[0] if isinstance(lr, (list, tuple)) else lr)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics
