"""Validation with exact accounting on a corpus of bad rows: input rows = accepted + rejected, always."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from data_corpus import (
    CASES,
    DIMS,
    GOOD,
    MAX_PROMPT,
    MAX_RESPONSE,
    corpus_lines,
    expected_rejections,
    num_bad_kinds,
)

from raypo.data.pipeline import build_rows, process_rows
from raypo.data.validate import REJECT_REASONS, REPAIR_RULES, DataQualityError, ValidationReport


def _write_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(corpus_lines()) + "\n\n")  # a trailing blank line is not a row
    return path


def _cfg(data_cfg, path, tmp_path, **kw):
    return data_cfg(train_path=str(path), format="listwise", dimensions=list(DIMS),
                    max_prompt_length=MAX_PROMPT, max_response_length=MAX_RESPONSE, overlong="drop",
                    quarantine_path=str(tmp_path / "quarantine.jsonl"), **kw)


def test_corpus_has_at_least_20_kinds_of_bad_row():
    assert num_bad_kinds() >= 20
    assert len({c[2] for c in CASES if c[2]}) >= 20  # and at least 20 distinct reasons


def test_bad_row_corpus_exact_accounting_with_quarantine(tmp_path, data_cfg, tiny_tokenizer):
    path = _write_corpus(tmp_path)
    cfg = _cfg(data_cfg, path, tmp_path)
    rows, report, dims = process_rows(str(path), cfg, tiny_tokenizer, "train")

    n_lines = len(corpus_lines())
    repaired_ok = sum(1 for c in CASES if c[2] is None)
    assert report.input_rows == n_lines
    assert report.rejected == expected_rejections(with_tokenizer=True)
    assert report.accepted_rows == len(GOOD) + repaired_ok == len(rows)
    assert report.input_rows == report.accepted_rows + report.rejected_rows
    assert report.balanced and dims == DIMS
    assert report.repaired["numeric_string_score"] == 1
    assert report.repaired["derived_prompt_id"] == 1 and report.repaired["prompt_id_to_string"] == 1
    assert report.repaired["dropped_empty_response"] == 2  # one repaired row + the one then rejected
    assert report.repaired["missing_rating"] == 2  # "N/A" in r4 and in the rejected no-label row

    lines = [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert len(lines) == report.rejected_rows
    assert Counter(x["reason"] for x in lines) == report.rejected
    assert all(x["row"] and x["detail"] is not None and x["stage"] in ("convert", "tokenize") for x in lines)
    invalid = next(x for x in lines if x["reason"] == "invalid_json")
    assert invalid["row"] == CASES[0][1]  # the original line, verbatim
    assert {x["stage"] for x in lines if x["reason"].startswith("overlong")} == {"tokenize"}


def test_without_a_tokenizer_length_limits_are_not_checked(tmp_path, data_cfg):
    path = _write_corpus(tmp_path)
    _, report, _ = process_rows(str(path), _cfg(data_cfg, path, tmp_path), None, "train")
    assert report.rejected == expected_rejections(with_tokenizer=False) and report.balanced


def test_truncate_policy_repairs_instead_of_rejecting(tmp_path, data_cfg, tiny_tokenizer):
    path = _write_corpus(tmp_path)
    cfg = _cfg(data_cfg, path, tmp_path)
    cfg.overlong = "truncate"
    rows, report, _ = process_rows(str(path), cfg, tiny_tokenizer, "train")
    assert "overlong_prompt" not in report.rejected and report.repaired["truncated_prompt"] == 1
    assert report.repaired["truncated_response"] == 1
    assert max(r["prompt_length"] for r in rows) <= MAX_PROMPT
    assert max(max(r["response_lengths"]) for r in rows) <= MAX_RESPONSE


def test_reject_threshold_stops_the_run_with_the_report(tmp_path, data_cfg, tiny_tokenizer):
    path = _write_corpus(tmp_path)
    cfg = _cfg(data_cfg, path, tmp_path)  # default max_reject_fraction = 0.01
    with pytest.raises(DataQualityError) as err:
        build_rows(cfg, tiny_tokenizer)
    message = str(err.value)
    assert "data.max_reject_fraction=1.00%" in message and "invalid_json" in message
    assert err.value.report.rejected_rows == sum(expected_rejections(True).values())
    cfg.max_reject_fraction = 1.0
    train, evals, report = build_rows(cfg, tiny_tokenizer)
    assert len(train) + len(evals) == report.output_rows


def test_every_reason_and_rule_is_documented():
    doc = (__import__("pathlib").Path(__file__).parents[2] / "docs" / "data.md").read_text()
    for name in list(REJECT_REASONS) + list(REPAIR_RULES):
        assert f"`{name}`" in doc, f"{name} is not documented in docs/data.md"


def test_report_merge_and_format():
    a = ValidationReport(input_rows=3, accepted_rows=2, output_rows=2, rejected=Counter(invalid_json=1),
                         source="a")
    b = ValidationReport(input_rows=2, accepted_rows=2, output_rows=1, source="b")
    m = a.merge(b)
    assert m.input_rows == 5 and m.rejected_rows == 1 and m.balanced and m.source == "a + b"
    text = m.format()
    assert "invalid_json" in text and "20.00%" in text
