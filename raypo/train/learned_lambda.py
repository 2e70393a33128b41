"""The learned lambda scheduler's mathematics (the lambda-DPO paper, Sun et al. arXiv 2506.19780, Appendix D;
docs/loss_reference.md §3.5), free of any schedule state: polynomial features of lambda, the least-squares
fit of probe results, the candidate table and its softmax, and reading probe results from a table.
:class:`raypo.train.lambda_schedules.PolynomialLambdaScheduler` samples from it.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from raypo.config import LearnedLambdaConfig
from raypo.config.validate import temperature_problem
from raypo.storage import open_text

#: Fewest (lambda, score) points a fit accepts: one point gives no direction to prefer.
MIN_POINTS = 2


def monomial_exponents(m: int, degree: int) -> list[tuple[int, ...]]:
    """Index tuples of all monomials of total degree <= ``degree`` in m variables.

    Ordered by degree, then lexicographically by the sorted index tuple: ``()``, ``(0,)``, ..., ``(m-1,)``,
    ``(0, 0)``, ``(0, 1)``, ..., ``(m-1, m-1)``, ... (m = 4, degree 2: 1 + 4 + 10 = 15 features).
    """
    if degree < 0 or m < 1:
        raise ValueError(f"monomial_exponents(m={m}, degree={degree}) needs m >= 1, degree >= 0")
    out: list[tuple[int, ...]] = []
    for d in range(degree + 1):
        out.extend(itertools.combinations_with_replacement(range(m), d))
    return out


def poly_features(lam: Union[np.ndarray, Sequence[Sequence[float]]], degree: int) -> np.ndarray:
    """Phi(lambda) ``[n, F]``: the monomials of :func:`monomial_exponents` at each row of ``lam``."""
    x = np.atleast_2d(np.asarray(lam, dtype=np.float64))
    cols = [np.prod(x[:, list(idx)], axis=1) if idx else np.ones(len(x)) for idx in
            monomial_exponents(x.shape[1], degree)]
    return np.stack(cols, axis=1)


def fit_poly_scheduler(lambdas: Union[np.ndarray, Sequence[Sequence[float]]], scores: Sequence[float],
                       degree: int = 2) -> np.ndarray:
    """``w = argmin ||Phi w - score||^2`` with the minimum norm (SVD ``lstsq``); Phi is rank-deficient on
    the simplex (sum lambda = 1), and with fewer points than features the fit interpolates them exactly."""
    phi = poly_features(lambdas, degree)
    y = np.asarray(scores, dtype=np.float64)
    if y.shape != (phi.shape[0],):
        raise ValueError(f"fit_poly_scheduler: {phi.shape[0]} lambdas but {y.shape} scores")
    w, *_ = np.linalg.lstsq(phi, y, rcond=None)
    return w


def softmax_scores(f: np.ndarray, tau: float) -> np.ndarray:
    """``p_j = exp(tau * f_j) / sum_l exp(tau * f_l)`` (lambda-DPO paper, Appendix D.4): tau multiplies the
    scores (an inverse temperature; the paper's tau = 100), tau = 0 is uniform. Max-subtracted, float64."""
    x = float(tau) * np.asarray(f, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def simplex_grid(m: int, resolution: int) -> np.ndarray:
    """All points of the simplex whose coordinates are multiples of 1/resolution: every composition of
    ``resolution`` into m non-negative parts, divided by ``resolution`` (Appendix D.3's "all combinations
    with replacement, normalised"). ``[C(resolution + m - 1, m - 1), m]``; m = 4, resolution 4: 35 rows."""
    if m < 1 or resolution < 1:
        raise ValueError(f"simplex_grid(m={m}, resolution={resolution}) needs m >= 1, resolution >= 1")
    rows = [np.bincount(c, minlength=m) for c in
            itertools.combinations_with_replacement(range(m), resolution)]
    return np.asarray(rows, dtype=np.float64) / resolution


def candidate_set(learned: LearnedLambdaConfig, m: int) -> np.ndarray:
    """The candidate lambdas of Appendix D.3, ``[K, m]``: the simplex grid of ``grid_resolution``
    (``candidates: grid``), or ``num_candidates`` draws from Dirichlet(``dirichlet_alpha``, default 1 each:
    uniform on the simplex) seeded by ``learned.seed`` (``candidates: dirichlet``; the paper's example:
    K = 10). The same on every rank: the seed does not depend on the rank's lambda stream."""
    if learned.candidates == "grid":
        return simplex_grid(m, learned.grid_resolution)
    if learned.candidates != "dirichlet":
        raise ValueError(f"lambdas.learned.candidates={learned.candidates!r} must be 'dirichlet' or 'grid'")
    alpha = np.ones(m) if learned.dirichlet_alpha is None else np.asarray(learned.dirichlet_alpha, float)
    if alpha.shape == (1,):
        alpha = np.repeat(alpha, m)
    if alpha.shape != (m,) or not (alpha > 0).all():
        raise ValueError(f"lambdas.learned.dirichlet_alpha={learned.dirichlet_alpha} must be 1 or {m} "
                         "positive concentrations")
    if learned.num_candidates < 1:
        raise ValueError(f"lambdas.learned.num_candidates={learned.num_candidates} must be >= 1")
    rng = np.random.Generator(np.random.PCG64(learned.seed))
    return rng.dirichlet(alpha, size=learned.num_candidates)


@dataclass
class LearnedFit:
    """A fitted scheduler: the polynomial, its residuals at the probe points and the candidate table."""

    degree: int
    weights: np.ndarray  # w [F]
    residuals: np.ndarray  # f(lambda_i) - y_i at the probe points [n]
    candidates: np.ndarray  # [K, m]
    f: np.ndarray  # predicted score of each candidate [K]
    p: np.ndarray  # softmax(tau * f) [K]

    def features(self) -> list[str]:
        """The monomial of each weight, e.g. ``1``, ``l0``, ``l0*l1``, ``l2^2``."""
        return [monomial_name(idx) for idx in monomial_exponents(self.candidates.shape[1], self.degree)]


def monomial_name(idx: tuple[int, ...]) -> str:
    if not idx:
        return "1"
    return "*".join(f"l{k}" if n == 1 else f"l{k}^{n}" for k, n in sorted(Counter(idx).items()))


def fit_learned(lambdas: np.ndarray, scores: np.ndarray, learned: LearnedLambdaConfig) -> LearnedFit:
    """Appendix D.1-D.4 end to end: fit, candidates, distribution. Needs at least :data:`MIN_POINTS`."""
    check_learned(learned)
    lam = np.atleast_2d(np.asarray(lambdas, dtype=np.float64))
    y = np.asarray(scores, dtype=np.float64)
    if len(lam) < MIN_POINTS:
        raise ValueError(f"the learned lambda scheduler needs at least {MIN_POINTS} (lambda, score) points, "
                         f"got {len(lam)}: probe more lambdas")
    w = fit_poly_scheduler(lam, y, learned.degree)
    cands = candidate_set(learned, lam.shape[1])
    f = poly_features(cands, learned.degree) @ w
    return LearnedFit(learned.degree, w, poly_features(lam, learned.degree) @ w - y, cands, f,
                      softmax_scores(f, learned.tau))


def check_learned(learned: LearnedLambdaConfig) -> None:
    """The checks of :func:`raypo.config.validate` for code that builds the config directly."""
    if learned.temperature is not None:
        raise ValueError(temperature_problem(learned.temperature))
    if learned.degree < 1 or not (math.isfinite(learned.tau) and learned.tau >= 0):
        raise ValueError(f"lambdas.learned needs degree >= 1 and a finite tau >= 0, got degree="
                         f"{learned.degree}, tau={learned.tau}")


def read_results_table(
    path_or_rows: Union[str, Path, Iterable[Mapping[str, Any]]],
    lambda_columns: Sequence[str],
    score_column: str,
) -> list[tuple[list[float], float]]:
    """(lambda, score) points from a results table: a CSV path (e.g. a Ray Tune ``ResultGrid`` dataframe
    written with ``to_csv``) or an iterable of row mappings. Rows with a missing or non-finite score or
    lambda are skipped; unknown column names raise with the available ones."""
    if isinstance(path_or_rows, (str, Path)):
        with open_text(str(path_or_rows)) as f:
            rows: list[Mapping[str, Any]] = list(csv.DictReader(f))
    else:
        rows = list(path_or_rows)
    if not rows:
        raise ValueError("read_results_table: the results table has no rows")
    available = set(rows[0].keys())
    missing = [c for c in [*lambda_columns, score_column] if c not in available]
    if missing:
        raise ValueError(
            f"read_results_table: columns {missing} not in the table; available: {sorted(available)}")
    points: list[tuple[list[float], float]] = []
    for row in rows:
        try:
            lam = [float(row[c]) for c in lambda_columns]
            score = float(row[score_column])
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(x) for x in [*lam, score]):
            points.append((lam, score))
    if not points:
        raise ValueError("read_results_table: no row has finite lambda and score values")
    return points


def table_columns(path: Union[str, Path]) -> list[str]:
    """The header of a CSV results table (local or s3://)."""
    with open_text(str(path)) as f:
        return next(csv.reader(f), [])


def lambda_columns_in(columns: Sequence[str]) -> list[str]:
    """The ``lambda_0 .. lambda_{m-1}`` columns of a results table (as ``raypo tune`` writes them for a
    ``lambdas.weights`` search), ordered by index; ``[]`` if there are none."""
    found = {int(c[len("lambda_"):]): c for c in columns
             if c.startswith("lambda_") and c[len("lambda_"):].isdigit()}
    return [found[k] for k in sorted(found)]
