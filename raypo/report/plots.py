"""The report's curves as PNG images (matplotlib, headless).

One figure per panel: the losses (train and eval), the pairwise accuracy (train, eval, and eval per
dimension), the reward margin, the learning rate and throughput; and for a sweep, the tuned metric of every
trial against the optimizer step. A panel with no data is left out rather than drawn empty.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from raypo.report.artifacts import RunArtifacts


@dataclass(frozen=True)
class Panel:
    """One figure: its file name, title, y label and the metric keys it draws."""

    name: str
    title: str
    ylabel: str
    keys: tuple[str, ...]


def run_panels(run: RunArtifacts) -> list[Panel]:
    dims = run.dimensions()
    per_dim = tuple(f"eval/pairwise_accuracy/{d}" for d in dims)
    return [
        Panel("loss.png", "Loss", "loss", ("train/loss", "eval/loss")),
        Panel("pairwise_accuracy.png", "Pairwise accuracy of the implicit rewards", "accuracy",
              ("train/pairwise_accuracy", "eval/pairwise_accuracy", *per_dim)),
        Panel("reward_margin.png", "Reward margin (chosen - rejected)", "margin",
              ("train/reward_margin", "eval/reward_margin")),
        Panel("learning_rate.png", "Learning rate", "lr", ("train/lr",)),
        Panel("throughput.png", "Throughput", "tokens/s", ("perf/tokens_per_s",)),
    ]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def line_plot(title: str, ylabel: str, series: Sequence[tuple[str, Sequence[int], Sequence[float]]]) -> bytes:
    """A PNG of labelled (steps, values) lines against the optimizer step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, steps, values in series:
        ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _png(fig)


def run_plots(run: RunArtifacts) -> dict[str, bytes]:
    """``{file name: PNG}`` for every panel with at least one point."""
    plots: dict[str, bytes] = {}
    for panel in run_panels(run):
        series = [(key, *run.series(key)) for key in panel.keys]
        series = [s for s in series if s[1]]
        if series:
            plots[panel.name] = line_plot(panel.title, panel.ylabel, series)
    return plots


def sweep_metric_plot(trials: Sequence[RunArtifacts], metric: str) -> dict[str, bytes]:
    """``trials_<metric>.png``: the metric of each trial against the step (empty when no trial has it)."""
    series = [(t.name, *t.series(metric)) for t in trials]
    series = [s for s in series if s[1]]
    if not series:
        return {}
    return {f"trials_{metric.replace('/', '_')}.png": line_plot(f"{metric} per trial", metric, series)}
