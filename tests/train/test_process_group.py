"""The workers' process group on CPUs starts without building DeepSpeed's shared-memory op."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_START = """
import os, socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from raypo.train.collectives import init_process_group
import torch.distributed as dist
init_process_group(use_gpu=False)
assert dist.is_initialized() and dist.get_backend() == "gloo"
print("process group up")
"""


def test_a_stale_extension_build_lock_does_not_stop_the_process_group(tmp_path):
    """A process killed while torch JIT-built DeepSpeed's shm op leaves
    ``<extensions>/deepspeed_shm_comm/lock`` behind; DeepSpeed's own ``init_distributed`` then waits on it
    forever. raypo's start does not build the op (training never uses it), so it comes up at once, and
    nothing is compiled."""
    extensions = tmp_path / "torch_extensions"
    for build_dir in (extensions / "deepspeed_shm_comm", extensions / "py311_cpu" / "deepspeed_shm_comm"):
        build_dir.mkdir(parents=True)
        (build_dir / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    done = subprocess.run([sys.executable, "-c", _START], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process group up" in done.stdout
    assert "built successfully" not in done.stdout + done.stderr
    assert sorted(p.name for p in (extensions / "deepspeed_shm_comm").iterdir()) == ["lock"]
