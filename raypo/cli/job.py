"""The cluster side of ``raypo submit``: the entrypoint of a submitted job.

::

    python -m raypo.cli.job run train|tune [ARGS]   a job with an inline config: the config travels as JSON in
                                                    RAYPO_JOB_CONFIG; it is written to a YAML file and
                                                    ``raypo train|tune FILE [ARGS]`` runs on it
    python -m raypo.cli.job run-job JOB.yaml        a job spec whose files are on this machine (a KubeRay
                                                    RayJob's entrypoint, cluster/kuberay/rayjob.yaml)
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional

from raypo.cli.main import command_flags
from raypo.cli.main import main as raypo_main
from raypo.config import config_from_dict, to_yaml
from raypo.errors import ConfigError
from raypo.launch.jobspec import ENTRYPOINTS, RUN_CONFIG_ENV, job_config, load_job


def run_inline(entrypoint: str, args: list[str], environ: Optional[dict[str, str]] = None) -> int:
    """Write the config carried in ``RAYPO_JOB_CONFIG`` to a YAML file and run ``raypo ENTRYPOINT`` on it."""
    environ = os.environ if environ is None else environ
    text = environ.get(RUN_CONFIG_ENV)
    if not text:
        raise ConfigError([f"{RUN_CONFIG_ENV} is not set: `python -m raypo.cli.job run` runs jobs submitted "
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
    job = load_job(path, entry_flags=command_flags())
    cfg = job_config(job)
    with tempfile.TemporaryDirectory(prefix="raypo-job-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(to_yaml(cfg))
        argv = [job.spec.entrypoint, str(config), *job.spec.args]
        print(f"raypo: job {job.spec.name}: running raypo {shlex.join(argv)}", flush=True)
        return raypo_main(argv)


_USAGE = """\
usage: python -m raypo.cli.job run {train,tune} [ARGS...]   the job side of `raypo submit` (inline config)
       python -m raypo.cli.job run-job JOB.yaml             run a job spec here (a RayJob's entrypoint)"""


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

