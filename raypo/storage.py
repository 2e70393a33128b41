"""Local paths and ``s3://`` URIs behind one interface (fsspec; s3fs for S3), for every layer.

Endpoint and region come from the caller (``data.s3`` in a config) or the environment
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``), so MinIO, Ceph
or a loopback test server work like AWS. Credentials are never taken here: botocore reads them from the
environment, ~/.aws or instance roles, so they never appear in options raypo prints, logs or stores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional


def s3_options(endpoint_url: Optional[str] = None, region: Optional[str] = None,
               extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem``: the endpoint and region (arguments, else the
    environment), plus ``extra``."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    options: dict[str, Any] = {"client_kwargs": client_kwargs} if client_kwargs else {}
    options.update(extra or {})
    return options


def s3_options_of(s3_cfg: Any = None) -> dict[str, Any]:
    """:func:`s3_options` from an S3 config section (``endpoint_url``, ``region``; None: the environment)."""
    return s3_options(getattr(s3_cfg, "endpoint_url", None), getattr(s3_cfg, "region", None))


def filesystem_for(path: str, s3_cfg: Any = None):
    """An fsspec filesystem for ``path``: s3fs for ``s3://``, None for local paths."""
    if str(path).startswith("s3://"):
        import s3fs

        return s3fs.S3FileSystem(**s3_options_of(s3_cfg))
    return None


def fsspec_for(path: str, s3_cfg: Any = None):
    """An fsspec filesystem for ``path``: s3fs for ``s3://``, the local filesystem otherwise."""
    import fsspec

    fs = filesystem_for(path, s3_cfg)
    return fs if fs is not None else fsspec.filesystem("file")


def write_bytes(uri: str, data: bytes, s3_cfg: Any = None) -> None:
    """Write ``data`` to ``uri``, creating local parent directories."""
    fs = fsspec_for(uri, s3_cfg)
    if "://" not in uri:
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    with fs.open(uri, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str, s3_cfg: Any = None) -> None:
    write_bytes(uri, text.encode(), s3_cfg)


def read_text(uri: str, s3_cfg: Any = None) -> Optional[str]:
    """The text at ``uri``, or None when there is nothing there."""
    fs = fsspec_for(uri, s3_cfg)
    if not fs.exists(uri):
        return None
    with fs.open(uri, "rb") as f:
        return f.read().decode()


def open_text(path: str, s3_cfg: Any = None):
    """``path`` opened for reading text (CSV: ``newline=""``), local or ``s3://``."""
    if "://" in path:
        return fsspec_for(path, s3_cfg).open(path, "r", newline="")
    return open(path, newline="")
