"""Submitting a validated job (:mod:`raypo.launch.jobspec`) to a Ray cluster: the exact submission
(entrypoint, runtime_env, id, metadata, driver resources), the equivalent plain ``ray job submit`` command
(``--print-ray-cli``, so a job can be launched with the Ray CLI alone), Ray's ``JobSubmissionClient``
calls, and whether the job fits the cluster named in ``config.plan`` (:mod:`raypo.launch.plan`).

How the config reaches the cluster
    ``config: PATH``  the entrypoint is ``raypo train PATH [overrides] [checkpoint.run_name=NAME] [args]``,
                      run in the uploaded working_dir (the local copy is what was validated).
    ``config: {...}`` the config is resolved here (``defaults`` relative to the job file, overrides applied,
                      validated); the values that differ from raypo's defaults travel as JSON in the
                      runtime_env variable ``RAYPO_JOB_CONFIG``, and the entrypoint
                      ``python -m raypo.cli.job run train [args]`` (:mod:`raypo.cli.job`) writes them to a
                      YAML file on the cluster and runs ``raypo train`` on it. No working_dir is needed, so
                      this also works with ``image_uri``.
    Either way ``checkpoint.run_name`` defaults to the job's name: re-submitting a job resumes its run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from raypo import __version__
from raypo.config import RaypoConfig, load_config, to_dict, to_yaml
from raypo.errors import ConfigError
from raypo.launch.jobspec import RUN_CONFIG_ENV, Job, JobSpec, JobSpecError, is_local


class SubmitError(RuntimeError):
    """The cluster could not be reached, or refused the job."""


def plan_problems(cfg: RaypoConfig) -> tuple[list[str], Optional[str]]:
    """When ``plan`` names a cluster: (problems if the job does not fit, the plan's text)."""
    if not (cfg.plan.node_type or cfg.plan.gpu_memory_gib):
        return [], None
    from raypo.launch.plan import make_plan
    from raypo.launch.plan_format import format_plan

    try:
        plan = make_plan(cfg)
    except ConfigError as exc:
        return [f"config: {p}" for p in exc.problems], None
    text = format_plan(plan)
    if plan.fits is False:
        return [f"the job does not fit {plan.hardware.name} per `raypo plan` ({plan.total_gib:.1f} GiB per "
                f"GPU, {plan.host_gib:.0f} GiB host RAM per node); see the plan above for fixes, or pass "
                "--skip-plan if you know better"], text
    return [], text


# ----------------------------------------------------------------------------------------------------
# Building the submission
# ----------------------------------------------------------------------------------------------------


@dataclass
class Submission:
    """Exactly what is sent to Ray (forwarded variables' values are filled in at submit time)."""

    entrypoint: list[str]
    runtime_env: dict[str, Any]
    forward_env: list[str]
    submission_id: Optional[str]
    submission_id_policy: str
    metadata: dict[str, str]
    entrypoint_num_cpus: Optional[float] = None
    entrypoint_num_gpus: Optional[float] = None
    entrypoint_memory: Optional[int] = None  # bytes
    entrypoint_resources: dict[str, float] = field(default_factory=dict)
    checkpoint_dir: str = ""

    @property
    def entrypoint_str(self) -> str:
        return shlex.join(self.entrypoint)


def non_default_values(cfg: RaypoConfig) -> dict[str, Any]:
    """The config's values that differ from raypo's defaults, nested (what an inline config must carry)."""
    return _diff(to_dict(cfg), to_dict(RaypoConfig()))


def _diff(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        base = defaults.get(key)
        if isinstance(value, dict) and isinstance(base, dict) and value and base:
            sub = _diff(value, base)
            if sub:
                out[key] = sub
        elif value != base:
            out[key] = value
    return out


def submission_id_for(spec: JobSpec, now: Optional[datetime] = None) -> Optional[str]:
    if spec.submission_id == "ray":
        return None
    if spec.submission_id == "fixed":
        return spec.name
    now = now or datetime.now(timezone.utc)
    return f"{spec.name}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def build_submission(job: Job, cfg: RaypoConfig, now: Optional[datetime] = None) -> Submission:
    """The entrypoint, runtime_env, id, metadata and driver resources for ``job`` with config ``cfg``."""
    spec, env = job.spec, job.spec.runtime_env
    runtime_env: dict[str, Any] = {}
    if job.local_working_dir is not None:
        runtime_env["working_dir"] = str(job.local_working_dir)
    elif env.working_dir:
        runtime_env["working_dir"] = env.working_dir
    if env.excludes:
        runtime_env["excludes"] = list(env.excludes)
    if env.pip:
        runtime_env["pip"] = list(env.pip)
    if env.image_uri:
        runtime_env["image_uri"] = env.image_uri
    env_vars = {k: str(v) for k, v in env.env_vars.items()}

    if isinstance(spec.config, str):
        overrides = [*spec.overrides, *job.extra_overrides]
        if load_config(job.config_path, overrides).checkpoint.run_name is None:
            overrides.append(f"checkpoint.run_name={cfg.checkpoint.run_name}")  # job_config's default
        entrypoint = ["raypo", spec.entrypoint, Path(spec.config).as_posix(), *overrides, *spec.args]
    else:
        env_vars[RUN_CONFIG_ENV] = json.dumps(non_default_values(cfg), sort_keys=True, separators=(",", ":"))
        entrypoint = ["python", "-m", "raypo.cli.job", "run", spec.entrypoint, *spec.args]
    if env_vars or env.forward_env:
        runtime_env["env_vars"] = env_vars

    checkpoint_dir = f"{cfg.checkpoint.storage_path.rstrip('/')}/{cfg.checkpoint.run_name}"
    metadata = {**{k: str(v) for k, v in spec.metadata.items()},
                "raypo_job": spec.name, "raypo_version": __version__, "raypo_entrypoint": spec.entrypoint,
                "raypo_checkpoint": checkpoint_dir,
                "raypo_config_sha256": hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]}
    res = spec.entrypoint_resources
    return Submission(
        entrypoint=entrypoint, runtime_env=runtime_env, forward_env=list(env.forward_env),
        submission_id=submission_id_for(spec, now), submission_id_policy=spec.submission_id,
        metadata=metadata,
        entrypoint_num_cpus=res.num_cpus, entrypoint_num_gpus=res.num_gpus,
        entrypoint_memory=int(res.memory_gib * 2**30) if res.memory_gib else None,
        entrypoint_resources=dict(res.resources), checkpoint_dir=checkpoint_dir,
    )


def forwarded_env(sub: Submission, environ: dict[str, str], source: Optional[str] = None) -> dict[str, str]:
    """Values of ``runtime_env.forward_env`` from the submitting shell; a missing one is a JobSpecError."""
    missing = [n for n in sub.forward_env if not environ.get(n)]
    if missing:
        raise JobSpecError([f"runtime_env.forward_env: {n} is not set in this shell; export it (its value "
                            "goes to the cluster in the job's runtime_env, never into a file) or remove it "
                            "from forward_env" for n in missing], source=source)
    return {n: environ[n] for n in sub.forward_env}


def runtime_env_for_ray(sub: Submission, environ: dict[str, str],
                        source: Optional[str] = None) -> dict[str, Any]:
    """The runtime_env sent to Ray: the spec's, plus the forwarded variables' values from ``environ``."""
    env = json.loads(json.dumps(sub.runtime_env))
    if sub.forward_env:
        env.setdefault("env_vars", {}).update(forwarded_env(sub, environ, source))
    return env


# ----------------------------------------------------------------------------------------------------
# The equivalent `ray job submit` command
# ----------------------------------------------------------------------------------------------------


def _placeholder(name: str) -> str:
    return f"__RAYPO_FORWARD_ENV_{name}__"


def _display_path(path: str) -> str:
    """A path relative to the current directory when it is inside it (the command is run from here)."""
    p = Path(path)
    try:
        rel = p.relative_to(Path.cwd())
        return "." if str(rel) == "." else rel.as_posix()
    except ValueError:
        return str(p)


def render_ray_cli(sub: Submission, address: Optional[str] = None, no_wait: bool = False) -> str:
    """The plain ``ray job submit`` command that submits ``sub``, one option per line.

    Forwarded variables appear as shell expansions (``"$HF_TOKEN"``), so the command carries no secret and
    reads them from the shell that runs it. Paths are relative to the current directory when inside it.
    """
    lines: list[list[str]] = [["ray", "job", "submit"]]
    if address:
        lines.append(["--address", address])
    if sub.submission_id:
        lines.append(["--submission-id", sub.submission_id])
    env = dict(sub.runtime_env)
    working_dir = env.pop("working_dir", None)
    if working_dir:
        lines.append(["--working-dir", _display_path(working_dir) if is_local(working_dir) else working_dir])
    if sub.forward_env:
        env.setdefault("env_vars", {}).update({n: _placeholder(n) for n in sub.forward_env})
    if env:
        lines.append(["--runtime-env-json", json.dumps(env, sort_keys=True)])
    lines.append(["--metadata-json", json.dumps(sub.metadata, sort_keys=True)])
    if sub.entrypoint_num_cpus is not None:
        lines.append(["--entrypoint-num-cpus", f"{sub.entrypoint_num_cpus:g}"])
    if sub.entrypoint_num_gpus is not None:
        lines.append(["--entrypoint-num-gpus", f"{sub.entrypoint_num_gpus:g}"])
    if sub.entrypoint_memory is not None:
        lines.append(["--entrypoint-memory", str(sub.entrypoint_memory)])
    if sub.entrypoint_resources:
        lines.append(["--entrypoint-resources", json.dumps(sub.entrypoint_resources, sort_keys=True)])
    if no_wait:
        lines.append(["--no-wait"])
    lines.append(["--", *sub.entrypoint])
    text = " \\\n    ".join(" ".join(shlex.quote(tok) for tok in line) for line in lines)
    for name in sub.forward_env:  # close the single quote, expand the variable in double quotes, reopen
        text = text.replace(_placeholder(name), f"'\"${{{name}}}\"'")
    return text


# ----------------------------------------------------------------------------------------------------
# Submission, waiting and logs
# ----------------------------------------------------------------------------------------------------


def resolve_address(address: Optional[str]) -> Optional[str]:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or None


def _connection_hint(exc: Exception) -> str:
    text = str(exc)
    if "uthenticat" in text or "Unauthorized" in text:
        return ("; the cluster uses token authentication: export RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN=<token> (print it on the head node with `ray get-auth-token`)")
    return ("; start a cluster (cluster/README.md), forward its dashboard port (ray dashboard CLUSTER.yaml "
            "or kubectl port-forward svc/HEAD-svc 8265), and pass --address http://HOST:8265 or set "
            "RAY_ADDRESS")


def connect(address: Optional[str]):
    """A ``JobSubmissionClient`` for the cluster's job server (its dashboard, port 8265 by default)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, RuntimeError (auth), ValueError (bad address)
        where = address or "the address in RAY_ADDRESS / a local cluster"
        raise SubmitError(f"cannot reach the Ray job server at {where}: {exc}{_connection_hint(exc)}") \
            from exc


def submit(client, sub: Submission, environ: dict[str, str]) -> str:
    """Submit ``sub``; with ``submission_id: fixed`` refuse when that id exists on the cluster."""
    if sub.submission_id_policy == "fixed":
        try:
            info = client.get_job_info(sub.submission_id)
        except Exception:  # RuntimeError("Request failed with status code 404...") when absent
            info = None
        if info is not None:
            raise SubmitError(f"a job with submission id '{sub.submission_id}' already exists (status "
                              f"{info.status}); submission_id: fixed allows one per name: delete it with "
                              f"`ray job delete {sub.submission_id}` or use submission_id: unique")
    try:
        return client.submit_job(
            entrypoint=sub.entrypoint_str, runtime_env=runtime_env_for_ray(sub, environ),
            submission_id=sub.submission_id, metadata=sub.metadata,
            entrypoint_num_cpus=sub.entrypoint_num_cpus, entrypoint_num_gpus=sub.entrypoint_num_gpus,
            entrypoint_memory=sub.entrypoint_memory, entrypoint_resources=sub.entrypoint_resources or None,
        )
    except JobSpecError:
        raise
    except Exception as exc:
        raise SubmitError(f"the cluster refused the job: {exc}") from exc


async def _stream_logs(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_job(client, job_id: str, follow: bool = False, poll_s: float = 1.0, out=None) -> str:
    """Wait until the job ends; stream its logs with ``follow``. Returns the final status name."""
    out = out or sys.stdout
    if follow:
        asyncio.run(_stream_logs(client, job_id, out))
    last = None
    while True:
        status = client.get_job_status(job_id)
        if status != last:
            print(f"raypo: job {job_id} is {status.value}", file=out, flush=True)
            last = status
        if status.is_terminal():
            break
        time.sleep(poll_s)
    if status.value != "SUCCEEDED" and not follow:
        info = client.get_job_info(job_id)
        tail = "\n".join(client.get_job_logs(job_id).splitlines()[-40:])
        print(f"raypo: {info.message or ''}\n--- last lines of the job's log ---\n{tail}", file=out,
              flush=True)
    return status.value


