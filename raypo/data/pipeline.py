"""Ray Data pipeline: read -> convert + validate -> tokenise -> split -> hand off to Ray Train.

::

    source (local dir/file, s3://, HF datasets.Dataset, synthetic://)       Parquet or JSONL
      | read_source                 raw rows (JSONL: one line per row, parsed in the next stage so a bad
      |                             line is a counted rejection, not a failed read)
      | stage_rows                  map_batches(convert_batch): converter + row rules -> staged rows
      | finalize_staged             pairwise merge (by prompt) and duplicate prompt ids (by id): only keys
      |                             seen twice are grouped, on the driver or with a Ray groupby
      | tokenize_dataset            map_batches(TokenizeBatch), an actor per tokenizer
      | report                      every input row: accepted or rejected by reason (+ quarantine file)
      | split_train_eval            seeded hash of the prompt id (stable across runs and cluster sizes)
      v
    build_datasets -> (train_ds, eval_ds, report)      shuffle_for_epoch / trainer_datasets per epoch
                                                       ray.train.get_dataset_shard(train_key(epoch))

Rows are whole listwise groups, so no stage (map, groupby, streaming_split) can split a group.

S3: ``s3://`` paths use s3fs (:mod:`raypo.data.io`). The endpoint and region come from ``data.s3`` or the
environment (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``);
credentials only from the environment or the AWS credential chain (botocore), and raypo never prints or
logs them.

The split, the epoch order and the hand-off to Ray Train are :mod:`raypo.data.splits`. :func:`build_rows`
is the same pipeline in plain Python (no Ray), for tests, benchmarks and the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from raypo.data.formats import ConvertOptions, check_format, convert_row, dimensions_for
from raypo.data.groups import convert_records, looks_like_oasst, merge_pair_group, prepare_ranked_rows
from raypo.data.hf_source import is_hf_source, open_hf_source
from raypo.data.io import (
    file_format,
    iter_raw_rows,
    jsonl_lines_batch,
    list_data_files,
    parquet_rows,
    read_dimensions,
    text_row,
    text_rows,
)
from raypo.data.schema import (
    LISTWISE_FIELDS,
    STAGE_COLUMNS,
    ListwiseRecord,
    listwise_schema,
    staged_schema,
    with_dimensions,
)
from raypo.data.splits import in_eval, split_train_eval
from raypo.data.synthetic import (
    is_synthetic_uri,
    parse_synthetic_uri,
    spec_records,
    spec_table,
    synthetic_dimensions,
)
from raypo.data.tokenize import TokenizeBatch, TokenizeConfig, load_tokenizer, tokenize_rows
from raypo.data.validate import (
    Outcome,
    ValidationReport,
    quarantine_row,
    resolve_duplicates,
    write_quarantine,
)
from raypo.progress import ray_data_stage, track
from raypo.storage import filesystem_for, s3_options_of

logger = logging.getLogger(__name__)

_LISTWISE_NAMES = tuple(f.name for f in LISTWISE_FIELDS)


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def read_source(source: Any, s3_cfg: Any = None):
    """A Ray Dataset of raw rows from a path/URI, a ``synthetic://`` URI or a HF ``datasets`` object.

    JSONL is read as bytes and split into lines here (column ``text``, one line per row, empty lines
    skipped; :func:`jsonl_lines_batch`) and parsed by the conversion stage, so a malformed line or one that
    is not UTF-8 is one counted rejection instead of a failed read.
    """
    import ray.data

    if not isinstance(source, str):
        return ray.data.from_huggingface(source)
    if is_synthetic_uri(source):
        return ray.data.from_arrow(spec_table(parse_synthetic_uri(source)))
    fs = filesystem_for(source, s3_cfg)
    files = list_data_files(source, s3_cfg)
    if file_format(source, s3_cfg) == "parquet":
        return ray.data.read_parquet(files, filesystem=fs)
    # not read_text: it decodes a whole file at once, so one bad byte fails the read
    return ray.data.read_binary_files(files, filesystem=fs, include_paths=True).map_batches(
        jsonl_lines_batch, batch_format="pyarrow", batch_size=1)


def convert_batch(batch: pa.Table, fmt: str, opts: ConvertOptions, dimensions: list[str],
                  text_column: Optional[str] = None) -> pa.Table:
    """``map_batches`` function: raw rows -> staged listwise rows (accepted, or rejected with a reason)."""
    if text_column is not None:
        raws: list[Any] = text_rows(batch, text_column)
    else:
        raws = batch.to_pylist()
    rows = [_staged(convert_row(fmt, raw, opts, dimensions)) for raw in raws]
    return pa.Table.from_pylist(rows, schema=staged_schema(listwise_schema(dimensions)))


def _staged(o: Outcome, notes: Optional[Counter] = None) -> dict[str, Any]:
    row: dict[str, Any] = o.record.to_row() if o.record is not None else dict.fromkeys(_LISTWISE_NAMES)
    row.update({"_reject_reason": o.reason, "_reject_detail": o.detail, "_raw": o.raw,
                "_repairs": o.repairs, "_source_rows": o.source_rows, "_group_key": o.group_key,
                "_notes": list((notes or Counter()).elements()) or None})
    return row


def _outcome(row: dict[str, Any]) -> Outcome:
    rec = ListwiseRecord.from_row(row) if row.get("_reject_reason") is None else None
    return Outcome(rec, row.get("_reject_reason"), row.get("_reject_detail") or "", row.get("_raw"),
                   list(row.get("_repairs") or []), int(row.get("_source_rows") or 1), row.get("_group_key"))


def _filter_rejected(batch: pa.Table, rejected: bool) -> pa.Table:
    is_null = pc.is_null(batch.column("_reject_reason"))
    return batch.filter(pc.invert(is_null) if rejected else is_null)


def split_rejected(ds):
    """(accepted rows, rejected rows) of a staged dataset."""
    kw = {"batch_format": "pyarrow", "zero_copy_batch": True}
    return (ds.map_batches(_filter_rejected, fn_kwargs={"rejected": False}, **kw),
            ds.map_batches(_filter_rejected, fn_kwargs={"rejected": True}, **kw))


def _merge_pairs_group(group: pa.Table, merge: bool, schema: pa.Schema) -> pa.Table:
    """One pairwise group key -> merged or separate rows (see :func:`merge_pair_group`)."""
    outcomes, notes = merge_pair_group([_outcome(r) for r in group.to_pylist()], merge)
    rows = [_staged(o, notes if i == 0 else None) for i, o in enumerate(outcomes)]
    return pa.Table.from_pylist(rows, schema=schema)


def _resolve_duplicates_group(group: pa.Table, schema: pa.Schema) -> pa.Table:
    """The rows sharing one prompt id -> kept and rejected rows (see :func:`resolve_duplicates`)."""
    outcomes = resolve_duplicates([_outcome(r) for r in group.to_pylist()])
    return pa.Table.from_pylist([_staged(o) for o in outcomes], schema=schema)


def _select_keys(batch: pa.Table, column: str, keys: list[str], keep: bool) -> pa.Table:
    hit = pc.is_in(batch.column(column), value_set=pa.array(keys, pa.string()))
    return batch.filter(hit if keep else pc.invert(hit))


# Rows of multi-row groups up to this many are grouped on the driver (cheap, exact); beyond it a Ray
# groupby does it on the cluster (a hash shuffle: scalable, but seconds of fixed cost).
DRIVER_GROUP_LIMIT = 100_000


def _group_and_apply(ds, column: str, fn, fn_kwargs: dict[str, Any], schema: pa.Schema):
    """Apply ``fn`` to every group of rows sharing ``column`` whose key occurs more than once; rows with
    a unique key pass through untouched. Returns the resulting (materialised) dataset."""
    import ray.data

    counts: Counter = Counter()
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow"):
        counts.update(batch.column(column).to_pylist())
    keys = sorted(k for k, n in counts.items() if n > 1)
    if not keys:
        return ds
    kw = {"batch_format": "pyarrow"}
    rest = ds.map_batches(_select_keys, fn_kwargs={"column": column, "keys": keys, "keep": False}, **kw)
    multi = ds.map_batches(_select_keys, fn_kwargs={"column": column, "keys": keys, "keep": True}, **kw)
    if sum(counts[k] for k in keys) <= DRIVER_GROUP_LIMIT:
        table = pa.concat_tables(list(multi.iter_batches(batch_format="pyarrow")))
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(table.column(column).to_pylist()):
            groups.setdefault(key, []).append(i)
        parts = [fn(table.take(idx), **fn_kwargs) for _, idx in sorted(groups.items())]
        done = ray.data.from_arrow(pa.concat_tables(parts))
    else:
        from ray.data.context import ShuffleStrategy

        multi = multi.materialize()
        # A sort-based shuffle runs as tasks; the default hash shuffle starts aggregator actors that hold
        # CPUs (on a small cluster, for many seconds). Set on this dataset's own context copy only.
        multi.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        done = multi.groupby(column).map_groups(fn, fn_kwargs=fn_kwargs, **kw)
    return rest.union(done).materialize()


def stage_rows(source: Any, fmt: str, opts: ConvertOptions, s3_cfg: Any = None,
               dimensions: Optional[list[str]] = None) -> tuple[Any, list[str], Counter]:
    """Read ``source`` and run the row stage; returns (staged dataset, dimension names, notes)."""
    import ray.data

    check_format(fmt)
    ds = read_source(source, s3_cfg)
    notes: Counter = Counter()
    text_column = "text" if isinstance(source, str) and not is_synthetic_uri(source) and \
        file_format(source, s3_cfg) == "jsonl" else None
    if dimensions is None:
        dimensions = dimensions_for(fmt, opts) if fmt != "listwise" or opts.dimensions else \
            _listwise_dimensions(source, s3_cfg, lambda: _first(ds.take(1), text_column))
    opts = ConvertOptions(dimensions, opts.keep_system_prompt, opts.merge_pairs, opts.extra)
    kwargs = {"fmt": fmt, "opts": opts, "dimensions": dimensions, "text_column": text_column}
    if fmt == "ranked":
        first = ds.take(1)
        if first and looks_like_oasst(first[0][text_column] if text_column else first[0]):
            # OpenAssistant trees: a reply's prompt is its whole ancestry, so the tree is assembled (and
            # converted) on the driver.
            raws = [text_row(r, text_column) if text_column else r for r in ds.take_all()]
            rows, notes = prepare_ranked_rows(raws)
            table = pa.Table.from_pylist([_staged(convert_row(fmt, r, opts, dimensions)) for r in rows],
                                         schema=staged_schema(listwise_schema(dimensions)))
            return ray.data.from_arrow(table), dimensions, notes
    return ds.map_batches(convert_batch, batch_format="pyarrow", fn_kwargs=kwargs), dimensions, notes


def _first(rows: list, text_column: Optional[str]) -> Any:
    if not rows:
        return None
    return rows[0][text_column] if text_column else rows[0]


def _listwise_dimensions(source: Any, s3_cfg: Any, first_row: Optional[Any] = None) -> list[str]:
    """Dimension names of native listwise data: synthetic data's own, the Parquet schema metadata, or none
    when the data has no ratings at all (ranks only); otherwise the user must name them."""
    if isinstance(source, str) and is_synthetic_uri(source):
        return synthetic_dimensions(source)
    if isinstance(source, str):
        dims = read_dimensions(source, s3_cfg)
        if dims is not None:
            return dims
    num_ratings = _ratings_per_response(first_row()) if first_row is not None else None
    if num_ratings == 0:
        return []  # ranks only: nothing to name
    jsonl = isinstance(source, str) and file_format(source, s3_cfg) == "jsonl"
    kind = "JSON lines carry no schema metadata" if jsonl else \
        "its Parquet schema has no raypo.dimensions metadata"
    seen = f" (its first row has {num_ratings} rating(s) per response)" if num_ratings else ""
    raise ValueError(f"the dimension names of {source!r} are unknown: {kind}{seen}; set data.dimensions "
                     "(e.g. [helpfulness, honesty]; --dimensions helpfulness,honesty on the command line) "
                     "or write the data with `raypo data convert`")


def _ratings_per_response(row: Any) -> Optional[int]:
    """m of a row's ``scores`` ([N][m]; 0 when it has none), or None when it cannot be read. ``row``: a
    mapping, or one line of JSON."""
    if isinstance(row, (str, bytes)):
        try:
            row = json.loads(row)
        except ValueError:
            return None
    if not isinstance(row, dict):
        return None
    scores = row.get("scores")
    if scores is None or len(scores) == 0:
        return 0
    item = scores[0]
    if item is None:
        return None
    return len(item) if hasattr(item, "__len__") else 1


def finalize_staged(staged, fmt: str, opts: ConvertOptions, dimensions: list[str]):
    """The across-row steps on a staged dataset; returns (accepted, rejected) staged datasets.

    Pairwise rows are grouped by prompt and merged (:func:`merge_pair_group`); then rows whose prompt id
    occurs more than once are grouped by id and resolved (:func:`resolve_duplicates`). The keys are
    counted on the driver first, so only keys that occur more than once are grouped at all.
    """
    schema = staged_schema(listwise_schema(dimensions))
    accepted, rejected = split_rejected(staged.materialize())
    parts_rejected = [rejected]
    accepted = accepted.materialize()
    if fmt == "pairwise":
        merged = _group_and_apply(accepted, "_group_key", _merge_pairs_group,
                                  {"merge": opts.merge_pairs, "schema": schema}, schema)
        accepted, more = split_rejected(merged)
        parts_rejected.append(more)
        accepted = accepted.materialize()
    resolved = _group_and_apply(accepted, "prompt_id", _resolve_duplicates_group, {"schema": schema}, schema)
    accepted, more = split_rejected(resolved)
    parts_rejected.append(more)
    rejected = parts_rejected[0].union(*parts_rejected[1:])
    return accepted, rejected.materialize()


def tokenize_dataset(ds, tokenizer_path: str, cfg: TokenizeConfig, dimensions: list[str],
                     concurrency: int = 1, batch_size: int = 256, s3_cfg: Any = None):
    """``map_batches(TokenizeBatch)``: staged listwise rows -> tokenised rows (+ overlong rejections)."""
    import ray.data

    return ds.map_batches(TokenizeBatch, fn_constructor_args=(tokenizer_path, cfg, dimensions, s3_cfg),
                          batch_format="pyarrow", batch_size=batch_size,
                          compute=ray.data.ActorPoolStrategy(size=concurrency))


# ----------------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------------


def count_into(report: ValidationReport, ds) -> None:
    """Add a staged/tokenised dataset's rows to ``report`` (accepted or rejected, repairs, notes)."""
    cols = ["_reject_reason", "_source_rows", "_repairs", "_notes"]
    for batch in ds.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=4096):
        for reason, n, repairs, notes in zip(*(batch.column(c).to_pylist() for c in cols)):
            report.add(Outcome(reason=reason, repairs=list(repairs or []), source_rows=int(n or 1)))
            report.notes.update(notes or [])


