"""The report page: a run or a sweep as a list of blocks (headings, paragraphs, tables, images, code),
written as Markdown (images as PNG files next to it) or as one self-contained HTML file (images inlined),
so it can be attached to an issue or a message as it is.
"""

from __future__ import annotations

import base64
import html
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from raypo.report.artifacts import RunArtifacts, SweepArtifacts
from raypo.report.plots import run_plots, sweep_metric_plot

#: the ranking metrics of the eval table, in column order (``eval/<metric>`` and ``eval/<metric>/<dim>``)
EVAL_COLUMNS = ("pairwise_accuracy", "ndcg", "kendall_tau", "top1_accuracy", "reward_margin")


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str
    png: bytes
    caption: str


@dataclass
class Code:
    text: str


Block = Union[Heading, Paragraph, Table, Image, Code]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return "-" if value is None else str(value)


# ----------------------------------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------------------------------


def _evals(run: RunArtifacts) -> list[dict[str, Any]]:
    return [m for m in run.metrics if any(k.startswith("eval/") for k in m)]


def eval_table(run: RunArtifacts) -> Table | None:
    """Rows: all dimensions together, then each dimension; cells: ``first -> last`` eval value."""
    evals = _evals(run)
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    same = first is last

    def cell(key: str) -> str:
        if key not in last:
            return "-"
        return _fmt(last[key]) if same or key not in first else f"{_fmt(first[key])} -> {_fmt(last[key])}"

    rows = [["all", *(cell(f"eval/{c}") for c in EVAL_COLUMNS)]]
    rows += [[d, *(cell(f"eval/{c}/{d}") for c in EVAL_COLUMNS)] for d in run.dimensions()]
    steps = f"step {first.get('step')}" if same else f"step {first.get('step')} -> {last.get('step')}"
    return Table([f"dimension ({steps})", *EVAL_COLUMNS], rows)


def _summary_rows(run: RunArtifacts) -> list[list[str]]:
    summary = run.summary or {}
    last_step = max((int(m["step"]) for m in run.metrics if "step" in m), default=None)
    rows = [["run directory", str(run.path)], ["last step logged", _fmt(last_step)],
            ["checkpoints", ", ".join(run.checkpoints) or "none"],
            ["final checkpoint", _fmt(summary.get("checkpoint"))],
            ["export", _fmt(summary.get("export_dir")) if run.summary
             else "not recorded (the run has not finished)"]]
    if "wall_s" in summary:
        rows.append(["wall time", f"{summary['wall_s']:.1f} s"])
    if run.skipped_lines:
        rows.append(["unreadable metrics.jsonl lines (skipped)", str(run.skipped_lines)])
    return rows


def timing_table(run: RunArtifacts) -> Table | None:
    """Mean, last and count of every ``perf/*`` metric over the logged steps."""
    keys = sorted(k for k in run.keys() if k.startswith("perf/"))
    rows = []
    for key in keys:
        _, values = run.series(key)
        if values:
            rows.append([key, _fmt(sum(values) / len(values)), _fmt(values[-1]), str(len(values))])
    return Table(["metric", "mean", "last", "steps"], rows) if rows else None


def data_blocks(report: dict[str, Any] | None) -> list[Block]:
    if not report:
        return [Paragraph("No data report was recorded for this run (data_report.json is missing).")]
    share = f"{report.get('reject_fraction', 0):.2%}"
    rows = [["source", _fmt(report.get("source"))],
            ["dimensions", ", ".join(report.get("dimensions") or [])],
            ["input rows", _fmt(report.get("input_rows"))],
            ["accepted rows", _fmt(report.get("accepted_rows"))],
            ["rejected rows", f"{_fmt(report.get('rejected_rows'))} ({share})"]]
    blocks: list[Block] = [Table(["", "count"], rows)]
    rejected = report.get("rejected") or {}
    if rejected:
        blocks.append(Table(["rejected by reason", "rows"],
                            [[r, str(n)] for r, n in sorted(rejected.items(), key=lambda kv: -kv[1])]))
    repaired = report.get("repaired") or {}
    if repaired:
        blocks.append(Table(["repaired by rule", "rows"], [[r, str(n)] for r, n in sorted(repaired.items())]))
    return blocks


