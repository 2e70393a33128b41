"""A corpus of bad (and repairable) listwise rows, as JSONL lines, with the expected accounting.

Used by the plain-Python and the Ray Data tests, which must both count every line exactly.
"""

from __future__ import annotations

import json
from collections import Counter

DIMS = ["helpfulness", "honesty"]
# Length limits for the tokenised checks: the good rows fit; the overlong ones do not.
MAX_PROMPT, MAX_RESPONSE = 64, 48


def _row(pid, prompt="Is the sky blue?", responses=("Yes, it is blue.", "No, it is green."),
         scores=((5, 4), (1, 2)), **extra):
    row = {"prompt_id": pid, "prompt": prompt,
           "responses": list(responses) if isinstance(responses, (list, tuple)) else responses,
           "scores": [list(s) if isinstance(s, (list, tuple)) else s for s in scores]}
    row.update(extra)
    return row


def _line(obj) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj)


GOOD = [
    _row("good-1"),
    _row("good-2", prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         responses=("4", "5", "22"), scores=((5, 5), (1, 1), (2, None)), ranks=[1, 3, 2]),
    _row("good-3", scores=((None, 4), (None, 2))),  # one dimension missing everywhere: still labelled
]

# (kind of bad row, the row or raw line, expected reason or None when repaired and accepted)
CASES = [
    ("malformed JSON line", '{"prompt_id": "x", "prompt": ', "invalid_json"),
    ("JSON array instead of an object", "[1, 2, 3]", "not_a_record"),
    ("JSON string instead of an object", '"just text"', "not_a_record"),
    ("no responses field", {"prompt_id": "b1", "prompt": "q", "scores": []}, "missing_field"),
    ("no prompt field", {"prompt_id": "b2", "responses": ["a", "b"], "scores": [[1, 1], [2, 2]]},
     "missing_field"),
    ("responses is a string", _row("b3", responses="a, b"), "wrong_type"),
    ("prompt_id is an object", _row({"id": 1}), "wrong_type"),
    ("a score row is a number", _row("b4", scores=(5, (1, 2))), "wrong_type"),
    ("empty prompt string", _row("b5", prompt="   "), "empty_prompt"),
    ("unknown message role", _row("b6", prompt=[{"role": "robot", "content": "hi"}]), "invalid_prompt"),
    ("prompt ends with the assistant", _row("b7", prompt=[{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello"}]),
     "invalid_prompt"),
    ("message without content", _row("b8", prompt=[{"role": "user"}]), "invalid_prompt"),
    ("numeric response", _row("b9", responses=("fine", 42)), "non_text_response"),
    ("null response", _row("b10", responses=("fine", None)), "non_text_response"),
    ("single response", _row("b11", responses=("only one",), scores=((1, 1),)), "too_few_responses"),
    ("second response blank, dropped", _row("b12", responses=("fine", "  ")), "too_few_responses"),
    ("identical responses", _row("b13", responses=("same", "same")), "identical_responses"),
    ("three score rows for two responses", _row("b14", scores=((1, 1), (2, 2), (3, 3))), "length_mismatch"),
    ("ranks of the wrong length", _row("b15", ranks=[1]), "length_mismatch"),
    ("a score row with one value", _row("b16", scores=((1,), (2, 2))), "dimension_mismatch"),
    ("word rating", _row("b17", scores=(("good", 1), (2, 2))), "unparseable_rating"),
    ("boolean rating", _row("b18", scores=((True, 1), (2, 2))), "unparseable_rating"),
    ("NaN score", '{"prompt_id": "b19", "prompt": "q", "responses": ["a", "b"], '
                  '"scores": [[NaN, 1], [2, 2]]}', "non_finite_score"),
    ("infinite score", '{"prompt_id": "b20", "prompt": "q", "responses": ["a", "b"], '
                       '"scores": [[Infinity, 1], [2, 2]]}', "non_finite_score"),
    ("rank zero", _row("b21", ranks=[0, 1]), "invalid_rank"),
    ("fractional rank", _row("b22", ranks=[1.5, 2]), "invalid_rank"),
    ("NaN reference log-prob", '{"prompt_id": "b23", "prompt": "q", "responses": ["a", "b"], '
                               '"scores": [[1, 1], [2, 2]], "ref_logps": [NaN, -1.0]}', "invalid_reference"),
    ("no rating and no rank", _row("b24", scores=((None, None), (None, "N/A"))), "no_labels"),
    ("exact duplicate of good-1", _row("good-1"), "duplicate_row"),
    ("id shared by two different rows (1)", _row("dup", responses=("x", "y")), "duplicate_prompt_id"),
    ("id shared by two different rows (2)", _row("dup", responses=("x", "z")), "duplicate_prompt_id"),
    ("over-long prompt", _row("b25", prompt="why " * 200), "overlong_prompt"),
    ("over-long response", _row("b26", responses=("fine", "word " * 200)), "overlong_response"),
    # Repaired rows (accepted):
    ("numeric string score", _row("r1", scores=(("4.5", 1), (2, 2))), None),
    ("one blank response among three",
     _row("r2", responses=("a", "", "c"), scores=((1, 1), (2, 2), (3, 3))), None),
    ("no prompt id", {k: v for k, v in _row("r3", responses=("p", "q")).items() if k != "prompt_id"}, None),
    ("integer prompt id", _row(123, responses=("m", "n")), None),
    ("N/A rating", _row("r4", scores=(("N/A", 1), (2, 2))), None),
    ("flat scores are not allowed with two dimensions", _row("b27", scores=(1, 2)), "wrong_type"),
]

TOKEN_REASONS = {"overlong_prompt", "overlong_response"}


def corpus_lines() -> list[str]:
    return [_line(r) for r in GOOD] + [_line(c[1]) for c in CASES]


def expected_rejections(with_tokenizer: bool) -> Counter:
    """Reasons counted when the corpus is processed (overlong rows pass without a tokenizer)."""
    return Counter(c[2] for c in CASES if c[2] is not None and (with_tokenizer or c[2] not in TOKEN_REASONS))


def num_bad_kinds() -> int:
    return sum(1 for c in CASES if c[2] is not None)
