"""bench/alignment.py's held-out metric: implicit-reward pairwise accuracy per dimension (pure Python)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def alignment(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.alignment

    return bench.alignment


def test_pairs_with_different_ratings_count_and_reward_ties_are_half(alignment) -> None:
    scores = [[[1.0, 0.2], [0.0, 0.2], [None, 0.9]]]  # dimension 0: one pair (0, 1); dimension 1: two
    assert alignment.pairwise_accuracy([[2.0, 1.0, 0.0]], scores, 0) == (1.0, 1)
    assert alignment.pairwise_accuracy([[1.0, 2.0, 0.0]], scores, 0) == (0.0, 1)
    assert alignment.pairwise_accuracy([[0.0, 0.0, 0.0]], scores, 1) == (0.5, 2)  # the reference
    assert alignment.pairwise_accuracy([[0.0, 0.0, 3.0]], scores, 1) == (1.0, 2)


def test_every_listed_loss_exists(alignment) -> None:
    from raypo.losses.registry import list_losses

    assert set(alignment.LOSSES) <= set(list_losses())
