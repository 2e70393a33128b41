"""``raypo tune``: Ray Tune sweeps in which every trial is a full raypo training run (Ray Train + DeepSpeed).

::

    raypo tune CONFIG [key=value ...] [--resume] [--dry-run]

    load + validate CONFIG (every trial config is checked before anything starts)
      | plan_sweep                 name, storage, search space -> ray.tune domains
      | prepare_shared_reference   reference log-probs computed ONCE into raypo.train.reference_cache
      | Tuner(run_trial) / Tuner.restore(...)
      |     run_trial: trial config = base + sampled overrides; build_trainer(..., TuneReportCallback) .fit()
      | results_table              one row per trial: config, status, last and best metric
      v
    <sweep>/results/results.csv, best_config.yaml (ready for `raypo train`), metric_vs_*.png

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

    ``simplex`` is a grid of fixed lambdas for ``lambdas.schedule: fixed``: the m one-hot vectors and the
    uniform vector (the seed paper's probes) and ``num`` seeded Dirichlet(``concentration``) draws; m is
    ``dims``, else ``len(data.dimensions)``, else 4 for ``synthetic://`` data. A mapping value (a bundle) is
    merged key by key, so options that belong together (a loss and its parameters) are sampled together.
    ``num_samples`` repeats every grid point (Tune's rule): trials = num_samples x product of grid sizes
    (Tune expands grids with the alphabetically first key varying fastest). Each dimension becomes one
    column of the results table, named by its key. A key given twice (flat in the file, nested from the
    command line) takes the later one.

Scheduling
    ASHA's time attribute is the optimizer ``step`` the training loop reports, not Tune's
    ``training_iteration`` (which counts reports: the step-0 baseline evaluation, step 1 and every
    ``logging.log_every`` steps, and restarts at 1 when a resumed trial continues from a checkpoint).
    ``max_t = train.max_steps``; ``grace_period`` and the rungs count steps. Only the reports that carry
    ``tune.metric`` are forwarded to Tune, so every result Tune sees has the metric (Tune's strict metric
    check) and ASHA decides at evaluations: with an ``eval/`` metric, set ``train.eval_every`` and make
    ``tune.grace_period`` a multiple of it. A trial stopped by ASHA is killed with its Train controller;
    Ray Train's placement-group cleaner releases its workers (this needs ``ray[default]``, i.e. the State
    API, and a cluster address it can find: :func:`raypo.train.trainer.init_ray` pins it), so the next
    trial can start.

Shared reference log-probs
    When ``tune.share_reference`` (default), some loss of the sweep uses a reference, and the search space
    varies no key that changes the data or the reference (``model.*``, ``data.*``, ``train.reference``,
    ``scaling.use_gpu``), the driver tokenises the data and scores it with the reference model once, before
    any trial starts, into the cache of :mod:`raypo.train.reference_cache` (``train.reference_cache``,
    default ``<tune storage>/reference_cache``; entries keyed by the reference model's file contents, the
    tokenised rows and the stage settings, with entropies when any loss of the sweep is a MallowsPO one).
    Every trial then trains with ``train.reference=precomputed`` on that cache: it tokenises its data
    (cheap) and joins the cached columns by row digest, so the reference model never runs in a trial, and
    a resumed sweep or another sweep on the same model and data finds the entries already there.

Resume
    The sweep is named ``checkpoint.run_name`` (default ``tune-<config file stem>``) and lives at
    ``<tune.storage_path or checkpoint.storage_path>/<name>``. ``--resume`` calls ``Tuner.restore(path,
    resume_unfinished=True, resume_errored=True)``: finished trials keep their results; unfinished ones run
    again with the same trial ids, and since each trial's Train run is named after its trial id
    (``trial_<id>`` under ``<sweep>/train_runs``), the rerun resumes from that run's latest checkpoint
    (``checkpoint.every_steps``). Tune does not keep the scheduler's state, so ASHA replays each finished
    trial's reported history into its rungs when the restored sweep re-adds it. The resolved config is
    stored as ``<sweep>/raypo_sweep.yaml``; resuming with a different one is refused.
"""

from __future__ import annotations

import argparse
import difflib
import io
import itertools
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from raypo.config import RaypoConfig, config_from_dict, load_config, to_dict, to_yaml
from raypo.config.load import deep_merge, unknown_keys
from raypo.errors import ConfigError, did_you_mean

# ----------------------------------------------------------------------------------------------------
# Search space: parsing and validation (no Ray needed)
# ----------------------------------------------------------------------------------------------------

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
SIMPLEX_OPTIONS = ("num", "include_onehots", "include_uniform", "dims", "concentration", "seed")
#: keys a search space may not set, and why
RESERVED_KEYS = {
    "tune": "the sweep's own settings are not per-trial",
    "ray": "the cluster is the sweep's, not a trial's",
    "plan": "raypo plan inputs do not affect training",
    "checkpoint.run_name": "each trial's run is named after its trial id",
    "checkpoint.storage_path": "trials write under the sweep's storage (tune.storage_path)",
}
#: keys whose change alters the tokenised data or the reference log-probs (no shared cache then)
REFERENCE_KEYS = ("model", "data", "train.reference", "scaling.use_gpu")
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
    points: tuple[tuple[float, ...], ...] = ()

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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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


