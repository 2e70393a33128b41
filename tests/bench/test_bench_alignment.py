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


def test_overall_accuracy_orders_by_the_mean_rating_and_the_ceiling_shows_the_conflict(alignment) -> None:
    # two dimensions that disagree on pair (0, 1); response 2 has no rating on dimension 1
    scores = [[[1.0, 0.0], [0.0, 0.5], [0.0, None]]]
    assert alignment.mean_ratings(scores) == [[0.5, 0.25, 0.0]]
    assert alignment.overall_accuracy([[3.0, 2.0, 1.0]], scores) == (1.0, 3)
    assert alignment.overall_accuracy([[1.0, 2.0, 3.0]], scores) == (0.0, 3)
    assert alignment.overall_accuracy([[0.0, 0.0, 0.0]], scores) == (0.5, 3)  # the reference
    # ordered by the mean rating: dimension 0 right on both its pairs, dimension 1 wrong on its one pair
    assert alignment.ceiling_accuracy(scores, 0) == 1.0
    assert alignment.ceiling_accuracy(scores, 1) == 0.0
    # a tie of the mean rating counts half, as a tie of the rewards does
    assert alignment.ceiling_accuracy([[[1.0, 0.0], [0.0, 1.0]]], 0) == 0.5


def test_every_listed_loss_exists(alignment) -> None:
    from raypo.losses.registry import list_losses

    assert set(alignment.LOSSES) <= set(list_losses())


def _results(dims: list[str]) -> dict:
    gen = {"mean_score": {d: 0.5 for d in dims}, "reference_mean_score": {d: 0.25 for d in dims},
           "win_rate": {d: 0.75 for d in dims}, "wins": {d: 2 for d in dims}, "ties": {d: 1 for d in dims},
           "losses": {d: 1 for d in dims}, "compared": {d: 4 for d in dims}, "mean_words": 3.0,
           "mean_tokens": 5.0, "failed_ratings": {d: 0 for d in dims}}
    gen["win_rate"][dims[1]], gen["mean_score"][dims[1]] = 0.25, 0.0
    return {"mode": "smoke", "sizes": {"heldout_prompts": 4, "max_new_tokens": 8, "steps": 1},
            "dimensions": dims,
            "ceiling": {d: 0.9 for d in dims},
            "reference": {"heldout_pairwise_accuracy": {d: 0.5 for d in dims},
                          "heldout_overall_accuracy": 0.5,
                          "generation": {"num_prompts": 4, "mean_score": {d: 0.25 for d in dims},
                                         "mean_words": 7.0, "mean_tokens": 9.0, "source": "ref"}},
            "losses": {"dpo": {"train_s": 12.0, "heldout_pairwise_accuracy": {d: 0.6 for d in dims},
                               "heldout_overall_accuracy": 0.7, "overall_pairs": 10,
                               "generation": gen}}}


def test_the_table_says_per_dimension_whether_generations_beat_the_reference(alignment, tmp_path,
                                                                              curve_pixels) -> None:
    results = _results(["correctness", "conciseness"])
    table = alignment.markdown_table(results)
    assert ("| dpo | 0.700 (10 pairs) | 0.600 / 0.600 | 0.500 / 0.000 | 0.750 / 0.250 | 3.0 (5.0) | 12 s |"
            in table)
    assert ("| reference | 0.500 | 0.500 / 0.500 | 0.250 / 0.250 | 0.500 by definition | 7.0 (9.0) | - |"
            in table)
    assert "(the ceiling) | 1.000 | 0.900 / 0.900 |" in table
    assert "better: +0.250, win 0.750 (2/1/1 of 4)" in table and "worse: -0.250, win 0.250" in table
    png = alignment.plot(results, str(tmp_path / "a.png"))
    assert curve_pixels(open(png, "rb").read()) > 0
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{alignment.TABLE_BEGIN}\nold\n{alignment.TABLE_END}\nrest\n")
    assert alignment.write_doc_table(table, doc)
    text = doc.read_text()
    assert "old" not in text and table in text and text.startswith("intro") and text.endswith("rest\n")
    doc.write_text("no markers\n")
    assert not alignment.write_doc_table(table, doc) and doc.read_text() == "no markers\n"


def test_the_reference_is_generated_once_for_every_loss(alignment, monkeypatch) -> None:
    from raypo.eval import by_generation

    calls = []

    class Fake:
        def __init__(self, settings):
            self.workers = {}

        def __call__(self, source, rows):
            calls.append(source)
            return [source] * len(rows)

    monkeypatch.setattr(by_generation, "LocalGenerator", Fake)
    gen = alignment.ReferenceOnce(None, "REF")
    for policy in ("p1", "p2"):
        g = gen.for_policy()
        assert g("REF", [{}]) == ["REF"] and g(policy, [{}]) == [policy]
    assert calls == ["REF", "p1", "p2"]
