"""One ``raypo train`` per run name at a time: ``<run dir>/raypo_lock.json`` names its owner.

Two drivers on one run name would both resume from the same checkpoint and overwrite each other's. The
first start writes the lock (owner pid, host, time, a random token) and removes it when it ends; a second
start refuses, naming the owner. A lock left by a process that died on this host (the pid is gone) is
stale and replaced; one from another host cannot be checked from here, so the message says how to
remove it. Local paths create the lock atomically (``O_EXCL``); on ``s3://`` the lock is written and
read back (two starts within the same second may both see their own token: a narrow window, documented).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any, Optional

from raypo.errors import RunError

LOCK_FILE = "raypo_lock.json"


class RunLockedError(RunError):
    """Another ``raypo train`` holds this run name."""


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "token": uuid.uuid4().hex}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(owner: dict[str, Any]) -> bool:
    """Whether the lock's owner is known to be gone (a dead process on this host)."""
    return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))


def _read(fs: Any, path: str) -> Optional[dict[str, Any]]:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode() or "{}")
    except FileNotFoundError:
        return None
    except ValueError:  # a half-written lock: treat as held by an unknown owner
        return {}


def _refuse(path: str, owner: dict[str, Any]) -> RunLockedError:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner.get("started", 0)))
    return RunLockedError(
        f"run directory {path.rsplit('/', 1)[0]} is in use by another raypo train (pid {owner.get('pid')} "
        f"on host {owner.get('host')}, since {since}); wait for it to finish, use another "
        f"checkpoint.run_name, or, if that process is gone, delete {path}")


def _create_local(path: str, me: dict[str, Any]) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


def acquire_run_lock(run_dir: str, fs: Any, log=print) -> dict[str, Any]:
    """Take the run's lock or raise :class:`RunLockedError`; returns the owner record written."""
    path = f"{run_dir}/{LOCK_FILE}"
    me = _owner()
    local = "://" not in run_dir
    for _ in range(2):  # a second try after removing a stale lock
        if local and _create_local(path, me):
            return me
        if not local and not fs.exists(path):
            fs.makedirs(run_dir, exist_ok=True)
            with fs.open(path, "wb") as f:
                f.write(json.dumps(me).encode())
            if (_read(fs, path) or {}).get("token") == me["token"]:
                return me
        owner = _read(fs, path)
        if owner is None:
            continue  # released meanwhile
        if not _stale(owner):
            raise _refuse(path, owner)
        log(f"raypo: replacing the stale lock {path} (pid {owner.get('pid')} on this host is gone)",
            flush=True)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    raise _refuse(path, _read(fs, path) or {})


def release_run_lock(run_dir: str, fs: Any, me: dict[str, Any]) -> None:
    """Remove the lock if it is still ours."""
    path = f"{run_dir}/{LOCK_FILE}"
    if (_read(fs, path) or {}).get("token") == me.get("token"):
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)


@contextlib.contextmanager
def run_lock(run_dir: str, fs: Any) -> Iterator[dict[str, Any]]:
    me = acquire_run_lock(run_dir, fs)
    try:
        yield me
    finally:
        release_run_lock(run_dir, fs, me)