def simplex_points(num_dims: int, *, num: int = 0, include_onehots: bool = True, include_uniform: bool = True,
                   concentration: float = 1.0, seed: int = 0) -> list[list[float]]:
    """Fixed lambdas on the simplex: the one-hot vectors e_1..e_m, the uniform vector (1/m, ..., 1/m) and
    ``num`` seeded Dirichlet(``concentration``) draws, rounded to 4 decimals (rows sum to 1 within 5e-4)."""
    m = num_dims
    points: list[list[float]] = []
    if include_onehots:
        points += [[1.0 if j == k else 0.0 for j in range(m)] for k in range(m)]
    if include_uniform:
        points.append([round(1.0 / m, 4)] * m)
    rng = np.random.Generator(np.random.PCG64(seed))
    for row in rng.dirichlet(np.full(m, float(concentration)), size=num) if num else []:
        points.append([round(float(x), 4) for x in row])
    return points


def _simplex_num_dims(opts: Mapping[str, Any], cfg: RaypoConfig) -> Optional[int]:
    if opts.get("dims") is not None:
        return int(opts["dims"])
    if cfg.data.dimensions:
        return len(cfg.data.dimensions)
    from raypo.data.synthetic import DIMENSIONS, is_synthetic_uri

    if is_synthetic_uri(cfg.data.train_path):
        return len(DIMENSIONS)
    return None


Points = tuple[tuple[float, ...], ...]


def _parse_simplex(where: str, opts: Any, cfg: RaypoConfig) -> tuple[Points, list[str]]:
    if opts is None:
        opts = {}
    if not isinstance(opts, Mapping):
        return (), [f"{where}={opts!r} must be a mapping of {', '.join(SIMPLEX_OPTIONS)}"]
    problems = [f"{where}: unknown option '{k}': {did_you_mean(str(k), list(SIMPLEX_OPTIONS))}"
                for k in opts if k not in SIMPLEX_OPTIONS]
    m = _simplex_num_dims(opts, cfg)
    if m is None:
        problems.append(f"{where}: the number of preference dimensions is unknown; give simplex.dims "
                        "(e.g. 4) or set data.dimensions")
    elif m < 2:
        problems.append(f"{where}: dims={m} must be >= 2")
    if cfg.data.dimensions and opts.get("dims") is not None and int(opts["dims"]) != len(cfg.data.dimensions):
        problems.append(f"{where}: dims={opts['dims']} but data.dimensions has {len(cfg.data.dimensions)} "
                        "entries; drop simplex.dims")
    num = opts.get("num", 0)
    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
        problems.append(f"{where}: num={num!r} must be an integer >= 0 (Dirichlet draws)")
    conc = opts.get("concentration", 1.0)
    if not _is_number(conc) or conc <= 0:
        problems.append(f"{where}: concentration={conc!r} must be > 0 (1 = uniform on the simplex)")
    for flag in ("include_onehots", "include_uniform"):
        if not isinstance(opts.get(flag, True), bool):
            problems.append(f"{where}: {flag}={opts[flag]!r} must be true or false")
    if problems:
        return (), problems
    points = simplex_points(m, num=num, include_onehots=opts.get("include_onehots", True),
                            include_uniform=opts.get("include_uniform", True), concentration=float(conc),
                            seed=int(opts.get("seed", 0)))
    if not points:
        return (), [f"{where}: the grid is empty; set num > 0 or include_onehots/include_uniform: true"]
    return tuple(tuple(p) for p in points), []


def _range_problems(where: str, sampler: str, args: Any) -> list[str]:
    want = 3 if sampler.startswith("q") else 2
    if not isinstance(args, (list, tuple)) or len(args) != want or not all(_is_number(a) for a in args):
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
        points, problems = _parse_simplex(f"{where}.simplex", args, cfg)
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
# Trial configs
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


def _base_for_trials(cfg: RaypoConfig) -> dict[str, Any]:
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
    base = _base_for_trials(cfg)
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
    """Everything wrong with ``cfg.tune.search_space``: syntax, keys, settings and invalid trial configs.
    Called by :func:`raypo.config.validate` (so ``raypo tune``, ``--dry-run`` and ``raypo submit`` all
    refuse a bad sweep before anything starts)."""
    dims, problems = parse_search_space(cfg.tune.search_space, cfg)
    if problems:
        return problems
    problems = sweep_setting_problems(cfg, dims)
    return problems + representative_configs(cfg, dims)[1]


