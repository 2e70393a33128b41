"""Two Ray nodes on one machine with no shared disk (issue 19, scenarios 1 and 2).

A head and ``node2``, separate ``ray start`` processes with their own HOME, working directory and temp
dir; the driver (``python -m raypo.cli train``) is a third process with its own HOME and working
directory. Everything the run shares goes through the loopback S3 server: the model, the data, the
reference cache, the checkpoints and the export. ``scaling.placement_strategy=STRICT_SPREAD`` puts the
two workers on different nodes, and the nodes refuse (and log) any access to the driver's directories
(``node_site/sitecustomize.py``).

One two-node run serves both scenarios (each costs minutes here). Its workers hold after step 2
(``RAYPO_HOLD_AFTER_STEP``), and the test kills ``node2``'s whole process group once Ray Train's controller
has committed that checkpoint (listed it in its snapshot on S3: the files come first, and a node lost in
between leaves the restarted group nothing to resume from). With ``checkpoint.max_failures=1`` Ray Train
restarts the worker group, which cannot be placed (STRICT_SPREAD needs two nodes) until the test starts a
replacement node; the run resumes from the step-2 checkpoint on S3. Scenario 1 checks what the run left on S3
and where its workers ran; scenario 2 that it recovered and ended with the weights of the same run
uninterrupted -- trained once on the test session's single-node cluster from the same S3 inputs (two workers
of one node: the same arithmetic as two workers of two nodes), to float32 rounding.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import LocalCluster, stop_driver
from fault_helpers import wait_for_committed_checkpoint

from raypo.testing import exported_weights, max_abs_diff, short_run_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(1800)]

STEPS = 4
TOLERANCE = 1e-5  # as tests/reliability/test_faults_e2e.py: sums taken in another order, nothing more
RUN_TIMEOUT_S = 900
START_TIMEOUT_S = 10  # Ray Train's worker-group start timeout in the node-loss run


def run_overrides(inputs, name: str) -> list[str]:
    """The deterministic short run of raypo.testing with every input and output on S3, the reference
    log-probs precomputed through an S3 cache, and the two workers on two nodes."""
    storage = f"{inputs.prefix}/runs"
    kept = [o for o in short_run_overrides(inputs.model, storage, name, STEPS)
            if not o.startswith("data.train_path=")]
    return kept + [f"data.train_path={inputs.data}", "scaling.placement_strategy=STRICT_SPREAD",
                   "train.reference=precomputed", f"train.reference_cache={inputs.prefix}/refcache"]


def start_training(cluster: LocalCluster, driver, overrides: list[str], log: Path, env=None):
    config = driver.cwd / "run.yaml"
    config.write_text("{}\n")
    return cluster.driver([sys.executable, "-m", "raypo.cli", "train", str(config), *overrides],
                          home=driver.home, cwd=driver.cwd, log=log, extra_env=env)


def wait_for_driver(proc, log: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the driver did not finish within {timeout}s:\n{log.read_text()[-5000:]}")
    finally:
        stop_driver(proc)  # only if still running (a timeout, an interrupted test session)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    return text


def local_export(s3, uri: str, where: Path) -> str:
    """Download an s3:// export for the weight comparison."""
    fs = s3.s3fs()
    fs.invalidate_cache()
    where.mkdir(parents=True, exist_ok=True)
    for key in fs.find(uri.removeprefix("s3://")):
        fs.get_file(key, str(where / Path(key).name))
    return str(where)


def assert_no_driver_paths(cluster: LocalCluster) -> None:
    lines = cluster.violation_lines()
    assert not lines, "a node process used a driver-local path:\n" + "\n".join(lines[:20])


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, s3_inputs, s3, tmp_path_factory):
    """The exported weights of the run below without the node loss, on this session's one-node cluster
    (its own reference cache, so the two-node run below computes its reference log-probs itself)."""
    from raypo.config import load_config
    from raypo.train.trainer import run_training

    name = "uninterrupted"
    cache = tmp_path_factory.mktemp("refcache")
    overrides = [o for o in run_overrides(s3_inputs, name)
                 if not o.startswith(("scaling.placement_strategy=", "train.reference_cache="))]
    result = run_training(load_config(None, [*overrides, f"train.reference_cache={cache}"]))
    export = f"{s3_inputs.prefix}/runs/{name}/export"
    assert result.metrics["step"] == STEPS
    return exported_weights(local_export(s3, export, tmp_path_factory.mktemp("uninterrupted_export")))


