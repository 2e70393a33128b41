"""Converters: preference data in its source shape -> the listwise record (:mod:`raypo.data.schema`).

Each converter maps one input row (a dict, or a JSONL line) to a :class:`ListwiseRecord`, or rejects it
with a reason; :func:`convert_row` then applies the format-independent rules of
:mod:`raypo.data.validate`. That function is all a streaming stage needs (Ray Data ``map_batches`` in
:mod:`raypo.data.pipeline`, a loop over record batches in the CLI). Two steps look across rows: merging
pairwise rows of one prompt and resolving duplicate prompt ids, in :mod:`raypo.data.groups`, which also
runs all of it in plain Python (:func:`raypo.data.groups.convert_records`).

Formats (field mappings in docs/data.md):

* ``ultrafeedback``: openbmb/UltraFeedback. ``instruction`` -> user prompt, ``completions[j].response`` ->
  response j, ``completions[j].annotations.<aspect>.Rating`` (a string: "1".."5", "N/A") -> scores[j][k]
  for the aspects helpfulness, honesty, instruction_following, truthfulness (optionally also
  ``overall_score`` and ``fine-grained_score`` as extra dimensions).
* ``ranked``: a prompt with responses and ranks (1 = best, ties allowed), either as parallel lists or as
  ``completions: [{text, rank}]``; OpenAssistant message trees (oasst1/oasst2 rows with ``message_id``,
  ``parent_id``, ``role``, ``text``, ``rank``) are first assembled into such groups.
* ``pairwise``: TRL's prompt/chosen/rejected, as strings or chat messages, with an explicit or implicit
  prompt; -> N = 2 with ranks [1, 2]. Pairs of one prompt whose order is consistent merge into one list.
* ``scored``: a prompt, responses and one scalar score each (reward-model output; e.g. the
  ``all_generated_responses`` / ``all_rm_scores`` columns of SimPO's on-policy UltraFeedback sets).
* ``listwise``: raypo's own schema, validated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from raypo.data.schema import ListwiseRecord, prompt_key
from raypo.data.validate import (
    Outcome,
    RowRejected,
    UndecodableLine,
    normalize_prompt_id,
    parse_score,
    raw_json,
    to_messages,
    validate_record,
)

FORMATS = ("ultrafeedback", "ranked", "pairwise", "scored", "listwise")
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
ULTRAFEEDBACK_EXTRAS = ("overall_score", "fine-grained_score")
ULTRAFEEDBACK_RANGE = (1.0, 5.0)
SCORED_DIMENSION = "score"

_PROMPT_FIELDS = ("prompt", "instruction", "question")
_TEXT_FIELDS = ("text", "response", "content", "completion")


@dataclass
class ConvertOptions:
    """Options of the converters.

    Attributes:
        dimensions: the score dimensions. ultrafeedback: which aspects (default the four; may add
            ``overall_score`` / ``fine-grained_score``); scored: one name (default ``score``); listwise:
            the dataset's names (required when rows carry scores); ranked/pairwise: ignored (m = 0).
        keep_system_prompt: ultrafeedback: keep each completion's ``custom_system_prompt`` (the system
            prompt it was generated with; one per response, so it cannot be the prompt's system turn)
            in the row's ``metadata`` JSON.
        merge_pairs: pairwise: merge rows of one prompt into one ranked list when their order is
            consistent (a strict total order).
    """

    dimensions: Optional[list[str]] = None
    keep_system_prompt: bool = False
    merge_pairs: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def dimensions_for(fmt: str, opts: ConvertOptions) -> list[str]:
    """The dimension names a format produces under ``opts``."""
    check_format(fmt)
    if fmt == "ultrafeedback":
        dims = list(opts.dimensions or ULTRAFEEDBACK_ASPECTS)
        unknown = [d for d in dims if d not in ULTRAFEEDBACK_ASPECTS + ULTRAFEEDBACK_EXTRAS]
        if unknown:
            raise ValueError(f"ultrafeedback dimensions {unknown} are not UltraFeedback aspects; choose from "
                             f"{list(ULTRAFEEDBACK_ASPECTS + ULTRAFEEDBACK_EXTRAS)}")
        return dims
    if fmt in ("ranked", "pairwise"):
        return []
    if fmt == "scored":
        dims = list(opts.dimensions or [SCORED_DIMENSION])
        if len(dims) != 1:
            raise ValueError(f"the scored format has one score per response; got dimensions={dims}")
        return dims
    return list(opts.dimensions or [])


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"data format {fmt!r} is not one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------------------------------
# Small field helpers
# ----------------------------------------------------------------------------------------------------


def _first(row: dict[str, Any], names: tuple[str, ...]) -> tuple[Optional[str], Any]:
    for name in names:
        if name in row and row[name] is not None:
            return name, row[name]
    return None, None


def _require_list(value: Any, name: str) -> list:
    if value is None:
        raise RowRejected("missing_field", f"{name} is missing")
    if not isinstance(value, (list, tuple)):
        raise RowRejected("wrong_type", f"{name} is a {type(value).__name__}, not a list")
    return list(value)


def _parse_rank(value: Any, what: str) -> Optional[int]:
    """An integer rank >= 1, None when absent; an integral float (2.0) is accepted."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise RowRejected("invalid_rank", f"{what}={value!r} is a boolean")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value < 1:
        raise RowRejected("invalid_rank", f"{what}={value!r} must be an integer >= 1 (1 = best)")
    return value