def num_trials(cfg: RaypoConfig, dims: list[SearchDim]) -> int:
    """num_samples x the product of the grid sizes (Tune's rule)."""
    return cfg.tune.num_samples * math.prod(len(d.options()) for d in dims if d.is_grid)


# ----------------------------------------------------------------------------------------------------
# The sweep: name, storage, resources
# ----------------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """A planned sweep: the validated base config, its search space, name and storage root."""

    cfg: RaypoConfig
    dims: list[SearchDim]
    name: str
    storage: str  # absolute local path or s3://bucket/prefix

    @property
    def uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def train_runs(self) -> str:
        return f"{self.uri}/train_runs"

    @property
    def results_uri(self) -> str:
        return f"{self.uri}/results"

    @property
    def config_uri(self) -> str:
        return f"{self.uri}/raypo_sweep.yaml"

    def tune_location(self) -> tuple[str, Any]:
        """(experiment path, pyarrow filesystem or None) for ``Tuner.restore`` / ``can_restore``."""
        from raypo.train.trainer import storage_location

        path, fs = storage_location(replace(self.cfg, checkpoint=replace(self.cfg.checkpoint,
                                                                          storage_path=self.storage)))
        return f"{path.rstrip('/')}/{self.name}", fs

    def max_steps(self, point: Mapping[str, Any]) -> int:
        return int(point.get("train.max_steps", self.cfg.train.max_steps))


def _write_bytes(uri: str, data: bytes, s3_cfg: Any) -> None:
    """Write a file at a local path or an ``s3://`` URI (parent directories made as needed)."""
    from raypo.data.io import fsspec_for

    if "://" not in uri:
        os.makedirs(os.path.dirname(uri), exist_ok=True)
    with fsspec_for(uri, s3_cfg).open(uri, "wb") as f:
        f.write(data)


def _write_text(uri: str, text: str, s3_cfg: Any) -> None:
    _write_bytes(uri, text.encode(), s3_cfg)


def _read_text(uri: str, s3_cfg: Any) -> Optional[str]:
    from raypo.data.io import fsspec_for

    fs = fsspec_for(uri, s3_cfg)
    if not fs.exists(uri):
        return None
    with fs.open(uri, "r") as f:
        return f.read()


def sweep_name(cfg: RaypoConfig, config_path: Optional[str]) -> str:
    """``checkpoint.run_name``, else ``tune-<config file stem>``: deterministic, so --resume finds it."""
    if cfg.checkpoint.run_name:
        return cfg.checkpoint.run_name
    return f"tune-{Path(config_path).stem}" if config_path else "tune"


def _absolute(path: str) -> str:
    if "://" in path:
        return path.rstrip("/")
    return str(Path(os.path.expanduser(path)).resolve())


def plan_sweep(cfg: RaypoConfig, config_path: Optional[str] = None) -> Sweep:
    """The :class:`Sweep` for a validated config; raises :class:`ConfigError` when there is nothing to
    search."""
    if not cfg.tune.search_space:
        raise ConfigError(["tune.search_space is empty: give at least one key to search, e.g. "
                           "tune.search_space: {loss.beta: {loguniform: [0.01, 0.5]}}"], source=config_path)
    dims, problems = parse_search_space(cfg.tune.search_space, cfg)
    if problems:
        raise ConfigError(problems, source=config_path)
    storage = _absolute(cfg.tune.storage_path or cfg.checkpoint.storage_path)
    return Sweep(cfg=cfg, dims=dims, name=sweep_name(cfg, config_path), storage=storage)


def resources_per_trial(cfg: RaypoConfig) -> tuple[str, float]:
    """(resource, amount) one trial's workers hold: GPUs on a GPU cluster, else CPUs."""
    s = cfg.scaling
    resource = "GPU" if s.use_gpu else "CPU"
    return resource, s.num_workers * float(s.resources_per_worker.get(resource, 1.0))


