"""Files and storage without Ray: listing, streaming raw rows, writing Parquet/JSONL, local or ``s3://``.

Storage (local or S3, endpoint and credentials) is :mod:`raypo.storage`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from raypo.data.schema import ListwiseRecord, dimensions_of, records_to_table
from raypo.data.validate import UndecodableLine, decode_jsonl_lines
from raypo.storage import atomic_output, fsspec_for

DATA_EXTENSIONS = (".parquet", ".jsonl", ".json")


def list_data_files(path: str, s3_cfg: Any = None) -> list[str]:
    """The Parquet/JSONL files at ``path`` (one file, or a directory searched recursively), sorted."""
    path = str(path)
    fs = fsspec_for(path, s3_cfg)
    if fs.isfile(path):
        return [path]
    if not fs.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist; check the path (data.train_path, "
                                "data.eval_path or the command's argument)")
    files = sorted(f for f in fs.find(path) if f.endswith(DATA_EXTENSIONS)
                   and not os.path.basename(f).startswith(("_", ".")))
    if path.startswith("s3://"):
        files = [f if f.startswith("s3://") else "s3://" + f for f in files]
    return files


def file_format(path: str, s3_cfg: Any = None) -> str:
    """``parquet`` or ``jsonl``, from the files' extensions (``.json`` files are read as JSON lines)."""
    files = list_data_files(path, s3_cfg)
    kinds = {"parquet" if f.endswith(".parquet") else "jsonl" for f in files}
    if not kinds:
        raise FileNotFoundError(f"no .parquet, .jsonl or .json files under {path!r}")
    if len(kinds) > 1:
        raise ValueError(f"{path!r} mixes Parquet and JSONL files; keep one format per dataset path")
    return kinds.pop()


def read_dimensions(path: str, s3_cfg: Any = None) -> Optional[list[str]]:
    """Dimension names from the Parquet schema metadata of the first file at ``path``, or None."""
    files = [f for f in list_data_files(path, s3_cfg) if f.endswith(".parquet")]
    if not files:
        return None
    with fsspec_for(files[0], s3_cfg).open(files[0], "rb") as f:
        return dimensions_of(pq.read_schema(f))


def iter_raw_rows(path: str, s3_cfg: Any = None, batch_size: int = 1024) -> Iterator[Any]:
    """Stream the rows at ``path``: dicts from Parquet, raw text lines from JSONL (empty lines skipped).

    JSONL lines are read as bytes and not parsed here, so a malformed line becomes a counted
    ``invalid_json`` rejection and a line that is not UTF-8 an ``invalid_utf8`` one
    (:func:`~raypo.data.validate.decode_jsonl_lines`).
    """
    fmt = file_format(path, s3_cfg)
    for name in list_data_files(path, s3_cfg):
        fs = fsspec_for(name, s3_cfg)
        if fmt == "parquet":
            with fs.open(name, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                    yield from batch.to_pylist()
        else:
            with fs.open(name, "rb") as f:
                yield from decode_jsonl_lines(f, name)


UTF8_ERROR_COLUMN = "_utf8_error"  # JSON of an UndecodableLine for a line that is not UTF-8, else null


def jsonl_lines_batch(batch: pa.Table) -> pa.Table:
    """``map_batches`` over whole JSONL files (``bytes``, ``path``) -> one row per non-blank line:
    ``text`` and, for a line that is not UTF-8, :data:`UTF8_ERROR_COLUMN`."""
    texts: list[str] = []
    errors: list[Optional[str]] = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        for line in decode_jsonl_lines(data.splitlines(keepends=True), path):
            bad = isinstance(line, UndecodableLine)
            texts.append(line.text if bad else line)
            errors.append(json.dumps(dataclasses.asdict(line)) if bad else None)
    return pa.table({"text": pa.array(texts, pa.string()), UTF8_ERROR_COLUMN: pa.array(errors, pa.string())})


def text_row(row: dict[str, Any], text_column: str) -> Any:
    error = row.get(UTF8_ERROR_COLUMN)
    return row[text_column] if error is None else UndecodableLine(**json.loads(error))


def text_rows(batch: pa.Table, text_column: str) -> list[Any]:
    """The JSONL lines of a batch: ``str``, or an :class:`UndecodableLine` where the bytes were not UTF-8."""
    texts = batch.column(text_column).to_pylist()
    if UTF8_ERROR_COLUMN not in batch.column_names:
        return texts
    return [t if e is None else UndecodableLine(**json.loads(e))
            for t, e in zip(texts, batch.column(UTF8_ERROR_COLUMN).to_pylist())]


def _output_file(path: str, suffix: str) -> str:
    """``path`` itself if it names a file with ``suffix``, else ``path/part-00000<suffix>``."""
    path = str(path)
    return path if path.endswith(suffix) else path.rstrip("/") + f"/part-00000{suffix}"


def write_table(table: pa.Table, path: str, s3_cfg: Any = None) -> str:
    """Write one Arrow table as Parquet (``.parquet`` file or a directory) or JSONL (``.jsonl``)."""
    target = _output_file(path, ".jsonl" if str(path).endswith(".jsonl") else ".parquet")
    # atomic: a full disk or a missing permission leaves no truncated file, and one line naming the path
    if target.endswith(".jsonl"):
        with atomic_output(target, "w", s3_cfg, encoding="utf-8") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n")
    else:
        with atomic_output(target, "wb", s3_cfg) as f:
            pq.write_table(table, f)
    return target


def write_records(records: Iterable[ListwiseRecord], path: str, dimensions: list[str],
                  s3_cfg: Any = None) -> str:
    """Write listwise records (dimension names in the schema metadata); returns the file written."""
    return write_table(records_to_table(list(records), dimensions), path, s3_cfg)


def read_table(path: str, s3_cfg: Any = None) -> pa.Table:
    """All Parquet files at ``path`` as one table, with the first file's schema metadata."""
    tables = []
    for name in list_data_files(path, s3_cfg):
        with fsspec_for(name, s3_cfg).open(name, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def parquet_rows(path: str, s3_cfg: Any = None) -> Optional[int]:
    """Rows of the Parquet files at ``path`` from their footers (no data read); None for JSONL or when the
    files cannot be listed."""
    try:
        files = list_data_files(path, s3_cfg)
        if not files or not all(f.endswith(".parquet") for f in files):
            return None
        total = 0
        for name in files:
            with fsspec_for(name, s3_cfg).open(name, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total
    except (OSError, ValueError):
        return None
