"""The listwise record: raypo's one data schema, in Arrow and in Python.

One row per prompt (a listwise *group*); a group is never split across rows, batches or workers.

=================  ==============================  ==================================================
column             Arrow type                      meaning
=================  ==============================  ==================================================
``prompt_id``      ``string`` (not null)           unique per row; ``BASE#suffix`` ids share ``BASE``
                                                   for the train/eval split (see :func:`split_key`)
``prompt``         ``list<struct<role, content>>`` chat messages; the last one is from the user
``responses``      ``list<string>``                N >= 2 responses (N varies per row)
``scores``         ``list<list<double>>``          ``[N][m]`` ratings, one per dimension; null = missing.
                                                   m = 0 for rank-only data (ranked, pairwise)
``ranks``          ``list<int32>`` (nullable)      1 = best, ties allowed; null when not given
``ref_logps``      ``list<double>`` (nullable)     precomputed reference log-probs, one per response
``ref_entropy``    ``list<double>`` (nullable)     mean reference token entropy (MallowsPO dispersion)
``metadata``       ``string`` (nullable)           JSON with provenance (source, models, ...)
=================  ==============================  ==================================================

The m dimension names (e.g. helpfulness, honesty, instruction_following, truthfulness) live in the Arrow
schema metadata under :data:`DIMENSIONS_KEY` as a JSON list, and in ``data.dimensions`` of the config.
Tokenised rows (:func:`tokenized_schema`) replace the texts by token ids and add lengths and labels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa

DIMENSIONS_KEY = b"raypo.dimensions"
SCHEMA_KIND_KEY = b"raypo.schema"
LISTWISE_KIND = b"listwise/1"
TOKENIZED_KIND = b"tokenized/1"

ROLES = ("system", "user", "assistant")
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

LISTWISE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.list_(MESSAGE_TYPE)),
    pa.field("responses", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.list_(pa.float64()))),
    pa.field("ranks", pa.list_(pa.int32())),
    pa.field("ref_logps", pa.list_(pa.float64())),
    pa.field("ref_entropy", pa.list_(pa.float64())),
    pa.field("metadata", pa.string()),
    pa.field("win_probs", pa.list_(pa.list_(pa.float64()))),  # [N][N] or null: P(response k beats i)
)

# Tokenised rows: what the trainer's collate function reads (one row = one whole group).
TOKENIZED_FIELDS: tuple[pa.Field, ...] = (
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt_ids", pa.list_(pa.int32())),  # chat template applied, generation prompt included
    pa.field("response_ids", pa.list_(pa.list_(pa.int32()))),  # [N][R_i] continuations of the prompt
    pa.field("response_masks", pa.list_(pa.list_(pa.int8()))),  # [N][R_i] 1 = token counts in the loss
    pa.field("scores", pa.list_(pa.list_(pa.float64()))),  # [N][m], null = missing rating
    pa.field("ranks", pa.list_(pa.int32())),  # [N] or null
    pa.field("psi", pa.list_(pa.float64())),  # [N] LiPO labels in [0, 1] (from ranks, else ratings)
    pa.field("num_responses", pa.int32()),  # N
    pa.field("prompt_length", pa.int32()),  # P
    pa.field("response_lengths", pa.list_(pa.int32())),  # [N] R_i
    pa.field("num_tokens", pa.int32()),  # P + sum_i R_i: tokens of the group with the prompt shared once
    pa.field("ref_logps", pa.list_(pa.float64())),
    pa.field("ref_entropy", pa.list_(pa.float64())),
    pa.field("win_probs", pa.list_(pa.list_(pa.float64()))),  # [N][N] or null (LiPO labels: matrix)
    pa.field("prompt_messages", pa.string()),  # the prompt's chat messages as JSON (lambda conditioning)
)

# Bookkeeping columns of the pipeline's intermediate (staged) rows. A rejected row keeps its reason and
# its original input (JSON) so it can be counted and quarantined; an accepted row has a null reason.
STAGE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("_reject_reason", pa.string()),
    pa.field("_reject_detail", pa.string()),
    pa.field("_raw", pa.string()),
    pa.field("_repairs", pa.list_(pa.string())),
    pa.field("_source_rows", pa.int64()),
    pa.field("_group_key", pa.string()),
    pa.field("_notes", pa.list_(pa.string())),  # counters for the report (e.g. pairwise groups merged)
)
STAGE_COLUMNS = tuple(f.name for f in STAGE_FIELDS)


def _metadata(kind: bytes, dimensions: Optional[list[str]]) -> dict[bytes, bytes]:
    meta = {SCHEMA_KIND_KEY: kind}
    if dimensions is not None:
        meta[DIMENSIONS_KEY] = json.dumps(list(dimensions)).encode()
    return meta


def listwise_schema(dimensions: Optional[list[str]] = None) -> pa.Schema:
    """The listwise Arrow schema, with the dimension names in its metadata."""
    return pa.schema(list(LISTWISE_FIELDS), metadata=_metadata(LISTWISE_KIND, dimensions))


def tokenized_schema(dimensions: Optional[list[str]] = None) -> pa.Schema:
    return pa.schema(list(TOKENIZED_FIELDS), metadata=_metadata(TOKENIZED_KIND, dimensions))


def staged_schema(base: pa.Schema) -> pa.Schema:
    """``base`` plus the pipeline's bookkeeping columns; every base column becomes nullable."""
    fields = [f.with_nullable(True) for f in base] + list(STAGE_FIELDS)
    return pa.schema(fields, metadata=base.metadata)