def derive_max_concurrent_trials(cfg: RaypoConfig, cluster: Mapping[str, float]) -> int:
    """``tune.max_concurrent_trials``, or the cluster's GPUs (CPUs without GPUs) // those of one trial.

    At least 1: an autoscaling cluster that starts without GPU nodes still runs one trial at a time (set
    the value to let the autoscaler add nodes for more).
    """
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resource, per_trial = resources_per_trial(cfg)
    return max(1, int(float(cluster.get(resource, 0.0)) // per_trial)) if per_trial > 0 else 1


# ----------------------------------------------------------------------------------------------------
# Shared reference log-probs
# ----------------------------------------------------------------------------------------------------


def _varies_reference(dims: list[SearchDim]) -> Optional[str]:
    for d in dims:
        for prefix in REFERENCE_KEYS:
            if d.key == prefix or d.key.startswith(prefix + ".") or prefix.startswith(d.key + "."):
                return d.key
    return None


def reference_needs(configs: list[RaypoConfig]) -> tuple[bool, bool]:
    """(any trial uses reference log-probs, any trial needs the reference entropy) over trial configs."""
    from raypo.losses.registry import get_loss_spec

    uses = entropy = False
    for c in configs:
        spec = get_loss_spec(c.loss.name)
        hparams = {**c.loss.params, **({"beta": c.loss.beta} if c.loss.beta is not None else {})}
        entropy |= spec.needs_dispersion
        uses |= spec.uses_reference(hparams) or spec.needs_dispersion
    return uses, entropy


def share_decision(sweep: Sweep) -> tuple[bool, bool, str]:
    """(share, with_entropy, why): whether the trials read one precomputed reference cache."""
    if not sweep.cfg.tune.share_reference:
        return False, False, "tune.share_reference is false: each trial keeps its train.reference setting"
    key = _varies_reference(sweep.dims)
    if key is not None:
        return False, False, f"the search space varies {key}, so trials do not share data and reference"
    configs, _ = representative_configs(sweep.cfg, sweep.dims)
    uses, entropy = reference_needs(configs or [sweep.cfg])
    if not uses:
        return False, False, "no loss in the sweep uses reference log-probs"
    return True, entropy, f"computed once into {reference_cache_dir(sweep)}, read by every trial"


def reference_cache_dir(sweep: Sweep) -> str:
    """``train.reference_cache`` when set, else ``<tune storage>/reference_cache``."""
    return _absolute(sweep.cfg.train.reference_cache) if sweep.cfg.train.reference_cache else \
        f"{sweep.storage.rstrip('/')}/reference_cache"


def prepare_shared_reference(sweep: Sweep) -> Optional[str]:
    """Score the sweep's data with the reference model once, into the reference cache the trials read
    (:func:`raypo.train.reference_cache.cached_reference_logprobs`; a resumed sweep finds it there); returns
    the cache directory, or None when trials do not share it (printed with the reason). Needs Ray."""
    from raypo.data.pipeline import build_datasets
    from raypo.train.reference_cache import cached_reference_logprobs
    from raypo.train.trainer import model_sources, resolve_model_paths

    share, with_entropy, why = share_decision(sweep)
    if not share:
        print(f"raypo: reference log-probs: {why}", flush=True)
        return None
    cfg = sweep.cfg
    cache_dir = reference_cache_dir(sweep)
    print(f"raypo: reference log-probs: preparing them once for all trials (cache {cache_dir})", flush=True)
    start = time.time()
    before = _cache_entries(cache_dir, cfg.data.s3)
    resolve_model_paths(cfg)  # fail fast, and fill the driver node's cache
    policy_path, ref_path = model_sources(cfg)
    train_ds, eval_ds, report = build_datasets(cfg.data, tokenizer_path=policy_path)
    print(report.format(), flush=True)
    for ds in (train_ds, eval_ds):
        if ds.count():
            cached_reference_logprobs(ds, cfg, ref_path, cache_dir, with_entropy=with_entropy)
    new = len(_cache_entries(cache_dir, cfg.data.s3) - before)
    how = f"computed {new} cache entries" if new else "found in the cache"
    print(f"raypo: reference log-probs: {how} in {time.time() - start:.1f} s", flush=True)
    return cache_dir


def _cache_entries(cache_dir: str, s3_cfg: Any) -> set[str]:
    """The complete entries (with a manifest) of a reference cache directory."""
    from raypo.data.io import fsspec_for

    fs = fsspec_for(cache_dir, s3_cfg)
    return set(fs.glob(f"{cache_dir.rstrip('/')}/*/manifest.json")) if fs.exists(cache_dir) else set()


# ----------------------------------------------------------------------------------------------------
# Trials
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrialSetup:
    """What every trial of a sweep needs (shipped to the trials with ``tune.with_parameters``)."""

    base: dict[str, Any]  # the base config as plain containers, search space emptied
    dims: list[SearchDim]
    train_runs: str  # storage of the trials' Train runs
    metric: str
    reference_cache: Optional[str]  # the shared reference cache, or None: trials keep train.reference


def trial_run_name(trial_id: str) -> str:
    """The Train run of a trial: named after the trial id, which ``Tuner.restore`` keeps, so a resumed
    trial finds its checkpoints."""
    return f"trial_{trial_id}"


def trial_config(setup: TrialSetup, point: Mapping[str, Any], trial_id: str) -> RaypoConfig:
    """Base config + the sampled overrides, its Train run named after the trial under the sweep's storage,
    no per-trial export, and ``train.reference=precomputed`` on the shared reference cache when there is
    one."""
    fixed: dict[str, Any] = {"checkpoint.run_name": trial_run_name(trial_id),
                             "checkpoint.storage_path": setup.train_runs, "checkpoint.export_path": None}
    if setup.reference_cache is not None:
        fixed["train.reference"] = "precomputed"
        fixed["train.reference_cache"] = setup.reference_cache
    raw = apply_overrides(apply_overrides(setup.base, trial_overrides(setup.dims, point)), fixed)
    return config_from_dict(raw, source=f"trial {trial_id}")


def metric_report_callback(metric: str):
    """A ``TuneReportCallback`` that forwards only the reports carrying ``metric`` (see "Scheduling")."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReportCallback(TuneReportCallback):
        def __init__(self, metric: str):
            super().__init__()
            self.metric = metric

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and self.metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReportCallback(metric)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: one training run with the trial's config (a Train driver inside the trial)."""
    from ray import tune

    from raypo.train.trainer import build_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup, config, trial_id)
    point = {d.key: config[d.key] for d in setup.dims if d.key in config}
    print(f"raypo: trial {trial_id}: {describe_point(point)}", flush=True)
    build_trainer(cfg, callbacks=[metric_report_callback(setup.metric)]).fit()


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


#: The trial actor only drives Ray Train (its controller and workers reserve their own resources).
TRIAL_RESOURCES = {"CPU": 0.01}


def make_trainable(setup: TrialSetup):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), TRIAL_RESOURCES)


