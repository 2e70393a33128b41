"""Job specs (``jobs/*.yaml``): the schema, reading and validating a spec, and resolving its raypo config.

``ray job submit`` has no job file of its own (its only YAML input is a runtime_env), so raypo defines one.
A spec is checked on the submitting machine before anything is sent: its keys and types, its values, its
local paths, and its raypo config (:func:`raypo.config.load_config`; for a sweep, also its search space,
:func:`raypo.tune.space.search_space_problems`), each problem named with the key, the value and the fix.

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

The flags allowed in ``args`` are those of the command the job runs; the command line knows them and hands
them in (``entry_flags``, :func:`raypo.cli.main.command_flags`), so this layer never imports the CLI.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raypo.config import RaypoConfig, config_from_dict
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
# Known token shapes, checked on values whatever the variable is called: Hugging Face, AWS access key ids
# (long-term AKIA, temporary ASIA), GitHub (classic and fine-grained), OpenAI-style and Slack tokens.
_SECRET_VALUE_RE = re.compile(
    r"^(hf_[A-Za-z0-9]{20,}|(AKIA|ASIA)[A-Z0-9]{16}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|sk-[A-Za-z0-9_-]{20,}|xox[abpr]-[A-Za-z0-9-]{10,})$")


def looks_like_secret_value(value: object) -> bool:
    """Whether ``value`` has the shape of a known access token or key id (not only a secret-like name)."""
    return bool(_SECRET_VALUE_RE.match(str(value).strip()))

#: entrypoint -> the flags of ``raypo <entrypoint>`` (the command line's own parser knows them)
EntryFlags = Mapping[str, Sequence[str]]

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


def validate_job_spec(spec: JobSpec, entry_flags: Optional[EntryFlags] = None) -> list[str]:
    """Problems with the spec's own values (not its paths or config), each naming key, value and fix.

    ``entry_flags``: the flags of each entrypoint's command, to check ``args`` against; None leaves
    ``args`` unchecked (the command that runs the job refuses an unknown flag then).
    """
    p: list[str] = []
    if spec.name is None:
        p.append("name is required: a short id such as mpo-llama8b (submission ids and the run name use it)")
    elif not _NAME_RE.match(spec.name):
        p.append(f"name={spec.name!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a "
                 "letter or digit, e.g. mpo-llama8b")
    if spec.entrypoint not in ENTRYPOINTS:
        p.append(f"entrypoint={spec.entrypoint!r} is not one of {', '.join(ENTRYPOINTS)}: "
                 f"{did_you_mean(spec.entrypoint, list(ENTRYPOINTS))}")
    elif entry_flags is not None:
        flags = list(entry_flags.get(spec.entrypoint, ()))
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
        elif looks_like_secret_value(value):
            p.append(f"runtime_env.env_vars.{name} holds a value shaped like an access token or key id "
                     "(hf_..., AKIA/ASIA..., ghp_..., sk-...): never write secrets in a job spec; list the "
                     "variable under runtime_env.forward_env instead (its value is read from your shell at "
                     "submit time)")
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


def load_job(path: str | os.PathLike, extra_overrides: Optional[list[str]] = None, *,
             entry_flags: Optional[EntryFlags] = None) -> Job:
    """Read and validate a job spec: keys (with "did you mean"), types, values (``args`` against
    ``entry_flags``, see :func:`validate_job_spec`) and local paths.

    Raises :class:`JobSpecError` listing every problem found. The raypo config is checked by
    :func:`job_config`.
    """
    path = Path(path)
    source = str(path)
    spec = _typed_spec(_read_spec(path), source)
    problems = validate_job_spec(spec, entry_flags)
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


def _raw_config(job: Job, overrides: list[str]) -> dict[str, Any]:
    """The job's config as a mapping (the file at ``config_path`` or the inline one, ``defaults`` merged),
    with ``overrides`` applied: what :func:`raypo.config.load_config` reads."""
    if isinstance(job.spec.config, str):
        raw = read_yaml(job.config_path)
    else:
        raw = _inline_config(job.spec.config, job.path.parent)
    return deep_merge(raw, parse_overrides(overrides)) if overrides else raw


def _sweep_problems(raw: Optional[dict[str, Any]], cfg: Optional[RaypoConfig]) -> list[str]:
    """A ``tune`` job's search-space problems: of the validated ``cfg``, else of ``raw`` (which failed)."""
    from raypo.tune.space import search_space_problems, unchecked_search_space_problems

    if cfg is not None:
        return search_space_problems(cfg) if cfg.tune.search_space else []
    return unchecked_search_space_problems(raw) if raw is not None else []


def job_config(job: Job) -> RaypoConfig:
    """The job's raypo config, resolved and validated, with ``checkpoint.run_name`` defaulting to the name.

    A ``tune`` job's search space is validated too, as ``raypo tune`` would before starting (in one list
    with the config's own problems). Config problems are raised as a :class:`JobSpecError` whose lines
    start with ``config:``.
    """
    spec = job.spec
    sweep = spec.entrypoint == "tune"
    raw: Optional[dict[str, Any]] = None
    try:
        raw = _raw_config(job, [*spec.overrides, *job.extra_overrides])
        cfg = config_from_dict(raw)
    except JobSpecError:
        raise
    except ConfigError as exc:
        problems = exc.problems + (_sweep_problems(raw, None) if sweep else [])
        raise JobSpecError([f"config: {p}" for p in problems], source=str(job.path)) from exc
    problems = _sweep_problems(None, cfg) if sweep else []
    if problems:
        raise JobSpecError([f"config: {p}" for p in problems], source=str(job.path))
    if cfg.checkpoint.run_name is None:
        cfg.checkpoint.run_name = spec.name
    problems = storage_problems(cfg)
    if problems:
        raise JobSpecError(problems, source=str(job.path))
    return cfg


def is_local(path: str) -> bool:
    return not _URI_RE.match(path)


def storage_problems(cfg: RaypoConfig) -> list[str]:
    """Checkpoint storage a cluster job can use: never relative, shared when the job spans nodes."""
    p: list[str] = []
    gpus_per_node = cfg.plan.gpus_per_node or 8
    multi_node = cfg.scaling.use_gpu and cfg.scaling.num_workers > gpus_per_node
    for key, value in (("checkpoint.storage_path", cfg.checkpoint.storage_path),
                       ("checkpoint.export_path", cfg.checkpoint.export_path),
                       ("tune.storage_path", cfg.tune.storage_path)):
        if value is None or not is_local(value):
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

