"""``raypo submit JOB [--address URL] [--no-wait] [--follow] [--print-ray-cli] [--skip-plan]``: validate a job
spec (:mod:`raypo.launch.jobspec`) and its raypo config here, check that it fits the cluster in
``config.plan``, then submit it with Ray's ``JobSubmissionClient`` (:mod:`raypo.launch.submit`) or print the
equivalent ``ray job submit`` command."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from raypo.cli.main import command_flags
from raypo.launch.jobspec import JobSpecError, job_config, load_job
from raypo.launch.submit import (
    Submission,
    SubmitError,
    build_submission,
    connect,
    plan_problems,
    render_ray_cli,
    resolve_address,
    runtime_env_for_ray,
    submit,
    wait_for_job,
)


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
    job = load_job(args.job, entry_flags=command_flags())
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
