"""A Ray cluster of several nodes on one machine, for tests/cluster: a head and further nodes on loopback,
each its own ``ray start --block`` process (its own process group, temp dir, HOME, working directory and
resources), and drivers run as subprocesses with their own HOME and working directory.

It is kept apart from the session's in-process cluster (``ray_cluster`` in tests/conftest.py) and from
every other Ray instance on the machine: free ports, an own auth token and temp dirs under /tmp (Ray's unix
socket paths must stay under ~107 characters). Teardown ends exactly the processes it started (each node's
process group, then any descendant left), never ``ray stop``.

**No shared disk.** A real cluster's nodes share nothing but the network, while processes on one machine
share one disk. The nodes' PYTHONPATH names ``node_site/``, whose ``sitecustomize`` makes every Python
process of a node refuse (and log) any access to the driver's private directories
(:attr:`LocalCluster.forbidden`): a worker that reads or writes a driver-local path fails as it would on a
real cluster, and the test says which path.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NODE_SITE = Path(__file__).resolve().parent / "node_site"
START_TIMEOUT_S = 120
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", *NODE_PORTS)
# A killed node is noticed after ~5 s instead of Ray's default ~15 s (3 s x 5 failed health checks); a
# check may still take 5 s to answer, so a slow node on a loaded machine is not declared dead.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5,
                      "health_check_timeout_ms": 5000}
# `ray start --address` gives up when its raylet has not registered within 30 s (fixed in Ray's node.py),
# which happens on a loaded machine: try again
START_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NodeExited(RuntimeError):
    """A node's ``ray start`` process ended while it was expected to run."""


@dataclass
class RayNode:
    """One node: its ``ray start --block`` process (leader of its own process group) and private dirs."""

    name: str
    proc: subprocess.Popen
    root: Path  # home/, cwd/, ray/ (temp dir), node.log
    resources: dict[str, float]

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def log(self) -> Path:
        return self.root / "node.log"


