"""``raypo tune CONFIG [key=value ...] [--resume] [--dry-run]``: a Ray Tune sweep (:mod:`raypo.tune.sweep`).

Everything that can be checked without Ray is checked first, so a bad sweep exits with status 2 before any
cluster starts: the config and the search space with every representative trial config, in one list
(:func:`raypo.tune.space.load_sweep_config`, then :func:`raypo.tune.sweep.plan_sweep`, which runs
:func:`raypo.tune.space.search_space_problems`), and the search algorithm's package.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from raypo.config import to_yaml
from raypo.tune.space import load_sweep_config
from raypo.tune.sweep import Sweep, build_search_algorithm, describe_sweep, plan_sweep, run_sweep


def load_sweep(path: Optional[str | os.PathLike], overrides: Optional[list[str]] = None) -> Sweep:
    """The sweep ``raypo tune PATH [overrides]`` runs: the config loaded, its search space checked, planned.
    Raises :class:`raypo.errors.ConfigError` listing every problem."""
    cfg = load_sweep_config(path, overrides)
    return plan_sweep(cfg, None if path is None else str(path))


def tune_command(args: argparse.Namespace) -> int:
    """``raypo tune CONFIG [key=value ...] [--resume] [--dry-run]``."""
    sweep = load_sweep(args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(sweep.cfg), end="")
        print(describe_sweep(sweep))
        return 0
    from raypo.train.trainer import init_ray
    from raypo.tune.results import report_results

    build_search_algorithm(sweep.cfg)  # a missing optuna / hyperopt is reported before the cluster starts
    init_ray(sweep.cfg)
    grid = run_sweep(sweep, resume=getattr(args, "resume", False))
    return report_results(sweep, grid)