def write_quarantine_datasets(datasets: list[Any], path: str, stages: list[str], s3_cfg: Any = None) -> int:
    """Write the rejected rows of ``datasets`` (one stage name each) as one JSONL file at ``path``."""

    def rows():
        for ds, stage in zip(datasets, stages):
            cols = ["_reject_reason", "_reject_detail", "_raw", "_source_rows"]
            for r in ds.select_columns(cols).iter_rows():
                yield quarantine_row(Outcome(reason=r["_reject_reason"], detail=r["_reject_detail"] or "",
                                             raw=r["_raw"], source_rows=int(r["_source_rows"] or 1)), stage)

    return write_quarantine(rows(), path, s3_options_of(s3_cfg) if str(path).startswith("s3://") else None)


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------


def convert_options(data_cfg: Any) -> ConvertOptions:
    return ConvertOptions(dimensions=list(data_cfg.dimensions) or None,
                          keep_system_prompt=getattr(data_cfg, "keep_system_prompt", False),
                          merge_pairs=getattr(data_cfg, "merge_pairs", True))


def _process(source: Any, data_cfg: Any, tokenizer_path: Optional[str], label: str):
    """Read, convert, validate and (with a tokenizer) tokenise one source; returns (accepted ds, report,
    dims) with the report's counts final and the quarantine written. Shows the stage's progress
    (:func:`raypo.progress.ray_data_stage`)."""
    with ray_data_stage(f"data {label}" + (" (read, validate, tokenize)" if tokenizer_path else "")) as stage:
        accepted, report, dims = _process_stages(source, data_cfg, tokenizer_path, label)
        stage.done = report.input_rows
    return accepted, report, dims


