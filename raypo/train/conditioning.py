"""Lambda conditioning in the training loop (``lambdas.condition: prompt``, docs/steering.md).

A read micro-batch holds plain prompts. Before its forwards, each prompt is re-rendered with the lambda the
loss will weight it by (:func:`raypo.data.conditioning.conditioned_prompt_ids`), so the policy scores
log pi(y | x, lambda). The reference must score the plain prompt x: when it runs online, its values are
computed on the plain micro-batch first and carried in the batch's ``ref_logps`` / ``ref_entropy`` columns,
exactly where precomputed values would be, so every later step (token-budget packing, response chunks,
metrics) reads them the same way in both reference modes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import torch

from raypo.config import RaypoConfig
from raypo.data.conditioning import PromptConditioning, conditioned_prompt_ids, install_chat_template
from raypo.model.batch import ListwiseBatch
from raypo.model.listwise import grouped_logprobs
from raypo.train.objective import Objective


def conditioning_of(cfg: RaypoConfig, dims: Optional[list[str]]) -> Optional[PromptConditioning]:
    """The run's :class:`PromptConditioning`, or None when ``lambdas.condition`` is ``none``."""
    if cfg.lambdas.condition != "prompt":
        return None
    if not dims:
        raise ValueError("lambdas.condition=prompt needs the dataset's dimension names (data.dimensions, or "
                         "the dataset's schema metadata); this dataset has none")
    return PromptConditioning(tuple(dims), template=cfg.lambdas.condition_template,
                              weight_format=cfg.lambdas.condition_weight_format)


@dataclass
class BatchConditioner:
    """Renders a batch's prompts with their lambdas; holds the tokenizer (its chat template wrapped, so the
    checkpoints it is saved with can be conditioned by plain transformers)."""

    conditioning: PromptConditioning
    tokenizer: Any

    def __post_init__(self) -> None:
        install_chat_template(self.tokenizer, self.conditioning)

    def __call__(self, batch: ListwiseBatch, lam: torch.Tensor) -> ListwiseBatch:
        """``batch`` with prompt b rendered at ``lam[b]`` (``lam``: [B, m], or [m] for every prompt)."""
        if batch.prompt_messages is None:
            raise ValueError("lambdas.condition=prompt needs the prompts' messages in the tokenised data "
                             "(the prompt_messages column); re-tokenise the data with this raypo version")
        lam = lam.detach().double().cpu()
        rows = lam.expand(batch.num_groups, -1) if lam.dim() == 1 else lam
        prompts = [conditioned_prompt_ids(self.tokenizer, json.loads(messages), rows[b].tolist(),
                                          self.conditioning, batch.prompt_ids[b])
                   for b, messages in enumerate(batch.prompt_messages)]
        return ListwiseBatch(prompts, batch.response_ids, batch.num_responses, extras=dict(batch.extras),
                             response_masks=batch.response_masks, prompt_messages=batch.prompt_messages)


def with_reference_columns(objective: Objective, reference: Any, batch: ListwiseBatch, *,
                           prefix_sharing: bool, per_group: bool) -> ListwiseBatch:
    """``batch`` carrying the online reference's values on its own (plain) prompts as the ``ref_logps``
    (summed) and, for MallowsPO, ``ref_entropy`` columns; unchanged when there is no online reference or
    the data already carries them."""
    needs_entropy = objective.spec.needs_dispersion
    carried = "ref_logps" in batch.extras and (not needs_entropy or "ref_entropy" in batch.extras)
    if reference is None or carried:
        return batch
    with torch.no_grad():
        out = grouped_logprobs(reference, batch, prefix_sharing=prefix_sharing, with_entropy=needs_entropy,
                               per_group=per_group)
    extras = {**batch.extras, "ref_logps": out.logps.detach().float().cpu()}
    if needs_entropy:
        extras["ref_entropy"] = out.entropy.detach().float().cpu()
    return ListwiseBatch(batch.prompt_ids, batch.response_ids, batch.num_responses, extras=extras,
                         response_masks=batch.response_masks, prompt_messages=batch.prompt_messages)


def evaluation_lambdas(dims: list[str]) -> list[tuple[str, torch.Tensor]]:
    """The lambdas a conditioned model is evaluated at during training: uniform (metrics ``eval/...``) and
    each one-hot e_k (``eval_at_<dimension>/...``)."""
    m = len(dims)
    out = [("eval/", torch.full((m,), 1.0 / m))]
    for k, name in enumerate(dims):
        out.append((f"eval_at_{name}/", torch.nn.functional.one_hot(torch.tensor(k), m).double()))
    return out
