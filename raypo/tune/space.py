"""The search space of a sweep (``tune.search_space``): its format, its parsing into :class:`SearchDim`
objects, the overrides a sampled point makes to the base config, and its validation before anything starts.
No Ray is needed here except for :meth:`SearchDim.domain`.

Search space (``tune.search_space``)
    A mapping from dotted config keys to one sampler each; both the flat form ``loss.beta: {...}`` and the
    nested form ``loss: {beta: {...}}`` are accepted (the nested one is what ``tune.search_space.loss.beta.
    loguniform=[0.01,0.5]`` on the command line builds)::

        loss.beta:          {loguniform: [0.01, 0.5]}          # tune.loguniform(low, high)
        optimizer.lr:       {loguniform: [1.0e-6, 1.0e-4]}
        loss.params.alpha:  {uniform: [0.0, 1.0]}              # also quniform/qloguniform [low, high, q]
        train.micro_batch_size: {randint: [1, 5]}              # integers in [low, high); also lograndint
        loss.name:          {choice: [dpo, lipo_lambda]}       # one at random per trial
        loss.beta:          {grid_search: [0.01, 0.1]}         # every value (x num_samples)
        lambdas.alpha:      {loguniform: [0.3, 3.0], repeat: 4}  # a scalar, used as [a, a, a, a]
        lambdas.weights:    {simplex: {num: 6, include_onehots: true, include_uniform: true, seed: 0}}
        loss:               {choice: [{name: dpo}, {name: wmpo, params: {alpha: 0.1}}]}  # bundles

    ``simplex`` is a grid of fixed lambdas for ``lambdas.schedule: fixed`` (:mod:`raypo.tune.simplex`: the
    m one-hot vectors, the uniform vector and ``num`` seeded Dirichlet draws; the probes of the learned lambda
    scheduler, docs/tune.md). A mapping value (a bundle) is merged key by key, so options that belong
    together (a loss and its parameters) are sampled together. ``num_samples`` repeats every grid point
    (Tune's rule): trials = num_samples x product of grid sizes (Tune expands grids with the alphabetically
    first key varying fastest). Each dimension becomes one column of the results table, named by its key. A
    key given twice (flat in the file, nested from the command line) takes the later one.

Validation (:func:`search_space_problems`)
    The syntax and keys (reserved keys, keys the config schema lacks, with "did you mean"), the sweep
    settings that cannot work with the space (a grid under optuna, ASHA without evaluations, ...), and the
    trial configs of :func:`representative_points` (range ends, every option), each refused with the sampled
    values that produce it. The config layer does not know search spaces: the entry points that run a sweep
    call this (:func:`raypo.tune.sweep.plan_sweep`, used by ``raypo tune``; ``raypo submit`` of a ``tune``
    job, :func:`raypo.launch.jobspec.job_config`).
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raypo.config import RaypoConfig, config_from_dict, to_dict
from raypo.config.load import deep_merge, parse_overrides, read_yaml, unknown_keys
from raypo.errors import ConfigError
from raypo.tune.simplex import Points, is_number, parse_simplex

#: sampler name -> the arguments it takes (for error messages and docs)
SAMPLERS: dict[str, str] = {
    "loguniform": "[low, high] with 0 < low < high",
    "uniform": "[low, high] with low < high",
    "quniform": "[low, high, q] with q > 0",
    "qloguniform": "[low, high, q] with 0 < low < high, q > 0",
    "randint": "[low, high]: integers low <= x < high",
    "lograndint": "[low, high]: integers 1 <= low <= x < high",
    "choice": "[value, ...]: one value at random per trial",
    "grid_search": "[value, ...]: every value, num_samples times",
    "simplex": "{num, include_onehots, include_uniform, dims, concentration, seed}: fixed lambdas",
}
RANGE_SAMPLERS = ("loguniform", "uniform", "quniform", "qloguniform", "randint", "lograndint")
LOG_SAMPLERS = ("loguniform", "qloguniform", "lograndint")
GRID_SAMPLERS = ("grid_search", "simplex")
#: keys a search space may not set, and why
RESERVED_KEYS = {
    "tune": "the sweep's own settings are not per-trial",
    "ray": "the cluster is the sweep's, not a trial's",
    "plan": "raypo plan inputs do not affect training",
    "checkpoint.run_name": "each trial's run is named after its trial id",
    "checkpoint.storage_path": "trials write under the sweep's storage (tune.storage_path)",
}
#: when the representative trial configs number more than this, each key's values are checked one at a time
MAX_CHECKED_TRIALS = 32


@dataclass(frozen=True)
class SearchDim:
    """One searched config key: ``key`` (dotted), its sampler and arguments.

    ``repeat``: the sampled scalar is used as a list of that many copies (a symmetric Dirichlet
    concentration). ``points``: the lambda grid of a ``simplex`` sampler.
    """

    key: str
    sampler: str
    args: Any
    repeat: Optional[int] = None
    points: Points = ()

    @property
    def is_grid(self) -> bool:
        return self.sampler in GRID_SAMPLERS

    @property
    def is_log(self) -> bool:
        return self.sampler in LOG_SAMPLERS

    def options(self) -> list[Any]:
        """The grid (``grid_search``, ``simplex``) or choice values."""
        if self.sampler == "simplex":
            return [list(p) for p in self.points]
        return list(self.args)

    def candidates(self) -> list[Any]:
        """Sampled values whose trial configs are validated before the sweep: both ends of a range, every
        option of a choice or grid."""
        if self.sampler in ("randint", "lograndint"):
            return [self.args[0], self.args[1] - 1]
        if self.sampler in RANGE_SAMPLERS:
            return [self.args[0], self.args[1]]
        return self.options()

    def config_value(self, sampled: Any) -> Any:
        """The value a trial's config gets for a sampled one."""
        return [sampled] * self.repeat if self.repeat else sampled

    def domain(self) -> Any:
        """The ``ray.tune`` search-space object."""
        from ray import tune

        a = self.args
        if self.sampler == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.sampler == "uniform":
            return tune.uniform(a[0], a[1])
        if self.sampler == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.sampler == "qloguniform":
            return tune.qloguniform(a[0], a[1], a[2])
        if self.sampler == "randint":
            return tune.randint(a[0], a[1])
        if self.sampler == "lograndint":
            return tune.lograndint(a[0], a[1])
        if self.sampler == "choice":
            return tune.choice(self.options())
        return tune.grid_search(self.options())

    def describe(self) -> str:
        if self.sampler == "simplex":
            text = f"simplex grid of {len(self.points)} lambdas: " + ", ".join(
                "[" + ", ".join(f"{x:g}" for x in p) + "]" for p in self.points)
        else:
            text = f"{self.sampler}({', '.join(map(repr, self.args))})"
        return text + (f" x{self.repeat}" if self.repeat else "")