def _text_of(item: Any) -> Any:
    """The text of a response item: a string as is, a dict's text/response/content field."""
    if isinstance(item, dict):
        return _first(item, _TEXT_FIELDS)[1]
    return item


# ----------------------------------------------------------------------------------------------------
# Converters: row dict -> (record, the id came from the source?, group key)
# ----------------------------------------------------------------------------------------------------

Converted = tuple[ListwiseRecord, bool, Optional[str]]


def convert_ultrafeedback(row: dict[str, Any], opts: ConvertOptions, repairs: list[str]) -> Converted:
    """openbmb/UltraFeedback -> listwise, scores ``[N][m]`` from the aspects' string ratings.

    Rating rule: "1".."5" (or numbers) -> float; absent annotation, absent ``Rating``, "", "N/A" -> null
    (repair ``missing_rating``); any other string -> ``unparseable_rating``; outside 1..5 ->
    ``rating_out_of_range``. ``overall_score`` / ``fine-grained_score`` are not range-checked.
    """
    dims = dimensions_for("ultrafeedback", opts)
    _, instruction = _first(row, ("instruction", "prompt"))
    prompt = to_messages(instruction, field_name="instruction")
    completions = _require_list(row.get("completions"), "completions")
    responses, scores, models, system_prompts = [], [], [], []
    for j, comp in enumerate(completions):
        if not isinstance(comp, dict):
            raise RowRejected("wrong_type", f"completions[{j}] is a {type(comp).__name__}, not an object")
        responses.append(comp.get("response"))
        models.append(comp.get("model"))
        system_prompts.append(comp.get("custom_system_prompt"))
        annotations = comp.get("annotations")
        if annotations is not None and not isinstance(annotations, dict):
            raise RowRejected("wrong_type", f"completions[{j}].annotations is a {type(annotations).__name__}")
        scores.append([_ultrafeedback_rating(comp, annotations or {}, dim, j, repairs) for dim in dims])
    meta: dict[str, Any] = {"source": row.get("source"), "models": models}
    if opts.keep_system_prompt:
        meta["custom_system_prompts"] = system_prompts
    pid = normalize_prompt_id(row.get("prompt_id"), repairs)
    rec = ListwiseRecord(pid or "", prompt, responses, scores,
                         metadata=json.dumps({k: v for k, v in meta.items() if v is not None}))
    return rec, False, None


def _ultrafeedback_rating(comp: dict, annotations: dict, dim: str, j: int, repairs: list[str]
                          ) -> Optional[float]:
    if dim in ULTRAFEEDBACK_EXTRAS:
        value = comp.get(dim)
        if value is None:
            repairs.append("missing_rating")
        return parse_score(value, f"completions[{j}].{dim}", repairs, native_strings=True)
    what = f"completions[{j}].annotations.{dim}.Rating"
    ann = annotations.get(dim)
    if isinstance(ann, list) and len(ann) == 1:  # some exports wrap the aspect's annotation in a list
        ann = ann[0]
    if isinstance(ann, dict):
        value = ann.get("Rating")
    elif ann is None or isinstance(ann, (str, int, float)):  # flattened exports store the rating directly
        value = ann
    else:
        raise RowRejected("wrong_type", f"completions[{j}].annotations.{dim} is a {type(ann).__name__}")
    if value is None:
        repairs.append("missing_rating")
        return None
    rating = parse_score(value, what, repairs, native_strings=True)
    lo, hi = ULTRAFEEDBACK_RANGE
    if rating is not None and not lo <= rating <= hi:
        raise RowRejected("rating_out_of_range", f"{what}={value!r} is outside {lo:g}-{hi:g}")
    return rating


