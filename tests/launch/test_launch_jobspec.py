"""Job specs: the shipped jobs/*.yaml, refusal of bad specs before anything is sent, the submission that
is built, and the printed ``ray job submit`` command (parsed by Ray's own CLI, compared with the SDK call)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from launch_helpers import REPO

from raypo.cli import main
from raypo.cli.job import run_inline, run_job_here
from raypo.config import ConfigError, config_from_dict, load_config, to_dict
from raypo.launch.jobspec import RUN_CONFIG_ENV, is_job_spec, job_config, load_job
from raypo.launch.submit import build_submission, render_ray_cli, runtime_env_for_ray

JOBS = sorted((REPO / "jobs").glob("*.yaml"))
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens here: a test that reaches the network would fail


def test_the_issue_s_jobs_are_shipped():
    names = {p.name for p in JOBS}
    assert {"mpo_llama8b.yaml", "lambda_dpo_llama8b.yaml", "lipo_qwen32b.yaml",
            "sweep_beta_llama8b.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_shipped_job_specs_validate_and_fit(path: Path):
    job = load_job(path)
    cfg = job_config(job)
    assert cfg.checkpoint.run_name
    sub = build_submission(job, cfg)
    assert sub.entrypoint[:2] in (["raypo", job.spec.entrypoint], ["python", "-m"])
    if cfg.scaling.use_gpu:  # cluster jobs: they name their cluster and fit it, and their storage is shared
        from raypo.launch.plan import make_plan

        plan = make_plan(cfg)
        assert plan.fits, path
        assert cfg.checkpoint.storage_path.startswith("s3://")
        assert "GPU" in cfg.scaling.resources_per_worker
        text = path.read_text()  # each names its GPUs and memory with the arithmetic, in comments
        assert "GPUs:" in text and "model states" in text and "18 B x P / W" in text


@pytest.mark.parametrize("path", [p for p in JOBS if "qwen32b" in p.name or "llama8b" in p.name],
                         ids=lambda p: p.name)
def test_memory_comments_match_raypo_plan(path: Path):
    """The per-GPU totals written in each job's comments are what `raypo plan` computes."""
    from raypo.launch.plan import make_plan

    plan = make_plan(job_config(load_job(path)))
    written = re.search(r"total\s+~ ([0-9.]+) GiB", path.read_text())
    assert written, path
    assert float(written.group(1)) == pytest.approx(plan.total_gib, abs=0.06)


def test_qwen32b_needs_two_nodes_or_offload():
    from raypo.launch.plan import make_plan

    job = load_job(REPO / "jobs" / "lipo_qwen32b.yaml")
    assert make_plan(job_config(job)).inputs.num_nodes >= 2
    one_node = load_job(REPO / "jobs" / "lipo_qwen32b.yaml", extra_overrides=["scaling.num_workers=8"])
    assert make_plan(job_config(one_node)).fits is False
    offload = load_job(REPO / "jobs" / "lipo_qwen32b.yaml",
                       extra_overrides=["scaling.num_workers=8", "deepspeed.offload_optimizer=true"])
    assert make_plan(job_config(offload)).fits is True


@pytest.mark.parametrize("path", [p for p in JOBS if not p.name.startswith("quickstart")],
                         ids=lambda p: p.name)
def test_inline_config_travels_exactly(path: Path):
    """The JSON in RAYPO_JOB_CONFIG rebuilds the very config that was validated here."""
    job = load_job(path)
    cfg = job_config(job)
    sub = build_submission(job, cfg)
    carried = json.loads(sub.runtime_env["env_vars"][RUN_CONFIG_ENV])
    assert to_dict(config_from_dict(carried)) == to_dict(cfg)
    assert sub.entrypoint[:4] == ["python", "-m", "raypo.cli.job", "run"]


def _shell_argv(command: str, env: dict[str, str]) -> list[str]:
    """The argv bash would pass to `ray` for ``command`` (quotes and $VARS resolved)."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {command.split(' ', 1)[1]}"], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_printed_ray_cli_is_the_same_submission(path: Path, monkeypatch):
    """Parse the printed command with Ray's own `ray job submit` CLI and compare with the SDK call."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.dashboard.modules.job.cli import submit as ray_submit

    monkeypatch.chdir(REPO)
    job = load_job(path)
    sub = build_submission(job, job_config(job))
    environ = {"PATH": "/usr/bin:/bin", **{name: f"value-of-{name}" for name in sub.forward_env}}
    command = render_ray_cli(sub, address="http://10.0.0.1:8265")
    assert "value-of-" not in command  # secrets are shell expansions, never literal
    argv = _shell_argv(command, environ)
    assert argv[:2] == ["job", "submit"]
    params = ray_submit.make_context("submit", argv[2:]).params
    runtime_env = parse_runtime_env_args(runtime_env=params["runtime_env"],
                                         runtime_env_json=params["runtime_env_json"],
                                         working_dir=params["working_dir"])
    expected = runtime_env_for_ray(sub, environ)
    runtime_env["working_dir"] = str((REPO / runtime_env["working_dir"]).resolve())
    assert runtime_env == expected
    assert shlex.join(params["entrypoint"]) == sub.entrypoint_str
    assert params["submission_id"] == sub.submission_id
    assert json.loads(params["metadata_json"]) == sub.metadata
    assert params["address"] == "http://10.0.0.1:8265"


