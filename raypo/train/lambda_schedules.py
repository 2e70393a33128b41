"""Lambda schedules for multi-dimension losses (lambda_dpo): where each prompt's weight vector comes from.

A schedule draws lambda in the simplex Delta^m (docs/loss_reference.md §3.4). PAPER: the
lambda-DPO paper (Sun et al., arXiv 2506.19780); CODE: commits of its official repository
(yuhui15/Multi-Preference-Lambda-weighted-DPO); "raypo's choice": neither specifies it.

================== ===========================================================================================
schedule           lambda
================== ===========================================================================================
fixed              ``weights`` (default 1/m each; CODE e7b383e..8c84345 and f81818f)
uniform            Dirichlet(1_m), truly uniform on the simplex (PAPER; normalised Exp(1) draws)
dirichlet          Dirichlet(alpha)
normalized_uniform u ~ U[0, 1)^m, lambda = u / sum u (CODE 8c2749c..e7b383e; *not* uniform on the simplex)
gaussian           z ~ N(mean, std^2 I) (default mean 1/m, std 1/m), mapped to the simplex by ``clip``
                   (max(z, 0) renormalised, redrawn if all <= 0), ``abs`` (|z| renormalised), ``softmax`` or
                   ``project`` (the Euclidean projection onto the simplex; with mean 0, std 1: the paper's
                   "standard normal, projected to the simplex"); PAPER only, no code: the rule is raypo's
                   choice
onehot             e_k, with k = ``onehot_index`` or uniformly random ("unimodal", PAPER; CODE Dec 2025)
cycle              e_1, e_2, ..., e_m, e_1, ... in order (deterministic)
table              weighted rows, sampled exactly like the official ``TableLambdaScheduler`` (python
                   ``random.Random(seed)``; first row with r <= cumsum(p / sum p)); default: the HEAD table
learned            the paper's polynomial scheduler (Appendix D): fit degree-p
                   monomials of lambda to (lambda, score) points by minimum-norm least squares, take K
                   candidates (Dirichlet(alpha) draws or a simplex grid), sample a candidate with
                   probability softmax(tau * f) (tau = 100)
================== ===========================================================================================

Every schedule is built from a :class:`LambdaConfig`, is seeded, returns ``sample(batch_size) ->
Tensor[B, m]`` (``per="prompt"``: one draw per prompt, the raypo default; ``per="batch"``: one draw shared by
the batch, the official behaviour), and has ``state_dict()`` / ``load_state_dict()`` (plain python values) so
that a resumed run continues the same sequence.

Random numbers come from ``numpy.random.Generator(PCG64(seed))`` (Dirichlet and Gamma draws with a
serialisable state), except ``table``, which uses python's ``random.Random`` to reproduce the official code.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from raypo.config import LambdaConfig, LearnedLambdaConfig
from raypo.config.validate import GAUSSIAN_NEGATIVES
from raypo.train.learned_lambda import LearnedFit, fit_learned, poly_features, read_results_table

__all__ = [
    "SCHEDULES",
    "OFFICIAL_TABLE_HEAD",
    "OFFICIAL_TABLE_PAPER",
    "LambdaSchedule",
    "FixedSchedule",
    "DirichletSchedule",
    "NormalizedUniformSchedule",
    "GaussianSchedule",
    "OneHotSchedule",
    "CycleSchedule",
    "TableSchedule",
    "PolynomialLambdaScheduler",
    "build_lambda_schedule",
    "table_sample_index",
    "from_results_table",
]

SCHEDULES = ("fixed", "uniform", "dirichlet", "normalized_uniform", "gaussian", "onehot", "cycle", "table",
             "learned")

#: HEAD ``TableLambdaScheduler.TABLE`` (yuhui15/Multi-Preference-Lambda-weighted-DPO 2fb13f7; test vector
#: ``lambda_table_scheduler_HEAD_2fb13f7_seed42``): rows (lambda, p). Rows sum to 0.999-1.001 (3 decimals).
OFFICIAL_TABLE_HEAD: tuple[tuple[tuple[float, ...], float], ...] = (
    ((0.469, 0.092, 0.198, 0.242), 0.102),
    ((0.013, 0.341, 0.623, 0.022), 0.094),
    ((0.193, 0.321, 0.345, 0.141), 0.108),
    ((0.445, 0.128, 0.207, 0.221), 0.103),
    ((0.562, 0.069, 0.238, 0.131), 0.097),
    ((0.105, 0.161, 0.425, 0.310), 0.105),
    ((0.110, 0.011, 0.465, 0.415), 0.098),
    ((0.163, 0.112, 0.616, 0.109), 0.100),
    ((0.018, 0.447, 0.527, 0.008), 0.095),
    ((0.213, 0.513, 0.082, 0.193), 0.098),
)

#: The first table of the repository history (commit 8c84345), whose comment says the
#: probabilities are "the softmax values shown in the paper table".
OFFICIAL_TABLE_PAPER: tuple[tuple[tuple[float, ...], float], ...] = (
    ((0.212, 0.334, 0.245, 0.209), 0.095),
    ((0.126, 0.237, 0.131, 0.507), 0.075),
    ((0.542, 0.079, 0.256, 0.123), 0.117),
    ((0.233, 0.721, 0.020, 0.025), 0.185),
    ((0.004, 0.334, 0.281, 0.381), 0.067),
    ((0.320, 0.069, 0.513, 0.099), 0.082),
    ((0.236, 0.155, 0.358, 0.251), 0.093),
    ((0.141, 0.110, 0.701, 0.048), 0.110),
    ((0.070, 0.198, 0.388, 0.344), 0.081),
    ((0.090, 0.139, 0.306, 0.465), 0.095),
)


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


class LambdaSchedule:
    """Base: seeded draws of lambda in the simplex, per prompt or per batch, resumable."""

    name = "base"

    def __init__(self, cfg: LambdaConfig, num_dims: Optional[int] = None) -> None:
        num_dims = _num_dims_of(cfg) if num_dims is None else num_dims
        if not (isinstance(num_dims, int) and num_dims >= 1):
            raise ValueError(f"lambda num_dims={num_dims!r} must be an int >= 1")
        self.cfg = cfg
        self.m = num_dims
        self.rng = np.random.Generator(np.random.PCG64(cfg.seed))
        self.num_samples = 0  # sample() calls so far

    def _draw(self, n: int) -> np.ndarray:
        """``n`` independent draws, float64 ``[n, m]``."""
        raise NotImplementedError

    def sample(self, batch_size: int, dtype: torch.dtype = torch.float32,
               device: Optional[Union[str, torch.device]] = None) -> Tensor:
        """``[batch_size, m]`` lambdas: a draw per row (``per="prompt"``) or one shared draw (``"batch"``)."""
        if batch_size < 1:
            raise ValueError(f"sample(batch_size={batch_size}) needs batch_size >= 1")
        if self.cfg.per == "batch":
            rows = np.repeat(self._draw(1), batch_size, axis=0)
        else:
            rows = self._draw(batch_size)
        self.num_samples += 1
        return torch.as_tensor(rows, dtype=dtype, device=device)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.name, "num_samples": self.num_samples, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("schedule") != self.name:
            raise ValueError(f"lambda schedule state is for {state.get('schedule')!r}, not {self.name!r}")
        self.num_samples = int(state["num_samples"])
        self.rng.bit_generator.state = _to_rng_state(state["rng"])


def _to_rng_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """numpy bit-generator state from a possibly JSON round-tripped dict."""
    out = dict(state)
    out["state"] = {k: int(v) for k, v in dict(state["state"]).items()}
    out["has_uint32"] = int(state["has_uint32"])
    out["uinteger"] = int(state["uinteger"])
    return out


# --------------------------------------------------------------------------------------------------
# Simple schedules
# --------------------------------------------------------------------------------------------------


class FixedSchedule(LambdaSchedule):
    """``fixed``: lambda = ``weights`` every time (default 1/m, the official code's fixed uniform)."""

    name = "fixed"

    def __init__(self, cfg: LambdaConfig, num_dims: Optional[int] = None) -> None:
        super().__init__(cfg, num_dims)
        w = cfg.weights if cfg.weights is not None else [1.0 / self.m] * self.m
        self.weights = np.asarray(w, dtype=np.float64)
        if self.weights.shape != (self.m,) or (self.weights < 0).any():
            raise ValueError(f"fixed lambda weights={w} must be {self.m} non-negative numbers")

    def _draw(self, n: int) -> np.ndarray:
        return np.tile(self.weights, (n, 1))


class DirichletSchedule(LambdaSchedule):
    """``uniform`` = Dirichlet(1_m) (truly uniform on the simplex) and ``dirichlet`` = Dirichlet(alpha)."""

    def __init__(self, cfg: LambdaConfig, num_dims: Optional[int] = None) -> None:
        super().__init__(cfg, num_dims)
        self.name = cfg.schedule
        a = 1.0 if cfg.schedule == "uniform" or cfg.alpha is None else cfg.alpha
        alpha = np.broadcast_to(np.asarray(a, dtype=np.float64), (self.m,)).copy()
        if (alpha <= 0).any():
            raise ValueError(f"dirichlet lambda alpha={a} must be > 0")
        self.alpha = alpha

    def _draw(self, n: int) -> np.ndarray:
        return self.rng.dirichlet(self.alpha, size=n)


class NormalizedUniformSchedule(LambdaSchedule):
    """``normalized_uniform``: u ~ U[0, 1)^m, lambda = u / sum(u) (official code 8c2749c..e7b383e).

    Not uniform on the simplex: for m = 4, Var(lambda_1) = 0.0196 vs 0.0375 for Dirichlet(1).
    """

    name = "normalized_uniform"

    def _draw(self, n: int) -> np.ndarray:
        u = self.rng.random((n, self.m))
        while (u.sum(-1) == 0).any():  # probability 0, kept for exactness
            u = self.rng.random((n, self.m))
        return u / u.sum(-1, keepdims=True)


class GaussianSchedule(LambdaSchedule):
    """``gaussian``: z ~ N(mean, std^2 I) mapped to the simplex (PAPER; the rule for negatives is raypo's
    choice).

    ``clip``: max(z, 0) / sum, redrawing a row whose entries are all <= 0; ``abs``: |z| / sum (redraw if 0);
    ``softmax``: softmax(z); ``project``: argmin_{lambda in simplex} ||lambda - z||
    (:func:`project_to_simplex`).
    Defaults mean = 1/m, std = 1/m; mean 0, std 1, ``project`` is the paper's "standard normal, projected to
    the simplex".
    """

    name = "gaussian"

    def __init__(self, cfg: LambdaConfig, num_dims: Optional[int] = None) -> None:
        super().__init__(cfg, num_dims)
        mean = cfg.gaussian_mean if cfg.gaussian_mean is not None else [1.0 / self.m] * self.m
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = float(cfg.gaussian_std if cfg.gaussian_std is not None else 1.0 / self.m)
        if self.mean.shape != (self.m,) or not self.std > 0:
            raise ValueError(f"gaussian lambda needs {self.m} means and std > 0, got {mean}, {self.std}")
        self.negatives = cfg.gaussian_negatives

    def _one(self) -> np.ndarray:
        while True:
            z = self.rng.normal(self.mean, self.std)
            if self.negatives == "softmax":
                e = np.exp(z - z.max())
                return e / e.sum()
            if self.negatives == "project":
                return project_to_simplex(z[None])[0]
            v = np.maximum(z, 0.0) if self.negatives == "clip" else np.abs(z)
            if v.sum() > 0:
                return v / v.sum()

    def _draw(self, n: int) -> np.ndarray:
        return np.stack([self._one() for _ in range(n)])


def project_to_simplex(z: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``z [n, m]`` onto the simplex: ``max(z - theta, 0)`` with the
    theta that makes the row sum 1 (sort-based, exact; Held, Wolfe & Crowder 1974, Duchi et al. 2008)."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    u = -np.sort(-z, axis=1)  # descending
    css = np.cumsum(u, axis=1) - 1.0
    k = np.arange(1, z.shape[1] + 1)
    rho = (u - css / k > 0).sum(axis=1)  # the condition holds for a prefix of the sorted entries
    theta = css[np.arange(len(z)), rho - 1] / rho
    return np.maximum(z - theta[:, None], 0.0)


class OneHotSchedule(LambdaSchedule):
    """``onehot``: e_k with k = ``onehot_index`` (fixed) or uniformly random per draw."""

    name = "onehot"

    def __init__(self, cfg: LambdaConfig, num_dims: Optional[int] = None) -> None:
        super().__init__(cfg, num_dims)
        if cfg.onehot_index is not None and not 0 <= cfg.onehot_index < self.m:
            raise ValueError(f"onehot_index={cfg.onehot_index} must be in [0, {self.m})")
        self.index = cfg.onehot_index

    def _draw(self, n: int) -> np.ndarray:
        k = np.full(n, self.index) if self.index is not None else self.rng.integers(0, self.m, size=n)
        return np.eye(self.m)[k]


class CycleSchedule(LambdaSchedule):
    """``cycle``: e_1, e_2, ..., e_m, e_1, ... one per draw, in order (deterministic)."""

    name = "cycle"

    def __init__(self, cfg: LambdaConfig, num_dims: Optional[int] = None) -> None:
        super().__init__(cfg, num_dims)
        self.position = 0

    def _draw(self, n: int) -> np.ndarray:
        k = (self.position + np.arange(n)) % self.m
        self.position += n
        return np.eye(self.m)[k]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.position = int(state["position"])


# --------------------------------------------------------------------------------------------------
# Table schedule (official TableLambdaScheduler)
# --------------------------------------------------------------------------------------------------


def table_sample_index(rand: random.Random, probs: Sequence[float]) -> int:
    """One draw of the official ``TableLambdaScheduler.sample``, as a row index.

    ``r = rand.random()``; probabilities are normalised by their python ``sum``; the chosen row is the first
    with ``r <= cum`` where ``cum`` accumulates left to right in python floats; the last row if none.
    """
    total = sum(probs)
    normed = [p / total for p in probs]
    r = rand.random()
    cum = 0.0
    for i, p in enumerate(normed):
        cum += p
        if r <= cum:
            return i
    return len(normed) - 1


class TableSchedule(LambdaSchedule):
    """``table``: weighted rows, sampled exactly like the official ``TableLambdaScheduler`` (python
    ``random.Random(seed)``; the official seed is 42). Default table: :data:`OFFICIAL_TABLE_HEAD`."""

    name = "table"

    def __init__(self, cfg: LambdaConfig, num_dims: Optional[int] = None) -> None:
        super().__init__(cfg, num_dims)
        if cfg.table is None:
            rows = [list(r) for r, _ in OFFICIAL_TABLE_HEAD]
            probs = [p for _, p in OFFICIAL_TABLE_HEAD] if cfg.table_probs is None else list(cfg.table_probs)
        else:
            rows = [list(r) for r in cfg.table]
            probs = [1.0] * len(rows) if cfg.table_probs is None else list(cfg.table_probs)
        if not rows or any(len(r) != self.m for r in rows):
            raise ValueError(f"lambda table rows must each have num_dims = {self.m} entries")
        if len(probs) != len(rows) or any(p < 0 for p in probs) or sum(probs) <= 0:
            raise ValueError(
                f"lambda table_probs must be {len(rows)} non-negative weights with a positive sum")
        self.rows = np.asarray(rows, dtype=np.float64)
        self.probs = [float(p) for p in probs]
        self.rand = random.Random(cfg.seed)
        self.last_indices: list[int] = []

    def sample_index(self) -> int:
        return table_sample_index(self.rand, self.probs)

    def _draw(self, n: int) -> np.ndarray:
        self.last_indices = [self.sample_index() for _ in range(n)]
        return self.rows[self.last_indices]

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rand.getstate()
        return {"schedule": self.name, "num_samples": self.num_samples,
                "py_random": [version, list(internal), gauss]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("schedule") != self.name:
            raise ValueError(f"lambda schedule state is for {state.get('schedule')!r}, not {self.name!r}")
        self.num_samples = int(state["num_samples"])
        version, internal, gauss = state["py_random"]
        self.rand.setstate((int(version), tuple(int(x) for x in internal), gauss))


# --------------------------------------------------------------------------------------------------
# Learned polynomial scheduler (lambda-DPO paper, Appendix D)
# --------------------------------------------------------------------------------------------------


class PolynomialLambdaScheduler(LambdaSchedule):
    """``learned``: the lambda-DPO paper's polynomial lambda scheduler (Appendix D; no commit of the
    official code has it; docs/loss_reference.md §3.5).

    1. probe trainings with fixed lambda_i give points (lambda_i, y_i), e.g. a ``raypo tune`` sweep;
    2. features phi(lambda) = all monomials of total degree <= p (:func:`monomial_exponents`; 15 for m = 4,
       p = 2);
    3. w = minimum-norm least squares fit of the scores (:func:`fit_poly_scheduler`; with fewer points than
       features it interpolates them, as gradient descent from w = 0 does);
    4. candidates (D.3): K draws of Dirichlet(alpha), seeded by ``learned.seed``, or the simplex grid;
    5. f_j = phi(c_j) w, p_j = exp(tau f_j) / sum_l exp(tau f_l) (D.4), tau = 100 by default (the paper's);
    6. each draw picks a candidate with probability p.

    ``raypo lambdas fit`` prints the same fit (:attr:`fit`) from a results table.
    """

    name = "learned"

    def __init__(self, cfg: LambdaConfig, num_dims: Optional[int] = None,
                 points: Optional[Sequence[tuple[Sequence[float], float]]] = None) -> None:
        super().__init__(cfg, num_dims)
        learned = cfg.learned
        pts = points if points is not None else learned.points
        if pts is None and learned.results_path is not None:
            pts = read_results_table(learned.results_path, _lambda_columns(learned, self.m),
                                     learned.score_column)
        if not pts:
            raise ValueError(
                "learned lambda schedule needs (lambda, score) points: set points or results_path")
        lam = np.asarray([list(p[0]) for p in pts], dtype=np.float64)
        if lam.shape[1] != self.m:
            raise ValueError(f"learned lambda points have {lam.shape[1]} dimensions, num_dims is {self.m}")
        self.points_lambda = lam
        self.points_score = np.asarray([float(p[1]) for p in pts], dtype=np.float64)
        self.fit: LearnedFit = fit_learned(lam, self.points_score, learned)
        self.weights, self.candidates = self.fit.weights, self.fit.candidates
        self.a_hat, self.probs = self.fit.f, self.fit.p
        self.last_indices: list[int] = []

    def predict(self, lam: Union[np.ndarray, Sequence[Sequence[float]]]) -> np.ndarray:
        """The fitted polynomial f(lambda) at each row of ``lam``."""
        return poly_features(lam, self.cfg.learned.degree) @ self.weights

    def _draw(self, n: int) -> np.ndarray:
        idx = self.rng.choice(len(self.probs), size=n, p=self.probs)
        self.last_indices = [int(i) for i in idx]
        return self.candidates[idx]

    def state_dict(self) -> dict[str, Any]:
        # The fitted table is stored so a resumed run keeps sampling the same candidates even if the
        # points file changed since.
        return {**super().state_dict(), "candidates": self.candidates.tolist(), "a_hat": self.a_hat.tolist(),
                "probs": self.probs.tolist(), "weights": self.weights.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.candidates = np.asarray(state["candidates"], dtype=np.float64)
        self.a_hat = np.asarray(state["a_hat"], dtype=np.float64)
        self.probs = np.asarray(state["probs"], dtype=np.float64)
        self.weights = np.asarray(state["weights"], dtype=np.float64)


def _lambda_columns(learned: LearnedLambdaConfig, num_dims: int) -> list[str]:
    if learned.lambda_columns:
        return list(learned.lambda_columns)
    return [f"lambda_{k}" for k in range(num_dims)]


def from_results_table(
    path_or_rows: Union[str, Path, Iterable[Mapping[str, Any]]],
    lambda_columns: Sequence[str],
    score_column: str,
    *,
    seed: int = 0,
    per: str = "prompt",
    **learned: Any,
) -> PolynomialLambdaScheduler:
    """A fitted :class:`PolynomialLambdaScheduler` from a results table (see :func:`read_results_table`).

    ``learned`` sets the other :class:`~raypo.config.LearnedLambdaConfig` fields (degree, tau, candidates,
    num_candidates, dirichlet_alpha, grid_resolution, seed of the candidates); m is ``len(lambda_columns)``;
    ``seed`` is the lambda stream's (``lambdas.seed``).
    """
    points = read_results_table(path_or_rows, lambda_columns, score_column)
    cfg = LambdaConfig(schedule="learned", seed=seed, per=per, learned=LearnedLambdaConfig(
        lambda_columns=list(lambda_columns), score_column=score_column, **learned))
    return PolynomialLambdaScheduler(cfg, len(lambda_columns), points=points)


_CLASSES: dict[str, type[LambdaSchedule]] = {
    "fixed": FixedSchedule,
    "uniform": DirichletSchedule,
    "dirichlet": DirichletSchedule,
    "normalized_uniform": NormalizedUniformSchedule,
    "gaussian": GaussianSchedule,
    "onehot": OneHotSchedule,
    "cycle": CycleSchedule,
    "table": TableSchedule,
    "learned": PolynomialLambdaScheduler,
}


def _as_config(cfg: Union[LambdaConfig, Mapping[str, Any]]) -> LambdaConfig:
    """A :class:`~raypo.config.LambdaConfig`, or the same keys as a mapping (``learned`` nested)."""
    if isinstance(cfg, LambdaConfig):
        return cfg
    raw = dict(cfg)
    learned = raw.pop("learned", None) or {}
    return LambdaConfig(**raw, learned=learned if isinstance(learned, LearnedLambdaConfig)
                        else LearnedLambdaConfig(**dict(learned)))


def _num_dims_of(cfg: LambdaConfig) -> int:
    """m from the first configured per-dimension vector; 4 (UltraFeedback's dimensions) otherwise."""
    for vector in (cfg.weights, cfg.alpha if isinstance(cfg.alpha, (list, tuple)) else None,
                   cfg.gaussian_mean, cfg.table[0] if cfg.table else None):
        if vector is not None:
            return len(vector)
    return 4


def build_lambda_schedule(cfg: Union[LambdaConfig, Mapping[str, Any]],
                          num_dims: Optional[int] = None) -> LambdaSchedule:
    """The schedule ``cfg`` describes, drawing lambdas of ``num_dims`` entries (e.g. ``len(data.dimensions)``;
    None: the length of the configured weights / alpha / mean / table rows, else 4)."""
    cfg = _as_config(cfg)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"lambda schedule={cfg.schedule!r} is not one of {SCHEDULES}")
    if cfg.per not in ("prompt", "batch"):
        raise ValueError(f"lambda per={cfg.per!r} must be 'prompt' or 'batch'")
    if cfg.gaussian_negatives not in GAUSSIAN_NEGATIVES:
        raise ValueError(f"lambda gaussian_negatives={cfg.gaussian_negatives!r} is not one of "
                         f"{', '.join(GAUSSIAN_NEGATIVES)}")
    return _CLASSES[cfg.schedule](cfg, num_dims)