def convert_ranked(row: dict[str, Any], opts: ConvertOptions, repairs: list[str]) -> Converted:
    """Prompt + responses + ranks (1 = best, ties allowed) -> listwise with m = 0 and ``ranks``.

    Accepts ``responses`` + ``ranks`` lists, or ``completions``/``replies`` as ``[{text, rank}]``. A
    response whose rank is null is removed (repair ``dropped_unranked_response``).
    """
    name, prompt_value = _first(row, _PROMPT_FIELDS)
    prompt = to_messages(prompt_value, field_name=name or "prompt")
    if "responses" in row:
        responses = _require_list(row.get("responses"), "responses")
        ranks_in = _require_list(row.get("ranks"), "ranks")
        if len(ranks_in) != len(responses):
            raise RowRejected("length_mismatch", f"{len(responses)} responses but {len(ranks_in)} ranks")
    else:
        key, items = _first(row, ("completions", "replies"))
        items = _require_list(items, "completions")
        responses, ranks_in = [], []
        for j, item in enumerate(items):
            if not isinstance(item, dict):
                raise RowRejected("wrong_type", f"{key}[{j}] is a {type(item).__name__}, not an object")
            responses.append(_text_of(item))
            ranks_in.append(item.get("rank"))
    ranks = [_parse_rank(r, f"ranks[{j}]") for j, r in enumerate(ranks_in)]
    keep = [j for j, r in enumerate(ranks) if r is not None]
    if len(keep) < len(ranks):
        repairs.append("dropped_unranked_response")
        responses, ranks = [responses[j] for j in keep], [ranks[j] for j in keep]
    pid = normalize_prompt_id(row.get("prompt_id"), repairs)
    rec = ListwiseRecord(pid or "", prompt, responses, [[] for _ in responses], ranks=ranks)
    return rec, pid is not None, None


