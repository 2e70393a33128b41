"""The results of a sweep: one table row per trial (its sampled values, status, the metric's last and
best values), the best trial's config as a ready-to-run ``best_config.yaml``, plots of the metric against
each searched key, written under ``<sweep>/results`` (local or ``s3://``) and printed.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from raypo.config import RaypoConfig, config_from_dict, to_yaml
from raypo.storage import write_bytes, write_text
from raypo.tune.simplex import is_number
from raypo.tune.space import SearchDim, apply_overrides, base_for_trials, describe_point, trial_overrides
from raypo.tune.sweep import Sweep
from raypo.tune.trials import trial_run_name

STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERROR = "completed", "stopped early", "error"


def _cell(value: Any) -> Any:
    """A table cell: scalars as they are, lists and bundles as compact JSON."""
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return value


def _best_of(values: list[float], mode: str) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return float("nan")
    return max(finite) if mode == "max" else min(finite)


def trial_row(sweep: Sweep, trial_id: str, point: Mapping[str, Any], last: Mapping[str, Any],
              history: list[Mapping[str, Any]], error: Optional[str]) -> dict[str, Any]:
    """One results-table row: trial, status, sampled values (lambda_k columns for a lambda grid), the
    metric's last and best values, the other eval metrics and train/loss of the last report."""
    cfg = sweep.cfg
    metric, mode = cfg.tune.metric, cfg.tune.mode
    step = last.get("step")
    if error:
        status = STATUS_ERROR
    elif step is not None and int(step) >= sweep.max_steps(point):
        status = STATUS_COMPLETED
    else:
        status = STATUS_STOPPED
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, "step": step}
    for d in sweep.dims:
        row[d.key] = _cell(point.get(d.key))
        if d.key == "lambdas.weights" and isinstance(point.get(d.key), (list, tuple)):
            row.update({f"lambda_{k}": float(w) for k, w in enumerate(point[d.key])})
    row[metric] = last.get(metric, float("nan"))
    row[f"best {metric}"] = _best_of([h.get(metric) for h in history], mode)
    for key in sorted(last):
        if (key.startswith("eval/") or key == "train/loss") and key != metric:
            row[key] = last[key]
    row["train_run"] = f"{sweep.train_runs}/{trial_run_name(trial_id)}"
    row["error"] = (error or "").splitlines()[0][:200] if error else ""
    return row


def results_table(sweep: Sweep, grid):
    """A pandas DataFrame with one row per trial of a Tune ResultGrid, best first."""
    import pandas as pd

    rows = []
    for result in grid:
        last = dict(result.metrics or {})
        trial_id = str(last.get("trial_id") or Path(str(result.path)).name.removeprefix("trial_"))
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        point = {d.key: result.config.get(d.key) for d in sweep.dims}
        error = str(result.error) if result.error else None
        rows.append(trial_row(sweep, trial_id, point, last, history, error))
    return sort_table(pd.DataFrame(rows), sweep.cfg.tune.metric, sweep.cfg.tune.mode)


def sort_table(df, metric: str, mode: str):
    if df.empty or metric not in df:
        return df
    return df.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable") \
        .reset_index(drop=True)


def best_row(df, metric: str, mode: str) -> Optional[Mapping[str, Any]]:
    """The best trial by its last ``metric``: among completed trials when any has the metric (a trial
    that ASHA stopped early was scored at an earlier step), else among all."""
    if df.empty or metric not in df:
        return None
    scored = df[df[metric].notna()]
    done = scored[scored["status"] == STATUS_COMPLETED]
    pool = done if not done.empty else scored
    if pool.empty:
        return None
    idx = pool[metric].idxmax() if mode == "max" else pool[metric].idxmin()
    return pool.loc[idx].to_dict()


def _decode_cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def best_config(sweep: Sweep, row: Mapping[str, Any]) -> RaypoConfig:
    """The base config with the best trial's values: a plain training config (no search space) whose run
    is named ``<sweep>-best``, ready for ``raypo train``."""
    point = {d.key: _decode_cell(row[d.key]) for d in sweep.dims if d.key in row}
    raw = apply_overrides(base_for_trials(sweep.cfg), trial_overrides(sweep.dims, point))
    raw["checkpoint"] = {**raw["checkpoint"], "run_name": f"{sweep.name}-best"}
    return config_from_dict(raw, source="best trial")


