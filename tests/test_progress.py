"""Progress of long stages: a live line on a terminal, one closing line in CI and logs (raypo.progress)."""

from __future__ import annotations

import io

import pytest

from raypo.progress import Progress, eta, format_duration, interactive, ray_data_stage, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_ci(monkeypatch):
    for name in ("CI", "GITHUB_ACTIONS", "BUILDKITE", "JENKINS_URL", "RAY_JOB_ID", "RAYPO_PROGRESS"):
        monkeypatch.delenv(name, raising=False)


def test_off_a_terminal_a_stage_prints_one_closing_line():
    out = io.StringIO()
    assert list(track(range(5), "data validate", total=5, stream=out)) == [0, 1, 2, 3, 4]
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raypo: data validate: 5 rows in ")
    assert "\r" not in out.getvalue()


def test_on_a_terminal_the_line_shows_done_of_total_rate_and_eta():
    out = Terminal()
    progress = Progress("tokenize", total=100, stream=out, min_interval_s=0.0)
    progress.start -= 2.0  # 2 s in
    progress.advance(50)
    live = out.getvalue()
    assert live.startswith("\r") and "raypo: tokenize: 50/100 rows" in live and "eta 2s" in live
    assert "rows/s" in live
    progress.close()
    assert out.getvalue().endswith("\n") and "tokenize: 50 rows in 2.0s" in out.getvalue()


def test_ci_and_ray_jobs_get_no_live_line_even_on_a_terminal(monkeypatch):
    assert interactive(Terminal())
    monkeypatch.setenv("CI", "true")
    assert not interactive(Terminal())
    monkeypatch.setenv("RAYPO_PROGRESS", "1")
    assert interactive(io.StringIO())  # forced on
    monkeypatch.setenv("RAYPO_PROGRESS", "0")
    monkeypatch.delenv("CI")
    assert not interactive(Terminal())


def test_eta_and_durations():
    assert eta(25, 100, 10.0) == pytest.approx(30.0)
    assert eta(0, 100, 10.0) is None and eta(5, 0, 1.0) is None
    assert [format_duration(s) for s in (3.4, 75, 3 * 3600 + 120)] == ["3s", "1m15s", "3h02m"]


def test_a_ray_data_stage_shows_ray_data_bars_only_on_a_terminal_and_restores_the_setting():
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    seen = []
    for stream in (Terminal(), io.StringIO()):
        with ray_data_stage("data train", stream=stream) as stage:
            seen.append(ctx.enable_progress_bars)
            stage.done = 7
        assert ctx.enable_progress_bars is False
        assert stream.getvalue().startswith("raypo: data train: 7 rows in ")
    assert seen == [True, False]


def test_data_validate_reports_its_stage_on_stderr(tmp_path, capsys):
    import json

    from raypo.cli.main import main

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": str(i), "prompt": "p", "responses": ["a", "b"],
                                        "scores": [[1.0], [2.0]]}) + "\n" for i in range(3)))
    assert main(["data", "validate", str(path), "--dimensions", "h", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["accepted_rows"] == 3  # stdout: the report alone
    assert [line for line in captured.err.splitlines() if line.startswith("raypo: data validate: 3 rows in")]