def _process_stages(source: Any, data_cfg: Any, tokenizer_path: Optional[str], label: str):
    if is_hf_source(source):  # a save_to_disk directory or hf://... (raypo.data.hf_source)
        source = open_hf_source(source, role="eval" if label == "eval" else "train")
    fmt = "listwise" if isinstance(source, str) and is_synthetic_uri(source) else data_cfg.format
    opts = convert_options(data_cfg)
    staged, dims, notes = stage_rows(source, fmt, opts, data_cfg.s3)
    accepted, rejected = finalize_staged(staged, fmt, opts, dims)
    report = ValidationReport(source=label, notes=notes, dimensions=dims)
    rejected_parts, stages = [rejected], ["convert"]
    if tokenizer_path is not None:
        tok = tokenize_dataset(accepted, tokenizer_path, TokenizeConfig.from_data_config(data_cfg), dims,
                               concurrency=data_cfg.tokenize_concurrency, s3_cfg=data_cfg.s3).materialize()
        accepted, tok_rejected = split_rejected(tok)
        rejected_parts.append(tok_rejected)
        stages.append("tokenize")
        count_into(report, tok)
    else:
        accepted = accepted.materialize()
        count_into(report, accepted)
    count_into(report, rejected)
    if data_cfg.quarantine_path and report.rejected_rows:
        path = data_cfg.quarantine_path if label == "train" else _suffixed(data_cfg.quarantine_path, label)
        write_quarantine_datasets(rejected_parts, path, stages, data_cfg.s3)
    return accepted.drop_columns(list(STAGE_COLUMNS)), report, dims