@dataclass
class LocalCluster:
    """A head and its nodes on 127.0.0.1. ``forbidden`` are the driver's private directories, which no node
    process may touch; ``violations`` is where the nodes log an attempt."""

    root: Path
    token: str
    base_env: dict[str, str]
    forbidden: list[str]
    ports: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, RayNode] = field(default_factory=dict)
    system_config: dict = field(default_factory=lambda: dict(FAST_HEALTH_CHECKS))

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def violations(self) -> Path:
        return self.root / "guard_violations.log"

    def violation_lines(self) -> list[str]:
        return self.violations.read_text().splitlines() if self.violations.exists() else []

    # -- nodes ------------------------------------------------------------------------------------------

    def node_env(self, node_root: Path) -> dict[str, str]:
        """A node's environment: its own HOME, the guard against the driver's directories, and the
        cluster's address (Ray Train's placement-group cleaner uses Ray's state API, which otherwise fails
        with "multiple active Ray instances" when other Ray clusters run on this machine)."""
        env = dict(self.base_env)
        env.update({"HOME": str(node_root / "home"), "PYTHONPATH": str(NODE_SITE),
                    "RAY_ADDRESS": self.gcs_address,
                    "CLUSTER_GUARD_FORBIDDEN": os.pathsep.join(self.forbidden),
                    "CLUSTER_GUARD_LOG": str(self.violations)})
        return env

    def start_head(self, cpus: int, resources: Optional[dict[str, float]] = None,
                   autoscaling_config: Optional[dict] = None) -> RayNode:
        """Start the head; with ``autoscaling_config`` (a cluster config for Ray's ``fake_multinode``
        provider, :func:`fake_autoscaling_config`) its autoscaler launches and removes nodes as local
        processes, children of the head's autoscaler."""
        self.ports = {name: free_port() for name in HEAD_PORTS}
        args = ["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--system-config={json.dumps(self.system_config, separators=(',', ':'))}",
                *[f"--{name}={port}" for name, port in self.ports.items()]]
        env = {}
        if autoscaling_config is not None:
            config = dict(autoscaling_config, provider={**autoscaling_config["provider"],
                                                        "gcs_address": self.gcs_address})
            path = self.root / "autoscaling.yaml"
            path.write_text(json.dumps(config, indent=1))  # JSON is YAML
            args.append(f"--autoscaling-config={path}")
            # the fake provider refuses to run without RAY_FAKE_CLUSTER; 1 s autoscaler rounds, not 5 s
            env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        node = self._start("head", cpus, resources or {}, args, env)
        self.wait_for_nodes(1)
        return node

    def start_node(self, name: str, cpus: int, resources: Optional[dict[str, float]] = None) -> RayNode:
        """Join a node to the head and wait until the head lists it (alive nodes + 1); a start that
        fails (the head too slow to answer) is tried once more."""
        before = len(self.alive_nodes())
        for attempt in range(START_ATTEMPTS):
            args = [f"--address={self.gcs_address}", *[f"--{p}={free_port()}" for p in NODE_PORTS]]
            node = self._start(name, cpus, resources or {}, args)
            try:
                self.wait_for_nodes(before + 1)
                return node
            except NodeExited:
                self.nodes.pop(name, None)
                if attempt == START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _start(self, name: str, cpus: int, resources: dict[str, float], args: list[str],
               extra_env: Optional[dict[str, str]] = None) -> RayNode:
        node_root = self.root / name
        for sub in ("home", "cwd", "ray"):
            (node_root / sub).mkdir(parents=True, exist_ok=True)
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
               "--num-gpus=0", f"--resources={json.dumps(resources)}", f"--temp-dir={node_root / 'ray'}",
               "--object-store-memory=150000000", "--disable-usage-stats", *args]
        env = {**self.node_env(node_root), **(extra_env or {})}
        with open(node_root / "node.log", "a") as out:
            proc = subprocess.Popen(cmd, cwd=node_root / "cwd", env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = RayNode(name, proc, node_root, resources)
        self.nodes[name] = node
        return node

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's whole process group (and any descendant that left it): a lost machine."""
        node = self.nodes.pop(name)
        _kill_tree(node.proc)

    def shutdown(self) -> None:
        for name in reversed(list(self.nodes)):  # worker nodes first, the head last
            self.kill_node(name)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the head's HTTP API ------------------------------------------------------------------------------

    def get_json(self, route: str) -> dict:
        request = urllib.request.Request(f"{self.dashboard_url}{route}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[dict]:
        """The head's list of alive nodes (Ray's state API), or [] while the dashboard is not up."""
        try:
            listed = self.get_json("/api/v0/nodes?limit=100&detail=1")
        except OSError:
            return []
        return [n for n in listed["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = START_TIMEOUT_S) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.proc.poll() is not None:
                    raise NodeExited(f"node {node.name} exited with {node.proc.returncode}:\n"
                                     f"{node.log.read_text()[-4000:]}")
            alive = self.alive_nodes()
            if len(alive) == count:
                return alive
            time.sleep(0.5)
        raise RuntimeError(f"the cluster did not reach {count} alive nodes within {timeout}s")

    def actors(self, class_name: str) -> list[dict]:
        """Actors of ``class_name`` the head knows of, dead ones included (each with its ``node_id``)."""
        listed = self.get_json(f"/api/v0/actors?limit=1000&detail=1&filter_keys=class_name"
                               f"&filter_predicates=%3D&filter_values={class_name}")
        return listed["data"]["result"]["result"]

    # -- drivers ------------------------------------------------------------------------------------------

    def driver_env(self, home: Path) -> dict[str, str]:
        """A driver's environment: the cluster's address and token, its own HOME, no guard."""
        env = dict(self.base_env)
        env.update({"HOME": str(home), "RAY_ADDRESS": self.gcs_address})
        return env

    def driver(self, args: list[str], home: Path, cwd: Path, log: Path,
               extra_env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        """Start a driver process (its own process group), output to ``log``."""
        env = {**self.driver_env(home), **(extra_env or {})}
        with open(log, "w") as out:
            return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)


def base_environment(token: str) -> dict[str, str]:
    """What every process of the test cluster shares: this venv on PATH, token auth, quiet Ray; the
    pytest process's S3 endpoint variables pass through (tests/conftest.py exports them)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "PYTHONPATH", "RAYPO_CACHE_DIR")}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    })
    # DeepSpeed's JIT-built CPU ops live under HOME by default; every node has a fresh HOME here, so each
    # would compile them again (minutes on 2 cores). A real cluster's image carries them once, as this
    # shared build directory does.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    return env


def new_cluster(forbidden: list[str], prefix: str = "rpcl") -> LocalCluster:
    """An empty cluster description with a fresh root under /tmp; start nodes with its methods."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    token = secrets.token_hex(16)
    return LocalCluster(root=root, token=token, base_env=base_environment(token), forbidden=forbidden)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group, then every descendant that is still there (by pid)."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in descendants:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=10)
    proc.wait(timeout=10)


def stop_driver(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        _kill_tree(proc)


# ----------------------------------------------------------------------------------------------------
# Autoscaling: cluster/aws.yaml scaled down for Ray's fake multi-node provider
# ----------------------------------------------------------------------------------------------------

GPU_STANDIN = "a100_80g_node"  # one unit per GPU node: that node's 8 A100s, on a CPU-only test node


def fake_autoscaling_config(launcher_config: dict, *, max_nodes: int = 2, head_cpus: int = 2,
                            idle_timeout_minutes: float = 0.1) -> dict:
    """A cluster config for Ray's ``fake_multinode`` provider with ``launcher_config``'s worker node types
    (cluster/aws.yaml): each GPU node type becomes a CPU-only node type with 1 CPU and one unit of
    :data:`GPU_STANDIN` for its GPUs, at most ``max_nodes`` of it; the head keeps no stand-in, so training
    workers that ask for one need new nodes, as on the real cluster, where the head has no GPUs. The
    provider's fields replace the cloud's (no SSH, no Docker: nodes are local processes).

    Ray's own ``ray.cluster_utils.AutoscalingCluster`` is not used: it runs ``ray stop --force``, which
    would stop every Ray instance on the machine, and the ``fake_multi_node/example.yaml`` it reads is not
    in Ray 2.60's wheel.
    """
    head_type = launcher_config["head_node_type"]
    node_types = {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, node_type in launcher_config["available_node_types"].items():
        if name == head_type:
            continue
        gpus = node_type["resources"].get("GPU", 0)
        resources = {"CPU": 1, **({GPU_STANDIN: 1} if gpus else {})}
        node_types[name] = {"resources": resources, "node_config": {},
                            "min_workers": node_type.get("min_workers", 0),
                            "max_workers": min(node_type.get("max_workers", max_nodes), max_nodes)}
    config = {k: v for k, v in launcher_config.items() if k not in ("docker", "provider", "auth")}
    config.update({
        "cluster_name": f"{launcher_config['cluster_name']}-fake",
        "max_workers": min(launcher_config.get("max_workers", max_nodes), max_nodes),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"},
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    })
    return config