def run_blocks(run: RunArtifacts) -> list[Block]:
    blocks: list[Block] = [Heading(f"raypo run report: {run.name}", 1),
                           Paragraph(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {run.path}."),
                           Heading("Summary"), Table(["", ""], _summary_rows(run))]
    table = eval_table(run)
    blocks += [Heading("Evaluation per dimension"),
               table or Paragraph("No evaluation was logged (the run has no eval split, or has not "
                                  "reached its first evaluation).")]
    plots = run_plots(run)
    blocks.append(Heading("Curves"))
    blocks += [Image(name, png, name.removesuffix(".png").replace("_", " ")) for name, png in plots.items()]
    if not plots:
        blocks.append(Paragraph("metrics.jsonl has no steps to plot."))
    blocks += [Heading("Data"), *data_blocks(run.data_report)]
    timings = timing_table(run)
    if timings is not None:
        blocks += [Heading("Timings"), timings]
    blocks += [Heading("Config")]
    blocks.append(Code(run.config_yaml) if run.config_yaml else Paragraph("config.yaml was not recorded."))
    return blocks


# ----------------------------------------------------------------------------------------------------
# A sweep
# ----------------------------------------------------------------------------------------------------


def sweep_metric(sweep: SweepArtifacts) -> str:
    """The metric the sweep optimised (``tune.metric`` of its ``raypo_sweep.yaml``)."""
    import yaml

    try:
        raw = yaml.safe_load(sweep.config_yaml or "") or {}
    except yaml.YAMLError:
        raw = {}
    tune = raw.get("tune") if isinstance(raw, dict) else None
    return str((tune or {}).get("metric") or "eval/pairwise_accuracy")


def sweep_blocks(sweep: SweepArtifacts) -> list[Block]:
    metric = sweep_metric(sweep)
    blocks: list[Block] = [Heading(f"raypo sweep report: {sweep.name}", 1),
                           Paragraph(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {sweep.path}; "
                                     f"{len(sweep.table)} trial(s) in results/results.csv, "
                                     f"{len(sweep.trials)} trial run(s) under train_runs/.")]
    blocks.append(Heading("Trials"))
    if sweep.table:
        header = list(sweep.table[0])
        blocks.append(Table(header, [[_fmt(_number(r.get(h))) for h in header] for r in sweep.table]))
    else:
        blocks.append(Paragraph("results/results.csv is missing: the sweep has not finished."))
    images = {**sweep.plots, **sweep_metric_plot(sweep.trials, metric)}
    if images:
        blocks.append(Heading("Plots"))
        blocks += [Image(n, png, n.removesuffix(".png").replace("_", " ")) for n, png in images.items()]
    if sweep.best_config_yaml:
        blocks += [Heading("Best trial's config (results/best_config.yaml)"), Code(sweep.best_config_yaml)]
    if sweep.config_yaml:
        blocks += [Heading("Sweep config"), Code(sweep.config_yaml)]
    return blocks


def _number(text: Any) -> Any:
    """A CSV cell as a number when it is one; Python's float() also reads "96849_00001" (digits grouped by
    underscores), which is a Tune trial id, so a cell with an underscore stays text."""
    if isinstance(text, str) and "_" in text:
        return text
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


# ----------------------------------------------------------------------------------------------------
# Markdown and HTML
# ----------------------------------------------------------------------------------------------------


def to_markdown(blocks: list[Block], image_dir: Path, image_prefix: str) -> str:
    """Markdown text; each image is written to ``image_dir`` and linked as ``image_prefix/<name>``."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Table):
            cells = [[c.replace("|", "\\|") for c in row] for row in [b.header, *b.rows]]
            out.append("\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(b.header),
                                  *("| " + " | ".join(r) + " |" for r in cells[1:])]))
        elif isinstance(b, Image):
            image_dir.mkdir(parents=True, exist_ok=True)
            (image_dir / b.name).write_bytes(b.png)
            out.append(f"![{b.caption}]({image_prefix}/{b.name})")
        else:
            out.append(f"```yaml\n{b.text.rstrip()}\n```")
    return "\n\n".join(out) + "\n"


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;"
          "text-align:left;font-size:.9em}pre{background:#f5f5f5;padding:.8em;overflow-x:auto}"
          "img{max-width:100%}figure{margin:1em 0}")


def to_html(blocks: list[Block], title: str) -> str:
    """One HTML page with the images inlined as data URIs (no files beside it)."""
    esc = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{_STYLE}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode()
            out.append(f"<figure><img alt='{esc(b.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{esc(b.caption)}</figcaption></figure>")
        else:
            out.append(f"<pre>{esc(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(artifacts: RunArtifacts | SweepArtifacts, out: Path, fmt: str) -> Path:
    """Write the page to ``out`` (``fmt`` = ``html`` or ``md``; Markdown images go to
    ``<out stem>_files/``); returns ``out``."""
    blocks = run_blocks(artifacts) if isinstance(artifacts, RunArtifacts) else sweep_blocks(artifacts)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "md":
        image_dir = out.parent / f"{out.stem}_files"
        text = to_markdown(blocks, image_dir, image_dir.name)
    else:
        text = to_html(blocks, blocks[0].text if isinstance(blocks[0], Heading) else "raypo report")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out
