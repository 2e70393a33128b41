"""Ranking metrics (raypo.losses.metrics) against brute-force python references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from raypo.losses import listwise_loss
from raypo.losses.metrics import (
    finalize_metrics,
    merge_metric_sums,
    metric_sums_from_tensor,
    metric_sums_to_tensor,
    ranking_metrics,
)

D64 = torch.float64


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _ref_metrics(s: list[float], y: list[float], k: int | None) -> dict[str, float | None]:
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if y[i] > y[j]]
    acc = sum(s[i] > s[j] for i, j in pairs) / len(pairs) if pairs else None
    conc = sum(_sign(s[i] - s[j]) * _sign(y[i] - y[j]) for i, j in itertools.combinations(range(n), 2))
    ns = sum(s[i] != s[j] for i, j in itertools.combinations(range(n), 2))
    nl = sum(y[i] != y[j] for i, j in itertools.combinations(range(n), 2))
    tau = conc / math.sqrt(ns * nl) if ns and nl else None
    order = sorted(range(n), key=lambda i: (-s[i], i))
    cut = n if k is None else k
    dcg = sum((2 ** y[i] - 1) / math.log2(2 + r) for r, i in enumerate(order) if r < cut)
    ideal = sorted(y, reverse=True)
    idcg = sum((2**v - 1) / math.log2(2 + r) for r, v in enumerate(ideal) if r < cut)
    top1 = None if max(y) == min(y) else float(y[order[0]] == max(y))
    ndcg = dcg / idcg if idcg > 0 else None
    return {"pairwise_accuracy": acc, "kendall_tau": tau, "ndcg": ndcg, "top1": top1}


def test_metrics_match_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 7, generator=g, dtype=D64).round(decimals=1)  # some reward ties
    y = torch.randint(0, 4, (6, 7), generator=g).to(D64)
    lengths = [7, 5, 3, 7, 2, 6]
    mask = torch.arange(7).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    fin = finalize_metrics(ranking_metrics(s, y, mask, ndcg_ks=(None, 3)))
    refs = [_ref_metrics(s[b, :n].tolist(), y[b, :n].tolist(), None) for b, n in enumerate(lengths)]
    refs3 = [_ref_metrics(s[b, :n].tolist(), y[b, :n].tolist(), 3) for b, n in enumerate(lengths)]
    n_pairs = [sum(1 for i in range(n) for j in range(n) if y[b, i] > y[b, j]) for b, n in enumerate(lengths)]
    pooled = sum(r["pairwise_accuracy"] * c for r, c in zip(refs, n_pairs) if c) / sum(n_pairs)
    assert fin["pairwise_accuracy"] == pytest.approx(pooled, rel=1e-12)

    def mean(key: str, rs: list) -> float:
        vals = [r[key] for r in rs if r[key] is not None]
        return sum(vals) / len(vals)

    assert fin["kendall_tau"] == pytest.approx(mean("kendall_tau", refs), rel=1e-12)
    assert fin["ndcg"] == pytest.approx(mean("ndcg", refs), rel=1e-12)
    assert fin["ndcg@3"] == pytest.approx(mean("ndcg", refs3), rel=1e-12)
    assert fin["top1_accuracy"] == pytest.approx(mean("top1", refs), rel=1e-12)


def test_margins_and_step_zero() -> None:
    labels = torch.tensor([[0.2, 0.9, 0.5]], dtype=D64)
    s = torch.tensor([[0.1, 0.4, -0.3]], dtype=D64)
    fin = finalize_metrics(ranking_metrics(s, labels))
    assert fin["reward_margin"] == pytest.approx(0.4 - 0.1)
    assert fin["rewards_chosen"] == pytest.approx(0.4) and fin["rewards_rejected"] == pytest.approx(0.1)
    assert fin["rewards_mean"] == pytest.approx(0.2 / 3)
    zero = finalize_metrics(ranking_metrics(torch.zeros(1, 3, dtype=D64), labels))
    assert zero["pairwise_accuracy"] == 0.0  # ties count as wrong (TRL convention)
    assert math.isnan(zero["kendall_tau"])  # undefined with all rewards tied


def test_per_dimension_names_and_nan_labels() -> None:
    s = torch.tensor([[1.0, 0.0, -1.0]], dtype=D64)
    labels = torch.tensor([[[5.0, 1.0], [3.0, math.nan], [1.0, 4.0]]], dtype=D64)
    out = ranking_metrics(s, labels, dim_names=["helpfulness", "honesty"], prefix="eval/")
    fin = finalize_metrics(out)
    assert fin["eval/pairwise_accuracy/helpfulness"] == 1.0
    assert fin["eval/pairwise_accuracy/honesty"] == 0.0  # only the pair (2 > 0) exists and s disagrees
    assert out["eval/pairwise_accuracy/honesty"][1].item() == 1


def test_aggregation_across_micro_batches_and_ranks() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(8, 5, generator=g, dtype=D64)
    y = torch.rand(8, 5, generator=g, dtype=D64)
    full = ranking_metrics(s, y)
    merged = merge_metric_sums(ranking_metrics(s[:3], y[:3]), ranking_metrics(s[3:], y[3:]))
    names, packed = metric_sums_to_tensor(merged)
    back = metric_sums_from_tensor(names, packed)
    for k, (total, count) in full.items():
        assert back[k][0].item() == pytest.approx(total.item(), rel=1e-12, abs=1e-15)
        assert back[k][1].item() == count.item()


def test_loss_rewards_feed_metrics() -> None:
    policy = torch.tensor([[-10.0, -12.0, -11.0]], dtype=D64)
    ref = torch.tensor([[-11.0, -11.0, -11.0]], dtype=D64)
    psi = torch.tensor([[0.9, 0.1, 0.5]], dtype=D64)
    out = listwise_loss("lipo_lambda", policy, ref, scores=psi)
    fin = finalize_metrics(ranking_metrics(out.rewards, psi))
    assert fin["pairwise_accuracy"] == 1.0 and fin["kendall_tau"] == pytest.approx(1.0)
    assert fin["ndcg"] == pytest.approx(1.0)