def trial_history(trial) -> list[dict[str, Any]]:
    """Every result a Tune trial reported (its ``result.json`` in the sweep's storage), oldest first."""
    from ray.tune.result import EXPR_RESULT_FILE

    fs, path = trial.storage.storage_filesystem, f"{trial.path}/{EXPR_RESULT_FILE}"
    try:
        with fs.open_input_stream(path) as f:
            lines = f.read().decode().splitlines()
    except (OSError, FileNotFoundError):
        return [dict(trial.last_result)] if trial.last_result else []
    return [json.loads(line) for line in lines if line.strip()]


def _resumable_asha_class():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import AsyncHyperBandScheduler

    class ResumableASHA(AsyncHyperBandScheduler):
        """ASHA whose rungs survive ``Tuner.restore``: Tune keeps the trials but not the scheduler's
        records, so the (step, metric) history of each finished trial is replayed into the rungs when the
        restored sweep re-adds it; resumed trials are then compared with the finished ones again."""

        def on_trial_add(self, tune_controller, trial) -> None:
            super().on_trial_add(tune_controller, trial)
            if trial.status != Trial.TERMINATED:
                return
            bracket = self._trial_info[trial.trial_id]
            for result in trial_history(trial):
                if self._time_attr in result and self._metric in result:
                    bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])

    return ResumableASHA


def _scheduler(cfg: RaypoConfig):
    from ray.tune.schedulers import FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_t ends by itself (its function returns) instead of
    # being killed at its last report.
    return _resumable_asha_class()(time_attr="step", max_t=cfg.train.max_steps,
                                   grace_period=cfg.tune.grace_period,
                                   reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


def _search_algorithm(cfg: RaypoConfig):
    """None (Tune's random/grid variant generator), or an Optuna / HyperOpt searcher."""
    name = cfg.tune.search_alg
    if name in ("random", "grid"):
        return None
    try:
        if name == "optuna":
            import optuna  # noqa: F401  (OptunaSearch imports it lazily; fail here with the fix)
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(seed=cfg.train.seed)
        import hyperopt  # noqa: F401
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=cfg.train.seed)
    except ImportError as exc:
        raise ConfigError([f"tune.search_alg={name} needs the {name} package on the driver: pip install "
                           f"{name} (or pip install 'raypo[tune]', or use tune.search_alg=random)"]) from exc


def param_space(dims: list[SearchDim]) -> dict[str, Any]:
    return {d.key: d.domain() for d in dims}


def build_tuner(sweep: Sweep, setup: TrialSetup, max_concurrent: int):
    from ray import tune

    path, fs = sweep.tune_location()
    storage_path = path.rsplit("/", 1)[0]
    cfg = sweep.cfg
    tune_config = tune.TuneConfig(
        metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=_scheduler(cfg),
        search_alg=_search_algorithm(cfg), num_samples=cfg.tune.num_samples,
        max_concurrent_trials=max_concurrent, trial_dirname_creator=_trial_dirname)
    run_config = tune.RunConfig(name=sweep.name, storage_path=storage_path, storage_filesystem=fs,
                                failure_config=tune.FailureConfig(max_failures=0), verbose=1)
    return tune.Tuner(make_trainable(setup), param_space=param_space(sweep.dims), tune_config=tune_config,
                      run_config=run_config)


