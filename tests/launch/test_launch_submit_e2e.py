"""End to end: a real ``ray start --head`` on loopback, jobs submitted with ``raypo submit`` and with the
plain ``ray job submit`` command that ``raypo submit --print-ray-cli`` prints.

The --dry-run variants run ``raypo train CONFIG --dry-run`` (which loads and validates the config on the
cluster): they prove the submission path (runtime_env, working_dir upload, inline-config transport,
forwarded variables, the entrypoint on the driver's PATH) to SUCCEEDED without the trainer. The full
variant submits with ``raypo submit`` a tiny training (2 steps, ZeRO-3 on 2 CPU workers) and reads the
checkpoint back from where the spec says with Ray Train's ``Result.from_path``. The printed command gets
the dry run only: past the submission it runs the same ``raypo train`` as the full variant, and a second
full training (about a minute here) would test nothing more.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from launch_helpers import REPO, RayHead

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(300)]

TINY_TRAINING = ["train.max_steps=2", "train.eval_every=0", "train.eval_batches=1",
                 "train.micro_batch_size=2", "checkpoint.every_steps=0", "checkpoint.export_path=null",
                 "data.train_path=synthetic://default?num_prompts=64&seed=0", "logging.tensorboard=false"]
def _inline_job(tmp: Path, name: str, storage: Path, dry_run: bool) -> Path:
    """A job spec with an inline config (the quickstart, composed from the repo's configs/)."""
    overrides = [] if dry_run else TINY_TRAINING
    spec = {
        "name": name,
        "entrypoint": "train",
        "args": ["--dry-run"] if dry_run else [],
        "config": {
            "defaults": [str(REPO / "configs" / "quickstart.yaml")],
            # run_name null: it defaults to the job's name
            "checkpoint": {"storage_path": str(storage), "run_name": None, "export_path": None},
        },
        "overrides": overrides,
        "runtime_env": {"working_dir": ".", "env_vars": {"RAYPO_E2E": "1"},
                        "forward_env": ["RAYPO_E2E_FORWARDED"]},
        "submission_id": "unique",
        "metadata": {"test": "e2e"},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(spec, indent=2))  # JSON is YAML
    return path


def _path_job(tmp: Path, name: str, storage: Path, dry_run: bool) -> Path:
    """A job spec naming a config file inside its working_dir (a copy of the repo's configs/)."""
    shutil.copytree(REPO / "configs", tmp / "configs", dirs_exist_ok=True)
    overrides = [f"checkpoint.storage_path={storage}", "checkpoint.run_name=null",
                 "checkpoint.export_path=null"]
    if not dry_run:
        overrides += TINY_TRAINING
    path = tmp / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        entrypoint: train
        args: {["--dry-run"] if dry_run else []}
        config: configs/quickstart.yaml
        overrides: {json.dumps(overrides)}
        runtime_env:
          working_dir: .
        submission_id: fixed
        """))
    return path


def _submit_with_raypo(head: RayHead, job: Path) -> str:
    env_before = dict(head.env)
    head.env["RAYPO_E2E_FORWARDED"] = "forwarded-value"
    try:
        out = head.run(["raypo", "submit", str(job), "--address", head.address, "--follow"], cwd=job.parent)
    finally:
        head.env.clear()
        head.env.update(env_before)
    assert out.returncode == 0, out.stdout
    assert "is SUCCEEDED" in out.stdout, out.stdout
    return out.stdout


def _submit_printed_command(head: RayHead, job: Path) -> str:
    printed = head.run(["raypo", "submit", "--print-ray-cli", str(job), "--address", head.address],
                       cwd=job.parent)
    assert printed.returncode == 0, printed.stdout
    command = printed.stdout.strip()
    assert command.startswith("ray job submit") and "raypo" not in command.split(" -- ")[0].split()[0]
    out = head.run(["bash", "-c", command], cwd=job.parent)
    assert out.returncode == 0, f"{command}\n{out.stdout}"
    assert "succeeded" in out.stdout.lower(), out.stdout
    return out.stdout


def _job_info(head: RayHead, job_id: str) -> dict:
    """Job info read back through the Jobs SDK (in a subprocess that carries the head's auth token)."""
    code = ("import json, sys; from ray.job_submission import JobSubmissionClient as C; "
            f"i = C({head.address!r}).get_job_info(sys.argv[1]); "
            "print(json.dumps({'status': str(i.status.value), 'runtime_env': i.runtime_env, "
            "'metadata': i.metadata, 'entrypoint': i.entrypoint}))")
    out = head.run(["python", "-c", code, job_id], cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stdout
    return json.loads(out.stdout.strip().splitlines()[-1])


def _job_id(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("raypo: submitted job "))
    return line.split()[3]


def test_raypo_submit_inline_job_spec_dry_run(ray_head: RayHead, tmp_path: Path):
    storage = tmp_path / "runs"
    job = _inline_job(tmp_path, "e2e-inline", storage, dry_run=True)
    stdout = _submit_with_raypo(ray_head, job)
    # The job's log: the config was rebuilt on the cluster from RAYPO_JOB_CONFIG and validated there.
    assert "running: raypo train" in stdout
    assert f"storage_path: {storage}" in stdout and "run_name: e2e-inline" in stdout
    info = _job_info(ray_head, _job_id(stdout))
    assert info["status"] == "SUCCEEDED"
    assert info["entrypoint"] == "python -m raypo.cli.job run train --dry-run"
    env_vars = info["runtime_env"]["env_vars"]
    assert env_vars["RAYPO_E2E"] == "1" and env_vars["RAYPO_E2E_FORWARDED"] == "forwarded-value"
    assert info["metadata"]["raypo_job"] == "e2e-inline" and info["metadata"]["test"] == "e2e"
    assert info["metadata"]["raypo_checkpoint"] == f"{storage}/e2e-inline"


def test_printed_ray_job_submit_command_dry_run(ray_head: RayHead, tmp_path: Path):
    storage = tmp_path / "runs"
    job = _path_job(tmp_path, "e2e-path", storage, dry_run=True)
    stdout = _submit_printed_command(ray_head, job)
    # `ray job submit` tails the job's log: `raypo train` ran in the uploaded working_dir, found its config.
    assert f"storage_path: {storage}" in stdout and "run_name: e2e-path" in stdout
    info = _job_info(ray_head, "e2e-path")  # submission_id: fixed -> the job's name
    assert info["status"] == "SUCCEEDED"
    assert info["entrypoint"].startswith("raypo train configs/quickstart.yaml")
    # A second submission of a `fixed` id is refused by raypo before anything is sent.
    again = ray_head.run(["raypo", "submit", str(job), "--address", ray_head.address, "--no-wait"],
                         cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stdout, again.stdout


def _latest_checkpoint(storage: Path, run_name: str) -> Path:
    """The run's latest checkpoint, read back with Ray Train's own API from ``storage/run_name``."""
    from ray.train import Result

    checkpoint = Result.from_path(str(storage / run_name)).checkpoint
    assert checkpoint is not None, list(storage.rglob("*"))
    path = Path(checkpoint.path)
    assert path.parent == storage / run_name and any(path.iterdir()), path
    return path


def test_raypo_submit_trains_and_checkpoints_where_the_spec_says(ray_head: RayHead, tmp_path: Path):
    storage = tmp_path / "runs"
    job = _inline_job(tmp_path, "e2e-train-inline", storage, dry_run=False)
    _submit_with_raypo(ray_head, job)
    _latest_checkpoint(storage, "e2e-train-inline")

