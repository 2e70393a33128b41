"""The synthetic dataset: seeded, short, multi-dimension, learnable, dimensions in partial conflict."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from raypo.data.synthetic import DIMENSIONS, generate, generate_table, parse_synthetic_uri, rate
from raypo.data.validate import report_from_outcomes


def test_same_seed_same_rows_other_seed_other_rows():
    assert generate_table(64, seed=3).equals(generate_table(64, seed=3), check_metadata=True)
    assert not generate_table(64, seed=3).equals(generate_table(64, seed=4))
    assert [r.prompt_id for r in generate(2, seed=1)] == ["synth-1-000000", "synth-1-000001"]


def test_rows_are_valid_listwise_records_with_four_dimensions():
    from raypo.data.formats import ConvertOptions
    from raypo.data.groups import convert_records

    table = generate_table(100, seed=0)
    res = convert_records(table.to_pylist(), "listwise", ConvertOptions(dimensions=list(DIMENSIONS)))
    assert res.report.accepted_rows == 100 and not res.report.rejected and not res.report.repaired
    for rec in res.records:
        assert len(rec.responses) == 4 and len(set(rec.responses)) == 4
        assert all(1.0 <= v <= 5.0 for row in rec.scores for v in row)


def test_texts_are_short_for_the_tiny_tokenizer(tiny_tokenizer):
    recs = generate(200, seed=0)
    def n_tokens(text):
        return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])

    p_tok = max(n_tokens(r.prompt[0]["content"]) for r in recs)
    r_tok = max(n_tokens(y) for r in recs for y in r.responses)
    assert p_tok + 7 < 40 and r_tok + 2 < 24  # + chat-template tokens (bos, role markers, end, newlines)


def test_dimensions_mostly_agree_but_partly_conflict():
    recs = generate(400, seed=0)
    scores = np.concatenate([np.array(r.scores) for r in recs])  # [400*4, 4]
    corr = np.corrcoef(scores.T)
    assert (corr[np.triu_indices(4, 1)] > 0.3).all()  # mostly agree
    disagree = 0
    for r in recs:
        s = np.array(r.scores)
        for i, j in itertools.combinations(range(4), 2):
            d = np.sign(s[i] - s[j])
            disagree += (d > 0).any() and (d < 0).any()
    assert disagree > 0.1 * len(recs) * 6  # many pairs are ordered differently by two dimensions


def test_preferences_follow_easy_surface_features():
    """The ranking by mean rating mostly follows the opener alone (what a tiny model learns first)."""
    agree = total = 0
    for r in generate(400, seed=0):
        mean = np.array(r.scores).mean(1)
        polite = [2 if y.startswith(("Sure!", "Thanks!")) else 0 if y.startswith(("Ugh.", "No.")) else 1
                  for y in r.responses]
        for i, j in itertools.combinations(range(4), 2):
            if mean[i] != mean[j] and polite[i] != polite[j]:
                total += 1
                agree += (mean[i] > mean[j]) == (polite[i] > polite[j])
    assert agree / total > 0.85


def test_rubric_conflict_on_detail():
    from raypo.data.synthetic import Properties

    detailed = Properties(polite=1, correct=1, hedged=0, keyword=1, detailed=1)
    brief = Properties(polite=1, correct=1, hedged=0, keyword=1, detailed=0)
    h, _, inst_brief_asked, _ = (np.array(rate(detailed, False)) - np.array(rate(brief, False))).tolist()
    assert h > 0 and inst_brief_asked < 0  # detail helps helpfulness, hurts following a "be brief" request


def test_uri():
    spec = parse_synthetic_uri("synthetic://default?num_prompts=32&seed=7")
    assert (spec.num_prompts, spec.seed, spec.num_responses) == (32, 7, 4)
    with pytest.raises(ValueError, match="unknown key"):
        parse_synthetic_uri("synthetic://default?prompts=3")
    assert report_from_outcomes([]).balanced
