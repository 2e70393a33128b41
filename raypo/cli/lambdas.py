"""``raypo lambdas fit RESULTS.csv [--degree 2] [--tau 100] [--candidates dirichlet:10|grid:4] [--seed S]
[--score-column C] [--lambda-columns a,b,...] [--json]``.

The learned lambda scheduler of the lambda-DPO paper (Appendix D; docs/loss_reference.md §3.5), fitted to a
results table and printed: the polynomial (feature, weight), the residuals at the probe points and the
candidate table (lambda, f, p). The table is built by
:func:`raypo.train.lambda_schedules.build_lambda_schedule` from the same
:class:`~raypo.config.LambdaConfig` that ``lambdas.schedule: learned`` gives a training run, so what is
printed is what training samples from (given the same ``lambdas.learned`` values).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from raypo.config import LambdaConfig, LearnedLambdaConfig
from raypo.errors import ConfigError
from raypo.train.lambda_schedules import PolynomialLambdaScheduler, build_lambda_schedule
from raypo.train.learned_lambda import MIN_POINTS, lambda_columns_in, read_results_table, table_columns


def parse_candidates(spec: str) -> dict[str, Any]:
    """``dirichlet[:K[:ALPHA]]`` or ``grid[:R]`` as :class:`~raypo.config.LearnedLambdaConfig` fields."""
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind == "grid" and len(parts) <= 1:
            return {"candidates": "grid", **({"grid_resolution": int(parts[0])} if parts else {})}
        if kind == "dirichlet" and len(parts) <= 2:
            out: dict[str, Any] = {"candidates": "dirichlet"}
            if parts:
                out["num_candidates"] = int(parts[0])
            if len(parts) == 2:
                out["dirichlet_alpha"] = [float(a) for a in parts[1].split(",")]
            return out
    except ValueError:
        pass
    raise ConfigError([f"--candidates={spec!r} is not dirichlet:K[:ALPHA] or grid:R; e.g. dirichlet:10, "
                       "dirichlet:10:0.5 or grid:4"], source="command line")


def _lambda_columns(args: argparse.Namespace) -> list[str]:
    try:
        found = table_columns(args.results)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise ConfigError([f"results table {args.results!r} does not exist ({exc.strerror or exc}); give the "
                           "path of a CSV, e.g. <sweep>/results/results.csv"], source="command line") from exc
    if args.lambda_columns:
        cols = [c.strip() for c in args.lambda_columns.split(",") if c.strip()]
    else:
        cols = lambda_columns_in(found)
    missing = [c for c in [*cols, args.score_column] if c not in found]
    if not cols or missing:
        what = f"columns {missing} are" if missing else "no lambda_0, lambda_1, ... columns are"
        raise ConfigError([f"{what} not in {args.results}; columns found: {found}. Name them with "
                           "--lambda-columns a,b,... and --score-column C"], source="command line")
    return cols


def fit_from_args(args: argparse.Namespace) -> PolynomialLambdaScheduler:
    """The scheduler ``lambdas.schedule: learned`` builds for these options."""
    cols = _lambda_columns(args)
    learned = LearnedLambdaConfig(results_path=args.results, score_column=args.score_column,
                                  lambda_columns=cols, degree=args.degree, tau=args.tau, seed=args.seed,
                                  **parse_candidates(args.candidates))
    try:
        points = read_results_table(args.results, cols, args.score_column)
    except ValueError:  # no row, or none with finite values (the columns were checked above)
        points = []
    if len(points) < MIN_POINTS:
        raise ConfigError([f"too few rows: {args.results} has {len(points)} row(s) with finite "
                           f"{', '.join(cols)} and {args.score_column}; the fit needs at least {MIN_POINTS}"],
                          source="command line")
    try:
        sched = build_lambda_schedule(LambdaConfig(schedule="learned", learned=learned), num_dims=len(cols))
    except ValueError as exc:
        raise ConfigError([str(exc)], source="command line") from exc
    assert isinstance(sched, PolynomialLambdaScheduler)
    return sched


def fit_report(sched: PolynomialLambdaScheduler) -> dict[str, Any]:
    """The ``--json`` object: weights, features, residuals, candidates (lambda, f, p)."""
    fit = sched.fit
    return {
        "features": fit.features(),
        "weights": fit.weights.tolist(),
        "residuals": [{"lambda": lam.tolist(), "score": float(y), "residual": float(r)}
                      for lam, y, r in zip(sched.points_lambda, sched.points_score, fit.residuals)],
        "candidates": [{"lambda": c.tolist(), "f": float(f), "p": float(p)}
                       for c, f, p in zip(fit.candidates, fit.f, fit.p)],
        "degree": fit.degree, "tau": sched.cfg.learned.tau, "candidate_set": sched.cfg.learned.candidates,
    }


def _lam(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"polynomial (degree {report['degree']}, {len(report['features'])} features):"]
    lines += [f"  {name:<10} {w:+.6f}" for name, w in zip(report["features"], report["weights"])]
    lines.append("residuals f(lambda) - score at the probe points:")
    lines += [f"  {_lam(r['lambda'])}  score {r['score']:.6g}  residual {r['residual']:+.3e}"
              for r in report["residuals"]]
    lines.append(f"candidates ({report['candidate_set']}, p = softmax({report['tau']:g} * f)):")
    lines += [f"  {_lam(c['lambda'])}  f {c['f']:.6f}  p {c['p']:.4f}" for c in report["candidates"]]
    return "\n".join(lines)


def fit_command(args: argparse.Namespace) -> int:
    report = fit_report(fit_from_args(args))
    print(json.dumps(report) if args.json else format_report(report))
    return 0
