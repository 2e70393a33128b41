"""The conversion steps that look across rows, and the whole conversion in plain Python.

* Pairwise rows of one prompt whose order is consistent merge into one ranked list
  (:func:`merge_pair_group`).
* OpenAssistant message trees (oasst1/oasst2) are assembled into ranked groups first
  (:func:`prepare_ranked_rows`).
* Duplicate prompt ids are resolved (:func:`raypo.data.validate.resolve_duplicates`).

:func:`convert_records` runs the per-row converters of :mod:`raypo.data.formats` and these steps in memory
(the CLI, tests, benchmarks); :mod:`raypo.data.pipeline` runs the same steps on Ray Data.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

from raypo.data.formats import ConvertOptions, check_format, convert_row, dimensions_for
from raypo.data.schema import ListwiseRecord, _digest, derive_prompt_id, prompt_key
from raypo.data.validate import Outcome, ValidationReport, resolve_duplicates

# ----------------------------------------------------------------------------------------------------
# Pairwise merging (across rows of one prompt)
# ----------------------------------------------------------------------------------------------------


def _total_order(pairs: list[tuple[str, str]]) -> Optional[list[str]]:
    """Responses best -> worst if the (winner, loser) pairs determine a strict total order, else None.

    That is the case when the preference graph is acyclic and has a unique topological order (every
    step of Kahn's algorithm has exactly one source); the order then follows by transitivity.
    """
    nodes = sorted({x for p in pairs for x in p})
    succ: dict[str, set[str]] = {n: set() for n in nodes}
    indeg = dict.fromkeys(nodes, 0)
    for w, loser in set(pairs):
        if loser not in succ[w]:
            succ[w].add(loser)
            indeg[loser] += 1
    order = []
    sources = [n for n in nodes if indeg[n] == 0]
    while sources:
        if len(sources) > 1:
            return None  # two incomparable responses
        n = sources.pop()
        order.append(n)
        for s in sorted(succ[n]):
            indeg[s] -= 1
            if indeg[s] == 0:
                sources.append(s)
    return order if len(order) == len(nodes) else None  # leftover nodes = a cycle


def merge_pair_group(outcomes: list[Outcome], merge: bool = True) -> tuple[list[Outcome], Counter]:
    """Accepted pairwise outcomes sharing one group key -> final outcomes (and notes).

    Rules, independent of row order:

    * rows with a different prompt under the same given ``prompt_id`` -> all ``duplicate_prompt_id``;
    * exact duplicate pairs -> one kept, the others ``duplicate_row``;
    * with ``merge`` and 2+ distinct pairs whose preferences form a strict total order (acyclic, every
      two responses comparable, transitivity allowed) -> one row, responses best first, ranks 1..N;
    * otherwise each pair stays its own N = 2 row; under a given id several rows get ids
      ``<id>#<pair hash>``.
    """
    notes: Counter = Counter()
    if not outcomes:
        return [], notes

    def pair_hash(o: Outcome) -> str:
        return _digest(json.dumps(o.record.responses, ensure_ascii=False), 4)

    outcomes = sorted(outcomes, key=lambda o: (pair_hash(o), o.record.content_hash()))
    if len({prompt_key(o.record.prompt) for o in outcomes}) > 1:
        return [o.reject("duplicate_prompt_id", f"prompt_id={o.group_key!r} is used for different prompts")
                for o in outcomes], notes
    unique: dict[str, Outcome] = {}
    final: list[Outcome] = []
    for o in outcomes:
        h = pair_hash(o)
        if h in unique:
            final.append(o.reject("duplicate_row", "exact copy of another pair of this prompt"))
        else:
            unique[h] = o
    pairs = list(unique.values())
    # The group key is the source's prompt_id when it had one, else the prompt's hash (see convert_pairwise).
    explicit = pairs[0].group_key != prompt_key(pairs[0].record.prompt)
    if merge and len(pairs) >= 2:
        order = _total_order([(o.record.responses[0], o.record.responses[1]) for o in pairs])
        if order is not None:
            first = pairs[0].record
            pid = pairs[0].group_key if explicit else derive_prompt_id(first.prompt, order)
            rec = ListwiseRecord(pid, first.prompt, order, [[] for _ in order],
                                 ranks=list(range(1, len(order) + 1)),
                                 metadata=json.dumps({"merged_pairs": len(pairs)}))
            repairs = sorted({r for o in pairs for r in o.repairs})
            notes["pair_groups_merged"] += 1
            notes["pairs_merged"] += len(pairs)
            final.append(Outcome(record=rec, repairs=repairs, source_rows=sum(o.source_rows for o in pairs),
                                 group_key=pairs[0].group_key))
            return final, notes
        notes["pair_groups_not_mergeable"] += 1
    for o in pairs:
        if explicit and len(pairs) > 1:
            o.record.prompt_id = f"{o.group_key}#{pair_hash(o)}"
        elif explicit:
            o.record.prompt_id = o.group_key
        final.append(o)
    return final, notes


# ----------------------------------------------------------------------------------------------------
# OpenAssistant message trees
# ----------------------------------------------------------------------------------------------------


def is_oasst_tree(row: dict[str, Any]) -> bool:
    return isinstance(row, dict) and {"message_id", "parent_id", "role", "text"} <= row.keys()


def assemble_oasst(messages: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
    """OpenAssistant message rows (oasst1/oasst2) -> one ranked group per prompter message with replies.

    The prompt is the conversation from the tree's root down to that prompter message (``prompter`` ->
    user, ``assistant`` -> assistant); the responses are its non-deleted assistant replies, ordered by
    message id; OpenAssistant's 0-based sibling ``rank`` becomes a 1-based rank (null stays null, and the
    ranked converter drops that reply). Deleted messages are skipped. The groups are the input rows of
    the accounting; the notes count the messages read.
    """
    notes: Counter = Counter()
    by_id: dict[str, dict[str, Any]] = {}
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in messages:
        notes["oasst_messages"] += 1
        if m.get("deleted"):
            notes["oasst_deleted_messages"] += 1
            continue
        by_id[m["message_id"]] = m
        if m.get("parent_id") is not None:
            children[m["parent_id"]].append(m)
    groups = []
    for mid in sorted(by_id):
        m = by_id[mid]
        replies = sorted((c for c in children.get(mid, []) if c.get("role") == "assistant"),
                         key=lambda c: c["message_id"])
        if m.get("role") != "prompter" or not replies:
            continue
        path, node = [], m
        while node is not None:
            path.append({"role": "user" if node.get("role") == "prompter" else "assistant",
                         "content": node.get("text")})
            node = by_id.get(node.get("parent_id")) if node.get("parent_id") is not None else None
        ranks = [None if c.get("rank") is None else int(c["rank"]) + 1 for c in replies]
        groups.append({"prompt_id": mid, "prompt": path[::-1],
                       "completions": [{"text": c.get("text"), "rank": r} for c, r in zip(replies, ranks)]})
    notes["oasst_groups"] = len(groups)
    return groups, notes


def _maybe_json(raw: Any) -> Any:
    if isinstance(raw, (str, bytes)):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return None
    return raw


def looks_like_oasst(first_raw: Any) -> bool:
    """Whether a dataset whose first row is ``first_raw`` (dict or JSON line) is an OpenAssistant tree."""
    return is_oasst_tree(_maybe_json(first_raw))


def prepare_ranked_rows(rows: list[Any]) -> tuple[list[Any], Counter]:
    """Ranked input rows as the converter takes them: OpenAssistant message rows are assembled into groups
    (:func:`assemble_oasst`); unparseable lines and non-message rows are kept as rows, to be converted (or
    rejected) on their own. Other inputs are returned unchanged."""
    first = next((r for r in rows if _maybe_json(r) is not None), None)
    if first is None or not looks_like_oasst(first):
        return rows, Counter()
    messages, others = [], []
    for raw in rows:
        parsed = _maybe_json(raw)
        (messages if is_oasst_tree(parsed) else others).append(parsed if is_oasst_tree(parsed) else raw)
    groups, notes = assemble_oasst(messages)
    return groups + others, notes


# ----------------------------------------------------------------------------------------------------
# Plain-Python driver (CLI, tests, benchmarks)
# ----------------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    """Accepted records, rejected outcomes, all final outcomes (input order for single rows), the report."""

    records: list[ListwiseRecord]
    rejected: list[Outcome]
    outcomes: list[Outcome]
    report: ValidationReport
    dimensions: list[str]


def finalize_outcomes(fmt: str, outcomes: list[Outcome], opts: ConvertOptions
                      ) -> tuple[list[Outcome], Counter]:
    """The across-row steps on accepted outcomes: pairwise grouping/merging, then duplicate ids."""
    notes: Counter = Counter()
    accepted = [o for o in outcomes if o.accepted]
    final = [o for o in outcomes if not o.accepted]
    if fmt == "pairwise":
        groups: dict[str, list[Outcome]] = defaultdict(list)
        for o in accepted:
            groups[o.group_key].append(o)
        accepted = []
        for key in sorted(groups):
            merged, n = merge_pair_group(groups[key], opts.merge_pairs)
            notes += n
            accepted += [o for o in merged if o.accepted]
            final += [o for o in merged if not o.accepted]
    by_id: dict[str, list[Outcome]] = defaultdict(list)
    for o in accepted:
        by_id[o.record.prompt_id].append(o)
    for pid in by_id:
        final += resolve_duplicates(by_id[pid])
    return final, notes


def convert_records(rows: Iterable[Any], fmt: str, opts: Optional[ConvertOptions] = None,
                    dimensions: Optional[list[str]] = None, source: str = "") -> ConversionResult:
    """Convert and validate ``rows`` (dicts or JSONL lines) in memory, with the report.

    Row order is kept for the accepted records (merged pairwise groups appear where their group is
    completed, i.e. after the single rows).
    """
    opts = opts or ConvertOptions()
    check_format(fmt)
    rows = list(rows)
    notes: Counter = Counter()
    if fmt == "ranked":
        rows, notes = prepare_ranked_rows(rows)
    dims = dimensions if dimensions is not None else dimensions_for(fmt, opts)
    outcomes = [convert_row(fmt, r, opts, dims) for r in rows]
    final, more = finalize_outcomes(fmt, outcomes, opts)
    report = ValidationReport(source=source, notes=notes + more, dimensions=dims)
    for o in final:
        report.add(o)
    records = [o.record for o in final if o.accepted]
    return ConversionResult(records, [o for o in final if not o.accepted], final, report, dims)
