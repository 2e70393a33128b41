"""``raypo submit``: job specs (``jobs/*.yaml``) -> Ray Job Submission.

``ray job submit`` has no job file of its own (its only YAML input is a runtime_env), so raypo defines one
and submits it through Ray's ``JobSubmissionClient``, or prints the equivalent plain ``ray job submit``
command (``--print-ray-cli``) so a job can be launched with the Ray CLI alone. Everything is validated on
the submitting machine first: the spec's keys and types, its paths, and its raypo config
(:func:`raypo.config.load_config`); with a cluster named in ``config.plan``, also whether the job fits
(:mod:`raypo.launch.plan`).

Job spec (every key but ``name`` and ``config`` is optional)::

    name: mpo-llama8b            # [a-z0-9._-]; submission ids and the default checkpoint.run_name
    description: "..."
    entrypoint: train            # train | tune: runs `raypo train|tune CONFIG`
    args: []                     # extra flags of that command, e.g. [--dry-run] or [--resume]
    config: configs/x.yaml       # a path relative to runtime_env.working_dir, or an inline raypo config
    overrides: [loss.beta=0.1]   # key=value overrides on top of the config
    runtime_env:
      working_dir: ..            # local directory (relative to this file) Ray uploads; the job runs there
      excludes: [.git]           # gitignore-style patterns left out of the upload (.gitignore is honoured)
      pip: []                    # extra packages installed for this job (Ray's pip runtime env)
      image_uri: null            # or run the job in this container image (Ray allows only env_vars with it)
      env_vars: {NCCL_DEBUG: WARN}
      forward_env: [HF_TOKEN]    # names only: values are read from the submitting shell at submit time
    entrypoint_resources: {num_cpus: null, num_gpus: null, memory_gib: null, resources: {}}
    submission_id: unique        # unique: NAME-YYYYmmdd-HHMMSS-xxxx | fixed: NAME (one at a time) | ray
    metadata: {owner: alice}     # strings; raypo adds raypo_job, raypo_checkpoint, raypo_config_sha256, ...

How the config reaches the cluster
    ``config: PATH``  the entrypoint is ``raypo train PATH [overrides] [checkpoint.run_name=NAME] [args]``,
                      run in the uploaded working_dir (the local copy is what was validated).
    ``config: {...}`` the config is resolved here (``defaults`` relative to the job file, overrides applied,
                      validated); the values that differ from raypo's defaults travel as JSON in the
                      runtime_env variable ``RAYPO_JOB_CONFIG``, and the entrypoint
                      ``python -m raypo.launch.submit run train [args]`` writes them to a YAML file on the cluster
                      and runs ``raypo train`` on it. No working_dir is needed, so this also works with
                      ``image_uri``.
    Either way ``checkpoint.run_name`` defaults to the job's name: re-submitting a job resumes its run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raypo import __version__
from raypo.config import RaypoConfig, config_from_dict, load_config, to_dict, to_yaml
from raypo.config.load import (
    dataclass_of,
    deep_merge,
    parse_overrides,
    read_yaml,
    resolve_include,
    unknown_keys,
)
from raypo.errors import ConfigError, did_you_mean

ENTRYPOINTS = ("train", "tune")
SUBMISSION_ID_POLICIES = ("unique", "fixed", "ray")
RUN_CONFIG_ENV = "RAYPO_JOB_CONFIG"
RESERVED_METADATA_PREFIX = "raypo_"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME_RE = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)", re.I)
_URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# ----------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------


@dataclass
class RuntimeEnvSpec:
    """The job's Ray runtime_env, minus secrets (``forward_env`` names variables; values stay local)."""

    working_dir: Optional[str] = None
    excludes: list[str] = field(default_factory=list)
    pip: list[str] = field(default_factory=list)
    image_uri: Optional[str] = None
    env_vars: dict[str, str] = field(default_factory=dict)
    forward_env: list[str] = field(default_factory=list)


@dataclass
class EntrypointResourcesSpec:
    """Resources reserved for the job's driver. None everywhere: the driver runs on the head node."""

    num_cpus: Optional[float] = None
    num_gpus: Optional[float] = None
    memory_gib: Optional[float] = None
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class JobSpec:
    name: Optional[str] = None
    description: str = ""
    entrypoint: str = "train"
    args: list[str] = field(default_factory=list)
    config: Any = None  # str (path relative to runtime_env.working_dir) or an inline raypo config mapping
    overrides: list[str] = field(default_factory=list)
    runtime_env: RuntimeEnvSpec = field(default_factory=RuntimeEnvSpec)
    entrypoint_resources: EntrypointResourcesSpec = field(default_factory=EntrypointResourcesSpec)
    submission_id: str = "unique"
    metadata: dict[str, str] = field(default_factory=dict)


