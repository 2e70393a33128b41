"""Loop-based python re-statements of the spec formulas, checked against the vectorised losses on random
padded batches (ties in labels and scores included)."""

from __future__ import annotations

import math

import pytest
import torch

from raypo.losses import listwise_loss

D64 = torch.float64


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _batch(seed: int, b: int = 4, n: int = 7):
    g = torch.Generator().manual_seed(seed)
    ref = -30 + 5 * torch.randn(b, n, generator=g, dtype=D64)
    policy = ref + 4 * torch.randn(b, n, generator=g, dtype=D64)
    psi = torch.randint(0, 4, (b, n), generator=g).to(D64) / 3  # many label ties
    lengths = torch.tensor([n, 5, 3, 2][:b])
    mask = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)
    policy[1, 1] = policy[1, 0] - ref[1, 0] + ref[1, 1]  # a tie in s within a list
    return policy, ref, psi, mask, lengths.tolist()


def _ref_lambda(s: list[float], y: list[float], n_pad: int, *, scale: str, normalize: bool, topn: int | None,
                base: float) -> tuple[float, int]:
    n = len(s)
    order = sorted(range(n), key=lambda i: (-s[i], i))  # stable, descending
    rank = {i: r + 1 for r, i in enumerate(order)}

    def disc(r: int) -> float:
        return 0.0 if topn is not None and r > topn else math.log(base) / math.log(1 + r)

    gains = [2**v - 1 for v in y]
    if normalize:
        ideal = sorted(gains, reverse=True)
        idcg = sum(gv * disc(r + 1) for r, gv in enumerate(ideal))
        gains = [gv / (idcg if idcg != 0 else 1.0) for gv in gains]
    c = {"padded": n_pad, "valid": n, "none": 1}[scale]
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(n):
            if y[i] > y[j]:
                pairs += 1
                delta = c * abs(gains[i] - gains[j]) * abs(disc(rank[i]) - disc(rank[j]))
                total += delta * _softplus(-(s[i] - s[j]))
    return total, pairs


