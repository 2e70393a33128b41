"""Validation with exact accounting: every input row is either accepted (possibly repaired) or rejected.

Rules are applied to each row after its converter (:mod:`raypo.data.formats`) has mapped it to a
:class:`~raypo.data.schema.ListwiseRecord`, then across rows (duplicate prompt ids), then at
tokenisation (over-long sequences). A row that breaks a rule is either *repaired* by a documented rule
(counted in :attr:`ValidationReport.repaired`) or *rejected* with one reason (counted in
:attr:`ValidationReport.rejected`, optionally written to a quarantine location with the original row).
Nothing is dropped silently::

    report.input_rows == report.accepted_rows + sum(report.rejected.values())

The reasons and repair rules are listed in :data:`REJECT_REASONS` and :data:`REPAIR_RULES` (and in
docs/data.md).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from raypo.data.schema import ROLES, ListwiseRecord, derive_prompt_id
from raypo.errors import RunError

REJECT_REASONS: dict[str, str] = {
    "invalid_utf8": "a JSONL line is not valid UTF-8 (the detail gives the line number and byte offset)",
    "invalid_json": "a JSONL line is not valid JSON",
    "not_a_record": "the row is not a mapping of fields (e.g. a JSON list or number)",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type (e.g. responses is a string, not a list)",
    "empty_prompt": "the prompt has no text",
    "invalid_prompt": "malformed prompt messages (unknown role, non-text content, not ending with the user)",
    "non_text_response": "a response is not a string (null, number, object)",
    "unsupported_response": "a response is a multi-message conversation rather than one assistant turn",
    "prompt_mismatch": "chosen and rejected conversations do not share the same prompt turns",
    "too_few_responses": "fewer than 2 usable responses remain",
    "identical_responses": "all responses are the same text, so there is nothing to prefer",
    "length_mismatch": "scores, ranks or reference values do not have one entry per response",
    "dimension_mismatch": "a response's score list does not have one value per dimension",
    "unparseable_rating": "a rating or score is not a number (e.g. 'good', '5 stars', true)",
    "rating_out_of_range": "a rating lies outside the source's scale (UltraFeedback: 1-5)",
    "non_finite_score": "a score is NaN or infinite",
    "missing_score": "a scored-format response has no score",
    "invalid_rank": "a rank is not an integer >= 1",
    "invalid_reference": "ref_logps / ref_entropy values are not finite numbers",
    "invalid_win_probs": "win_probs is not an N x N matrix of win probabilities in [0, 1]",
    "no_labels": "no rating and no rank: the row carries no preference",
    "duplicate_row": "an exact copy of another row (one copy is kept)",
    "duplicate_prompt_id": "several different rows share a prompt id (all copies are rejected)",
    "overlong_prompt": "the tokenised prompt exceeds data.max_prompt_length and data.overlong=drop",
    "overlong_response": "a tokenised response exceeds data.max_response_length and data.overlong=drop",
}

REPAIR_RULES: dict[str, str] = {
    "missing_rating": "a rating that is absent, '', 'N/A' (any case) or null is stored as null (missing)",
    "dropped_empty_response": "an empty or whitespace-only response is removed with its scores/rank",
    "dropped_unranked_response": "a ranked-format response without a rank is removed",
    "derived_prompt_id": "a missing or empty prompt_id is derived from the prompt and responses",
    "prompt_id_to_string": "a numeric prompt_id is converted to its decimal string",
    "string_prompt_to_messages": "a plain-string prompt becomes one user message",
    "flat_scores_reshaped": "a flat list of N scores with one dimension becomes [N][1]",
    "numeric_string_score": "a score given as a numeric string ('4.5') is parsed",
    "truncated_prompt": "an over-long prompt keeps its last data.max_prompt_length tokens",
    "truncated_response": "an over-long response keeps its first data.max_response_length tokens",
}

MISSING_STRINGS = frozenset({"", "n/a", "na", "none", "null"})


class RowRejected(Exception):
    """Raised inside a converter or rule: the row is rejected with ``reason`` (a key of REJECT_REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; add it to REJECT_REASONS")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DataQualityError(RunError):
    """Too many rows were rejected: the run stops before training, with the report."""

    def __init__(self, report: ValidationReport, max_reject_fraction: float, source: str = ""):
        self.report = report
        where = f" in {source}" if source else ""
        super().__init__(
            f"{report.rejected_rows} of {report.input_rows} rows ({report.reject_fraction:.2%}) were "
            f"rejected{where}, more than data.max_reject_fraction={max_reject_fraction:.2%}. Fix the data "
            "(see the reasons below and the quarantine file, data.quarantine_path) or raise "
            f"data.max_reject_fraction.\n{report.format()}"
        )


# ----------------------------------------------------------------------------------------------------
# Outcome of one row
# ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one output row: a record (accepted) or a rejection, with its repairs.

    ``source_rows`` is how many input rows the outcome stands for (> 1 when pairwise rows were merged),
    so that accounting stays in input rows.
    """

    record: Optional[ListwiseRecord] = None
    reason: Optional[str] = None
    detail: str = ""
    raw: Optional[str] = None  # the original input row (JSON) of a rejected row, for the quarantine
    repairs: list[str] = field(default_factory=list)
    source_rows: int = 1
    group_key: Optional[str] = None

    @property
    def accepted(self) -> bool:
        return self.reason is None

    def reject(self, reason: str, detail: str = "", raw: Optional[str] = None) -> Outcome:
        """This outcome turned into a rejection (keeps the source-row count and the original input row;
        only a row without one, e.g. a merged pairwise group, is quarantined as its listwise record)."""
        if raw is None and self.raw is None and self.record is not None:
            raw = json.dumps(self.record.to_row(), ensure_ascii=False, allow_nan=True)
        return Outcome(None, reason, detail, raw or self.raw, list(self.repairs), self.source_rows,
                       self.group_key)


@dataclass(frozen=True)
class UndecodableLine:
    """A JSONL line whose bytes are not valid UTF-8: rejected as ``invalid_utf8``, never a failed read.

    ``text`` is the line decoded with backslash escapes for the bad bytes (for the quarantine file);
    ``line`` is 1-based, ``offset`` the byte offset of the first bad byte in the file.
    """

    text: str
    path: str
    line: int
    offset: int
    byte: int

    @property
    def detail(self) -> str:
        return (f"line {self.line} of {self.path}: byte 0x{self.byte:02x} at byte offset {self.offset} is "
                "not valid UTF-8; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


UTF8_BOM = b"\xef\xbb\xbf"


def decode_jsonl_lines(lines: Iterable[bytes], path: str) -> Iterable[Any]:
    """Byte lines of one JSONL file -> ``str`` lines, or :class:`UndecodableLine` for a line that is not
    UTF-8. Blank lines are skipped; a UTF-8 byte-order mark at the start of the file is dropped."""
    offset = 0
    for number, raw in enumerate(lines, 1):
        start, body = offset, raw
        offset += len(raw)
        if number == 1 and body.startswith(UTF8_BOM):
            body, start = body[len(UTF8_BOM):], start + len(UTF8_BOM)
        body = body.rstrip(b"\r\n")
        if not body.strip():
            continue
        try:
            yield body.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield UndecodableLine(body.decode("utf-8", errors="backslashreplace"), path, number,
                                  start + exc.start, body[exc.start])


def raw_json(raw: Any) -> str:
    """The original row as JSON text for the quarantine (never fails: falls back to repr)."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, UndecodableLine):
        return raw.text
    try:
        return json.dumps(raw, ensure_ascii=False, allow_nan=True, default=repr)
    except (TypeError, ValueError):
        return repr(raw)


# ----------------------------------------------------------------------------------------------------
# Value parsing shared by converters
# ----------------------------------------------------------------------------------------------------


def parse_score(value: Any, what: str, repairs: list[str], *, native_strings: bool = False
                ) -> Optional[float]:
    """One rating/score -> float, or None when missing.

    * None is missing. A missing marker string ('', 'N/A', 'none', 'null', any case) is missing too and
      counts as the repair ``missing_rating``.
    * A numeric string is parsed; unless strings are the source's native form (``native_strings``, as
      in UltraFeedback) that counts as the repair ``numeric_string_score``.
    * Booleans and other strings or types are rejected as ``unparseable_rating``; NaN and infinities as
      ``non_finite_score``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise RowRejected("unparseable_rating", f"{what}={value!r} is a boolean, not a number")
    if isinstance(value, str):
        if value.strip().lower() in MISSING_STRINGS:
            repairs.append("missing_rating")
            return None
        try:
            out = float(value.strip())
        except ValueError:
            raise RowRejected("unparseable_rating", f"{what}={value!r} is not a number") from None
        if not native_strings:
            repairs.append("numeric_string_score")
    elif isinstance(value, (int, float)):
        out = float(value)
    else:
        raise RowRejected("unparseable_rating", f"{what}={value!r} ({type(value).__name__}) is not a number")
    if not math.isfinite(out):
        raise RowRejected("non_finite_score", f"{what}={value!r} is not finite")
    return out


def to_messages(prompt: Any, repairs: Optional[list[str]] = None, field_name: str = "prompt"
                ) -> list[dict[str, str]]:
    """A prompt (string or chat messages) -> validated messages; the last message must be the user's.

    A string becomes one user message; pass ``repairs`` to count that as ``string_prompt_to_messages``
    (only where messages are the source's native form).
    """
    if prompt is None:
        raise RowRejected("missing_field", f"{field_name} is missing")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowRejected("empty_prompt", f"{field_name} is an empty string")
        if repairs is not None:
            repairs.append("string_prompt_to_messages")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)):
        raise RowRejected("wrong_type", f"{field_name} is a {type(prompt).__name__}; give a string or a "
                                        "list of {role, content} messages")
    if not prompt:
        raise RowRejected("empty_prompt", f"{field_name} is an empty list of messages")
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowRejected("invalid_prompt", f"{field_name}[{i}]={m!r} is not a {{role, content}} message")
        if m["role"] not in ROLES:
            raise RowRejected("invalid_prompt", f"{field_name}[{i}].role={m['role']!r} is not one of {ROLES}")
        if not isinstance(m["content"], str):
            raise RowRejected("invalid_prompt", f"{field_name}[{i}].content is a "
                                                f"{type(m['content']).__name__}, not text")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "user":
        raise RowRejected("invalid_prompt", f"the last prompt message is from {messages[-1]['role']!r}; "
                                            "the prompt must end with a user turn")
    if not any(m["content"].strip() for m in messages):
        raise RowRejected("empty_prompt", f"every message of {field_name} is empty")
    return messages


def normalize_prompt_id(value: Any, repairs: list[str]) -> Optional[str]:
    """A given prompt id as a string, or None when absent/empty (then it is derived)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowRejected("wrong_type", f"prompt_id={value!r} ({type(value).__name__}) must be a string")
    if isinstance(value, int):
        repairs.append("prompt_id_to_string")
        return str(value)
    return value


# ----------------------------------------------------------------------------------------------------
# Row rules (all formats)
# ----------------------------------------------------------------------------------------------------


def validate_record(rec: ListwiseRecord, num_dimensions: int, repairs: list[str],
                    *, explicit_id: bool = True) -> ListwiseRecord:
    """The format-independent rules; returns the (possibly repaired) record or raises RowRejected.

    In order: response types; list lengths (scores, ranks, reference values vs responses); score shape
    and values; ranks; reference values; drop empty responses (repair); >= 2 responses; not all
    identical; some label present. Finally a missing prompt id is derived (``explicit_id=False`` when the
    source format has no ids, so deriving is not counted as a repair).
    """
    n = len(rec.responses)
    for i, r in enumerate(rec.responses):
        if not isinstance(r, str):
            raise RowRejected("non_text_response", f"responses[{i}]={r!r} ({type(r).__name__}) is not text")
    if len(rec.scores) != n:
        raise RowRejected("length_mismatch", f"{n} responses but {len(rec.scores)} score rows")
    for name in ("ranks", "ref_logps", "ref_entropy"):
        values = getattr(rec, name)
        if values is not None and len(values) != n:
            raise RowRejected("length_mismatch", f"{n} responses but {len(values)} {name}")
    for i, row in enumerate(rec.scores):
        if len(row) != num_dimensions:
            raise RowRejected("dimension_mismatch", f"scores[{i}] has {len(row)} values for "
                                                    f"{num_dimensions} dimensions")
        for k, v in enumerate(row):
            if v is not None and not math.isfinite(v):
                raise RowRejected("non_finite_score", f"scores[{i}][{k}]={v}")
    if rec.ranks is not None:
        for i, r in enumerate(rec.ranks):
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise RowRejected("invalid_rank", f"ranks[{i}]={r!r} must be an integer >= 1 (1 = best)")
    for name in ("ref_logps", "ref_entropy"):
        values = getattr(rec, name)
        if values is not None and any(isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not math.isfinite(v) for v in values):
            raise RowRejected("invalid_reference", f"{name}={values!r} must be finite numbers")
    if rec.win_probs is not None:
        _check_win_probs(rec.win_probs, n)

    keep = [i for i, r in enumerate(rec.responses) if r.strip()]
    if len(keep) < n:
        repairs.append("dropped_empty_response")
        rec = _select(rec, keep)
    if len(rec.responses) < 2:
        raise RowRejected("too_few_responses", f"{len(rec.responses)} usable response(s); need at least 2")
    if len(set(rec.responses)) == 1:
        raise RowRejected("identical_responses", f"all {len(rec.responses)} responses are the same text")
    has_rating = any(v is not None for row in rec.scores for v in row)
    if rec.ranks is None and not has_rating:
        raise RowRejected("no_labels", "every rating is missing and there are no ranks")
    if not rec.prompt_id:
        if explicit_id:
            repairs.append("derived_prompt_id")
        rec.prompt_id = derive_prompt_id(rec.prompt, rec.responses)
    return rec


def _check_win_probs(win_probs: Any, n: int) -> None:
    """``win_probs [N][N]``: W[k][i] = P(response k beats response i) in [0, 1] for k != i; the diagonal is
    not read (LiPO labels take it as 0.5) and may be null."""
    if not isinstance(win_probs, (list, tuple)) or len(win_probs) != n:
        raise RowRejected("invalid_win_probs", f"win_probs must have one row per response ({n}), got "
                                               f"{raw_json(win_probs)[:80]}")
    for k, row in enumerate(win_probs):
        if not isinstance(row, (list, tuple)) or len(row) != n:
            raise RowRejected("invalid_win_probs", f"win_probs[{k}] must have {n} entries, got "
                                                   f"{raw_json(row)[:80]}")
        for i, v in enumerate(row):
            if i == k and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise RowRejected("invalid_win_probs", f"win_probs[{k}][{i}]={v!r} must be a probability "
                                                       "in [0, 1]")


def _select(rec: ListwiseRecord, keep: list[int]) -> ListwiseRecord:
    def pick(values):
        return None if values is None else [values[i] for i in keep]

    win_probs = None if rec.win_probs is None else [[rec.win_probs[k][i] for i in keep] for k in keep]
    return ListwiseRecord(rec.prompt_id, rec.prompt, pick(rec.responses), pick(rec.scores), pick(rec.ranks),
                          pick(rec.ref_logps), pick(rec.ref_entropy), rec.metadata, rec.extra, win_probs)


# ----------------------------------------------------------------------------------------------------
# Across rows: duplicate prompt ids
# ----------------------------------------------------------------------------------------------------


def resolve_duplicates(outcomes: list[Outcome]) -> list[Outcome]:
    """Accepted outcomes that share one prompt id -> the outcomes to keep, plus rejections.

    Rule (independent of row order, so Ray and the CLI agree): exact copies (same content) collapse to
    one accepted row and the other copies are rejected as ``duplicate_row``; if the rows sharing the id
    differ, which one is right is unknown, so every copy is rejected as ``duplicate_prompt_id``.
    """
    if len(outcomes) <= 1:
        return outcomes
    pid = outcomes[0].record.prompt_id
    hashes = {o.record.content_hash() for o in outcomes}
    if len(hashes) == 1:
        kept = outcomes[0]
        dropped = [o.reject("duplicate_row", f"exact copy of the row with prompt_id={pid!r}")
                   for o in outcomes[1:]]
        return [kept, *dropped]
    return [o.reject("duplicate_prompt_id", f"{len(outcomes)} different rows have prompt_id={pid!r}")
            for o in outcomes]


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """Counts in *input rows*: ``input_rows == accepted_rows + rejected_rows``, always.

    ``output_rows`` counts accepted records (fewer than ``accepted_rows`` when pairwise rows merged);
    ``repaired`` counts accepted-or-rejected rows touched by each repair rule; ``notes`` holds other
    counters (e.g. pairwise groups merged or kept apart).
    """

    input_rows: int = 0
    accepted_rows: int = 0
    output_rows: int = 0
    rejected: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    source: str = ""
    dimensions: Optional[list[str]] = None

    @property
    def rejected_rows(self) -> int:
        return sum(self.rejected.values())

    @property
    def reject_fraction(self) -> float:
        return self.rejected_rows / self.input_rows if self.input_rows else 0.0

    @property
    def balanced(self) -> bool:
        return self.input_rows == self.accepted_rows + self.rejected_rows

    def add(self, outcome: Outcome, *, count_input: bool = True) -> None:
        """Account for one final outcome (its ``source_rows`` input rows)."""
        if count_input:
            self.input_rows += outcome.source_rows
        if outcome.accepted:
            self.accepted_rows += outcome.source_rows
            self.output_rows += 1
        else:
            self.rejected[outcome.reason] += outcome.source_rows
        for rule in set(outcome.repairs):
            self.repaired[rule] += 1

    def merge(self, other: ValidationReport) -> ValidationReport:
        return ValidationReport(
            self.input_rows + other.input_rows, self.accepted_rows + other.accepted_rows,
            self.output_rows + other.output_rows, self.rejected + other.rejected,
            self.repaired + other.repaired, self.notes + other.notes,
            " + ".join(s for s in (self.source, other.source) if s), self.dimensions or other.dimensions,
        )

    def check(self, max_reject_fraction: float, source: str = "") -> None:
        """Raise :class:`DataQualityError` if more than ``max_reject_fraction`` of the rows were rejected."""
        if not self.balanced:  # a bug in raypo, never a data problem
            raise AssertionError(f"data accounting is off: {self.to_dict()}")
        if self.reject_fraction > max_reject_fraction:
            raise DataQualityError(self, max_reject_fraction, source or self.source)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "dimensions": self.dimensions, "input_rows": self.input_rows,
                "accepted_rows": self.accepted_rows, "rejected_rows": self.rejected_rows,
                "output_rows": self.output_rows, "reject_fraction": self.reject_fraction,
                "rejected": dict(sorted(self.rejected.items())),
                "repaired": dict(sorted(self.repaired.items())), "notes": dict(sorted(self.notes.items()))}

    def format(self) -> str:
        """A human-readable table of the counts."""
        title = f"data report{f' for {self.source}' if self.source else ''}"
        dims = ", ".join(self.dimensions) if self.dimensions else "none (rank labels only)"
        lines = [title, f"  dimensions     {dims}" if self.dimensions is not None else "",
                 f"  input rows     {self.input_rows:>10}",
                 f"  accepted rows  {self.accepted_rows:>10}   (written as {self.output_rows} records)",
                 f"  rejected rows  {self.rejected_rows:>10}   ({self.reject_fraction:.2%})"]
        for reason, n in sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {reason:<26}{n:>8}   {REJECT_REASONS.get(reason, '')}")
        if self.repaired:
            lines.append("  repaired rows (by rule)")
            for rule, n in sorted(self.repaired.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"    {rule:<26}{n:>8}   {REPAIR_RULES.get(rule, '')}")
        if self.notes:
            lines.append("  notes")
            for key, n in sorted(self.notes.items()):
                lines.append(f"    {key:<26}{n:>8}")
        return "\n".join(line for line in lines if line)


def report_from_outcomes(outcomes: Iterable[Outcome], source: str = "") -> ValidationReport:
    report = ValidationReport(source=source)
    for o in outcomes:
        report.add(o)
    return report


# ----------------------------------------------------------------------------------------------------
# Quarantine
# ----------------------------------------------------------------------------------------------------


def quarantine_row(outcome: Outcome, stage: str) -> dict[str, Any]:
    """One JSONL line of the quarantine file: the reason, its detail, the stage and the original row."""
    return {"reason": outcome.reason, "detail": outcome.detail, "stage": stage,
            "source_rows": outcome.source_rows, "row": outcome.raw}


def write_quarantine(rows: Iterable[dict[str, Any]], path: str, storage_options: Optional[dict] = None
                     ) -> int:
    """Write quarantine rows as JSONL to a local path or an ``s3://`` URI; returns the number written.

    Written atomically (:func:`raypo.storage.atomic_output`): a full disk leaves no partial file and raises
    :class:`~raypo.storage.StorageWriteError` naming the path."""
    from raypo.storage import atomic_output

    count = 0
    with atomic_output(path, "w", storage_options=storage_options, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n")
            count += 1
    return count