class JobSpecError(ConfigError):
    """One or more job spec problems (the raypo config's included); each names the key, value and fix."""

    def __init__(self, problems: list[str], source: Optional[str] = None):
        self.problems = list(problems)
        where = f" {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        ValueError.__init__(self, f"invalid job spec{where}:\n{lines}")


class SubmitError(RuntimeError):
    """The cluster could not be reached, or refused the job."""


@dataclass(frozen=True)
class Job:
    """A validated job spec and where it was read from (relative paths are relative to the file)."""

    spec: JobSpec
    path: Path
    extra_overrides: tuple[str, ...] = ()

    @property
    def local_working_dir(self) -> Optional[Path]:
        wd = self.spec.runtime_env.working_dir
        if wd is None or _URI_RE.match(wd):
            return None
        return (self.path.parent / Path(wd).expanduser()).resolve()

    @property
    def config_path(self) -> Optional[Path]:
        """The local file of ``config: PATH`` (inside the working_dir), or None for an inline config."""
        if not isinstance(self.spec.config, str) or self.local_working_dir is None:
            return None
        return (self.local_working_dir / self.spec.config).resolve()


# ----------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------


def _read_spec(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise JobSpecError([f"job spec '{path}' does not exist; give the path to a YAML file such as "
                            "jobs/mpo_llama8b.yaml"])
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml and OmegaConf parse errors differ across versions
        raise JobSpecError([f"cannot parse YAML: {exc}"], source=str(path)) from exc
    if not isinstance(node, DictConfig):
        raise JobSpecError(["the top level must be a mapping (name:, config:, runtime_env:, ...)"],
                           source=str(path))
    return OmegaConf.to_container(node, resolve=False)


def is_job_spec(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a job spec rather than a raypo config (it has job-only top-level keys)."""
    try:
        raw = _read_spec(Path(path))
    except JobSpecError:
        return False
    return bool({"config", "entrypoint", "runtime_env", "submission_id"} & set(raw))


def _expected(schema: type, dotted: str) -> str:
    """The type annotation of a dotted key of a dataclass schema, for error messages."""
    hint: Any = None
    for part in re.sub(r"\[\d+\]", "", dotted).split("."):
        if schema is None or not dataclasses.is_dataclass(schema):
            break
        hint = get_type_hints(schema).get(part)
        schema = dataclass_of(hint) if hint is not None else None
    return str(hint).replace("typing.", "") if hint is not None else "the schema's type"


def _scalar_mapping_problems(raw: dict[str, Any]) -> list[str]:
    """env_vars, metadata and resources hold scalars (OmegaConf would accept lists there)."""
    problems = []
    sections = {"runtime_env.env_vars": (raw.get("runtime_env") or {}).get("env_vars"),
                "metadata": raw.get("metadata"),
                "entrypoint_resources.resources": (raw.get("entrypoint_resources") or {}).get("resources")}
    for key, mapping in sections.items():
        if mapping is None:
            continue
        if not isinstance(mapping, dict):
            problems.append(f"{key} must be a mapping of names to values, got {mapping!r}")
            continue
        for name, value in mapping.items():
            if isinstance(value, (dict, list)) or value is None:
                problems.append(f"{key}.{name}={value!r} must be a single value (a string or a number)")
    return problems


def _typed_spec(raw: dict[str, Any], source: str) -> JobSpec:
    problems = unknown_keys(raw, JobSpec) + _scalar_mapping_problems(raw)
    if problems:
        raise JobSpecError(problems, source=source)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobSpec), raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        value = getattr(exc, "value", None)
        raise JobSpecError([f"'{key}' has the wrong type: got {value!r} ({type(value).__name__}), expected "
                            f"{_expected(JobSpec, key)}"], source=source) from exc


def _entry_flags(entrypoint: str) -> list[str]:
    """The flags ``raypo <entrypoint>`` accepts, read from the CLI parser itself."""
    from raypo.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[entrypoint]
    return [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]


def validate_job_spec(spec: JobSpec) -> list[str]:
    """Problems with the spec's own values (not its paths or config), each naming key, value and fix."""
    p: list[str] = []
    if spec.name is None:
        p.append("name is required: a short id such as mpo-llama8b (submission ids and the run name use it)")
    elif not _NAME_RE.match(spec.name):
        p.append(f"name={spec.name!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a "
                 "letter or digit, e.g. mpo-llama8b")
    if spec.entrypoint not in ENTRYPOINTS:
        p.append(f"entrypoint={spec.entrypoint!r} is not one of {', '.join(ENTRYPOINTS)}: "
                 f"{did_you_mean(spec.entrypoint, list(ENTRYPOINTS))}")
    else:
        flags = _entry_flags(spec.entrypoint)
        for arg in spec.args:
            if arg.split("=", 1)[0] not in flags:
                p.append(f"args: {arg!r} is not a flag of `raypo {spec.entrypoint}` "
                         f"({did_you_mean(arg, flags)}); put key=value settings in overrides")
    if spec.config is None:
        p.append("config is required: a raypo config path relative to runtime_env.working_dir "
                 "(e.g. configs/quickstart.yaml), or an inline mapping (model:, data:, loss:, ...)")
    elif not isinstance(spec.config, (str, dict)):
        p.append(f"config={spec.config!r} must be a path or an inline mapping of raypo config sections")
    p += [f"overrides: '{o}' is not key=value; write e.g. loss.beta=0.1"
          for o in spec.overrides if "=" not in o]
    if spec.submission_id not in SUBMISSION_ID_POLICIES:
        p.append(f"submission_id={spec.submission_id!r} is not one of {', '.join(SUBMISSION_ID_POLICIES)}: "
                 f"{did_you_mean(spec.submission_id, list(SUBMISSION_ID_POLICIES))}")
    p += _runtime_env_problems(spec)
    p += _resource_problems(spec.entrypoint_resources)
    for key in spec.metadata:
        if key.startswith(RESERVED_METADATA_PREFIX):
            p.append(f"metadata.{key}: keys starting with '{RESERVED_METADATA_PREFIX}' are set by raypo; "
                     "rename it")
    return p


def _runtime_env_problems(spec: JobSpec) -> list[str]:
    p: list[str] = []
    env = spec.runtime_env
    if env.image_uri and env.working_dir:
        p.append("runtime_env.image_uri cannot be combined with runtime_env.working_dir (Ray runs image_uri "
                 "jobs with env_vars only): inline the config and drop working_dir, or drop image_uri and "
                 "use the cluster's image (cluster/Dockerfile)")
    if env.image_uri and env.pip:
        p.append("runtime_env.image_uri cannot be combined with runtime_env.pip: bake the packages into the "
                 "image, or drop image_uri")
    if isinstance(spec.config, str):
        if env.working_dir is None:
            p.append(f"config={spec.config!r} is a path, so runtime_env.working_dir must name the local "
                     "directory it is in (e.g. working_dir: ..); or inline the config")
        elif _URI_RE.match(env.working_dir):
            p.append(f"runtime_env.working_dir={env.working_dir!r} is remote, so raypo cannot validate "
                     f"config={spec.config!r} before submission; use a local working_dir or inline the "
                     "config")
    for name, value in env.env_vars.items():
        if not _ENV_NAME_RE.match(name):
            p.append(f"runtime_env.env_vars.{name}: not a valid environment variable name")
        elif name == RUN_CONFIG_ENV:
            p.append(f"runtime_env.env_vars.{name} is set by raypo (it carries an inline config); rename it")
        elif _SECRET_NAME_RE.search(name) and str(value):
            p.append(f"runtime_env.env_vars.{name} looks like a secret with its value in the job spec: list "
                     "the name under runtime_env.forward_env instead (its value is read from your shell at "
                     "submit time and never written to a file)")
    for name in env.forward_env:
        if not _ENV_NAME_RE.match(name):
            p.append(f"runtime_env.forward_env: {name!r} is not a valid environment variable name")
        elif name in env.env_vars:
            p.append(f"runtime_env.forward_env: {name} is also in runtime_env.env_vars; keep one")
    return p


def _resource_problems(res: EntrypointResourcesSpec) -> list[str]:
    p = []
    for key in ("num_cpus", "num_gpus"):
        value = getattr(res, key)
        if value is not None and value < 0:
            p.append(f"entrypoint_resources.{key}={value} must be >= 0")
    if res.memory_gib is not None and not res.memory_gib > 0:
        p.append(f"entrypoint_resources.memory_gib={res.memory_gib} must be > 0 (GiB), or left out")
    for key, value in res.resources.items():
        if value < 0:
            p.append(f"entrypoint_resources.resources.{key}={value} must be >= 0")
    return p


def _path_problems(job: Job) -> list[str]:
    """Local paths: the working_dir exists, and a config path is a file inside it."""
    p: list[str] = []
    spec, wd = job.spec, job.local_working_dir
    if wd is not None and not wd.is_dir():
        p.append(f"runtime_env.working_dir={spec.runtime_env.working_dir!r} resolves to {wd}, which is not a "
                 "directory; it is relative to the job file")
    elif isinstance(spec.config, str) and wd is not None:
        cfg = job.config_path
        if Path(spec.config).is_absolute() or not cfg.is_relative_to(wd):
            p.append(f"config={spec.config!r} must be a path inside runtime_env.working_dir ({wd}) so that "
                     "it is uploaded with it; give it relative to the working_dir")
        elif not cfg.is_file():
            p.append(f"config={spec.config!r} resolves to {cfg}, which does not exist; the path is relative "
                     f"to runtime_env.working_dir ({wd})")
    return p


def load_job(path: str | os.PathLike, extra_overrides: Optional[list[str]] = None) -> Job:
    """Read and validate a job spec: keys (with "did you mean"), types, values and local paths.

    Raises :class:`JobSpecError` listing every problem found. The raypo config is checked by
    :func:`job_config`.
    """
    path = Path(path)
    source = str(path)
    spec = _typed_spec(_read_spec(path), source)
    problems = validate_job_spec(spec)
    job = Job(spec=spec, path=path.resolve(), extra_overrides=tuple(extra_overrides or ()))
    if not problems:
        problems = _path_problems(job)
    if problems:
        raise JobSpecError(problems, source=source)
    return job


def _inline_config(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """An inline config with its ``defaults`` merged in, paths relative to ``base_dir`` (the job file's)."""
    raw = dict(raw)
    includes = raw.pop("defaults", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for name in includes:
        merged = deep_merge(merged, read_yaml(resolve_include(str(name), base_dir)))
    return deep_merge(merged, raw)


def job_config(job: Job) -> RaypoConfig:
    """The job's raypo config, resolved and validated, with ``checkpoint.run_name`` defaulting to the name.

    Config problems are raised as a :class:`JobSpecError` whose lines start with ``config:``.
    """
    spec = job.spec
    overrides = [*spec.overrides, *job.extra_overrides]
    try:
        if isinstance(spec.config, str):
            cfg = load_config(job.config_path, overrides)
        else:
            raw = _inline_config(spec.config, job.path.parent)
            if overrides:
                raw = deep_merge(raw, parse_overrides(overrides))
            cfg = config_from_dict(raw)
    except JobSpecError:
        raise
    except ConfigError as exc:
        raise JobSpecError([f"config: {p}" for p in exc.problems], source=str(job.path)) from exc
    if cfg.checkpoint.run_name is None:
        cfg.checkpoint.run_name = spec.name
    problems = storage_problems(cfg)
    if problems:
        raise JobSpecError(problems, source=str(job.path))
    return cfg


def _is_local(path: str) -> bool:
    return not _URI_RE.match(path)


def storage_problems(cfg: RaypoConfig) -> list[str]:
    """Checkpoint storage a cluster job can use: never relative, shared when the job spans nodes."""
    p: list[str] = []
    gpus_per_node = cfg.plan.gpus_per_node or 8
    multi_node = cfg.scaling.use_gpu and cfg.scaling.num_workers > gpus_per_node
    for key, value in (("checkpoint.storage_path", cfg.checkpoint.storage_path),
                       ("checkpoint.export_path", cfg.checkpoint.export_path),
                       ("tune.storage_path", cfg.tune.storage_path)):
        if value is None or not _is_local(value):
            continue
        if not value.startswith(("/", "~")):
            p.append(f"config: {key}={value!r} is relative: a job runs in a temporary copy of its "
                     "working_dir that Ray deletes, so checkpoints would be lost; use s3://bucket/prefix, "
                     "gs://..., or an absolute path on shared storage (e.g. /mnt/fsx/raypo_runs)")
        elif value.startswith("~") and multi_node:
            nodes = math.ceil(cfg.scaling.num_workers / gpus_per_node)
            p.append(f"config: {key}={value!r} is each node's home directory, but the job spans {nodes} "
                     "nodes and Ray Train needs storage every node reaches: use s3://bucket/prefix or a "
                     "shared filesystem path")
    return p


def plan_problems(cfg: RaypoConfig) -> tuple[list[str], Optional[str]]:
    """When ``plan`` names a cluster: (problems if the job does not fit, the plan's text)."""
    if not (cfg.plan.node_type or cfg.plan.gpu_memory_gib):
        return [], None
    from raypo.launch.plan import format_plan, make_plan

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
        entrypoint = ["python", "-m", "raypo.launch.submit", "run", spec.entrypoint, *spec.args]
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
        lines.append(["--working-dir", _display_path(working_dir) if _is_local(working_dir) else working_dir])
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


def _summary(sub: Submission, job_id: str, address: Optional[str]) -> str:
    addr = f" --address {address}" if address else ""
    return "\n".join([
        f"raypo: submitted job {job_id}" + (f" to {address}" if address else ""),
        f"  entrypoint   {sub.entrypoint_str}",
        f"  checkpoints  {sub.checkpoint_dir}",
        f"  logs         ray job logs{addr} {job_id} --follow",
        f"  status       ray job status{addr} {job_id}",
        f"  stop         ray job stop{addr} {job_id}",
    ])


def submit_command(args: argparse.Namespace) -> int:
    """``raypo submit JOB [--address URL] [--no-wait] [--follow] [--print-ray-cli] [--skip-plan]``."""
    if args.no_wait and args.follow:
        print("raypo: --no-wait and --follow exclude each other; pick one", file=sys.stderr)
        return 2
    job = load_job(args.job)
    cfg = job_config(job)
    if not getattr(args, "skip_plan", False):
        problems, plan_text = plan_problems(cfg)
        if problems:
            if plan_text:
                print(plan_text, file=sys.stderr)
            raise JobSpecError(problems, source=str(args.job))
    sub = build_submission(job, cfg)
    address = resolve_address(args.address)
    if args.print_ray_cli:
        print(render_ray_cli(sub, address, no_wait=args.no_wait))
        return 0
    runtime_env_for_ray(sub, dict(os.environ), source=str(args.job))  # a missing forwarded variable
    job_id = None
    try:
        client = connect(address)
        job_id = submit(client, sub, dict(os.environ))
        print(_summary(sub, job_id, address), flush=True)
        if args.no_wait:
            return 0
        status = wait_for_job(client, job_id, follow=args.follow)
    except SubmitError as exc:
        print(f"raypo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a submitted job keeps running on the cluster
        if job_id is None:
            print("\nraypo: interrupted before the job was submitted", file=sys.stderr)
            return 130
        addr = f" --address {address}" if address else ""
        print(f"\nraypo: stopped waiting; job {job_id} keeps running (ray job stop{addr} {job_id})",
              file=sys.stderr)
        return 130
    return 0 if status == "SUCCEEDED" else 1


# ----------------------------------------------------------------------------------------------------
# On the cluster: `python -m raypo.launch.submit run train|tune [ARGS]` (inline configs) and
# `python -m raypo.launch.submit run-job JOB.yaml` (a job spec whose files are on this machine: KubeRay RayJobs)
# ----------------------------------------------------------------------------------------------------


def run_inline(entrypoint: str, args: list[str], environ: Optional[dict[str, str]] = None) -> int:
    """Write the config carried in ``RAYPO_JOB_CONFIG`` to a YAML file and run ``raypo ENTRYPOINT`` on it."""
    from raypo.cli import main as raypo_main

    environ = os.environ if environ is None else environ
    text = environ.get(RUN_CONFIG_ENV)
    if not text:
        raise ConfigError([f"{RUN_CONFIG_ENV} is not set: `python -m raypo.launch.submit run` runs jobs submitted "
                           "by `raypo submit` with an inline config; use `raypo train CONFIG` otherwise"])
    cfg = config_from_dict(json.loads(text), source=f"${RUN_CONFIG_ENV}")
    with tempfile.TemporaryDirectory(prefix="raypo-job-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(to_yaml(cfg))
        command = shlex.join(["raypo", entrypoint, str(path), *args])
        print(f"raypo: job config written to {path}; running: {command}", flush=True)
        return raypo_main([entrypoint, str(path), *args])


def run_job_here(path: str) -> int:
    """Run job spec ``path`` in this process, as its entrypoint would on a cluster (a RayJob's driver)."""
    from raypo.cli import main as raypo_main

    job = load_job(path)
    cfg = job_config(job)
    with tempfile.TemporaryDirectory(prefix="raypo-job-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(to_yaml(cfg))
        argv = [job.spec.entrypoint, str(config), *job.spec.args]
        print(f"raypo: job {job.spec.name}: running raypo {shlex.join(argv)}", flush=True)
        return raypo_main(argv)


_USAGE = """\
usage: python -m raypo.launch.submit run {train,tune} [ARGS...]   the job side of `raypo submit` (inline config)
       python -m raypo.launch.submit run-job JOB.yaml                 run a job spec here (a RayJob's entrypoint)"""


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) >= 2 and argv[0] == "run" and argv[1] in ENTRYPOINTS:
            return run_inline(argv[1], argv[2:])
        if len(argv) == 2 and argv[0] == "run-job":
            return run_job_here(argv[1])
    except ConfigError as exc:
        print(f"raypo: {exc}", file=sys.stderr)
        return 2
    print(_USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
