"""Ranking evaluation of a trained policy at chosen lambdas (``raypo eval``, docs/steering.md).

For each held-out list (prompt x, responses y_1..y_N rated on m dimensions) and each lambda::

    s_i(lambda) = beta * (logp_pi(y_i | x, lambda) - logp_ref(y_i | x))        [N] implicit rewards

with log-probs reduced as the model's loss reduces them (summed, or divided by the token count:
``raypo_model.json``), the reference scoring the plain prompt, and ``x, lambda`` the conditioned prompt of a
lambda-conditioned policy (the plain prompt otherwise, so an unconditioned model gives the same rewards at
every lambda). Against each dimension's ratings it reports the pairwise accuracy over all pairs with
different ratings, NDCG (exp2 gain) and Kendall's tau-b, each averaged as the training metrics are
(:func:`raypo.losses.metrics.ranking_metrics`).

:class:`ListScorer` scores tokenised rows (a Ray Data callable class: one model per actor); it is the same
code in one process (``--local``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import torch

from raypo.losses.metrics import finalize_metrics, merge_metric_sums, ranking_metrics
from raypo.model.batch import collate_listwise

METRICS = ("pairwise_accuracy", "ndcg", "kendall_tau")
POLICY_COLUMN = "eval_policy_logps"  # [L][N] summed log-probs, one list per lambda
REFERENCE_COLUMN = "eval_ref_logps"  # [N]


@dataclass(frozen=True)
class ScorerSpec:
    """What a :class:`ListScorer` actor loads (plain values, so Ray can ship it)."""

    model_path: str
    reference: Optional[str]
    conditioning: Optional[dict[str, Any]]
    lambdas: tuple[tuple[float, ...], ...]
    dtype: str = "float32"


class ListScorer:
    """Tokenised listwise rows -> the same rows with the policy's log-probs at every lambda and the
    reference's, summed over each response's scored tokens."""

    def __init__(self, spec: ScorerSpec):
        from raypo.data.conditioning import PromptConditioning
        from raypo.model.listwise import ListwiseLogProbModel
        from raypo.model.loading import load_causal_lm, load_tokenizer, without_zero3_init
        from raypo.train.conditioning import BatchConditioner

        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with without_zero3_init():
            self.policy = ListwiseLogProbModel(load_causal_lm(spec.model_path, dtype=spec.dtype).eval()
                                               .to(self.device))
            self.reference = None
            if spec.reference is not None:
                self.reference = ListwiseLogProbModel(load_causal_lm(spec.reference, dtype=spec.dtype).eval()
                                                      .to(self.device))
        self.conditioner = None
        if spec.conditioning is not None:
            self.conditioner = BatchConditioner(PromptConditioning.from_dict(spec.conditioning),
                                                load_tokenizer(spec.model_path))

    def score(self, rows: list[dict[str, Any]]) -> tuple[list[list[list[float]]], list[list[float]]]:
        """``(policy [B][L][N_b], reference [B][N_b])`` summed log-probs."""
        from raypo.model.listwise import grouped_logprobs

        batch = collate_listwise(rows)
        counts = [len(r["response_ids"]) for r in rows]
        with torch.no_grad():
            ref = torch.zeros(batch.num_groups, batch.num_responses)
            if self.reference is not None:
                ref = grouped_logprobs(self.reference, batch).logps.double().cpu()
            per_lambda = []
            for lam in self.spec.lambdas:
                seen = batch if self.conditioner is None else \
                    self.conditioner(batch, torch.tensor(lam, dtype=torch.float64))
                per_lambda.append(grouped_logprobs(self.policy, seen).logps.double().cpu())
        policy = [[lp[b, :n].tolist() for lp in per_lambda] for b, n in enumerate(counts)]
        return policy, [ref[b, :n].tolist() for b, n in enumerate(counts)]

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        policy, ref = self.score(rows)
        table = table.append_column(POLICY_COLUMN, pa.array(policy, type=pa.list_(pa.list_(pa.float64()))))
        return table.append_column(REFERENCE_COLUMN, pa.array(ref, type=pa.list_(pa.float64())))


def _reduce(logps: torch.Tensor, num_tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    return logps / num_tokens.clamp(min=1) if reduction == "mean" else logps


def lambda_metrics(rows: Sequence[dict[str, Any]], *, num_lambdas: int, dimensions: Sequence[str],
                   beta: float, reduction: str) -> list[dict[str, dict[str, float]]]:
    """Per lambda: ``{"pairwise_accuracy": {dim: v}, "ndcg": {...}, "kendall_tau": {...}}`` over ``rows``
    (scored by :class:`ListScorer`)."""
    sums: list[dict] = [{} for _ in range(num_lambdas)]
    for start in range(0, len(rows), 64):
        chunk = list(rows[start:start + 64])
        batch = collate_listwise(chunk, per_response_keys=("scores",))
        mask, n = batch.response_mask(), batch.num_responses
        tokens = batch.num_scored_tokens().double()
        ref = _pad([r[REFERENCE_COLUMN] for r in chunk], n)
        labels = batch.extras["scores"].double()
        for j in range(num_lambdas):
            pol = _pad([r[POLICY_COLUMN][j] for r in chunk], n)
            rewards = beta * (_reduce(pol, tokens, reduction) - _reduce(ref, tokens, reduction))
            sums[j] = merge_metric_sums(sums[j], ranking_metrics(rewards, labels, mask, ndcg_ks=(None,),
                                                                 dim_names=list(dimensions)))
    out = []
    for s in sums:
        final = finalize_metrics(s)
        out.append({metric: {d: final.get(f"{metric}/{d}", float("nan")) for d in dimensions}
                    for metric in METRICS})
    return out


def _pad(values: Sequence[Sequence[float]], n: int) -> torch.Tensor:
    out = torch.zeros(len(values), n, dtype=torch.float64)
    for b, v in enumerate(values):
        out[b, :len(v)] = torch.tensor(list(v), dtype=torch.float64)
    return out
