"""Optimizer and learning-rate schedule from raypo's config."""

from __future__ import annotations

import math

import torch

from raypo.config import OptimizerConfig


def build_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (a client optimizer; DeepSpeed wraps it for ZeRO)."""
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def lr_multiplier(step: int, *, total_steps: int, cfg: OptimizerConfig) -> float:
    """lr(step) / lr: linear warmup over ``warmup_steps``, then cosine / linear decay to ``min_lr_ratio``.

    cosine: m = r + (1 - r)·½(1 + cos(π·p)), linear: m = r + (1 - r)(1 - p), with p the fraction of the
    post-warmup steps done and r = min_lr_ratio.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    r = cfg.min_lr_ratio
    if cfg.lr_scheduler == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return r + (1.0 - r) * (1.0 - progress)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps=total_steps, cfg=cfg))