@pytest.fixture(scope="module")
def node_lost(two_nodes, driver_dirs, s3_inputs, s3, tmp_path_factory):
    """The two-node run that loses node2 after its step-2 checkpoint: (driver log, run prefix on S3, the
    node id of the replacement, the exported weights, the HOME of every worker node it used)."""
    name = "node_lost"
    homes = [two_nodes.nodes["node2"].home]
    run_prefix = f"{s3_inputs.prefix}/runs/{name}".removeprefix("s3://")
    log = tmp_path_factory.mktemp("logs") / "node_lost.log"
    # Ray Train's wait for a worker group's resources (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by
    # default) shortened, to show what happens when it runs out before a node comes back
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S), "RAYPO_HOLD_AFTER_STEP": "2"}
    started = time.monotonic()
    proc = start_training(two_nodes, driver_dirs, run_overrides(s3_inputs, name)
                          + ["checkpoint.max_failures=1"], log, env=env)
    try:
        wait_for_committed_checkpoint(s3.s3fs(), run_prefix, step=2, proc=proc, log=log, timeout=240)
        two_nodes.kill_node("node2")  # the machine is gone: raylet, workers, object store
        killed_at = time.monotonic()
        fs = s3.s3fs()
        fs.invalidate_cache()
        assert not fs.exists(f"{run_prefix}/step_{STEPS:08d}"), "the run finished before node2 was killed"
        two_nodes.wait_for_nodes(1, timeout=60)  # the head notices the loss
        wait_for_log(log, "[FailurePolicy] RETRY", proc)  # the lost workers: one of checkpoint.max_failures
        # No node comes back within the timeout: the start times out, and Ray Train retries (a controller
        # failure, unlimited by default) instead of failing the run; it keeps waiting
        wait_for_log(log, f"timed out after {float(START_TIMEOUT_S)} seconds waiting for 2 workers", proc)
        wait_for_log(log, "[FailurePolicy] RETRY", proc, count=2)
        homes.append(two_nodes.start_node("node2b", cpus=2).home)  # a replacement machine joins
        text = wait_for_driver(proc, log)
    finally:
        stop_driver(proc)
    print(f"two-node run: {time.monotonic() - started:.1f}s, recovered {time.monotonic() - killed_at:.1f}s "
          "after the kill")
    export = local_export(s3, f"s3://{run_prefix}/export", tmp_path_factory.mktemp("node_lost_export"))
    return text, f"s3://{run_prefix}", replacement_node_id(two_nodes), exported_weights(export), homes


def test_the_guard_refuses_a_driver_local_path_on_every_node(two_nodes, driver_dirs):
    """The harness itself: a task on each node that opens a file of the driver's gets FileNotFoundError,
    and the attempt is logged; without the guard this test (and the run's check below) would prove
    nothing, as both nodes share this machine's disk."""
    secret = driver_dirs.cwd / "driver_only.txt"
    secret.write_text("only on the driver's machine")
    code = (
        "import ray\n"
        "ray.init()\n"
        "@ray.remote(num_cpus=1, scheduling_strategy='SPREAD')\n"
        "def read(path):\n"
        "    try:\n"
        "        return ray.get_runtime_context().get_node_id(), open(path).read()\n"
        "    except FileNotFoundError:\n"
        "        return ray.get_runtime_context().get_node_id(), 'refused'\n"
        f"print('RESULT', sorted(set(ray.get([read.remote({str(secret)!r}) for _ in range(6)]))))\n")
    log = driver_dirs.cwd / "guard.log"
    proc = two_nodes.driver([sys.executable, "-c", code], home=driver_dirs.home, cwd=driver_dirs.cwd, log=log)
    text = wait_for_driver(proc, log, timeout=120)
    line = next(ln for ln in text.splitlines() if ln.startswith("RESULT"))
    result = ast.literal_eval(line.split(" ", 1)[1])
    assert {outcome for _, outcome in result} == {"refused"}, result
    assert [line for line in two_nodes.violation_lines() if str(secret) in line]
    two_nodes.violations.unlink()  # the training test below starts from a clean log


def test_two_workers_on_two_nodes_train_checkpoint_and_export_through_s3(node_lost, two_nodes, s3,
                                                                         s3_inputs, driver_dirs):
    text, run_prefix, _, weights, homes = node_lost
    assert "reference cache miss" in text or "reference" in text
    fs = s3.s3fs()
    fs.invalidate_cache()
    keys = fs.find(run_prefix.removeprefix("s3://"))
    assert any(k.endswith(f"step_{STEPS:08d}/raypo_state.json") for k in keys), keys
    assert any(k.endswith("export/model.safetensors") for k in keys), keys
    assert fs.find(f"{s3_inputs.prefix.removeprefix('s3://')}/refcache"), "no reference cache on S3"
    assert weights and all(t.abs().sum() > 0 for t in weights.values())
    # each worker group ran on two nodes: the first on the head and node2, the restarted one on the head
    # and node2b
    workers = two_nodes.actors("RayTrainWorker")
    assert len({w["node_id"] for w in workers}) == 3, workers
    # the other nodes fetched the model from S3 into their own homes, not through the driver's files
    for home in homes:
        assert any((home / ".cache").rglob("config.json")), home
    assert not (driver_dirs.cwd / "s3:").exists()  # an s3:// export is not a local directory named s3:
    assert_no_driver_paths(two_nodes)


def test_node_lost_after_a_checkpoint_resumes_on_a_new_node_to_the_same_weights(node_lost, uninterrupted,
                                                                                two_nodes):
    text, _, replacement, weights, _ = node_lost
    assert re.search(r"raypo: resuming from \S+/step_00000002 at step 2 ", text), text[-4000:]
    assert max_abs_diff(weights, uninterrupted) < TOLERANCE
    # the restarted worker group used the replacement node
    workers = two_nodes.actors("RayTrainWorker")
    assert replacement in {w["node_id"] for w in workers}, workers
    assert_no_driver_paths(two_nodes)


def wait_for_log(log: Path, text: str, proc, count: int = 1, timeout: float = 240) -> None:
    """Until ``text`` appears ``count`` times in the driver's log (the driver must keep running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text().count(text) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended while waiting for {text!r}:\n{log.read_text()[-5000:]}")
        time.sleep(0.5)
    pytest.fail(f"{text!r} did not appear {count}x within {timeout}s:\n{log.read_text()[-5000:]}")


def replacement_node_id(cluster: LocalCluster) -> str:
    """The Ray node id of the one alive node that is not the head (the replacement)."""
    others = [n["node_id"] for n in cluster.alive_nodes() if not n.get("is_head_node")]
    assert len(others) == 1, cluster.alive_nodes()
    return others[0]