def _comparable(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config without the settings that may change between a sweep and its resume."""
    out = {k: v for k, v in raw.items() if k != "ray"}
    out["tune"] = {k: v for k, v in dict(raw.get("tune", {})).items() if k != "max_concurrent_trials"}
    return out


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def check_resume_config(sweep: Sweep, stored_yaml: str) -> None:
    """Refuse to resume a sweep with a config other than the one it started with."""
    from omegaconf import OmegaConf

    stored = OmegaConf.to_container(OmegaConf.create(stored_yaml), resolve=False)
    diffs = _differences(_comparable(stored), _comparable(to_dict(sweep.cfg)))
    if diffs:
        shown = diffs[:10] + ([f"... and {len(diffs) - 10} more"] if len(diffs) > 10 else [])
        raise ConfigError([f"--resume: the sweep {sweep.name!r} at {sweep.uri} was started with another "
                           "config (" + "; ".join(shown) + "); resume with the same config and overrides, or "
                           "start a new sweep with checkpoint.run_name=<new name>"])


def run_sweep(sweep: Sweep, *, resume: bool = False):
    """Start (or with ``resume`` restore) the sweep and wait for it; returns Tune's ResultGrid."""
    import ray
    from ray import tune

    cfg = sweep.cfg
    path, fs = sweep.tune_location()
    exists = tune.Tuner.can_restore(path, storage_filesystem=fs)
    if exists and not resume:
        raise ConfigError([f"a sweep named {sweep.name!r} already exists at {sweep.uri}: resume it with "
                           "`raypo tune CONFIG --resume`, or start a new one with "
                           "checkpoint.run_name=<new name>"])
    if exists:
        stored = _read_text(sweep.config_uri, cfg.data.s3)
        if stored is not None:
            check_resume_config(sweep, stored)
    elif resume:
        print(f"raypo: nothing to resume at {sweep.uri}; starting the sweep", flush=True)
    setup = TrialSetup(base=_base_for_trials(cfg), dims=sweep.dims, train_runs=sweep.train_runs,
                       metric=cfg.tune.metric, reference_cache=prepare_shared_reference(sweep))
    if exists:
        print(f"raypo: resuming the sweep at {sweep.uri} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(path, make_trainable(setup), resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        max_concurrent = derive_max_concurrent_trials(cfg, ray.cluster_resources())
        resource, per_trial = resources_per_trial(cfg)
        print(f"raypo: sweep {sweep.name}: {num_trials(cfg, sweep.dims)} trials, at most {max_concurrent} at "
              f"a time ({per_trial:g} {resource} each), results in {sweep.uri}", flush=True)
        _write_text(sweep.config_uri, to_yaml(cfg), cfg.data.s3)
        tuner = build_tuner(sweep, setup, max_concurrent)
    return tuner.fit()


# ----------------------------------------------------------------------------------------------------
# Results: table, best config, plots
# ----------------------------------------------------------------------------------------------------

STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERROR = "completed", "stopped early", "error"


def _cell(value: Any) -> Any:
    """A table cell: scalars as they are, lists and bundles as compact JSON."""
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return value


def _best_of(values: list[float], mode: str) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return float("nan")
    return max(finite) if mode == "max" else min(finite)


def trial_row(sweep: Sweep, trial_id: str, point: Mapping[str, Any], last: Mapping[str, Any],
              history: list[Mapping[str, Any]], error: Optional[str]) -> dict[str, Any]:
    """One results-table row: trial, status, sampled values (lambda_k columns for a lambda grid), the
    metric's last and best values, the other eval metrics and train/loss of the last report."""
    cfg = sweep.cfg
    metric, mode = cfg.tune.metric, cfg.tune.mode
    step = last.get("step")
    if error:
        status = STATUS_ERROR
    elif step is not None and int(step) >= sweep.max_steps(point):
        status = STATUS_COMPLETED
    else:
        status = STATUS_STOPPED
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, "step": step}
    for d in sweep.dims:
        row[d.key] = _cell(point.get(d.key))
        if d.key == "lambdas.weights" and isinstance(point.get(d.key), (list, tuple)):
            row.update({f"lambda_{k}": float(w) for k, w in enumerate(point[d.key])})
    row[metric] = last.get(metric, float("nan"))
    row[f"best {metric}"] = _best_of([h.get(metric) for h in history], mode)
    for key in sorted(last):
        if (key.startswith("eval/") or key == "train/loss") and key != metric:
            row[key] = last[key]
    row["train_run"] = f"{sweep.train_runs}/{trial_run_name(trial_id)}"
    row["error"] = (error or "").splitlines()[0][:200] if error else ""
    return row


def results_table(sweep: Sweep, grid):
    """A pandas DataFrame with one row per trial of a Tune ResultGrid, best first."""
    import pandas as pd

    rows = []
    for result in grid:
        last = dict(result.metrics or {})
        trial_id = str(last.get("trial_id") or Path(str(result.path)).name.removeprefix("trial_"))
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        point = {d.key: result.config.get(d.key) for d in sweep.dims}
        error = str(result.error) if result.error else None
        rows.append(trial_row(sweep, trial_id, point, last, history, error))
    return sort_table(pd.DataFrame(rows), sweep.cfg.tune.metric, sweep.cfg.tune.mode)


def sort_table(df, metric: str, mode: str):
    if df.empty or metric not in df:
        return df
    return df.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable") \
        .reset_index(drop=True)


def best_row(df, metric: str, mode: str) -> Optional[Mapping[str, Any]]:
    """The best trial by its last ``metric``: among completed trials when any has the metric (a trial
    that ASHA stopped early was scored at an earlier step), else among all."""
    if df.empty or metric not in df:
        return None
    scored = df[df[metric].notna()]
    done = scored[scored["status"] == STATUS_COMPLETED]
    pool = done if not done.empty else scored
    if pool.empty:
        return None
    idx = pool[metric].idxmax() if mode == "max" else pool[metric].idxmin()
    return pool.loc[idx].to_dict()


def _decode_cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def best_config(sweep: Sweep, row: Mapping[str, Any]) -> RaypoConfig:
    """The base config with the best trial's values: a plain training config (no search space) whose run
    is named ``<sweep>-best``, ready for ``raypo train``."""
    point = {d.key: _decode_cell(row[d.key]) for d in sweep.dims if d.key in row}
    raw = apply_overrides(_base_for_trials(sweep.cfg), trial_overrides(sweep.dims, point))
    raw["checkpoint"] = {**raw["checkpoint"], "run_name": f"{sweep.name}-best"}
    return config_from_dict(raw, source="best trial")


def best_config_yaml(sweep: Sweep, row: Mapping[str, Any]) -> str:
    cfg = sweep.cfg
    point = {d.key: _decode_cell(row[d.key]) for d in sweep.dims if d.key in row}
    header = [f"# Best trial {row['trial_id']} of sweep {sweep.name} ({sweep.uri}):",
              f"#   {cfg.tune.metric} = {row[cfg.tune.metric]:.6g} ({cfg.tune.mode}) at step {row['step']}",
              f"#   {describe_point(point)}",
              "# Train with it:  raypo train best_config.yaml"]
    return "\n".join(header) + "\n" + to_yaml(best_config(sweep, row))


def format_table(df, sweep: Sweep) -> str:
    """The printed table: trial, status, step, the searched keys and the metrics that matter most."""
    metric = sweep.cfg.tune.metric
    cols = ["trial_id", "status", "step", *[d.key for d in sweep.dims], metric, f"best {metric}"]
    cols += [c for c in ("eval/pairwise_accuracy", "eval/loss", "train/loss") if c in df and c not in cols]
    shown = df[[c for c in cols if c in df]]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return shown.to_string(index=False, formatters={c: fmt for c in shown.columns})


def _numeric(values: list[Any]) -> bool:
    return bool(values) and all(_is_number(v) for v in values)


def _categorical_key(df, dims: list[SearchDim]) -> Optional[str]:
    """A searched key with few string values (e.g. loss.name), to colour the points by."""
    for d in dims:
        if d.key in df and d.sampler in ("choice", "grid_search") and not _numeric(list(df[d.key])):
            if df[d.key].nunique() <= 8:
                return d.key
    return None


def plot_results(df, sweep: Sweep) -> dict[str, bytes]:
    """PNG plots of the metric against each numeric searched key (beta, alpha, lr, concentration, ...),
    against each lambda axis (``metric_vs_lambda.png``), and per option of a categorical key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep.cfg.tune.metric
    if df.empty or metric not in df or df[metric].notna().sum() == 0:
        return {}
    group = _categorical_key(df, sweep.dims)
    groups = sorted(df[group].astype(str).unique()) if group else [None]
    markers = {STATUS_COMPLETED: "o", STATUS_STOPPED: "x", STATUS_ERROR: "s"}
    plots: dict[str, bytes] = {}

    def scatter(ax, xcol: str, log: bool) -> None:
        for gi, g in enumerate(groups):
            sub = df if g is None else df[df[group].astype(str) == g]
            for status, marker in markers.items():
                part = sub[(sub["status"] == status) & sub[metric].notna()]
                if part.empty:
                    continue
                label = " ".join(x for x in (g, status) if x)
                ax.scatter(part[xcol].astype(float), part[metric].astype(float), marker=marker,
                           color=f"C{gi}", label=label, s=36)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xcol)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)

    for d in sweep.dims:
        if d.key not in df or d.key == "lambdas.weights" or not _numeric(list(df[d.key].dropna())):
            continue
        values = df[d.key].astype(float)
        log = d.is_log or (values.min() > 0 and values.max() / values.min() > 20)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        scatter(ax, d.key, log)
        ax.set_title(f"{sweep.name}: {metric} vs {d.key}")
        ax.legend(fontsize=7)
        plots[f"metric_vs_{d.key}.png"] = _png(fig)
    lam_cols = sorted((c for c in df.columns if c.startswith("lambda_")), key=lambda c: int(c.split("_")[1]))
    if lam_cols:
        names = _dimension_names(sweep.cfg)
        names = names if len(names) == len(lam_cols) else []
        fig, axes = plt.subplots(1, len(lam_cols), figsize=(3.2 * len(lam_cols), 3.4), sharey=True,
                                 squeeze=False)
        for k, (ax, col) in enumerate(zip(axes[0], lam_cols)):
            scatter(ax, col, False)
            ax.set_xlim(-0.05, 1.05)
            ax.set_title(f"{col} ({names[k]})" if names else col, fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{sweep.name}: {metric} vs lambda")
        plots["metric_vs_lambda.png"] = _png(fig)
    if group:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for gi, g in enumerate(groups):
            ys = df[(df[group].astype(str) == g) & df[metric].notna()][metric].astype(float)
            ax.scatter([gi] * len(ys), ys, color=f"C{gi}", s=36)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_xlabel(group)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.set_title(f"{sweep.name}: {metric} by {group}")
        plots[f"metric_vs_{group}.png"] = _png(fig)
    return plots


def _dimension_names(cfg: RaypoConfig) -> list[str]:
    """``data.dimensions``, else the synthetic data's, else none (lambda axes are then only numbered)."""
    if cfg.data.dimensions:
        return list(cfg.data.dimensions)
    from raypo.data.synthetic import DIMENSIONS, is_synthetic_uri

    return list(DIMENSIONS) if is_synthetic_uri(cfg.data.train_path) else []


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@dataclass
class SweepOutputs:
    table: str  # results.csv
    best_config: Optional[str]  # best_config.yaml
    plots: list[str]


def write_results(df, sweep: Sweep) -> SweepOutputs:
    """results.csv, best_config.yaml and the plots under ``<sweep>/results`` (local or s3://)."""
    s3 = sweep.cfg.data.s3
    root = sweep.results_uri
    _write_text(f"{root}/results.csv", df.to_csv(index=False), s3)
    best = best_row(df, sweep.cfg.tune.metric, sweep.cfg.tune.mode)
    best_path = None
    if best is not None:
        best_path = f"{root}/best_config.yaml"
        _write_text(best_path, best_config_yaml(sweep, best), s3)
    plots = []
    for name, png in plot_results(df, sweep).items():
        _write_bytes(f"{root}/{name}", png, s3)
        plots.append(f"{root}/{name}")
    return SweepOutputs(table=f"{root}/results.csv", best_config=best_path, plots=plots)


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------


def describe_sweep(sweep: Sweep) -> str:
    cfg = sweep.cfg
    tu = cfg.tune
    share, _, why = share_decision(sweep)
    lines = [f"sweep {sweep.name} at {sweep.uri}",
             f"  trials: {num_trials(cfg, sweep.dims)} (num_samples={tu.num_samples}), metric {tu.metric} "
             f"({tu.mode}), search {tu.search_alg}"]
    for d in sweep.dims:
        lines.append(f"  {d.key}: {d.describe()}")
    if tu.scheduler == "asha":
        lines.append(f"  scheduler: ASHA on the optimizer step (grace_period={tu.grace_period}, "
                     f"reduction_factor={tu.reduction_factor}, max_t={cfg.train.max_steps})")
    else:
        lines.append("  scheduler: FIFO (every trial runs to the end)")
    concurrent = tu.max_concurrent_trials or "derived from the cluster"
    resource, per_trial = resources_per_trial(cfg)
    lines.append(f"  max concurrent trials: {concurrent} ({per_trial:g} {resource} per trial)")
    lines.append(f"  reference log-probs: {'shared: ' if share else ''}{why}")
    return "\n".join(lines)


def report_results(sweep: Sweep, grid) -> int:
    """Print and write the results; 0 when at least one trial reported the metric."""
    df = results_table(sweep, grid)
    out = write_results(df, sweep)
    metric = sweep.cfg.tune.metric
    print(f"\nsweep {sweep.name}: {len(df)} trials", flush=True)
    if not df.empty:
        print(format_table(df, sweep))
        for _, row in df[df["status"] == STATUS_ERROR].iterrows():
            print(f"trial {row['trial_id']} failed: {row['error']}")
    print(f"\nresults table:  {out.table}")
    print(f"best config:    {out.best_config or '(no trial reported ' + metric + ')'}")
    for p in out.plots:
        print(f"plot:           {p}")
    return 0 if out.best_config else 1


def tune_command(args: argparse.Namespace) -> int:
    """``raypo tune CONFIG [key=value ...] [--resume] [--dry-run]``."""
    cfg = load_config(args.config, args.overrides)
    sweep = plan_sweep(cfg, args.config)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        print(describe_sweep(sweep))
        return 0
    from raypo.train.trainer import init_ray

    _search_algorithm(cfg)  # a missing optuna / hyperopt is reported before the cluster starts
    init_ray(cfg)
    grid = run_sweep(sweep, resume=getattr(args, "resume", False))
    return report_results(sweep, grid)
