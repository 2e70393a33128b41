"""Ray's autoscaler with its fake multi-node provider (issue 19, scenario 3).

The head runs Ray's autoscaler (v1, ``--autoscaling-config``) on a config derived from cluster/aws.yaml
(``cluster_helpers.fake_autoscaling_config``): the p4de node type becomes a CPU-only node type with one
unit of a stand-in resource for its 8 GPUs, the head has none. A job submitted with ``raypo submit`` asks
for 2 training workers of one stand-in each, which the head cannot place: the autoscaler must launch two
nodes (local processes), the job must succeed, and once idle for ``idle_timeout_minutes`` (6 s here) the
nodes must be removed.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from cluster_helpers import GPU_STANDIN, REPO, LocalCluster, fake_autoscaling_config, new_cluster

pytestmark = [pytest.mark.timeout(1800)]

NODE_TYPE = "gpu_a100_80g"  # cluster/aws.yaml's GPU node type
# what raypo submit prints when the head is up but its job server cannot take the job yet
TRANSIENT_SUBMIT_ERRORS = ("No available agent", "cannot reach the Ray job server")


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory, s3) -> LocalCluster:
    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config = fake_autoscaling_config(launcher, max_nodes=2, head_cpus=2)
    cluster = new_cluster(forbidden=[str(tmp_path_factory.getbasetemp())], prefix="rpas")
    try:
        cluster.start_head(cpus=2, autoscaling_config=config)
        yield cluster
    finally:
        cluster.shutdown()


def test_the_fake_config_keeps_aws_node_types_and_passes_rays_validation():
    """The scaled-down config: aws.yaml's GPU node type, CPU-only with the stand-in resource, none on the
    head, and valid for Ray's autoscaler (its schema, as `ray up` checks it)."""
    from ray.autoscaler._private.util import validate_config

    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config = fake_autoscaling_config(launcher, max_nodes=2)
    validate_config(config)
    node_type = config["available_node_types"][NODE_TYPE]
    assert node_type["resources"] == {"CPU": 1, GPU_STANDIN: 1}
    assert node_type["min_workers"] == launcher["available_node_types"][NODE_TYPE]["min_workers"] == 0
    assert node_type["max_workers"] == 2 and config["provider"]["type"] == "fake_multinode"
    assert GPU_STANDIN not in config["available_node_types"]["ray.head.default"]["resources"]


def job_spec(tmp: Path, s3_prefix: str) -> Path:
    """A two-worker training job whose workers each need a GPU node (one stand-in unit), with its
    checkpoints on S3, the storage every node reaches."""
    spec = {
        "name": "autoscale",
        "entrypoint": "train",
        "config": {"defaults": [str(REPO / "configs" / "quickstart.yaml")]},
        "overrides": [
            # 4 prompts, 2 workers x 2 prompts: one step; its checkpoint is the end of the run
            "train.max_steps=1", "train.eval_every=0", "train.micro_batch_size=2", "train.epochs=1",
            "data.train_path=synthetic://default?num_prompts=4&seed=0", "data.eval_fraction=0.0",
            "scaling.num_workers=2", f"scaling.resources_per_worker.{GPU_STANDIN}=1",
            "scaling.resources_per_worker.CPU=1", "logging.tensorboard=false",
            f"checkpoint.storage_path={s3_prefix}", "checkpoint.run_name=autoscale",
            "checkpoint.every_steps=0", "checkpoint.export_path=null",
        ],
        # the nodes take a while to join on a loaded machine: wait for them instead of retrying
        "runtime_env": {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}},
        "submission_id": "unique",
    }
    path = tmp / "autoscale.yaml"
    path.write_text(json.dumps(spec, indent=2))
    return path


class NodeWatcher:
    """Polls the head's alive nodes in a thread: the most GPU-node stand-ins seen at once."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster, self.peak = cluster, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        """Alive nodes with the stand-in resource: the autoscaler's GPU nodes (the head has none)."""
        return sum(1 for n in self.cluster.alive_nodes() if GPU_STANDIN in (n.get("resources_total") or {}))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.count())
            time.sleep(1)

    def __enter__(self) -> NodeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def submit(job: Path, address: str, cwd: Path, env: dict, attempts: int = 10):
    """``raypo submit JOB --follow``; again while the head's job agent is not up yet (Ray answers "No
    available agent to submit job" for a while after the head starts) or its job server does not take the
    connection (seen once in CI under load, seconds after the same dashboard had listed the nodes)."""
    import subprocess

    for _ in range(attempts):
        out = subprocess.run(["raypo", "submit", str(job), "--address", address, "--follow"], cwd=cwd,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=1500)
        if not any(transient in out.stdout for transient in TRANSIENT_SUBMIT_ERRORS):
            return out
        time.sleep(3)
    return out


@pytest.mark.e2e
@pytest.mark.integration
def test_a_job_needing_gpu_nodes_scales_up_succeeds_and_scales_back_down(autoscaling_cluster, s3, tmp_path):
    cluster = autoscaling_cluster
    assert len(cluster.alive_nodes()) == 1  # the head alone: min_workers is 0
    job = job_spec(tmp_path, f"s3://{s3.bucket}/autoscale/runs")
    env = {**cluster.driver_env(tmp_path), "RAY_ADDRESS": cluster.dashboard_url}
    with NodeWatcher(cluster) as watcher:
        out = submit(job, cluster.dashboard_url, cwd=tmp_path, env=env)
    assert out.returncode == 0 and "is SUCCEEDED" in out.stdout, out.stdout[-6000:] + dashboard_log(cluster)
    assert watcher.peak == 2, f"the autoscaler launched {watcher.peak} {NODE_TYPE} node(s), not 2"
    fs = s3.s3fs()
    fs.invalidate_cache()
    assert any(k.endswith("raypo_state.json") for k in fs.find(f"{s3.bucket}/autoscale/runs/autoscale"))
    # idle for idle_timeout_minutes (6 s): the autoscaler terminates the nodes again
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and watcher.count() > 0:
        time.sleep(1)
    assert watcher.count() == 0, f"idle {NODE_TYPE} nodes were not removed: {cluster.alive_nodes()}"
    lines = cluster.violation_lines()  # the autoscaler's nodes run the same guard as tests/cluster's others
    assert not lines, "a node process used a driver-local path:\n" + "\n".join(lines[:20])
    assert len(cluster.alive_nodes()) == 1


def dashboard_log(cluster: LocalCluster) -> str:
    """The end of the head's dashboard log (the job server), for a submission that failed."""
    logs = sorted((cluster.nodes["head"].root / "ray").glob("session_*/logs/dashboard.log"))
    return f"\n--- {logs[-1]}:\n" + logs[-1].read_text()[-3000:] if logs else "\n(no dashboard.log)"
