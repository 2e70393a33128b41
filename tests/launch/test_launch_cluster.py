"""cluster/: the Ray cluster launcher configs against the schema Ray ships (ray/autoscaler/ray-schema.json,
with jsonschema) and Ray's own config preparation; the KubeRay manifests structurally; the Dockerfile; and
that the jobs/ specs fit the node types the configs provide."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import ray
import yaml
from launch_helpers import REPO

from raypo.launch.jobspec import job_config, load_job

CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = {"aws.yaml": ("aws", "p4de.24xlarge", "InstanceType"),
                    "gcp.yaml": ("gcp", "a2-ultragpu-8g", "machineType")}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
K8S_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", list(LAUNCHER_CONFIGS))
def test_launcher_config_matches_rays_schema(name):
    import jsonschema

    config = _yaml(CLUSTER / name)
    schema = _ray_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=str)
    assert not errors, "\n".join(e.message for e in errors)


@pytest.mark.parametrize("name", list(LAUNCHER_CONFIGS))
def test_launcher_config_passes_rays_own_preparation(name):
    """What `ray up` does before touching the cloud: fill in the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_yaml(CLUSTER / name))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", list(LAUNCHER_CONFIGS))
def test_launcher_config_autoscales_a100_80gb_nodes_from_zero(name):
    provider, instance, key = LAUNCHER_CONFIGS[name]
    config = _yaml(CLUSTER / name)
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # a CPU head that runs drivers only
    assert "GPU" not in head["resources"]
    gpu = [t for t in types.values() if t["node_config"].get(key) == instance]
    assert len(gpu) == 1, f"one {instance} node type"
    gpu = gpu[0]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 2  # 0 -> a maximum; 32B needs 2 nodes
    assert gpu["resources"]["GPU"] == 8
    assert config["max_workers"] >= gpu["max_workers"]
    assert config["idle_timeout_minutes"] <= 15  # idle GPU nodes go away
    image = config["docker"]["image"]
    assert "raypo" in image and "ray-ml" not in image


def test_aws_config_has_efa_and_nccl_settings():
    config = _yaml(CLUSTER / "aws.yaml")
    gpu = config["available_node_types"]["gpu_a100_80g"]["node_config"]
    interfaces = gpu["NetworkInterfaces"]
    assert [i["NetworkCardIndex"] for i in interfaces] == [0, 1, 2, 3]  # p4de has 4 network cards
    assert all(i["InterfaceType"] == "efa" for i in interfaces)
    assert interfaces[0]["DeviceIndex"] == 0 and all(i["DeviceIndex"] == 1 for i in interfaces[1:])
    assert "Placement" in gpu and "SubnetId" not in gpu  # subnets go on the interfaces with EFA
    options = " ".join(config["docker"]["worker_run_options"])
    for needle in ("/dev/infiniband/uverbs0", "FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1",
                   "NCCL_SOCKET_IFNAME"):
        assert needle in options
    assert "memlock=-1" in " ".join(config["docker"]["run_options"])


def test_placeholders_are_the_documented_ones():
    readme = (CLUSTER / "README.md").read_text()
    for name in LAUNCHER_CONFIGS:
        for placeholder in sorted(set(re.findall(r"[\w.-]*REPLACE_ME[\w.-]*", (CLUSTER / name).read_text()))):
            assert placeholder in readme, f"{name}: {placeholder} is not explained in cluster/README.md"


