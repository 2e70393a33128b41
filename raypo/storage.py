"""Local paths and ``s3://`` URIs behind one interface (fsspec; s3fs for S3), for every layer.

Endpoint and region come from the caller (``data.s3`` in a config) or the environment
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``), so MinIO, Ceph
or a loopback test server work like AWS. Credentials are never taken here: botocore reads them from the
environment, ~/.aws or instance roles, so they never appear in options raypo prints, logs or stores.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from raypo.errors import RunError


class StorageWriteError(RunError):
    """A file could not be written (a full disk, no permission): the message names the path, and nothing
    partial is left there. ``raypo`` prints it on one line and exits with status 1."""


def write_failed(path: str, exc: OSError) -> StorageWriteError:
    code = errno.errorcode.get(exc.errno or 0, "")
    why = exc.strerror or str(exc)
    fixes = {"ENOSPC": "free some space or write elsewhere", "EDQUOT": "free some space or write elsewhere",
             "EACCES": "check the permissions or write elsewhere"}
    fix = fixes.get(code, "write elsewhere")
    return StorageWriteError(f"cannot write {path}: {why}{f' ({code})' if code else ''}; nothing was left at "
                             f"that path; {fix}")


def temporary_sibling(path: str) -> str:
    """A hidden name in ``path``'s directory to write to before renaming it into place."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_output(uri: str, mode: str = "wb", s3_cfg: Any = None, *,
                  storage_options: Optional[Mapping[str, Any]] = None, **open_kwargs: Any) -> Iterator[Any]:
    """A file object for ``uri`` whose content appears there only when the block ends without error.

    Local paths: written to a hidden temporary sibling and renamed into place (``os.replace``, atomic on
    one filesystem). ``s3://``: an object appears only when its upload completes; on an error the upload
    is discarded. An ``OSError`` (ENOSPC, EACCES, ...) becomes a :class:`StorageWriteError` naming ``uri``.
    ``storage_options``: s3fs options to use instead of ``s3_cfg``'s.
    """
    if "://" in uri:
        if storage_options is not None:
            import s3fs

            fs = s3fs.S3FileSystem(**storage_options)
        else:
            fs = fsspec_for(uri, s3_cfg)
        f = fs.open(uri, mode, **open_kwargs)
        try:
            yield f
        except BaseException:
            raw = getattr(f, "buffer", f)  # text mode wraps the fsspec file
            if hasattr(raw, "discard"):
                raw.discard()
            raise
        else:
            try:
                f.close()
            except OSError as exc:
                raise write_failed(uri, exc) from exc
        return
    tmp = None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        tmp = temporary_sibling(os.path.abspath(uri))
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, uri)
        tmp = None
    except OSError as exc:
        raise write_failed(uri, exc) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


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
    """Write ``data`` to ``uri`` atomically (:func:`atomic_output`), creating local parent directories."""
    with atomic_output(uri, "wb", s3_cfg) as f:
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
