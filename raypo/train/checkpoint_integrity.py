"""Checkpoint manifests, their verification, and the one definition of a run's latest checkpoint.

Every rank writes ``raypo_manifest_r<rank>.json`` last into its part of a checkpoint: the size and SHA-256
of each file it wrote, the world size and the global step. A checkpoint is *good* when every rank's
manifest is there and every listed file has its recorded size (and, for local storage, checksum).

The latest checkpoint of a run is the newest one in Ray Train's own list
(``checkpoint_manager_snapshot.json``, the list ``ray.train.get_checkpoint`` resumes from) that is good.
A damaged one is, with ``checkpoint.on_corrupt=fallback``, moved aside to ``corrupt_<name>`` and dropped
from Ray's list, so Ray resumes from the newest good checkpoint; with ``fail`` the start is refused. Both
name the damaged file (docs/training.md, "Damaged checkpoints").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from raypo.errors import RunError

STATE_FILE = "raypo_state.json"  # raypo's own state in a checkpoint (rank 0; raypo.train.checkpoint)
MANIFEST_PREFIX = "raypo_manifest_r"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's checkpoint list in the run directory
CORRUPT_PREFIX = "corrupt_"


class CorruptCheckpointError(RunError):
    """The latest checkpoint is damaged and ``checkpoint.on_corrupt=fail``."""


def sha256_of(path: str, fs: Any = None) -> str:
    digest = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(local_dir: str, *, rank: int, world_size: int, global_step: int) -> str:
    """Record every file under ``local_dir`` (this rank's part) with size and SHA-256; written last."""
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            if not rel.startswith(MANIFEST_PREFIX):
                files[rel] = {"size": os.path.getsize(full), "sha256": sha256_of(full)}
    path = os.path.join(local_dir, f"{MANIFEST_PREFIX}{rank}.json")
    body = {"rank": rank, "world_size": world_size, "global_step": global_step, "files": files}
    with open(f"{path}.tmp", "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
    os.replace(f"{path}.tmp", path)
    return path


@dataclass
class Verdict:
    """The result of checking one checkpoint: ``problem`` is None when it is good."""

    path: str
    step: Optional[int]
    problem: Optional[str] = None

    @property
    def good(self) -> bool:
        return self.problem is None


def verify_checkpoint(path: str, fs: Any, *, checksums: bool = True) -> Verdict:
    """Check the checkpoint directory ``path`` (on ``fs``) against its manifests.

    A checkpoint without any manifest (written before manifests existed) is accepted when its
    ``raypo_state.json`` is there, and is damaged otherwise.
    """
    path = path.rstrip("/")
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    manifests = sorted(n for n in names if n.startswith(MANIFEST_PREFIX) and n.endswith(".json"))
    if not manifests:
        state = f"{path}/{STATE_FILE}"
        if not fs.exists(state):
            return Verdict(path, None, f"{state} is missing (and the checkpoint has no manifest)")
        with fs.open(state, "r") as f:
            return Verdict(path, int(json.load(f)["global_step"]))
    bodies = []
    for name in manifests:
        with fs.open(f"{path}/{name}", "r") as f:
            bodies.append(json.load(f))
    step, world = bodies[0]["global_step"], bodies[0]["world_size"]
    missing = sorted(set(range(world)) - {b["rank"] for b in bodies})
    if missing:
        return Verdict(path, step, f"{path}/{MANIFEST_PREFIX}{missing[0]}.json is missing: rank "
                                   f"{missing[0]}'s part of the checkpoint did not arrive")
    expected: dict[str, list[dict[str, Any]]] = {}
    for body in bodies:
        for rel, entry in body["files"].items():
            expected.setdefault(rel, []).append(entry)
    for rel, entries in sorted(expected.items()):
        problem = _file_problem(f"{path}/{rel}", entries, fs, checksums)
        if problem:
            return Verdict(path, step, problem)
    return Verdict(path, step)


def _file_problem(full: str, entries: list[dict[str, Any]], fs: Any, checksums: bool) -> Optional[str]:
    """Why ``full`` matches none of its manifest entries (several ranks may write the same file)."""
    if not fs.exists(full):
        return f"{full} is missing"
    size = int(fs.size(full))
    if all(size != e["size"] for e in entries):
        return f"{full} is {size} bytes, its manifest says {entries[0]['size']} (truncated or overwritten)"
    if checksums and all(sha256_of(full, fs) != e["sha256"] for e in entries):
        return f"{full} does not match its manifest's SHA-256 checksum (its content is damaged)"
    return None


# ----------------------------------------------------------------------------------------------------
# Ray Train's checkpoint list
# ----------------------------------------------------------------------------------------------------


def read_snapshot(run_dir: str, fs: Any) -> Optional[dict[str, Any]]:
    path = f"{run_dir}/{SNAPSHOT_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode())


def listed_checkpoints(snapshot: Optional[dict[str, Any]]) -> list[str]:
    """Checkpoint directory names in Ray's list, newest (highest report index) first."""
    if not snapshot:
        return []
    pairs = zip(snapshot.get("checkpoint_results", []), snapshot.get("checkpoint_report_indices", []))
    return [r["checkpoint_dir_name"] for r, _ in sorted(pairs, key=lambda p: -p[1])]


def without_checkpoint(snapshot: dict[str, Any], dir_name: str) -> dict[str, Any]:
    """Ray's checkpoint list with ``dir_name`` removed everywhere; the newest remaining becomes latest."""
    out = dict(snapshot)
    pairs = [(r, i) for r, i in zip(snapshot["checkpoint_results"], snapshot["checkpoint_report_indices"])
             if r["checkpoint_dir_name"] != dir_name]
    out["checkpoint_results"] = [r for r, _ in pairs]
    out["checkpoint_report_indices"] = [i for _, i in pairs]
    out["latest_checkpoint_result"] = max(pairs, key=lambda p: p[1])[0] if pairs else None
    pending = [(r, v) for r, v in zip(snapshot.get("pending_training_results", []),
                                      snapshot.get("pending_validation_specs", []))
               if r["checkpoint_dir_name"] != dir_name]
    out["pending_training_results"] = [r for r, _ in pending]
    out["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in out:
            out[key] = [n for n in out[key] if n != dir_name]
    return out


def _write_snapshot(run_dir: str, fs: Any, snapshot: dict[str, Any]) -> None:
    from raypo.storage import atomic_output

    path = f"{run_dir}/{SNAPSHOT_FILE}"
    if "://" in run_dir:
        with fs.open(path, "wb") as f:
            f.write(json.dumps(snapshot).encode())
        return
    with atomic_output(path, "wb") as f:
        f.write(json.dumps(snapshot).encode())


def latest_good_checkpoint(run_dir: str, fs: Any, on_corrupt: str = "fallback",
                           log=print) -> Optional[tuple[str, int]]:
    """(directory, global step) of the run's newest good checkpoint in Ray's list, or None.

    Damaged newer ones are set aside (``fallback``: moved to ``corrupt_<name>`` and dropped from Ray's
    list, each with a message naming the bad file) or refused (``fail``: :class:`CorruptCheckpointError`).
    """
    snapshot = read_snapshot(run_dir, fs)
    checksums = "://" not in run_dir  # on S3 sizes only: a checksum would download every shard
    for name in listed_checkpoints(snapshot):
        path = f"{run_dir}/{name}"
        verdict = verify_checkpoint(path, fs, checksums=checksums) if fs.exists(path) else \
            Verdict(path, None, f"{path} is missing")
        if verdict.good:
            return path, int(verdict.step if verdict.step is not None else name.rsplit("_", 1)[-1])
        if on_corrupt == "fail":
            raise CorruptCheckpointError(
                f"checkpoint {path} is damaged: {verdict.problem}. Set checkpoint.on_corrupt=fallback to "
                "set it aside and resume from the newest good checkpoint, or delete the run directory to "
                "start over")
        aside = f"{run_dir}/{CORRUPT_PREFIX}{name}"
        if fs.exists(path):
            fs.mv(path, aside, recursive=True)
        snapshot = without_checkpoint(snapshot, name)
        _write_snapshot(run_dir, fs, snapshot)
        log(f"raypo: checkpoint {path} is damaged: {verdict.problem}; moved it to {aside} and resuming from "
            "the newest good checkpoint instead (checkpoint.on_corrupt=fail refuses instead)", flush=True)
    return None