def best_config_yaml(sweep: Sweep, row: Mapping[str, Any]) -> str:
    cfg = sweep.cfg
    point = {d.key: _decode_cell(row[d.key]) for d in sweep.dims if d.key in row}
    header = [f"# Best trial {row['trial_id']} of sweep {sweep.name} ({sweep.uri}):",
              f"#   {cfg.tune.metric} = {row[cfg.tune.metric]:.6g} ({cfg.tune.mode}) at step {row['step']}",
              f"#   {describe_point(point)}",
              "# Train with it:  raypo train best_config.yaml"]
    return "\n".join(header) + "\n" + to_yaml(best_config(sweep, row))


def format_table(df, sweep: Sweep) -> str:
    """The printed table: trial, status, step, the searched keys and the metrics that matter most."""
    metric = sweep.cfg.tune.metric
    cols = ["trial_id", "status", "step", *[d.key for d in sweep.dims], metric, f"best {metric}"]
    cols += [c for c in ("eval/pairwise_accuracy", "eval/loss", "train/loss") if c in df and c not in cols]
    shown = df[[c for c in cols if c in df]]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return shown.to_string(index=False, formatters={c: fmt for c in shown.columns})


def _numeric(values: list[Any]) -> bool:
    return bool(values) and all(is_number(v) for v in values)


def _categorical_key(df, dims: list[SearchDim]) -> Optional[str]:
    """A searched key with few string values (e.g. loss.name), to colour the points by."""
    for d in dims:
        if d.key in df and d.sampler in ("choice", "grid_search") and not _numeric(list(df[d.key])):
            if df[d.key].nunique() <= 8:
                return d.key
    return None


_MARKERS = {STATUS_COMPLETED: "o", STATUS_STOPPED: "x", STATUS_ERROR: "s"}


@dataclass
class _Scatter:
    """Draws the metric of a results table against one column: a colour per option of the categorical key
    ``group`` (if any), a marker per trial status."""

    df: Any
    metric: str
    group: Optional[str]

    @property
    def groups(self) -> list[Optional[str]]:
        return sorted(self.df[self.group].astype(str).unique()) if self.group else [None]

    def __call__(self, ax, xcol: str, log: bool) -> None:
        df, metric = self.df, self.metric
        for gi, g in enumerate(self.groups):
            sub = df if g is None else df[df[self.group].astype(str) == g]
            for status, marker in _MARKERS.items():
                part = sub[(sub["status"] == status) & sub[metric].notna()]
                if part.empty:
                    continue
                label = " ".join(x for x in (g, status) if x)
                ax.scatter(part[xcol].astype(float), part[metric].astype(float), marker=marker,
                           color=f"C{gi}", label=label, s=36)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xcol)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)


