"""Imported at start-up by every Python process of a test cluster's nodes (their PYTHONPATH names this
directory; the driver's does not): a worker that opens, lists, creates, renames or removes anything under
the driver's private directories (``CLUSTER_GUARD_FORBIDDEN``, os.pathsep-separated) is recorded in
``CLUSTER_GUARD_LOG`` and gets ``FileNotFoundError``, as it would on a real cluster, where those paths
exist only on the driver's machine.

One machine shares one disk, so without this a worker reading the driver's files would pass unnoticed.
Python's audit hooks (PEP 578) see every such call made through Python, including ``os.open`` and
``shutil``; reads done inside C++ libraries that do not go through Python (pyarrow's own local filesystem)
are not seen.
"""

from __future__ import annotations

import os
import sys

_ROOTS = tuple(os.path.abspath(p) for p in os.environ.get("CLUSTER_GUARD_FORBIDDEN", "").split(os.pathsep)
               if p)
_LOG = os.environ.get("CLUSTER_GUARD_LOG")
# audit event -> positions of its path arguments
_PATH_ARGS = {"open": (0,), "os.listdir": (0,), "os.scandir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
              "os.remove": (0,), "os.rmdir": (0,), "os.chdir": (0,), "os.symlink": (0, 1), "os.link": (0, 1),
              "shutil.copyfile": (0, 1), "shutil.rmtree": (0,), "os.truncate": (0,)}


def _as_path(arg) -> str | None:
    if isinstance(arg, int) or arg is None:
        return None  # a file descriptor: its path was checked when it was opened
    try:
        return os.path.abspath(os.fsdecode(arg))
    except TypeError:
        return None


def _forbidden(path: str) -> bool:
    return any(path == root or path.startswith(root + os.sep) for root in _ROOTS)


def _record(event: str, path: str) -> None:
    line = f"{os.getpid()} {event} {path} argv={' '.join(sys.argv[:3])}\n"
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _import_probe(event: str, path: str) -> bool:
    """Python's import system looking into a ``sys.path`` entry: Ray puts the driver's script directory
    on every worker's ``sys.path``, and on another machine the directory is simply absent (importlib
    skips it), which is what the refusal reproduces; not a use of the driver's files by raypo."""
    return event in ("os.listdir", "os.scandir", "open") and path in {os.path.abspath(p) for p in sys.path}


def _guard(event: str, args: tuple) -> None:
    positions = _PATH_ARGS.get(event)
    if positions is None:
        return
    for i in positions:
        path = _as_path(args[i]) if i < len(args) else None
        if path is not None and _forbidden(path):
            if _LOG and not _import_probe(event, path):
                _record(event, path)
            raise FileNotFoundError(2, "driver-local path used on a cluster node (tests/cluster guard)", path)


if _ROOTS:
    sys.addaudithook(_guard)
