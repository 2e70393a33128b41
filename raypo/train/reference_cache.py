"""A cache of precomputed reference log-probs, keyed so that a stale entry is never used.

:func:`cached_reference_logprobs` wraps :func:`raypo.train.reference.add_reference_logprobs` (the Ray Data
batch-inference stage) with a cache directory, local or ``s3://``, so a second run over the same data with
the same reference model (a restarted job, the trials of a Ray Tune sweep) reads the columns instead of
running the reference model again.

Key. ``key = blake2b(canonical JSON of the components below)[:32 hex]``; an entry is used only when its
manifest holds exactly the same components (so a hash collision or a format change is a miss, not a hit):

* ``model``: a fingerprint of the reference model's files: the sha256 of the *content* of every top-level
  file of the model directory (config, weights, custom code; not docs or hidden files). Content, not
  size + mtime: checkpoints of one architecture have identical sizes, and ``cp -p`` / ``rsync -t`` /
  ``shutil.copy2`` keep the source's mtime, so a replaced checkpoint could keep both. Hashing costs about
  one read of the weights (~10 s per 16 GB), once per process: the digest is remembered under the file's
  (path, inode, size, mtime_ns, ctime_ns), and ctime changes on every write or rename, which no tool can
  set back.
* ``rows``: a fingerprint of the tokenised rows themselves: blake2b of each row's ``prompt_ids``,
  ``response_ids`` and ``response_masks`` (the only inputs of the reference forward), combined order-free
  (the sorted row digests are hashed), plus the row count. Every data setting that changes what the
  reference sees (source files, filters, tokenizer, chat template, max lengths and truncation, think-block
  masking, the train/eval split) changes these bytes; settings that do not (shuffle seed, scores) do not
  cause a miss.
* ``with_entropy``: MallowsPO's reference entropies are needed (an entry without them cannot serve).
* ``dtype``, ``attention``, ``prefix_sharing``, ``batch_size``: how the stage computes; they change the
  values in their last bits (bf16 vs fp32 much more), so they are part of the key too.
* ``batching``: ``train.reference_batching``; ``batched`` entries (one forward per batch of rows) differ in
  their last bits from ``per_group`` ones. Left out of the components when ``per_group``, so entries
  written before the setting existed (all per group) keep their key.
* ``format``: :data:`CACHE_FORMAT`, bumped when the layout below or the way values are computed changes
  (format 2: one forward per group, :func:`raypo.train.reference.add_reference_logprobs`; entries of format
  1 were scored in batches of groups and differ in their last bits).

Layout. ``<cache_dir>/<key>/manifest.json`` (the components, the row count and the name of the data
directory) is written last, after ``<cache_dir>/<key>/<uuid>/part-00000.parquet`` (columns ``_ref_key``,
the 16-byte row digest, ``ref_logps`` and, with entropies, ``ref_entropy``). A reader trusts only a
directory whose manifest matches; concurrent writers (two Tune trials missing at once) write different
uuid directories and either manifest is valid.

Records. ``<cache_dir>/<key>/dispersion/<digest>.json`` holds MallowsPO's dispersion scale c calibrated
from the entry's entropies by the last run that read them (:func:`write_entry_record`,
raypo/train/dispersion.py); a record for the user, never read to serve the entry.

Read. The cached columns are joined back onto ``ds`` by row digest (a ``map_batches`` with the lookup
table as an actor's constructor argument, so it is shipped once): the returned dataset is ``ds`` itself
with ``ref_logps`` (and ``ref_entropy``) filled, whatever its order or other columns. The lookup table is
held in memory (about 24 + 16 N bytes per row); for datasets of many millions of rows shard the cache by
the data's own splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from raypo.config import RaypoConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
KEY_COLUMN = "_ref_key"
_REF_COLUMNS = ("ref_logps", "ref_entropy")
_SKIP_MODEL_FILES = (".md", ".txt", ".png", ".jpg", ".gitattributes")
_HASH_MEMO: dict[tuple, str] = {}
# dataset returned by cached_reference_logprobs -> the entry directory it was filled from
_ENTRY_OF: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered under (path, inode, size, mtime_ns, ctime_ns)."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _HASH_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = _HASH_MEMO[memo_key] = h.hexdigest()
    return digest


def _local_model_dir(ref_path: str) -> Path:
    """The local directory of ``ref_path``: a directory as is, ``s3://`` and ``tiny://`` from this node's
    cache (copied or built if missing), a Hugging Face id from the local HF cache."""
    from raypo.model.gguf_source import is_gguf_source
    from raypo.model.loading import resolve_model_source
    from raypo.model.tiny import is_tiny_spec

    if str(ref_path).startswith("s3://") or is_tiny_spec(str(ref_path)) or is_gguf_source(str(ref_path)):
        ref_path = resolve_model_source(str(ref_path))
    path = Path(os.path.expanduser(str(ref_path)))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(ref_path), local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any failure means: no local files to fingerprint
        raise ValueError(f"cannot fingerprint reference model {ref_path!r} for the reference cache: it is "
                         "neither a local directory, s3:// or tiny://, nor in the local Hugging Face cache; "
                         "pass a local path") from err


def model_fingerprint(ref_path: str) -> dict[str, str]:
    """``{file name: sha256 of its content}`` for the top-level files of the model directory.

    Hidden files (raypo's ``.raypo-complete`` marker) and documentation are left out; subdirectories too
    (Hugging Face loads only top-level files).
    """
    root = _local_model_dir(ref_path)
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                   and not p.name.lower().endswith(_SKIP_MODEL_FILES))
    if not any(p.name == "config.json" for p in files):
        raise ValueError(f"reference model directory {str(root)!r} has no config.json; is it a Hugging Face "
                         "model directory?")
    return {p.name: _file_sha256(p) for p in files}


def _ints(values: Iterable[Any]) -> bytes:
    """Length-prefixed little-endian int64s (unambiguous concatenation)."""
    items = [int(v) for v in values]
    return struct.pack(f"<q{len(items)}q", len(items), *items)


def row_digest(prompt_ids, response_ids, response_masks=None) -> bytes:
    """16-byte blake2b of one row's reference inputs: prompt ids, each response's ids and scored mask."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"P" + _ints(prompt_ids))
    h.update(b"N" + _ints([len(response_ids)]))
    for i, response in enumerate(response_ids):
        h.update(b"R" + _ints(response))
        mask = response_masks[i] if response_masks is not None else None
        h.update(b"M" + (_ints(mask) if mask is not None else b"-"))
    return h.digest()


def add_row_digests(batch: pa.Table) -> pa.Table:
    """``map_batches`` function: append the ``_ref_key`` column (:func:`row_digest` of each row)."""
    prompts = batch.column("prompt_ids").to_pylist()
    responses = batch.column("response_ids").to_pylist()
    masks = batch.column("response_masks").to_pylist() if "response_masks" in batch.column_names \
        else [None] * len(prompts)
    keys = [row_digest(p, r, m) for p, r, m in zip(prompts, responses, masks)]
    column = pa.array(keys, type=pa.binary(16))
    if KEY_COLUMN in batch.column_names:
        return batch.set_column(batch.column_names.index(KEY_COLUMN), KEY_COLUMN, column)
    return batch.append_column(KEY_COLUMN, column)


def rows_fingerprint(digests: Iterable[bytes]) -> tuple[str, int]:
    """(hex blake2b of the sorted row digests, row count): independent of row order and block layout."""
    ordered = sorted(digests)
    h = hashlib.blake2b(digest_size=16)
    h.update(_ints([len(ordered)]))
    for d in ordered:
        h.update(d)
    return h.hexdigest(), len(ordered)


# ----------------------------------------------------------------------------------------------------
# Key
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached values depend on; see the module docstring."""

    model: str  # blake2b of the model files' sha256 digests
    rows: str
    num_rows: int
    with_entropy: bool
    dtype: str
    attention: str
    prefix_sharing: bool
    batch_size: int
    format: int = CACHE_FORMAT
    batching: str = "per_group"

    def components(self) -> dict[str, Any]:
        out = asdict(self)
        if out["batching"] == "per_group":  # the values before the setting existed: the same key as then
            del out["batching"]
        return out

    @property
    def digest(self) -> str:
        blob = json.dumps(self.components(), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _model_digest(files: Mapping[str, str]) -> str:
    blob = json.dumps(dict(sorted(files.items()))).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def stage_settings(cfg: RaypoConfig, with_entropy: bool | None = None) -> dict[str, Any]:
    """The reference stage's settings that change its values: entropies (None: when ``cfg.loss`` needs a
    dispersion), dtype, attention, layout."""
    from raypo.losses.registry import get_loss_spec
    from raypo.model.loading import hf_attn_implementation
    from raypo.train.engines import worker_dtype

    if with_entropy is None:
        with_entropy = get_loss_spec(cfg.loss.name).needs_dispersion
    # the resolved backend, so a cache made under an older meaning of ``auto`` is not reused
    attention = hf_attn_implementation(cfg.model.attention, prefix_sharing=cfg.model.prefix_sharing)
    return {"with_entropy": bool(with_entropy), "dtype": worker_dtype(cfg), "attention": attention,
            "prefix_sharing": bool(cfg.model.prefix_sharing), "batching": cfg.train.reference_batching}


def reference_cache_key(digests: Iterable[bytes], ref_path: str, *, with_entropy: bool, dtype: str,
                        attention: str, prefix_sharing: bool, batch_size: int,
                        batching: str = "per_group") -> CacheKey:
    """The :class:`CacheKey` of a dataset (its row digests) under a reference model and stage settings."""
    rows, count = rows_fingerprint(digests)
    return CacheKey(model=_model_digest(model_fingerprint(ref_path)), rows=rows, num_rows=count,
                    with_entropy=bool(with_entropy), dtype=str(dtype), attention=str(attention),
                    prefix_sharing=bool(prefix_sharing), batch_size=int(batch_size), batching=str(batching))


# ----------------------------------------------------------------------------------------------------
# Storage (local or s3://)
# ----------------------------------------------------------------------------------------------------


def _join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def _fs(path: str, s3_cfg: Any):
    from raypo.storage import fsspec_for

    return fsspec_for(path, s3_cfg)


def read_manifest(entry: str, s3_cfg: Any = None) -> Optional[dict[str, Any]]:
    """The manifest of a cache entry directory, or None when it has none (absent or half-written)."""
    path = _join(entry, "manifest.json")
    fs = _fs(path, s3_cfg)
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _write_entry(entry: str, key: CacheKey, table: pa.Table, s3_cfg: Any) -> None:
    """Data first (a fresh uuid directory), the manifest last: a reader never sees a partial entry."""
    name = uuid.uuid4().hex
    data_path = _join(entry, name, "part-00000.parquet")
    from raypo.storage import atomic_output

    # each file is written aside and renamed (S3: appears when its upload completes), so a full disk
    # leaves no partial file and a one-line StorageWriteError naming the path
    with atomic_output(data_path, "wb", s3_cfg) as f:
        pq.write_table(table, f)
    manifest = {"components": key.components(), "key": key.digest, "num_rows": table.num_rows,
                "data": name, "columns": table.column_names}
    with atomic_output(_join(entry, "manifest.json"), "w", s3_cfg, encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def _read_entry(entry: str, manifest: Mapping[str, Any], s3_cfg: Any) -> pa.Table:
    path = _join(entry, manifest["data"], "part-00000.parquet")
    with _fs(path, s3_cfg).open(path, "rb") as f:
        return pq.read_table(f)


# ----------------------------------------------------------------------------------------------------
# Joining cached columns back onto the dataset
# ----------------------------------------------------------------------------------------------------


class FillFromCache:
    """Ray Data callable class: fills ``ref_logps`` (and ``ref_entropy``) of each row by its ``_ref_key``."""

    def __init__(self, table: pa.Table):
        keys = table.column(KEY_COLUMN).to_pylist()
        self.columns = [c for c in _REF_COLUMNS if c in table.column_names]
        values = {c: table.column(c).to_pylist() for c in self.columns}
        self.lookup = {k: tuple(values[c][i] for c in self.columns) for i, k in enumerate(keys)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch.column(KEY_COLUMN).to_pylist()
        missing = sum(1 for k in keys if k not in self.lookup)
        if missing:
            raise KeyError(f"{missing} rows have no cached reference log-probs; the cache entry does not "
                           "match the data (this is a bug: its key covers every row)")
        for j, name in enumerate(self.columns):
            column = pa.array([self.lookup[k][j] for k in keys], type=pa.list_(pa.float64()))
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, column)
            else:
                batch = batch.append_column(name, column)
        return batch.drop_columns([KEY_COLUMN])


def _cached_columns(ds_scored, with_entropy: bool) -> pa.Table:
    """(``_ref_key``, ``ref_logps``[, ``ref_entropy``]) of a scored dataset, on the driver."""
    columns = [KEY_COLUMN, "ref_logps"] + (["ref_entropy"] if with_entropy else [])
    parts = list(ds_scored.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=None))
    schema = pa.schema([(KEY_COLUMN, pa.binary(16))] + [(c, pa.list_(pa.float64())) for c in columns[1:]])
    return pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()


def _digests(ds_keyed) -> list[bytes]:
    out: list[bytes] = []
    for batch in ds_keyed.select_columns([KEY_COLUMN]).iter_batches(batch_format="pyarrow", batch_size=None):
        out += batch.column(KEY_COLUMN).to_pylist()
    return out


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def _lookup(cache_dir: str, key: CacheKey, s3_cfg: Any) -> Optional[pa.Table]:
    """The cached columns for ``key``; an entry with entropies also serves a request without them."""
    keys = [key] if key.with_entropy else [key, replace(key, with_entropy=True)]
    for candidate in keys:
        entry = _join(cache_dir, candidate.digest)
        manifest = read_manifest(entry, s3_cfg)
        if manifest is None:
            continue
        if manifest.get("components") != candidate.components():
            logger.warning("reference cache entry %s does not match its key; ignoring it", entry)
            continue
        logger.info("reference cache hit: %s (%d rows)", entry, candidate.num_rows)
        table = _read_entry(entry, manifest, s3_cfg)
        return table if key.with_entropy else table.select([KEY_COLUMN, "ref_logps"])
    return None


def cached_reference_logprobs(ds, cfg: RaypoConfig, ref_path: str, cache_dir: str, *, batch_size: int = 8,
                              with_entropy: bool | None = None):
    """``ds`` with ``ref_logps`` (and ``ref_entropy`` for MallowsPO) from the cache, or computed and cached.

    Args:
        ds: a Ray Dataset of tokenised rows (``prompt_ids``, ``response_ids``, optional ``response_masks``).
        cfg: the run's config (loss, model dtype/attention/prefix sharing, ``data.s3`` for an s3:// cache).
        ref_path: the reference model: a local directory, ``s3://`` or ``tiny://`` (each scoring actor
            resolves it on its own node, :func:`raypo.train.trainer.model_sources`), or a Hugging Face id in
            the local cache.
        cache_dir: local directory or ``s3://bucket/prefix``; entries live in ``<cache_dir>/<key>/``.
        batch_size: groups per scoring batch (each group is still scored in a forward of its own, unless
            ``train.reference_batching: batched``).
        with_entropy: also provide ``ref_entropy`` (None: when ``cfg.loss`` needs a dispersion; a sweep over
            several losses asks for it when any of them does).

    Returns:
        A materialised dataset: ``ds``'s rows and columns with the reference columns filled (bitwise equal
        between the computing call and every later cached call).
    """
    from raypo.train.reference import add_reference_logprobs

    s3_cfg = cfg.data.s3
    keyed = ds.map_batches(add_row_digests, batch_format="pyarrow").materialize()
    settings = stage_settings(cfg, with_entropy)
    key = reference_cache_key(_digests(keyed), ref_path, batch_size=batch_size, **settings)
    table = _lookup(cache_dir, key, s3_cfg)
    if table is None:
        entry = _join(cache_dir, key.digest)
        logger.info("reference cache miss: computing %d rows into %s", key.num_rows, entry)
        scored = add_reference_logprobs(keyed, cfg, ref_path, batch_size=batch_size,
                                        with_entropy=key.with_entropy)
        table = _cached_columns(scored, key.with_entropy)
        _write_entry(entry, key, table, s3_cfg)
    import ray.data

    filled = keyed.map_batches(FillFromCache, fn_constructor_args=(table,), batch_format="pyarrow",
                               compute=ray.data.ActorPoolStrategy(size=1)).materialize()
    try:
        _ENTRY_OF[filled] = _join(cache_dir, key.digest)
    except TypeError:  # not weak-referenceable: the entry is then just not known
        pass
    return filled


def cache_entry_of(ds) -> Optional[str]:
    """The cache entry directory a dataset returned by :func:`cached_reference_logprobs` was filled from
    (None for any other dataset)."""
    try:
        return _ENTRY_OF.get(ds)
    except TypeError:
        return None


def write_entry_record(entry: str, name: str, payload: Mapping[str, Any], s3_cfg: Any = None) -> None:
    """Writes ``<entry>/<name>`` (JSON) beside an entry's data: a note about the entry (MallowsPO's c
    calibrated from its entropies, raypo/train/dispersion.py), never read to serve the entry, and not part
    of its key or manifest."""
    from raypo.storage import atomic_output

    with atomic_output(_join(entry, name), "w", s3_cfg, encoding="utf-8") as f:
        json.dump(dict(payload), f, indent=1, sort_keys=True, default=str)
