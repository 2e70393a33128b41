"""Helpers for tests/launch: the repository root, and a real Ray head on loopback (``ray start --head``).

It is kept apart from the session's in-process cluster (``ray_cluster`` in tests/conftest.py): its own
ports, its own temp dir (so a later ``ray.init()`` never discovers it through ``ray_current_cluster``) and
its own auth token. Teardown ends exactly the processes it started, by pid (never ``ray stop``, which
stops every Ray instance on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    """A running head: its job-server address and the environment clients need (PATH, auth token)."""

    address: str
    env: dict[str, str]
    temp_dir: Path
    log: Path

    def run(self, args: list[str] | str, cwd: Path, timeout: float = 240,
            **kw) -> subprocess.CompletedProcess:
        """Run a client command (raypo, ray, bash) against this head; stdout and stderr merged."""
        return subprocess.run(args, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, **kw)


def _head_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # job drivers find this venv's raypo/python
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_AUTH_MODE": "token",  # Ray 2.60 turns token auth on for local clusters; use our own token
        "RAY_AUTH_TOKEN": token,
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _wait_until_up(address: str, token: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}:\n"
                               f"{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not serve {address} within {HEAD_START_TIMEOUT_S}s:\n"
                       f"{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """End the head's process tree by pid: SIGTERM, 5 s grace, then SIGKILL."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


def start_ray_head() -> tuple[RayHead, subprocess.Popen]:
    """Start a head with free ports, its own temp dir and token; return it once its job server answers."""
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rphd", dir="/tmp"))
    log = temp_dir / "head.log"
    token = secrets.token_hex(16)
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port")}
    # 4 logical CPUs (on any number of cores): 2 training workers plus Ray Data tasks in the full variants.
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats",
           *[f"--{name}={port}" for name, port in ports.items()]]
    env = _head_env(token)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_until_up(address, token, proc, log)
    except BaseException:
        stop_ray_head(proc, temp_dir)
        raise
    return RayHead(address=address, env=env, temp_dir=temp_dir, log=log), proc


def stop_ray_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    _stop(proc)
    shutil.rmtree(temp_dir, ignore_errors=True)