def _sampler_hint(word: str) -> str:
    close = difflib.get_close_matches(word, list(SAMPLERS), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else "samplers: " + ", ".join(SAMPLERS)


def _segment_hint(key: str) -> str:
    """A misspelt sampler inside a dotted key (``lambdas.weights.simplx``), as a hint."""
    for part in key.split("."):
        if part not in SAMPLERS and _sampler_hint(part).startswith("did you mean"):
            return f" ('{part}': {_sampler_hint(part)})"
    return ""


def _flatten_space(space: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, spec) pairs; a mapping is descended into when none of its keys is a sampler and all
    its values are mappings (the nested form ``loss: {beta: {loguniform: [...]}}``)."""
    for key, spec in space.items():
        dotted = f"{prefix}{key}"
        if (isinstance(spec, Mapping) and spec and not any(k in SAMPLERS for k in spec)
                and all(isinstance(v, Mapping) for v in spec.values())):
            yield from _flatten_space(spec, dotted + ".")
        else:
            yield dotted, spec


def _range_problems(where: str, sampler: str, args: Any) -> list[str]:
    want = 3 if sampler.startswith("q") else 2
    if not isinstance(args, (list, tuple)) or len(args) != want or not all(is_number(a) for a in args):
        return [f"{where}={args!r}: {sampler} takes {SAMPLERS[sampler]}"]
    low, high = args[0], args[1]
    if sampler in ("randint", "lograndint") and not all(isinstance(a, int) for a in args):
        return [f"{where}={list(args)}: {sampler} takes integers; use uniform for floats"]
    if not low < high:
        return [f"{where}={list(args)}: low must be < high"]
    if sampler in LOG_SAMPLERS and not low > 0:
        return [f"{where}={list(args)}: a log-scale range needs low > 0; use uniform to include 0"]
    if want == 3 and not args[2] > 0:
        return [f"{where}={list(args)}: q must be > 0"]
    return []


def parse_dim(key: str, spec: Any, cfg: RaypoConfig) -> tuple[Optional[SearchDim], list[str]]:
    """One ``key: {sampler: args[, repeat: n]}`` entry as a :class:`SearchDim`, or the problems with it."""
    where = f"tune.search_space.{key}"
    example = "e.g. {loguniform: [0.01, 0.5]} or {choice: [dpo, ipo]}"
    if not isinstance(spec, Mapping):
        return None, [f"{where}={spec!r} is not a search spec: write {{sampler: args}} with a sampler from "
                      f"{', '.join(SAMPLERS)}, {example}{_segment_hint(key)}"]
    names = [k for k in spec if k != "repeat"]
    unknown = [k for k in names if k not in SAMPLERS]
    if unknown:
        return None, [f"{where}: unknown sampler '{k}': {_sampler_hint(str(k))}{_segment_hint(key)}"
                      for k in unknown]
    if len(names) != 1:
        return None, [f"{where} has {len(names)} samplers ({', '.join(names)}); give exactly one, {example}"]
    sampler, args = names[0], spec[names[0]]
    repeat = spec.get("repeat")
    if repeat is not None and (not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1):
        return None, [f"{where}.repeat={repeat!r} must be an integer >= 1 (the list length, e.g. 4)"]
    if sampler == "simplex":
        if repeat is not None:
            return None, [f"{where}: repeat does not apply to simplex (it yields whole lambda vectors)"]
        points, problems = parse_simplex(f"{where}.simplex", args, cfg)
        if problems:
            return None, problems
        return SearchDim(key, sampler, dict(args or {}), None, points), []
    if sampler in RANGE_SAMPLERS:
        problems = _range_problems(f"{where}.{sampler}", sampler, args)
        return (SearchDim(key, sampler, tuple(args), repeat), []) if not problems else (None, problems)
    if not isinstance(args, (list, tuple)) or not args:
        return None, [f"{where}.{sampler}={args!r} must be a non-empty list of values"]
    return SearchDim(key, sampler, tuple(args), repeat), []


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = value
    return out


def _key_problems(keys: list[str]) -> list[str]:
    """Reserved keys, and keys the config schema does not define ("did you mean")."""
    problems = []
    for key in keys:
        for reserved, why in RESERVED_KEYS.items():
            if key == reserved or key.startswith(reserved + "."):
                problems.append(f"tune.search_space.{key}: cannot be searched ({why})")
    for p in unknown_keys(_nest({k: None for k in keys}), RaypoConfig):
        # "unknown key 'loss.bta': did you mean 'beta'?" -> "... did you mean 'loss.beta'?"
        m = re.match(r"unknown key '(.+)\.[^.']+': did you mean '([^']+)'\?$", p)
        problems.append(f"tune.search_space: {p[:p.rindex('did you mean')]}did you mean "
                        f"'{m.group(1)}.{m.group(2)}'?" if m else f"tune.search_space: {p}")
    return problems


def parse_search_space(space: Mapping[str, Any], cfg: RaypoConfig) -> tuple[list[SearchDim], list[str]]:
    """The search space as :class:`SearchDim` objects (in the order written), or the problems with it."""
    by_key: dict[str, SearchDim] = {}
    problems: list[str] = []
    for key, spec in _flatten_space(space):
        dim, errs = parse_dim(key, spec, cfg)
        problems += errs
        if dim is not None:
            by_key.pop(key, None)  # given twice (flat and nested, e.g. a command-line override): last wins
            by_key[key] = dim
    dims = list(by_key.values())
    return dims, problems + _key_problems([d.key for d in dims])


# ----------------------------------------------------------------------------------------------------
# A sampled point -> a trial config, and the checks of the trial configs
# ----------------------------------------------------------------------------------------------------


def _flatten_value(key: str, value: Any) -> dict[str, Any]:
    """A bundle (mapping value) as dotted overrides, key by key; anything else as itself."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten_value(f"{key}.{k}", v))
        return out
    return {key: value}


def trial_overrides(dims: list[SearchDim], point: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted config overrides of one sampled point ``{key: sampled value}`` (repeat and bundles applied)."""
    out: dict[str, Any] = {}
    for d in dims:
        if d.key in point:
            out.update(_flatten_value(d.key, d.config_value(point[d.key])))
    return out


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` (a config as plain containers) with dotted ``overrides`` merged in."""
    return deep_merge(dict(raw), _nest(overrides))


def base_for_trials(cfg: RaypoConfig) -> dict[str, Any]:
    """The base config as plain containers, its search space emptied (a trial is a plain training run)."""
    raw = to_dict(cfg)
    raw["tune"] = {**raw["tune"], "search_space": {}}
    return raw


def representative_points(dims: list[SearchDim]) -> list[dict[str, Any]]:
    """Points whose trial configs are validated before the sweep: every combination of each key's
    candidates (range ends, all options), or, past :data:`MAX_CHECKED_TRIALS` combinations, each key's
    candidates with the other keys at their first one."""
    lists = [d.candidates() for d in dims]
    if math.prod(len(v) for v in lists) <= MAX_CHECKED_TRIALS:
        return [dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*lists)]
    first = {d.key: v[0] for d, v in zip(dims, lists)}
    points = [first]
    for d, values in zip(dims, lists):
        points += [{**first, d.key: v} for v in values[1:]]
    return points


def describe_point(point: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in point.items())


def _lambda_problems(dims: list[SearchDim], trial: RaypoConfig) -> list[str]:
    """A lambda grid only means something for a lambda loss with ``lambdas.schedule: fixed``."""
    from raypo.losses.registry import get_loss_spec

    if not any(d.key == "lambdas.weights" for d in dims):
        return []
    problems = []
    if trial.lambdas.schedule != "fixed":
        problems.append(f"tune.search_space.lambdas.weights: trials use lambdas.schedule="
                        f"{trial.lambdas.schedule}, which ignores lambdas.weights; set "
                        "lambdas.schedule: fixed")
    if not get_loss_spec(trial.loss.name).needs_lambda:
        problems.append(f"tune.search_space.lambdas.weights: loss {trial.loss.name} takes no lambda; use a "
                        "multi-dimension loss such as loss.name=lambda_dpo")
    return problems


def representative_configs(cfg: RaypoConfig, dims: list[SearchDim]
                           ) -> tuple[list[RaypoConfig], list[str]]:
    """The validated trial configs of :func:`representative_points`, and the problems of invalid ones
    (each named with the sampled values that produce it)."""
    base = base_for_trials(cfg)
    configs: list[RaypoConfig] = []
    problems: list[str] = []
    seen: set[str] = set()
    for point in representative_points(dims):
        try:
            trial = config_from_dict(apply_overrides(base, trial_overrides(dims, point)))
        except ConfigError as exc:
            for p in exc.problems:
                if p not in seen:
                    seen.add(p)
                    problems.append(f"tune.search_space: the trial with {describe_point(point)} is invalid: "
                                    f"{p}")
            continue
        for p in _lambda_problems(dims, trial):
            if p not in seen:
                seen.add(p)
                problems.append(p)
        configs.append(trial)
    return configs, problems


def _uses_eval(metric: str) -> bool:
    return metric.startswith("eval/")


def sweep_setting_problems(cfg: RaypoConfig, dims: list[SearchDim]) -> list[str]:
    """Scheduler and search-algorithm settings that cannot work with this search space."""
    tu, t = cfg.tune, cfg.train
    p: list[str] = []
    if tu.search_alg == "grid":
        p += [f"tune.search_space.{d.key}: tune.search_alg=grid needs grid_search or simplex, got "
              f"{d.sampler}; use tune.search_alg=random to sample" for d in dims if not d.is_grid]
    if tu.search_alg in ("optuna", "hyperopt"):
        for d in dims:
            if d.is_grid:
                p.append(f"tune.search_space.{d.key}: {tu.search_alg} cannot run a grid ({d.sampler}); use "
                         "choice, or tune.search_alg=random")
            elif d.sampler == "choice" and not all(isinstance(v, (str, int, float, bool)) for v in d.args):
                p.append(f"tune.search_space.{d.key}: {tu.search_alg} takes only scalar choices; use "
                         "tune.search_alg=random for lists or bundles")
    if _uses_eval(tu.metric) and not (cfg.data.eval_path or cfg.data.eval_fraction > 0):
        p.append(f"tune.metric={tu.metric} needs held-out data: set data.eval_fraction (e.g. 0.1) or "
                 "data.eval_path")
    if tu.scheduler == "asha":
        if _uses_eval(tu.metric) and not 0 < t.eval_every < t.max_steps:
            p.append(f"tune.scheduler=asha compares trials at evaluations, but train.eval_every="
                     f"{t.eval_every} gives none before the end (train.max_steps={t.max_steps}): set "
                     "train.eval_every (and tune.grace_period to a multiple of it), or use "
                     "tune.scheduler=fifo")
        if tu.grace_period > t.max_steps:
            p.append(f"tune.grace_period={tu.grace_period} is more than train.max_steps={t.max_steps}: ASHA "
                     "could never stop a trial; lower it (it counts optimizer steps)")
    return p


def search_space_problems(cfg: RaypoConfig) -> list[str]:
    """Everything wrong with ``cfg.tune.search_space``: syntax, keys, settings and invalid trial configs
    (see "Validation" above; ``cfg`` itself has passed :func:`raypo.config.load_config`)."""
    dims, problems = parse_search_space(cfg.tune.search_space, cfg)
    if problems:
        return problems
    problems = sweep_setting_problems(cfg, dims)
    return problems + representative_configs(cfg, dims)[1]


def check_search_space(cfg: RaypoConfig, source: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` with every problem of :func:`search_space_problems`, if any."""
    problems = search_space_problems(cfg)
    if problems:
        raise ConfigError(problems, source=source)


def unchecked_search_space_problems(raw: Mapping[str, Any]) -> list[str]:
    """:func:`search_space_problems` of a config mapping whose values failed validation, so that a sweep's
    entry point reports them in one list with the config's own problems. Empty when the mapping has no
    search space, or unknown keys or wrong types (no typed config to check: the config's error comes first).
    """
    if not (raw.get("tune") or {}).get("search_space") or unknown_keys(dict(raw), RaypoConfig):
        return []
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RaypoConfig), dict(raw)))
    except OmegaConfBaseException:
        return []
    return search_space_problems(cfg)


def load_sweep_config(path: Optional[str | os.PathLike], overrides: Optional[list[str]] = None
                      ) -> RaypoConfig:
    """:func:`raypo.config.load_config` for a sweep: an invalid config's :class:`ConfigError` also lists its
    search space's problems (:func:`unchecked_search_space_problems`). A valid config's search space is
    checked by :func:`raypo.tune.sweep.plan_sweep`, which every run of a sweep goes through."""
    raw = read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else None
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    try:
        return config_from_dict(raw, source=source)
    except ConfigError as exc:
        raise ConfigError(exc.problems + unchecked_search_space_problems(raw), source=source) from exc


def num_trials(cfg: RaypoConfig, dims: list[SearchDim]) -> int:
    """num_samples x the product of the grid sizes (Tune's rule)."""
    return cfg.tune.num_samples * math.prod(len(d.options()) for d in dims if d.is_grid)

