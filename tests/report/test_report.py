"""``raypo report``: a run or sweep directory as one Markdown or self-contained HTML page.

These tests build the directories by hand, with the files and names the trainer and the sweep driver
write (the end-to-end checks on a real run and a real sweep are in tests/train/test_quickstart.py and
tests/tune/test_tune_e2e.py).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from raypo.cli.main import EXIT_RUN, main
from raypo.report.artifacts import load, read_metrics
from raypo.report.plots import line_plot
from raypo.report.render import eval_table

DIMS = ["helpfulness", "honesty"]


def write_run(run: Path, steps: int = 4) -> None:
    run.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "train/loss": 1.0 / step, "train/pairwise_accuracy": 0.5 + 0.1 * step,
                      "train/lr": 1e-4, "perf/tokens_per_s": 100.0 + step})
    for step in (0, steps):
        row = {"step": step, "eval/loss": 0.9 if step == 0 else 0.4, "eval/pairwise_accuracy": 0.1 * step}
        row.update({f"eval/pairwise_accuracy/{d}": 0.2 * step + i for i, d in enumerate(DIMS)})
        row.update({f"eval/ndcg/{d}": 0.8 for d in DIMS})
        lines.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (run / "config.yaml").write_text("loss:\n  name: lambda_dpo\n")
    (run / "data_report.json").write_text(json.dumps({
        "source": "train", "dimensions": DIMS, "input_rows": 10, "accepted_rows": 8, "rejected_rows": 2,
        "reject_fraction": 0.2, "rejected": {"invalid_json": 1, "too_few_responses": 1}, "repaired": {}}))
    (run / "raypo_summary.json").write_text(json.dumps({"checkpoint": str(run / "step_00000004"),
                                                        "export_dir": "/exports/m", "wall_s": 12.5}))
    (run / "step_00000004").mkdir()


def test_metrics_history_has_one_row_per_step_and_skips_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n'
                    '{"step": 2, "train/loss": 1.4}\n{"step": 2, "eval/loss": 1.0}\n{"step": 3, "tr')
    rows, skipped = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1] == {"step": 2, "train/loss": 1.4, "eval/loss": 1.0}  # a resumed step's later report wins
    assert skipped == 1


def test_eval_table_shows_each_dimension_first_to_last(tmp_path):
    write_run(tmp_path / "run")
    table = eval_table(load(str(tmp_path / "run")))
    assert table.header[0] == "dimension (step 0 -> 4)"
    rows = {r[0]: r for r in table.rows}
    assert list(rows) == ["all", *DIMS]
    col = table.header.index("pairwise_accuracy")
    assert rows["all"][col] == "0 -> 0.4"
    assert rows["honesty"][col] == "1 -> 1.8"
    assert rows["honesty"][table.header.index("kendall_tau")] == "-"


def test_html_report_is_self_contained_with_curves_tables_and_config(tmp_path, curve_pixels, capsys):
    write_run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "report.html"
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    names = re.findall(r"<figcaption>([^<]+)</figcaption>", page)
    assert names == ["loss", "pairwise accuracy", "learning rate", "throughput"]  # no empty margin panel
    assert all(curve_pixels(base64.b64decode(img)) > 100 for img in images)
    for text in ("invalid_json", "too_few_responses", "/exports/m", "12.5 s", "lambda_dpo",
                 "perf/tokens_per_s", "step_00000004"):
        assert text in page, text


def test_markdown_report_writes_its_images_beside_it(tmp_path, curve_pixels):
    write_run(tmp_path / "run")
    out = tmp_path / "shared" / "run.md"
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    text = out.read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert links and all((out.parent / link).is_file() for link in links)
    assert all(curve_pixels((out.parent / link).read_bytes()) > 100 for link in links)
    assert "| honesty | 1 -> 1.8 |" in text


def test_a_plot_of_nothing_has_no_curve(curve_pixels):
    assert curve_pixels(line_plot("t", "y", [("a", [], [])])) == 0
    assert curve_pixels(line_plot("t", "y", [("a", [1, 2, 3], [0.1, 0.5, 0.2])])) > 100


def test_sweep_report_has_the_trials_table_and_a_curve_per_trial(tmp_path, curve_pixels):
    sweep = tmp_path / "sweep"
    (sweep / "results").mkdir(parents=True)
    (sweep / "raypo_sweep.yaml").write_text("tune:\n  metric: eval/loss\n")
    (sweep / "results" / "results.csv").write_text(
        # Tune's trial ids can be all digits around the underscore, which Python's float() would read
        "trial_id,status,loss.beta,eval/loss\n96849_00000,completed,0.1,0.5\n96849_00001,completed,0.2,0.7\n")
    (sweep / "results" / "best_config.yaml").write_text("loss:\n  beta: 0.1\n")
    for i, trial in enumerate(("trial_96849_00000", "trial_96849_00001")):
        (sweep / "train_runs" / trial).mkdir(parents=True)
        (sweep / "train_runs" / trial / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "eval/loss": 1.0 - 0.1 * s - i}) + "\n" for s in range(3)))
    out = tmp_path / "sweep.html"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<td>96849_00000</td><td>completed</td><td>0.1</td><td>0.5</td>" in page
    assert "beta: 0.1" in page
    img = re.search(r"alt='trials eval loss' src='data:image/png;base64,([^']+)'", page)
    assert img and curve_pixels(base64.b64decode(img.group(1))) > 100


@pytest.mark.parametrize("make", ["missing", "empty", "s3"])
def test_not_a_run_is_refused_with_what_to_pass(tmp_path, capsys, make):
    target = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path), "s3": "s3://bucket/run"}[make]
    assert main(["report", target]) == EXIT_RUN
    err = capsys.readouterr().err
    assert target in err and ("run directory" in err or "~/raypo_runs" in err)