def _suffixed(path: str, label: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.{label}{ext or '.jsonl'}"


def build_datasets(data_cfg: Any, tokenizer_path: Optional[str], *, check: bool = True,
                   train_source: Any = None, eval_source: Any = None):
    """Tokenised train and eval Ray Datasets and the validation report, from a ``DataConfig``.

    Rows: ``prompt_id, prompt_ids, response_ids, response_masks, scores [N][m], ranks, psi,
    num_responses, prompt_length, response_lengths, num_tokens, ref_logps, ref_entropy`` (see
    :func:`raypo.data.schema.tokenized_schema`); the dimension names are in the datasets' schema
    metadata and in ``report.dimensions``.

    Eval rows come from ``data.eval_path`` if set, else from the train source by
    :func:`split_train_eval` with ``data.eval_fraction`` and ``data.split_seed``. Both datasets are
    materialised. With ``check`` (default), raises :class:`~raypo.data.validate.DataQualityError` (which
    carries the report) when more than ``data.max_reject_fraction`` of the rows were rejected.
    ``tokenizer_path=None`` skips tokenisation (listwise rows are returned). ``train_source`` /
    ``eval_source`` override the config's paths with any source :func:`read_source` takes, e.g. a Hugging
    Face ``datasets.Dataset``.
    """
    train, report, dims = _process(train_source if train_source is not None else data_cfg.train_path,
                                   data_cfg, tokenizer_path, "train")
    eval_source = eval_source if eval_source is not None else data_cfg.eval_path
    if eval_source is not None:
        evals, eval_report, _ = _process(eval_source, data_cfg, tokenizer_path, "eval")
        report = report.merge(eval_report)
    else:
        train, evals = split_train_eval(train, data_cfg.eval_fraction, data_cfg.split_seed)
    report.dimensions = dims
    if check:
        report.check(data_cfg.max_reject_fraction)
    logger.info("data: %s", json.dumps(report.to_dict()))
    return train.materialize(), evals.materialize(), report


def convert_dataset(source: Any, fmt: str, data_cfg: Any, output: Optional[str] = None):
    """Convert ``source`` to listwise rows with Ray Data; optionally write them to ``output`` as Parquet.

    Returns (accepted listwise dataset, report, dimension names).
    """
    cfg = _with(data_cfg, format=fmt)
    ds, report, dims = _process(source, cfg, None, "convert")
    if output is not None:
        write_parquet(ds, output, dims, data_cfg.s3)
    return ds, report, dims


def _with(data_cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(data_cfg, **changes)


def _set_dimensions(batch: pa.Table, dimensions: list[str]) -> pa.Table:
    return batch.replace_schema_metadata(with_dimensions(batch.schema, dimensions).metadata)


def write_parquet(ds, path: str, dimensions: list[str], s3_cfg: Any = None) -> None:
    """Write a listwise or tokenised dataset as Parquet (local or ``s3://``), dimensions in the schema."""
    ds.map_batches(_set_dimensions, fn_kwargs={"dimensions": dimensions}, batch_format="pyarrow") \
        .write_parquet(path, filesystem=filesystem_for(path, s3_cfg))


def read_parquet(path: str, s3_cfg: Any = None):
    """Read a dataset written by :func:`write_parquet` (or ``raypo data convert``)."""
    import ray.data

    return ray.data.read_parquet(path, filesystem=filesystem_for(path, s3_cfg))


# ----------------------------------------------------------------------------------------------------
# The same pipeline in plain Python
# ----------------------------------------------------------------------------------------------------


def _source_format(source: Any, data_cfg: Any) -> str:
    return "listwise" if isinstance(source, str) and is_synthetic_uri(source) else data_cfg.format


def source_rows(source: Any, s3_cfg: Any = None) -> Optional[int]:
    """The number of raw rows of ``source`` when it is cheap to know (a HF dataset, ``synthetic://``,
    Parquet metadata), else None (JSONL is not scanned twice)."""
    if not isinstance(source, str):
        return len(source) if hasattr(source, "__len__") else None
    if is_synthetic_uri(source):
        return parse_synthetic_uri(source).num_prompts
    return parquet_rows(source, s3_cfg)


def iter_source_rows(source: Any, s3_cfg: Any = None):
    """Raw rows of a path/URI (dicts or JSONL lines), a ``synthetic://`` URI or a HF dataset, streamed."""
    if not isinstance(source, str):
        yield from iter(source)
    elif is_synthetic_uri(source):
        yield from (r.to_row() for r in spec_records(parse_synthetic_uri(source)))
    else:
        yield from iter_raw_rows(source, s3_cfg)


def process_rows(source: Any, data_cfg: Any, tokenizer: Any = None, label: str = ""):
    """Convert, validate and (with a tokenizer: object or path) tokenise one source in plain Python.

    Returns (rows, report, dims): listwise rows without a tokenizer, else tokenised rows; the report
    counts every input row; the quarantine file is written when ``data.quarantine_path`` is set.
    """
    if is_hf_source(source):
        source = open_hf_source(source, role="eval" if label == "eval" else "train")
    fmt = _source_format(source, data_cfg)
    opts = convert_options(data_cfg)
    dims = None if fmt != "listwise" or opts.dimensions else _listwise_dimensions(
        source, data_cfg.s3, lambda: next(iter(iter_source_rows(source, data_cfg.s3)), None))
    rows = track(iter_source_rows(source, data_cfg.s3), f"data {label or 'read'}",
                 source_rows(source, data_cfg.s3))
    result = convert_records(rows, fmt, opts, dims, source=label)
    report = ValidationReport(source=label, notes=result.report.notes, dimensions=result.dimensions)
    rejected = [(o, "convert") for o in result.rejected]
    for o, _ in rejected:
        report.add(o)
    accepted = [o for o in result.outcomes if o.accepted]
    if tokenizer is None:
        rows = [o.record.to_row() for o in accepted]
        for o in accepted:
            report.add(o)
    else:
        tok = load_tokenizer(tokenizer, data_cfg.s3) if isinstance(tokenizer, str) else tokenizer
        staged = [{**o.record.to_row(), "_repairs": o.repairs, "_source_rows": o.source_rows, "_raw": o.raw}
                  for o in accepted]
        rows = []
        for t in tokenize_rows(staged, tok, TokenizeConfig.from_data_config(data_cfg)) if staged else []:
            o = Outcome(reason=t["_reject_reason"], detail=t["_reject_detail"], raw=t["_raw"],
                        repairs=t["_repairs"], source_rows=t["_source_rows"])
            report.add(o)
            if o.accepted:
                rows.append({k: v for k, v in t.items() if not k.startswith("_")})
            else:
                rejected.append((o, "tokenize"))
    if data_cfg.quarantine_path and rejected:
        # the path is used as given; only a separate eval source gets its own ``<name>.eval.jsonl``
        path = _suffixed(data_cfg.quarantine_path, label) if label == "eval" else data_cfg.quarantine_path
        write_quarantine((quarantine_row(o, stage) for o, stage in rejected), path,
                         s3_options_of(data_cfg.s3) if str(path).startswith("s3://") else None)
    return rows, report, result.dimensions


def build_rows(data_cfg: Any, tokenizer: Any, *, check: bool = True):
    """:func:`build_datasets` without Ray: (train rows, eval rows, report), rows as Python dicts."""
    train, report, dims = process_rows(data_cfg.train_path, data_cfg, tokenizer, "train")
    if data_cfg.eval_path:
        evals, eval_report, _ = process_rows(data_cfg.eval_path, data_cfg, tokenizer, "eval")
        report = report.merge(eval_report)
    else:
        flags = [in_eval(r["prompt_id"], data_cfg.eval_fraction, data_cfg.split_seed) for r in train]
        train, evals = [r for r, f in zip(train, flags) if not f], [r for r, f in zip(train, flags) if f]
    report.dimensions = dims
    if check:
        report.check(data_cfg.max_reject_fraction)
    return train, evals, report
