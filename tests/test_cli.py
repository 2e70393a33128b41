"""The raypo command's surface: help for every subcommand, config errors before any cluster work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raypo.cli import build_parser, main

SUBCOMMANDS = ["train", "tune", "submit", "data", "export", "plan"]


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS + ["data convert", "data validate", "data synth", "lambdas fit"])
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*name.split(), "--help"])
    assert exc.value.code == 0
    assert "usage: raypo " + name in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "raypo.cli", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "key=value" in out


def test_bad_config_is_refused_with_exit_code_2(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("loss:\n  name: dpo\n  bta: 0.1\n")
    assert main(["train", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "loss.bta" in err and "did you mean 'beta'" in err


def test_missing_command_is_an_error():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([])
    assert exc.value.code != 0


def test_every_subcommand_has_its_own_module():
    """`raypo X` dispatches to raypo.cli.X (data has one function per action; raypo.cli.job is the cluster
    side of submit)."""
    import importlib

    for name in ("train", "tune", "submit", "export", "plan"):
        assert callable(getattr(importlib.import_module(f"raypo.cli.{name}"), f"{name}_command")), name
    data = importlib.import_module("raypo.cli.data")
    assert all(callable(getattr(data, f"{a}_command")) for a in ("convert", "validate", "synth"))


def test_job_runner_usage():
    out = subprocess.run([sys.executable, "-m", "raypo.cli.job"], capture_output=True, text=True)
    assert out.returncode == 2 and "python -m raypo.cli.job run {train,tune}" in out.stderr
