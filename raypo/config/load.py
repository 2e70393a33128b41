"""Loading a run configuration: YAML files, composition, overrides, the schema's key and type checks.

A raypo config is plain YAML whose top-level sections mirror the dataclasses below (``model``, ``data``,
``loss``, ``lambdas``, ``optimizer``, ``deepspeed``, ``scaling``, ``train``, ``checkpoint``, ``logging``,
``tune``, ``ray``, ``plan``).

Composition
    A config may start with a ``defaults:`` list of other YAML files. They are merged in order, then the
    file's own keys on top, then ``key=value`` overrides from the command line (OmegaConf dotlist syntax,
    e.g. ``loss.beta=0.1 scaling.num_workers=4``). Paths in ``defaults`` are relative to the file that
    names them; a name without a ``.yaml`` suffix is looked up as ``<name>.yaml`` there too, so
    ``defaults: [model/tiny, loss/lipo_lambda]`` works from ``configs/``. Included files may have their
    own ``defaults``.

Validation
    Everything is checked before any cluster work starts: unknown keys (with a "did you mean"), wrong
    types, and impossible values (``beta <= 0``, a lambda not on the simplex, ``num_workers < 1``, ...).
    Every problem is reported in one :class:`ConfigError` that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raypo.config.schema import RaypoConfig
from raypo.config.validate import validate
from raypo.errors import ConfigError, did_you_mean

# Free-form mappings: their keys belong to another component (the loss registry, the DeepSpeed config,
# Ray resources, a search space) and are checked there.
_FREE_FORM = {"loss.params", "deepspeed.overrides", "scaling.resources_per_worker", "tune.search_space"}


def unknown_keys(raw: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys in ``raw`` that the dataclass ``schema`` does not define, recursively."""
    if not isinstance(raw, dict):
        return []
    problems = []
    hints = get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            problems.append(f"unknown key '{dotted}': {did_you_mean(str(key), names)}")
            continue
        sub = dataclass_of(hints[key])
        if sub is not None and dotted not in _FREE_FORM:
            problems += unknown_keys(value, sub, dotted + ".")
    return problems


def dataclass_of(tp: Any) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) is Union:
        for arg in get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


# ----------------------------------------------------------------------------------------------------
# Loading and composition

def resolve_include(name: str, base_dir: Path) -> Path:
    candidates = [base_dir / name]
    if not name.endswith((".yaml", ".yml")):
        candidates.append(base_dir / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError([f"defaults entry '{name}' not found (looked for {', '.join(map(str, candidates))}); "
                       "fix the path, relative to the file that lists it"])


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file and the files its ``defaults:`` list names, merged in order."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError([f"defaults form a cycle: {chain}; remove one of the includes"])
    if not path.is_file():
        raise ConfigError([f"config file '{path}' does not exist; give the path to a YAML file"])
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and OmegaConf parse errors differ across versions
        raise ConfigError([f"cannot parse YAML: {exc}"], source=str(path)) from exc
    if not _is_mapping_text(path):
        # an empty file (or one of comments only) is a mistake, not a request for all the defaults
        raise ConfigError([f"config file '{path}' is empty; give the sections to set (model:, data:, loss:, "
                           "...), e.g. start from configs/quickstart.yaml"], source=str(path))
    if not isinstance(node, DictConfig):
        raise ConfigError(["the top level must be a mapping of sections (model:, data:, loss:, ...)"],
                          source=str(path))
    raw = OmegaConf.to_container(node, resolve=False)
    includes = raw.pop("defaults", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise ConfigError([f"'defaults' must be a list of YAML paths, got {includes!r}"], source=str(path))
    merged: dict[str, Any] = {}
    for name in includes:
        merged = deep_merge(merged, read_yaml(resolve_include(str(name), path.parent), (*seen, path)))
    return deep_merge(merged, raw)


def _is_mapping_text(path: Path) -> bool:
    """Whether the file spells out a mapping (``{}``) rather than holding nothing but comments."""
    return any(line.split("#", 1)[0].strip() for line in path.read_text().splitlines())


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    problems = [f"override '{o}' is not key=value; write e.g. loss.beta=0.1"
                for o in overrides if "=" not in o]
    if problems:
        raise ConfigError(problems, source="command line")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except OmegaConfBaseException as exc:
        raise ConfigError([f"cannot parse overrides {overrides}: {exc}"], source="command line") from exc


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RaypoConfig:
    """Load ``path`` (with its ``defaults``), apply ``key=value`` overrides, and validate.

    Returns a typed :class:`RaypoConfig`; raises :class:`ConfigError` listing every problem found.
    """
    raw = read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else None
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    return config_from_dict(raw, source=source)


def config_from_dict(raw: dict[str, Any], source: Optional[str] = None) -> RaypoConfig:
    """Build and validate a :class:`RaypoConfig` from a plain (possibly partial) mapping."""
    # Every problem at once: unknown keys and wrong types are set aside one by one (so one does not hide
    # the next), and the value checks then run on the rest (with the defaults in their place).
    problems = unknown_keys(raw, RaypoConfig)
    raw = _without_unknown(raw, RaypoConfig)
    schema = OmegaConf.structured(RaypoConfig)
    for _ in range(100):
        try:
            merged = OmegaConf.merge(schema, raw)
            break
        except OmegaConfBaseException as exc:
            problems.append(_type_error_message(exc))
            key = getattr(exc, "full_key", None)
            if not key or not _drop_key(raw, key):
                raise ConfigError(problems, source=source) from exc
    else:
        raise ConfigError(problems, source=source)
    cfg: RaypoConfig = OmegaConf.to_object(merged)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _without_unknown(raw: Any, schema: type) -> Any:
    """``raw`` without the keys :func:`unknown_keys` reports (recursively; free-form mappings kept)."""
    if not isinstance(raw, dict):
        return raw
    hints = get_type_hints(schema)
    out = {}
    for key, value in raw.items():
        if key not in hints:
            continue
        sub = dataclass_of(hints[key])
        out[key] = _without_unknown(value, sub) if sub is not None else value
    return out


def _drop_key(raw: dict[str, Any], dotted: str) -> bool:
    """Remove the dotted key (``a.b`` or ``a.b[2]``: the whole list ``a.b``) from ``raw``; False if absent."""
    parts = re.sub(r"\[\d+\].*$", "", dotted).split(".")
    node: Any = raw
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    if isinstance(node, dict) and parts[-1] in node:
        del node[parts[-1]]
        return True
    return False


def _type_error_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "?"
    value = getattr(exc, "value", None)
    detail = str(exc).splitlines()[0]
    return (f"'{key}' has the wrong type: got {value!r} ({type(value).__name__}), "
            f"expected {_expected_type(key)} ({detail})")


def _expected_type(dotted: str) -> str:
    """The schema's type annotation for a dotted key, for error messages."""
    schema: Any = RaypoConfig
    hint: Any = None
    for part in re.sub(r"\[\d+\]", "", dotted).split("."):
        if not dataclasses.is_dataclass(schema):
            break
        hint = get_type_hints(schema).get(part)
        schema = dataclass_of(hint) if hint is not None else None
    if hint is None:
        return "a value of the schema's type"
    if get_origin(hint) is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def to_dict(cfg: RaypoConfig) -> dict[str, Any]:
    """The config as plain Python containers (for Ray train_loop_config, YAML dumps, Tune)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RaypoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


# ----------------------------------------------------------------------------------------------------
