"""The learned lambda scheduler's mathematics (the lambda-DPO paper, Sun et al. arXiv 2506.19780, Appendix D;
docs/loss_reference.md §3.5), free of any schedule state: polynomial features of lambda, the least-squares
fit of probe results, the candidate table and its softmax, and reading probe results from a table.
:class:`raypo.train.lambda_schedules.PolynomialLambdaScheduler` samples from it.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from raypo.storage import open_text


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


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def poly_scheduler_table(weights: np.ndarray, degree: int, m: int, num_candidates: int, temperature: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K candidates from Dirichlet(1), ``a_hat = Phi(c) w`` and ``pi = softmax(a_hat / tau)``.

    Returns ``(candidates [K, m], a_hat [K], pi [K])``.
    """
    if num_candidates < 1 or not temperature > 0:
        raise ValueError(f"poly scheduler needs num_candidates >= 1 and temperature > 0, got "
                         f"{num_candidates}, {temperature}")
    cands = rng.dirichlet(np.ones(m), size=num_candidates)
    a_hat = poly_features(cands, degree) @ weights
    return cands, a_hat, _softmax(a_hat / temperature)


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