def test_submission_id_policies(tmp_path):
    base = {"name": "demo", "config": {"loss": {"name": "dpo"}},
            "runtime_env": {}, "overrides": ["checkpoint.storage_path=/tmp/x"]}
    ids = {}
    for policy in ("unique", "fixed", "ray"):
        spec = tmp_path / f"{policy}.yaml"
        spec.write_text(json.dumps({**base, "submission_id": policy}))
        job = load_job(spec)
        ids[policy] = build_submission(job, job_config(job)).submission_id
    assert re.fullmatch(r"demo-\d{8}-\d{6}-[0-9a-f]{4}", ids["unique"])
    assert ids["fixed"] == "demo" and ids["ray"] is None


def test_run_name_defaults_to_the_job_name_and_an_explicit_one_wins(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"name": "demo", "config": {"checkpoint": {"storage_path": "/tmp/r"}}}))
    assert job_config(load_job(spec)).checkpoint.run_name == "demo"
    spec.write_text(json.dumps({"name": "demo", "config": {"checkpoint": {"storage_path": "/tmp/r",
                                                                          "run_name": "mine"}}}))
    assert job_config(load_job(spec)).checkpoint.run_name == "mine"


def test_path_config_entrypoint_is_plain_raypo_train(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("loss:\n  name: dpo\n")
    spec = tmp_path / "job.yaml"
    spec.write_text("name: demo\nconfig: configs/run.yaml\n"
                    "overrides: [loss.beta=0.2, checkpoint.storage_path=/r]\n"
                    "args: [--dry-run]\nruntime_env: {working_dir: .}\n")
    job = load_job(spec)
    sub = build_submission(job, job_config(job))
    assert sub.entrypoint == ["raypo", "train", "configs/run.yaml", "loss.beta=0.2",
                              "checkpoint.storage_path=/r", "checkpoint.run_name=demo", "--dry-run"]
    assert sub.runtime_env == {"working_dir": str(tmp_path)}
    assert sub.checkpoint_dir == "/r/demo"


def test_is_job_spec_tells_job_specs_from_configs():
    assert is_job_spec(REPO / "jobs" / "mpo_llama8b.yaml")
    assert not is_job_spec(REPO / "configs" / "quickstart.yaml")


# ----------------------------------------------------------------------------------------------------
# Bad specs are refused before anything is sent (exit 2, a message naming key, value and fix)
# ----------------------------------------------------------------------------------------------------

GOOD = {"name": "demo", "entrypoint": "train", "config": {"loss": {"name": "dpo"},
                                                           "checkpoint": {"storage_path": "/tmp/runs"}}}


def _with(**changes):
    spec = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return spec


_DELETE = object()

BAD_SPECS = {
    "unknown top-level key": (_with(entrypont="train"),
                              ["unknown key 'entrypont'", "did you mean 'entrypoint'"]),
    "unknown nested key": (_with(runtime_env={"workdir": "."}),
                           ["unknown key 'runtime_env.workdir'", "did you mean 'working_dir'"]),
    "missing config": (_with(config=_DELETE), ["config is required"]),
    "missing name": (_with(name=_DELETE), ["name is required"]),
    "bad name": (_with(name="My Job"), ["name='My Job'", "a-z"]),
    "config fails validation: unknown key": (_with(config__loss={"name": "dpo", "bta": 0.1}),
                                             ["config: unknown key 'loss.bta'", "did you mean 'beta'"]),
    "config fails validation: value": (_with(config__loss={"name": "dpo", "beta": -1}),
                                       ["config: loss.beta=-1.0 must be > 0"]),
    "config fails validation: loss name": (_with(config__loss={"name": "mpoo"}),
                                           ["config: loss.name='mpoo'", "did you mean 'mpo'"]),
    "config path missing": (_with(config="configs/nope.yaml", runtime_env={"working_dir": "."}),
                            ["config='configs/nope.yaml' resolves to", "does not exist"]),
    "config path without working_dir": (_with(config="configs/x.yaml"),
                                        ["runtime_env.working_dir must name the local directory"]),
    "entrypoint typo": (_with(entrypoint="trian"), ["entrypoint='trian'", "did you mean 'train'"]),
    "unknown flag": (_with(args=["--dryrun"]), ["'--dryrun' is not a flag of `raypo train`",
                                                "did you mean '--dry-run'"]),
    "wrong type": (_with(args="--dry-run"), ["'args' has the wrong type", "list[str]"]),
    "secret value": (_with(runtime_env={"env_vars": {"HF_TOKEN": "hf_abc"}}),
                     ["runtime_env.env_vars.HF_TOKEN looks like a secret", "runtime_env.forward_env"]),
    "relative storage": (_with(config__checkpoint={"storage_path": "./runs"}),
                         ["checkpoint.storage_path='./runs' is relative"]),
    "home storage on many nodes": (_with(config__checkpoint={"storage_path": "~/runs"},
                                         config__scaling={"num_workers": 16, "use_gpu": True}),
                                   ["is each node's home directory", "spans 2 nodes"]),
    "image_uri with working_dir": (_with(runtime_env={"working_dir": ".", "image_uri": "img:1"}),
                                   ["image_uri cannot be combined with runtime_env.working_dir"]),
    "reserved metadata": (_with(metadata={"raypo_job": "x"}), ["metadata.raypo_job", "set by raypo"]),
    "submission id policy": (_with(submission_id="uniqe"),
                             ["submission_id='uniqe'", "did you mean 'unique'"]),
    "nested value in env_vars": (_with(runtime_env={"env_vars": {"A": [1, 2]}}),
                                 ["runtime_env.env_vars.A=[1, 2] must be a single value"]),
    "does not fit its cluster": (_with(config={"model": {"gradient_checkpointing": False},
                                               "scaling": {"num_workers": 8, "use_gpu": True},
                                               "checkpoint": {"storage_path": "s3://b/r"},
                                               "plan": {"model": "qwen2.5-32b",
                                                        "node_type": "p4de.24xlarge"}}),
                                 ["the job does not fit p4de.24xlarge", "--skip-plan"]),
    "unknown model in plan": (_with(config__plan={"model": "llama-3-8", "node_type": "p4de.24xlarge"}),
                              ["config: plan.model='llama-3-8'", "did you mean 'llama-3-8b'"]),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
@pytest.mark.parametrize("print_cli", [False, True], ids=["submit", "print-ray-cli"])
def test_bad_job_specs_are_refused_before_submission(case, print_cli, tmp_path, capsys):
    spec, expected = BAD_SPECS[case]
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    args = ["submit", str(path), "--address", CLOSED_PORT] + (["--print-ray-cli"] if print_cli else [])
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "ray job submit" not in captured.out and "submitted job" not in captured.out
    for text in expected:
        assert text in captured.err, captured.err


def test_a_forwarded_variable_missing_from_the_shell_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAYPO_TEST_NOT_SET", raising=False)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(_with(runtime_env={"forward_env": ["RAYPO_TEST_NOT_SET"]})))
    assert main(["submit", str(path), "--address", CLOSED_PORT]) == 2
    assert "RAYPO_TEST_NOT_SET is not set in this shell" in capsys.readouterr().err
    # printing the command needs no value: the command expands it when run
    assert main(["submit", str(path), "--print-ray-cli"]) == 0
    assert '"${RAYPO_TEST_NOT_SET}"' in capsys.readouterr().out


def test_an_unreachable_cluster_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(GOOD))
    assert main(["submit", str(path), "--address", CLOSED_PORT, "--no-wait"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the Ray job server at http://127.0.0.1:9" in err and "--address" in err


def test_missing_job_file(tmp_path, capsys):
    assert main(["submit", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_wait_and_follow_exclude_each_other(capsys):
    assert main(["submit", str(JOBS[0]), "--no-wait", "--follow"]) == 2


# ----------------------------------------------------------------------------------------------------
# The job side: `python -m raypo.cli.job run ...` and `run-job`
# ----------------------------------------------------------------------------------------------------


def test_run_inline_rebuilds_the_config_and_runs_raypo(tmp_path, capsys):
    job = load_job(REPO / "jobs" / "mpo_llama8b.yaml")
    sub = build_submission(job, job_config(job))
    env = {RUN_CONFIG_ENV: sub.runtime_env["env_vars"][RUN_CONFIG_ENV]}
    assert run_inline("train", ["--dry-run"], environ=env) == 0
    out = capsys.readouterr().out
    assert "running: raypo train" in out and "name: mpo" in out and "run_name: mpo-llama8b" in out


def test_run_inline_without_its_variable_is_an_error():
    with pytest.raises(ConfigError, match=RUN_CONFIG_ENV):
        run_inline("train", [], environ={})


def test_run_job_here_runs_a_spec_in_process(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({**GOOD, "args": ["--dry-run"]}))
    assert run_job_here(str(path)) == 0
    assert "run_name: demo" in capsys.readouterr().out


def test_plan_accepts_a_job_spec(capsys):
    assert main(["plan", str(REPO / "jobs" / "mpo_llama8b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "llama-3-8b (from plan.model)" in out and "= model states" in out and "-> FITS" in out


def test_quickstart_config_is_unchanged_by_jobs():
    """jobs/quickstart_local.yaml overrides the quickstart's relative paths rather than editing it."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    job_cfg = job_config(load_job(REPO / "jobs" / "quickstart_local.yaml"))
    assert cfg.checkpoint.storage_path == "./raypo_runs"
    assert job_cfg.checkpoint.storage_path == "~/raypo_runs" and job_cfg.checkpoint.export_path is None


def test_sweep_job_runs_the_tune_entrypoint(capsys):
    job = load_job(REPO / "jobs" / "sweep_beta_llama8b.yaml")
    sub = build_submission(job, job_config(job))
    assert sub.entrypoint[-3:] == ["raypo.cli.job", "run", "tune"]
    env = {RUN_CONFIG_ENV: sub.runtime_env["env_vars"][RUN_CONFIG_ENV]}
    assert run_inline("tune", ["--dry-run"], environ=env) == 0
    out = capsys.readouterr().out
    assert "running: raypo tune" in out and "search_space" in out


def test_readme_shows_what_print_ray_cli_prints(capsys):
    """The README's plain `ray job submit` example is the command raypo prints (up to the generated id and
    config hash), so a user can launch with the Ray CLI alone."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(ray job submit .*?)```", readme, re.S).group(1)
    assert main(["submit", "--print-ray-cli", str(REPO / "jobs" / "quickstart_local.yaml"),
                 "--address", "http://127.0.0.1:8265"]) == 0
    printed = capsys.readouterr().out
    printed = printed[printed.index("ray job submit"):]

    def normalise(text: str) -> str:
        text = re.sub(r"--submission-id \S+", "--submission-id ID", text)
        return re.sub(r'"raypo_config_sha256": "[0-9a-f]+"', '"raypo_config_sha256": "SHA"', text).strip()

    assert normalise(block) == normalise(printed)


def test_a_sweep_job_with_a_bad_search_space_is_refused(tmp_path, capsys):
    """The config layer does not know search spaces; `raypo submit` of a `tune` job checks it, in one list
    with the config's own problems."""
    spec = _with(entrypoint="tune", config__data={"train_path": "synthetic://default?num_prompts=16"},
                 config__tune={"search_space": {"loss.bta": {"loguniform": [0.01, 0.5]}}})
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    assert main(["submit", str(path), "--print-ray-cli"]) == 2
    assert "config: tune.search_space: unknown key 'loss.bta': did you mean 'loss.beta'?" in \
        capsys.readouterr().err
    spec["config"]["optimizer"] = {"lr": -1}
    path.write_text(json.dumps(spec))
    assert main(["submit", str(path), "--print-ray-cli"]) == 2
    err = capsys.readouterr().err
    assert "config: optimizer.lr=-1.0 must be > 0" in err and "did you mean 'loss.beta'?" in err
    spec["entrypoint"] = "train"  # a training run ignores the search space
    spec["config"].pop("optimizer")
    path.write_text(json.dumps(spec))
    assert main(["submit", str(path), "--print-ray-cli"]) == 0


def test_entry_flags_are_handed_down_by_the_command_line(tmp_path):
    """The launch layer never imports the CLI: the commands give it the flags their parser accepts."""
    from raypo.cli.main import command_flags
    from raypo.launch.jobspec import JobSpecError

    flags = command_flags()
    assert "--dry-run" in flags["train"] and "--resume" in flags["tune"] and "--help" not in flags["train"]
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(_with(args=["--dryrun"])))
    load_job(path)  # no flags given: args are left to the command that runs the job
    with pytest.raises(JobSpecError, match="'--dryrun' is not a flag of `raypo train`"):
        load_job(path, entry_flags=flags)
    with pytest.raises(JobSpecError, match="did you mean '--dry-run'"):
        run_job_here(str(path))