def _split_conversation(value: Any, name: str) -> tuple[list[dict[str, str]], Any]:
    """A pairwise side -> (prompt turns before the response, response text).

    A string is the response; a ``{role, content}`` dict or a one-message list is one assistant turn; a
    longer list is a conversation whose last message is the response and whose earlier messages are the
    prompt (TRL's implicit-prompt format).
    """
    if value is None:
        raise RowRejected("missing_field", f"{name} is missing")
    if isinstance(value, str):
        return [], value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise RowRejected("non_text_response", f"{name}={value!r} is neither text nor chat messages")
    last = value[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise RowRejected("unsupported_response", f"the last message of {name} must be an assistant turn")
    prefix = list(value[:-1])
    if prefix and isinstance(prefix[-1], dict) and prefix[-1].get("role") == "assistant":
        raise RowRejected("unsupported_response", f"{name} holds several assistant messages; raypo scores "
                                                  "one assistant turn per response")
    return prefix, last.get("content")


def convert_pairwise(row: dict[str, Any], opts: ConvertOptions, repairs: list[str]) -> Converted:
    """TRL prompt/chosen/rejected (strings or messages, explicit or implicit prompt) -> N = 2, ranks [1, 2].

    The group key (for merging) is the given ``prompt_id``, else a hash of the prompt messages.
    """
    c_prefix, chosen = _split_conversation(row.get("chosen"), "chosen")
    r_prefix, rejected = _split_conversation(row.get("rejected"), "rejected")
    if row.get("prompt") is None:
        if not c_prefix:
            raise RowRejected("missing_field", "prompt is missing and chosen has no prompt turns")
        prompt = to_messages(c_prefix, field_name="chosen[:-1]")
        if not r_prefix or to_messages(r_prefix, field_name="rejected[:-1]") != prompt:
            raise RowRejected("prompt_mismatch", "chosen and rejected start with different prompt turns")
    else:
        prompt = to_messages(row["prompt"])
        # Some exports (e.g. ultrafeedback_binarized) repeat the prompt turns inside chosen/rejected.
        for side, prefix in (("chosen", c_prefix), ("rejected", r_prefix)):
            if prefix and to_messages(prefix, field_name=f"{side}[:-1]") != prompt:
                raise RowRejected("prompt_mismatch", f"the prompt turns inside {side} differ from prompt")
    pid = normalize_prompt_id(row.get("prompt_id"), repairs)
    rec = ListwiseRecord(pid or "", prompt, [chosen, rejected], [[], []], ranks=[1, 2])
    return rec, pid is not None, pid if pid is not None else prompt_key(prompt)


def convert_scored(row: dict[str, Any], opts: ConvertOptions, repairs: list[str]) -> Converted:
    """Prompt + responses + one scalar score each -> listwise with m = 1. A null score is rejected."""
    name, prompt_value = _first(row, _PROMPT_FIELDS)
    prompt = to_messages(prompt_value, field_name=name or "prompt")
    r_name, items = _first(row, ("responses", "all_generated_responses", "completions", "candidates"))
    items = _require_list(items, r_name or "responses")
    s_name, values = _first(row, ("scores", "all_rm_scores", "rewards"))
    if values is None and items and all(isinstance(i, dict) for i in items):
        s_name, values = "score", [i.get("score", i.get("reward")) for i in items]
    values = _require_list(values, s_name or "scores")
    responses = [_text_of(i) for i in items]
    if len(values) != len(responses):
        raise RowRejected("length_mismatch", f"{len(responses)} responses but {len(values)} scores")
    scores = []
    for j, v in enumerate(values):
        if isinstance(v, (list, tuple)) and len(v) == 1:  # [[s], ...] from some reward-model dumps
            v = v[0]
        s = parse_score(v, f"{s_name}[{j}]", repairs)
        if s is None:
            raise RowRejected("missing_score", f"{s_name}[{j}] is missing; every response needs a score")
        scores.append([s])
    pid = normalize_prompt_id(row.get("prompt_id"), repairs)
    return ListwiseRecord(pid or "", prompt, responses, scores), pid is not None, None


def convert_listwise(row: dict[str, Any], opts: ConvertOptions, repairs: list[str]) -> Converted:
    """raypo's schema (prompt may be a string) -> validated record; scores ``[N][m]``, null = missing."""
    m = len(opts.dimensions or [])
    prompt = to_messages(row.get("prompt"), repairs)
    responses = _require_list(row.get("responses"), "responses")
    raw_scores = row.get("scores")
    if raw_scores is None and m == 0:
        raw_scores = [[] for _ in responses]
    raw_scores = _require_list(raw_scores, "scores")
    if m == 1 and raw_scores and not any(isinstance(s, (list, tuple)) for s in raw_scores):
        repairs.append("flat_scores_reshaped")
        raw_scores = [[s] for s in raw_scores]
    scores = []
    for i, s_row in enumerate(raw_scores):
        if not isinstance(s_row, (list, tuple)):
            raise RowRejected("wrong_type", f"scores[{i}]={s_row!r} is not a list of {m} ratings")
        scores.append([parse_score(v, f"scores[{i}][{k}]", repairs) for k, v in enumerate(s_row)])
    ranks = row.get("ranks")
    if ranks is not None:
        ranks = [_parse_rank(r, f"ranks[{j}]") for j, r in enumerate(_require_list(ranks, "ranks"))]
        if any(r is None for r in ranks):
            raise RowRejected("invalid_rank", "ranks contains null; give every response a rank or drop ranks")
    refs = {}
    for name in ("ref_logps", "ref_entropy"):
        refs[name] = None if row.get(name) is None else _require_list(row[name], name)
    metadata = row.get("metadata")
    if metadata is not None and not isinstance(metadata, str):
        metadata = json.dumps(metadata, ensure_ascii=False, default=repr)
    pid = normalize_prompt_id(row.get("prompt_id"), repairs)
    win_probs = row.get("win_probs")
    if win_probs is not None:  # [N][N]; its shape and values are checked by validate_record
        win_probs = [r.tolist() if hasattr(r, "tolist") else list(r) if isinstance(r, tuple) else r
                     for r in _require_list(win_probs, "win_probs")]
    rec = ListwiseRecord(pid or "", prompt, responses, scores, ranks, refs["ref_logps"], refs["ref_entropy"],
                         metadata, win_probs=win_probs)
    return rec, True, None


CONVERTERS: dict[str, Callable[[dict[str, Any], ConvertOptions, list[str]], Converted]] = {
    "ultrafeedback": convert_ultrafeedback,
    "ranked": convert_ranked,
    "pairwise": convert_pairwise,
    "scored": convert_scored,
    "listwise": convert_listwise,
}


# ----------------------------------------------------------------------------------------------------
# One row, end to end (the streaming stage)
# ----------------------------------------------------------------------------------------------------


def convert_row(fmt: str, raw: Any, opts: ConvertOptions, dimensions: Optional[list[str]] = None) -> Outcome:
    """Convert and validate one input row (a dict, or a JSONL line as ``str``/``bytes``).

    Never raises for bad data: the outcome is an accepted record or a rejection with its reason and
    the original row. ``dimensions`` defaults to :func:`dimensions_for`.
    """
    repairs: list[str] = []
    try:
        row = raw
        if isinstance(raw, UndecodableLine):
            raise RowRejected("invalid_utf8", raw.detail)
        if isinstance(raw, (str, bytes)):
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise RowRejected("invalid_json", str(exc)) from None
        if not isinstance(row, dict):
            raise RowRejected("not_a_record", f"the row is a {type(row).__name__}, not an object")
        dims = dimensions if dimensions is not None else dimensions_for(fmt, opts)
        rec, explicit_id, group_key = CONVERTERS[fmt](row, opts, repairs)
        rec = validate_record(rec, len(dims), repairs, explicit_id=explicit_id)
        # the input row is kept so that a later cross-row rejection (a duplicate) quarantines it verbatim
        return Outcome(record=rec, raw=raw_json(raw), repairs=repairs, group_key=group_key)
    except RowRejected as exc:
        return Outcome(reason=exc.reason, detail=exc.detail, raw=raw_json(raw), repairs=repairs)
