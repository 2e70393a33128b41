"""Hugging Face ``datasets`` as data sources (``data.train_path`` / ``data.eval_path``).

Two spellings, both read into a ``datasets.Dataset`` on the driver and handed to Ray Data
(``ray.data.from_huggingface``), then converted, validated and counted like any other source:

* a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (for a ``DatasetDict``,
  the split is ``?split=NAME`` or, by default, ``train`` for ``data.train_path`` and the first of
  ``validation``/``test`` for ``data.eval_path``);
* ``hf://PATH[?split=train&name=CONFIG]``: ``datasets.load_dataset`` on a local dataset script or directory,
  or on one local JSON/JSONL/Parquet/CSV file.

Only local data is read. A Hub name is tried from the local Hugging Face cache only (offline), so a machine
without network gets a clear error instead of minutes of retries.
"""

from __future__ import annotations

import os
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from raypo.errors import RunError

HF_SCHEME = "hf://"
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class HFSourceError(RunError):
    """A Hugging Face dataset source that cannot be read; the message says what to pass instead."""


def is_saved_dataset(path: str) -> bool:
    """A local directory written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    if "://" in path or not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or {"state.json", "dataset_info.json"} <= names


def is_hf_source(source: Any) -> bool:
    if not isinstance(source, str):
        return False
    return source.startswith(HF_SCHEME) or is_saved_dataset(_strip_query(source))


def _strip_query(source: str) -> str:
    return source.split("?", 1)[0]


def _query(source: str) -> dict[str, str]:
    query = urlsplit(source).query if "?" in source else ""
    return {k: v[-1] for k, v in parse_qs(query).items()}


def _pick_split(dataset_dict: Any, wanted: Optional[str], role: str, source: str) -> Any:
    splits = list(dataset_dict.keys())
    if wanted is None:
        preferred = ("train",) if role == "train" else ("validation", "test", "eval")
        wanted = next((s for s in preferred if s in splits), None)
        if wanted is None and len(splits) == 1:
            wanted = splits[0]
    if wanted not in splits:
        raise HFSourceError(f"{source}: the dataset has splits {', '.join(splits)}; name one with "
                            f"?split=NAME (e.g. {_strip_query(source)}?split={splits[0]})")
    return dataset_dict[wanted]


def _load_saved(path: str, split: Optional[str], role: str, source: str) -> Any:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, role, source)
    return loaded


def _load_offline(path: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` with the Hub switched off for this call (local files and cache only)."""
    import datasets
    import huggingface_hub.constants as hub

    saved = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(path, **kwargs)
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _load_dataset(target: str, split: Optional[str], name: Optional[str], role: str, source: str) -> Any:
    import datasets

    local = os.path.expanduser(target)
    builder = _FILE_BUILDERS.get(os.path.splitext(local)[1].lower()) if os.path.isfile(local) else None
    try:
        if builder is not None:
            loaded = _load_offline(builder, data_files=local, split=split or "train")
        else:
            loaded = _load_offline(local if os.path.exists(local) else target, name=name, split=split)
    except (ConnectionError, FileNotFoundError) as exc:
        if os.path.exists(local):
            raise HFSourceError(f"{source}: datasets.load_dataset could not read {local}: {exc}") from exc
        raise HFSourceError(
            f"{source}: {target!r} is not a local path, and a Hugging Face Hub dataset cannot be downloaded "
            "here (raypo reads datasets offline). Download it where there is network, save it with "
            f"datasets.load_dataset({target!r}).save_to_disk(DIR), copy DIR over and pass "
            "data.train_path=DIR (or hf://PATH for a local dataset script, JSON or Parquet file)") from exc
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, role, source)
    return loaded


def open_hf_source(source: str, role: str = "train") -> Any:
    """The ``datasets.Dataset`` that ``source`` names (see the module docstring); ``role`` is ``train`` or
    ``eval`` (the default split of a ``DatasetDict``)."""
    query = _query(source)
    split, name = query.get("split"), query.get("name")
    if source.startswith(HF_SCHEME):
        target = _strip_query(source[len(HF_SCHEME):])
        if is_saved_dataset(os.path.expanduser(target)):
            return _load_saved(os.path.expanduser(target), split, role, source)
        return _load_dataset(target, split, name, role, source)
    return _load_saved(_strip_query(source), split, role, source)
