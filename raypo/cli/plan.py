"""``raypo plan CONFIG|JOB [key=value ...]``: the per-GPU memory estimate of a config, or of a job spec's
config (:mod:`raypo.launch.plan`, printed by :mod:`raypo.launch.plan_format`)."""

from __future__ import annotations

import argparse

from raypo.cli.main import command_flags
from raypo.config import RaypoConfig, load_config
from raypo.launch.jobspec import is_job_spec, job_config, load_job
from raypo.launch.plan import make_plan
from raypo.launch.plan_format import format_plan


def load_plan_target(path: str, overrides: list[str]) -> RaypoConfig:
    """The raypo config of ``path``: a raypo config, or a job spec (jobs/*.yaml), whose config is used."""
    if is_job_spec(path):
        job = load_job(path, extra_overrides=overrides, entry_flags=command_flags())
        return job_config(job)
    return load_config(path, overrides)


def plan_command(args: argparse.Namespace) -> int:
    """``raypo plan CONFIG|JOB [key=value ...]``: exit 0 if it fits (or no cluster is named), 1 if not."""
    cfg = load_plan_target(args.config, args.overrides)
    plan = make_plan(cfg)
    print(format_plan(plan, title=args.config))
    return 1 if plan.fits is False else 0