def plot_results(df, sweep: Sweep) -> dict[str, bytes]:
    """PNG plots of the metric against each numeric searched key (beta, alpha, lr, concentration, ...),
    against each lambda axis (``metric_vs_lambda.png``), and per option of a categorical key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep.cfg.tune.metric
    if df.empty or metric not in df or df[metric].notna().sum() == 0:
        return {}
    scatter = _Scatter(df, metric, _categorical_key(df, sweep.dims))
    return {**_key_plots(plt, scatter, sweep), **_lambda_plot(plt, scatter, sweep),
            **_group_plot(plt, scatter, sweep)}


def _key_plots(plt, scatter: _Scatter, sweep: Sweep) -> dict[str, bytes]:
    """``metric_vs_<key>.png`` per numeric searched key, log-scaled for log samplers and wide ranges."""
    df, plots = scatter.df, {}
    for d in sweep.dims:
        if d.key not in df or d.key == "lambdas.weights" or not _numeric(list(df[d.key].dropna())):
            continue
        values = df[d.key].astype(float)
        log = d.is_log or (values.min() > 0 and values.max() / values.min() > 20)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        scatter(ax, d.key, log)
        ax.set_title(f"{sweep.name}: {scatter.metric} vs {d.key}")
        ax.legend(fontsize=7)
        plots[f"metric_vs_{d.key}.png"] = _png(fig)
    return plots


def _lambda_plot(plt, scatter: _Scatter, sweep: Sweep) -> dict[str, bytes]:
    """``metric_vs_lambda.png``: one panel per lambda_k column (a lambda grid), named by dimension."""
    df = scatter.df
    lam_cols = sorted((c for c in df.columns if c.startswith("lambda_")), key=lambda c: int(c.split("_")[1]))
    if not lam_cols:
        return {}
    names = _dimension_names(sweep.cfg)
    names = names if len(names) == len(lam_cols) else []
    fig, axes = plt.subplots(1, len(lam_cols), figsize=(3.2 * len(lam_cols), 3.4), sharey=True, squeeze=False)
    for k, (ax, col) in enumerate(zip(axes[0], lam_cols)):
        scatter(ax, col, False)
        ax.set_xlim(-0.05, 1.05)
        ax.set_title(f"{col} ({names[k]})" if names else col, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{sweep.name}: {scatter.metric} vs lambda")
    return {"metric_vs_lambda.png": _png(fig)}


def _group_plot(plt, scatter: _Scatter, sweep: Sweep) -> dict[str, bytes]:
    """``metric_vs_<group>.png``: the metric per option of the categorical key (e.g. loss.name)."""
    df, metric, group = scatter.df, scatter.metric, scatter.group
    if not group:
        return {}
    groups = scatter.groups
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for gi, g in enumerate(groups):
        ys = df[(df[group].astype(str) == g) & df[metric].notna()][metric].astype(float)
        ax.scatter([gi] * len(ys), ys, color=f"C{gi}", s=36)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel(group)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(f"{sweep.name}: {metric} by {group}")
    return {f"metric_vs_{group}.png": _png(fig)}


def _dimension_names(cfg: RaypoConfig) -> list[str]:
    """``data.dimensions``, else the synthetic data's, else none (lambda axes are then only numbered)."""
    if cfg.data.dimensions:
        return list(cfg.data.dimensions)
    from raypo.data.synthetic import is_synthetic_uri, synthetic_dimensions

    return synthetic_dimensions(cfg.data.train_path) if is_synthetic_uri(cfg.data.train_path) else []


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@dataclass
class SweepOutputs:
    table: str  # results.csv
    best_config: Optional[str]  # best_config.yaml
    plots: list[str]


def write_results(df, sweep: Sweep) -> SweepOutputs:
    """results.csv, best_config.yaml and the plots under ``<sweep>/results`` (local or s3://)."""
    s3 = sweep.cfg.data.s3
    root = sweep.results_uri
    write_text(f"{root}/results.csv", df.to_csv(index=False), s3)
    best = best_row(df, sweep.cfg.tune.metric, sweep.cfg.tune.mode)
    best_path = None
    if best is not None:
        best_path = f"{root}/best_config.yaml"
        write_text(best_path, best_config_yaml(sweep, best), s3)
    plots = []
    for name, png in plot_results(df, sweep).items():
        write_bytes(f"{root}/{name}", png, s3)
        plots.append(f"{root}/{name}")
    return SweepOutputs(table=f"{root}/results.csv", best_config=best_path, plots=plots)


def report_results(sweep: Sweep, grid) -> int:
    """Print and write the results; 0 when at least one trial reported the metric."""
    df = results_table(sweep, grid)
    out = write_results(df, sweep)
    metric = sweep.cfg.tune.metric
    print(f"\nsweep {sweep.name}: {len(df)} trials", flush=True)
    if not df.empty:
        print(format_table(df, sweep))
        for _, row in df[df["status"] == STATUS_ERROR].iterrows():
            print(f"trial {row['trial_id']} failed: {row['error']}")
    print(f"\nresults table:  {out.table}")
    print(f"best config:    {out.best_config or '(no trial reported ' + metric + ')'}")
    for p in out.plots:
        print(f"plot:           {p}")
    return 0 if out.best_config else 1
