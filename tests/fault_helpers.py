"""What the fault tests in tests/reliability and tests/cluster share."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from raypo.train.checkpoint_integrity import listed_checkpoints, read_snapshot


def wait_for_committed_checkpoint(fs: Any, run_dir: str, step: int, proc: Any, log: Path,
                                  timeout: float) -> None:
    """Wait until Ray Train's controller has committed checkpoint ``step`` of the run at ``run_dir`` on
    ``fs``, i.e. listed it in ``checkpoint_manager_snapshot.json``. That happens after the checkpoint's
    files are written, and it is what a restarted run resumes from, so a fault test kills only after it
    (docs/training.md, RAYPO_HOLD_AFTER_STEP). Fails the test, with the end of the run's ``log``, if
    ``proc`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fs.invalidate_cache()
        if f"step_{step:08d}" in listed_checkpoints(read_snapshot(run_dir, fs)):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before checkpoint {step} was committed:\n{log.read_text()[-5000:]}")
        time.sleep(0.5)
    pytest.fail(f"checkpoint {step} not committed within {timeout}s:\n{log.read_text()[-5000:]}")