@pytest.mark.parametrize("scale", ["padded", "valid", "none"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("topn", [None, 2])
@pytest.mark.parametrize("reduction", ["rax", "paper", "per_list_mean", "sum"])
def test_lipo_lambda_against_loops(scale: str, normalize: bool, topn: int | None, reduction: str) -> None:
    policy, ref, psi, mask, lengths = _batch(1)
    beta, base = 0.3, 2.0
    out = listwise_loss("lipo_lambda", policy, ref, mask=mask, scores=psi, beta=beta, scale=scale,
                        normalize=normalize, topn=topn, reduction=reduction)
    s = (beta * (policy - ref)).tolist()
    per = [_ref_lambda(s[b][:n], psi[b, :n].tolist(), policy.shape[1], scale=scale, normalize=normalize,
                       topn=topn, base=base) for b, n in enumerate(lengths)]
    if reduction == "rax":
        want = sum(t for t, _ in per) / sum(p for _, p in per)
    elif reduction == "paper":
        want = sum(t for t, _ in per) / len(per)
    elif reduction == "sum":
        want = sum(t for t, _ in per)
    else:
        kept = [t / p for t, p in per if p]
        want = sum(kept) / len(kept)
    assert out.loss.item() == pytest.approx(want, rel=1e-12)


def _allrank_lambda_rank(s: list[float], y: list[float], log: str = "natural", eps: float = 1e-10) -> float:
    """docs/loss_reference.md §2.10, allRank lambdaLoss(weighing_scheme="lambdaRank_scheme", reduction="sum")
    on one list
    (valid items only, no ties in s): positions after sorting the predictions descending, D = log2(1 + pos),
    G = (2^y - 1) / maxDCG, Delta_ij = |1/D_i - 1/D_j| * |G_i - G_j|, loss = -sum_{y_i > y_j} log(
    sigma(s_i - s_j)^Delta_ij) (natural or binary log)."""
    n = len(s)
    by_pred = sorted(range(n), key=lambda i: -s[i])
    pos = {i: p + 1 for p, i in enumerate(by_pred)}
    ideal = sorted(y, reverse=True)
    max_dcg = max(sum((2**v - 1) / math.log2(1 + k + 1) for k, v in enumerate(ideal)), eps)
    gain = [(2 ** v - 1) / max_dcg for v in y]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if y[i] > y[j]:
                delta = abs(1 / math.log2(1 + pos[i]) - 1 / math.log2(1 + pos[j])) * abs(gain[i] - gain[j])
                total += delta * _softplus(-(s[i] - s[j]))  # -log(sigma(d)^Delta) = Delta * softplus(-d)
    return total if log == "natural" else total / math.log(2)


def test_lipo_lambda_sum_is_allrank_lambda_loss() -> None:
    """docs/loss_reference.md §2.10: allRank's lambdaLoss with lambdaRank_scheme and natural log =
    lipo_lambda_loss(
    normalize=True, scale="none", reduction="sum"); its default binary log is that / ln 2."""
    policy, ref, psi, mask, lengths = _batch(5)
    policy[1, 1] += 0.37  # no ties in s (allRank's torch sort leaves the order of ties unspecified)
    beta = 0.3
    out = listwise_loss("lipo_lambda", policy, ref, mask=mask, scores=psi, beta=beta, normalize=True,
                        scale="none", reduction="sum")
    s = (beta * (policy - ref)).tolist()
    want = sum(_allrank_lambda_rank(s[b][:n], psi[b, :n].tolist()) for b, n in enumerate(lengths))
    assert out.loss.item() == pytest.approx(want, rel=1e-12)
    binary = sum(_allrank_lambda_rank(s[b][:n], psi[b, :n].tolist(), "binary") for b, n in enumerate(lengths))
    assert out.loss.item() / math.log(2) == pytest.approx(binary, rel=1e-12)


def test_list_mle_against_loops() -> None:
    policy, ref, psi, mask, lengths = _batch(2)
    beta = 0.2
    out = listwise_loss("lipo_list_mle", policy, ref, mask=mask, scores=psi, beta=beta)
    s = (beta * (policy - ref)).tolist()
    total = 0.0
    for b, n in enumerate(lengths):
        order = sorted(range(n), key=lambda i: (-psi[b, i].item(), i))  # stable: ties keep index order
        for k in range(n):
            tail = [s[b][order[j]] for j in range(k, n)]
            m = max(tail)
            total -= s[b][order[k]] - (m + math.log(sum(math.exp(t - m) for t in tail)))
    assert out.loss.item() == pytest.approx(total / len(lengths), rel=1e-12)


@pytest.mark.parametrize("loss", ["lipo_pair_logistic", "lipo_pair_hinge"])
def test_pair_losses_against_loops(loss: str) -> None:
    policy, ref, psi, mask, lengths = _batch(3)
    beta = 0.25
    out = listwise_loss(loss, policy, ref, mask=mask, scores=psi, beta=beta)
    s = (beta * (policy - ref)).tolist()
    total, pairs = 0.0, 0
    for b, n in enumerate(lengths):
        for i in range(n):
            for j in range(n):
                if psi[b, i] > psi[b, j]:
                    d = s[b][i] - s[b][j]
                    total += _softplus(-d) if loss == "lipo_pair_logistic" else max(0.0, 1 - d)
                    pairs += 1
    assert out.loss.item() == pytest.approx(total / pairs, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_mpo_against_loops(alpha: float) -> None:
    policy, ref, psi, mask, lengths = _batch(4)
    scores = psi * 10
    beta = 0.1
    out = listwise_loss("mpo", policy, ref, mask=mask, scores=scores, beta=beta, alpha=alpha)
    s = (beta * (policy - ref)).tolist()
    total, counted = 0.0, 0
    for b, n in enumerate(lengths):
        sc = scores[b, :n].tolist()
        mean = sum(sc) / n
        pos = [i for i in range(n) if sc[i] > mean]
        if not pos:
            continue
        r = [s[b][i] + alpha * abs(sc[i] - mean) for i in range(n)]
        total += math.log(sum(math.exp(v) for v in r)) - math.log(sum(math.exp(r[i]) for i in pos))
        counted += 1
    assert out.denominator.item() == counted
    assert out.loss.item() == pytest.approx(total / counted, rel=1e-12)
