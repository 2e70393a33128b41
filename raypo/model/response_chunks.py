"""Response chunks: exact gradients of a loss coupling N responses, with memory set by a chunk.

A listwise loss L(s) depends on the N sequence log-probs s_1..s_N of a group, so by the chain rule

    dL/dtheta = sum_i (dL/ds_i) * ds_i/dtheta = d/dtheta [ sum_i stopgrad(dL/ds_i) * s_i(theta) ].

:func:`listwise_backward` uses this in two passes (GroupDPO's decoupled backward, with prefix sharing):

1. no-grad forward for all N responses -> s [B, N]; the loss on a leaf copy of s gives g = dL/ds [B, N]
   (a tiny tensor) plus the loss value and metrics;
2. for each chunk of k response columns: forward prompt + those responses (prefix-shared) with grad and
   backpropagate sum_{b, i in chunk} g[b, i] * s[b, i].

The gradient is exact (equal to the direct path up to float rounding); activation memory is that of one
chunk (prompt + k responses) instead of all N; the price is one extra no-grad forward (~+33 % policy FLOPs).
With a single chunk the two passes collapse into the direct path (one forward with grad, one backward).

ZeRO-3: every data-parallel rank must run the same number of forwards and backwards (collectives run inside
them). The number of chunks therefore comes from the padded list width ``batch.num_responses`` (collate with
``num_responses=`` a maximum agreed across ranks) or from an explicit ``num_chunks``; a chunk that holds no
response on this rank still runs a forward on the prompts and a zero-weighted backward. Each chunk's
forward must go through the engine (``engine(...)``, which :func:`grouped_logprobs` does when given the
engine): DeepSpeed's stage 3 only *accumulates* (rather than overwrites) gradient partitions across
backwards when a forward of the engine sits between them.

The model must be deterministic between the two passes (no dropout; HF Llama has none by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from raypo.model.batch import ListwiseBatch
from raypo.model.listwise import LogProbOutput, grouped_logprobs

# loss_fn(policy_logps [B, N]) -> (numerator, denominator, metrics); the loss value is numerator / denominator
LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | float, dict]]


@dataclass
class ListwiseBackwardOutput:
    """What one micro-batch's forward/backward produced (all detached).

    logps: [B, N] policy log-prob sums (pass 1, or the direct pass); num_tokens, mask: [B, N].
    numerator, denominator: the loss_fn's values; ``loss = numerator / denominator``.
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor
    mask: torch.Tensor
    numerator: torch.Tensor
    denominator: torch.Tensor
    metrics: dict = field(default_factory=dict)
    num_forward: int = 0

    @property
    def loss(self) -> torch.Tensor:
        return self.numerator / self.denominator


def num_response_chunks(num_responses: int, chunk_size: int | None) -> int:
    """ceil(N / chunk_size); 1 when chunking is off (``chunk_size`` None or 0)."""
    if not chunk_size:
        return 1
    return max(1, math.ceil(num_responses / chunk_size))


def _default_backward(objective: torch.Tensor) -> None:
    objective.backward()


def _scale(numerator: torch.Tensor, denominator, loss_scale: float | None) -> torch.Tensor:
    """The objective actually backpropagated: numerator * loss_scale (default 1 / local denominator)."""
    if loss_scale is None:
        return numerator / torch.as_tensor(denominator, dtype=numerator.dtype, device=numerator.device)
    return numerator * loss_scale


def _detached(out: LogProbOutput, numerator, denominator, metrics, num_forward) -> ListwiseBackwardOutput:
    den = torch.as_tensor(denominator).detach()
    return ListwiseBackwardOutput(logps=out.logps.detach(), num_tokens=out.num_tokens, mask=out.mask,
                                  numerator=numerator.detach(), denominator=den, metrics=metrics,
                                  num_forward=num_forward)


def listwise_backward(
    model: nn.Module,
    batch: ListwiseBatch,
    loss_fn: LossFn,
    *,
    chunk_size: int | None = None,
    num_chunks: int | None = None,
    prefix_sharing: bool = True,
    loss_scale: float | None = None,
    backward_fn: Callable[[torch.Tensor], object] = _default_backward,
    per_group: bool = False,
) -> ListwiseBackwardOutput:
    """Forward and backward of ``loss_fn(logps)`` for one micro-batch, in response chunks.

    Args:
        model: causal LM, :class:`~raypo.model.listwise.ListwiseLogProbModel`, or a DeepSpeed engine
            around one.
        batch: the collated micro-batch; ``batch.num_responses`` (the padded N) sets the chunk count.
        loss_fn: ``policy_logps [B, N] -> (numerator, denominator, metrics)``; close over reference
            log-probs, scores and hyperparameters (e.g. a call of ``raypo.losses.listwise_loss``).
        chunk_size: responses per chunk (None/0: no chunking, one direct forward+backward).
        num_chunks: force this many chunks (a value agreed across ranks); with ``chunk_size`` None it
            derives chunk_size = ceil(N / num_chunks). Chunks past N are empty and still run.
        prefix_sharing: the layout of every forward (:mod:`raypo.model.layout`).
        loss_scale: backpropagate ``numerator * loss_scale``; None: ``numerator / denominator`` (local
            normalisation). For global normalisation pass world_size / (denominator summed over micro-batches
            and ranks): DeepSpeed averages gradients over data-parallel ranks.
        backward_fn: runs the backward of a scalar objective; ``engine.backward`` under DeepSpeed (it also
            divides by the gradient-accumulation steps and applies fp16 loss scaling).
        per_group: one forward per prompt group (:func:`~raypo.model.listwise.grouped_logprobs`), so the
            log-probs are bitwise those of each group scored alone (precomputed reference).
    """
    n = batch.num_responses
    if num_chunks is not None and num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if num_chunks is not None and not chunk_size:
        chunk_size = max(1, math.ceil(n / num_chunks))
    chunks = num_chunks if num_chunks is not None else num_response_chunks(n, chunk_size)

    if chunks == 1:  # direct path: one forward with grad, one backward
        out = grouped_logprobs(model, batch, prefix_sharing=prefix_sharing, per_group=per_group)
        numerator, denominator, metrics = loss_fn(out.logps)
        objective = _scale(numerator, denominator, loss_scale)
        if not objective.requires_grad:  # e.g. no valid pair on this rank: still backward (ZeRO-3)
            objective = objective + 0.0 * out.logps.sum()
        backward_fn(objective)
        return _detached(out, numerator, denominator, metrics, num_forward=1)

    # pass 1: all N log-probs without a graph, then g = dL/ds on a [B, N] leaf
    with torch.no_grad():
        out = grouped_logprobs(model, batch, prefix_sharing=prefix_sharing, per_group=per_group)
    scores = out.logps.detach().requires_grad_(True)
    with torch.enable_grad():
        numerator, denominator, metrics = loss_fn(scores)
        objective = _scale(numerator, denominator, loss_scale)
        (grad,) = torch.autograd.grad(objective, scores, allow_unused=True)
    grad = torch.zeros_like(scores) if grad is None else grad.detach()

    # pass 2: re-run chunks of response columns with grad; backprop sum(g * s) restricted to the chunk
    for c in range(chunks):
        start, stop = c * chunk_size, min((c + 1) * chunk_size, n)
        sub = batch.select_responses(start, max(start, stop))
        part = grouped_logprobs(model, sub, prefix_sharing=prefix_sharing)
        weights = grad[:, start:max(start, stop)].to(part.logps.dtype)
        backward_fn((part.logps * weights).sum())
    return _detached(out, numerator, denominator, metrics, num_forward=1 + chunks)