def test_dockerfile_builds_on_rayproject_ray_of_the_installed_version():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-") and "ray-ml" not in base
    assert re.search(r'pip install [^\n]*"torch==\$\{TORCH_VERSION\}"', text)  # a pinned torch
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.M)
    for path in ("pyproject.toml", "raypo", "configs", "jobs"):
        assert re.search(rf"^COPY .*\b{path}\b", text, re.M), path
    for name in LAUNCHER_CONFIGS:
        assert f":{ray.__version__}-" in _yaml(CLUSTER / name)["docker"]["image"]


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_jobs_fit_the_cluster_node_types(job):
    """A GPU job's workers fit on the GPU node type: GPUs and CPUs per node, and enough nodes."""
    cfg = job_config(load_job(job))
    if not cfg.scaling.use_gpu:
        return
    for name, (_, instance, key) in LAUNCHER_CONFIGS.items():
        config = _yaml(CLUSTER / name)
        types = config["available_node_types"].values()
        gpu = next(t for t in types if t["node_config"].get(key) == instance)
        per_worker = cfg.scaling.resources_per_worker
        per_node = min(gpu["resources"]["GPU"] // per_worker["GPU"],
                       gpu["resources"]["CPU"] // per_worker["CPU"])
        nodes = -(-cfg.scaling.num_workers // per_node)
        assert nodes <= gpu["max_workers"], (name, job.name)
        assert cfg.plan.node_type in ("p4de.24xlarge", "a2-ultragpu-8g")


# ----------------------------------------------------------------------------------------------------
# KubeRay: structural checks (the CRDs' OpenAPI schemas are not shipped with any installed package)
# ----------------------------------------------------------------------------------------------------


def _check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert DNS_1123.match(c["name"]) and c["image"], where
        res = c.get("resources", {})
        for kind in ("limits", "requests"):
            for key, value in res.get(kind, {}).items():
                assert isinstance(value, str) and K8S_QUANTITY.match(value), \
                    f"{where}: {kind}.{key}={value!r}"
        if "nvidia.com/gpu" in res.get("limits", {}):
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"], where
        for env in c.get("env", []):
            assert ("value" in env) != ("valueFrom" in env), f"{where}: env {env['name']}"
            assert "value" not in env or isinstance(env["value"], str), f"{where}: env {env['name']}"
    mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    volumes = {v["name"] for v in template["spec"].get("volumes", [])}
    assert mounts <= volumes, where
    return containers


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, where
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2", where
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams"
    assert head["rayStartParams"].get("num-cpus") == "0"
    head_containers = _check_pod_template(head["template"], f"{where}.headGroupSpec")
    ports = {p["containerPort"] for p in head_containers[0]["ports"]}
    assert {6379, 8265} <= ports
    images = {c["image"] for c in head_containers}
    gpus = []
    for group in spec["workerGroupSpecs"]:
        assert DNS_1123.match(group["groupName"])
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        containers = _check_pod_template(group["template"], f"{where}.{group['groupName']}")
        images |= {c["image"] for c in containers}
        gpus += [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers]
    assert len(images) == 1 and "raypo" in images.pop(), where  # one image, raypo's
    assert 8 in gpus, where


def test_kuberay_raycluster():
    doc = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert DNS_1123.match(doc["metadata"]["name"])
    assert set(doc["spec"]) <= {"rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions",
                                "headGroupSpec", "workerGroupSpecs", "suspend", "managedBy",
                                "gcsFaultToleranceOptions"}
    _check_ray_cluster_spec(doc["spec"], "RayCluster")


def test_kuberay_rayjob():
    doc = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    known = {"entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
             "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
             "shutdownAfterJobFinishes", "suspend", "backoffLimit", "activeDeadlineSeconds", "rayClusterSpec",
             "clusterSelector", "submitterPodTemplate", "deletionStrategy", "managedBy", "metadata"}
    assert set(spec) <= known, set(spec) - known
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    cluster = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    assert spec["rayClusterSpec"] == cluster  # one cluster shape, kept in step


def test_kuberay_rayjob_entrypoint_runs_a_valid_job_spec():
    """The RayJob runs `python -m raypo.cli.job run-job /home/ray/raypo/jobs/X.yaml` (the image has jobs/)."""
    entrypoint = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["python", "-m", "raypo.cli.job", "run-job"]
    in_image = Path(entrypoint[4])
    assert in_image.parts[:4] == ("/", "home", "ray", "raypo")
    local = REPO.joinpath(*in_image.parts[4:])
    job_config(load_job(local))  # the spec it names exists in the repository and validates


def test_cluster_readme_covers_the_lifecycle():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up cluster/aws.yaml", "ray up cluster/gcp.yaml", "ray dashboard", "raypo submit",
                   "ray job submit", "ray job logs", "ray job stop", "ray down", "kubectl apply",
                   "docker build -f cluster/Dockerfile", "Cost", "p4de.24xlarge", "a2-ultragpu-8g"):
        assert needle in text, needle