def with_dimensions(schema: pa.Schema, dimensions: list[str]) -> pa.Schema:
    meta = dict(schema.metadata or {})
    meta[DIMENSIONS_KEY] = json.dumps(list(dimensions)).encode()
    return schema.with_metadata(meta)


def dimensions_of(schema: Optional[pa.Schema]) -> Optional[list[str]]:
    """Dimension names stored in a schema's metadata, or None when absent."""
    if schema is None or not schema.metadata or DIMENSIONS_KEY not in schema.metadata:
        return None
    value = json.loads(schema.metadata[DIMENSIONS_KEY].decode())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"schema metadata {DIMENSIONS_KEY.decode()}={value!r} must be a JSON list of names")
    return value


# ----------------------------------------------------------------------------------------------------
# Python record
# ----------------------------------------------------------------------------------------------------


@dataclass
class ListwiseRecord:
    """One prompt and its N responses, as plain Python values (one row of :func:`listwise_schema`)."""

    prompt_id: str
    prompt: list[dict[str, str]]
    responses: list[str]
    scores: list[list[Optional[float]]]
    ranks: Optional[list[int]] = None
    ref_logps: Optional[list[float]] = None
    ref_entropy: Optional[list[float]] = None
    metadata: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # not stored; converter scratch space
    win_probs: Optional[list[list[Optional[float]]]] = None  # [N][N]: P(response k beats response i)

    @property
    def num_responses(self) -> int:
        return len(self.responses)

    def to_row(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "prompt": [{"role": m["role"], "content": m["content"]} for m in self.prompt],
            "responses": list(self.responses),
            "scores": [list(s) for s in self.scores],
            "ranks": None if self.ranks is None else list(self.ranks),
            "ref_logps": None if self.ref_logps is None else list(self.ref_logps),
            "ref_entropy": None if self.ref_entropy is None else list(self.ref_entropy),
            "metadata": self.metadata,
            # Only when given, so rows without a matrix keep their content hash.
            **({} if self.win_probs is None else {"win_probs": [list(r) for r in self.win_probs]}),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ListwiseRecord:
        """From a row of the listwise schema (already valid: no checks here, see raypo.data.validate)."""
        return cls(
            prompt_id=row["prompt_id"],
            prompt=[{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
            responses=list(row["responses"]),
            scores=[list(s) for s in row["scores"]],
            ranks=None if row.get("ranks") is None else list(row["ranks"]),
            ref_logps=None if row.get("ref_logps") is None else list(row["ref_logps"]),
            ref_entropy=None if row.get("ref_entropy") is None else list(row["ref_entropy"]),
            metadata=row.get("metadata"),
            win_probs=None if row.get("win_probs") is None else [list(r) for r in row["win_probs"]],
        )

    def content_hash(self) -> str:
        """Hash of everything but the id: equal hashes mean exact duplicates."""
        row = self.to_row()
        row.pop("prompt_id")
        return _digest(json.dumps(row, sort_keys=True, ensure_ascii=False, allow_nan=True))


def records_to_table(records: list[ListwiseRecord], dimensions: Optional[list[str]] = None) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=listwise_schema(dimensions))


# ----------------------------------------------------------------------------------------------------
# Prompt ids
# ----------------------------------------------------------------------------------------------------


def _digest(text: str, size: int = 16) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=size).hexdigest()


def prompt_key(prompt: list[dict[str, str]]) -> str:
    """A stable key for a prompt's messages: ``h`` + 16 hex digits of their canonical JSON."""
    canonical = json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)
    return "h" + _digest(canonical, 8)


def derive_prompt_id(prompt: list[dict[str, str]], responses: list[str]) -> str:
    """Id for sources without one: ``<prompt key>#<responses hash>``.

    The prompt part keeps every row of the same prompt on the same side of the train/eval split; the
    responses part makes two different response lists for one prompt two rows, while an exact duplicate
    row gets the same id (and is then rejected as ``duplicate_row``).
    """
    return f"{prompt_key(prompt)}#{_digest(json.dumps(responses, ensure_ascii=False), 4)}"


def split_key(prompt_id: str) -> str:
    """The part of a prompt id that decides the train/eval split: everything before the first ``#``."""
    return prompt_id.split("#", 1)[0]
