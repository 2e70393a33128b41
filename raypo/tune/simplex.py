"""Fixed lambdas on the simplex for a lambda sweep (the ``simplex`` sampler of :mod:`raypo.tune.space`).

A grid of lambda vectors for ``lambdas.schedule: fixed``: the m one-hot vectors e_1..e_m, the uniform vector
(1/m, ..., 1/m) and ``num`` seeded Dirichlet(``concentration``) draws, where m is ``simplex.dims``, else
``len(data.dimensions)``, else 4 for ``synthetic://`` data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from raypo.config import RaypoConfig
from raypo.errors import did_you_mean

SIMPLEX_OPTIONS = ("num", "include_onehots", "include_uniform", "dims", "concentration", "seed")

Points = tuple[tuple[float, ...], ...]


def is_number(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def simplex_points(num_dims: int, *, num: int = 0, include_onehots: bool = True, include_uniform: bool = True,
                   concentration: float = 1.0, seed: int = 0) -> list[list[float]]:
    """Fixed lambdas on the simplex: the one-hot vectors e_1..e_m, the uniform vector (1/m, ..., 1/m) and
    ``num`` seeded Dirichlet(``concentration``) draws, rounded to 4 decimals (rows sum to 1 within 5e-4)."""
    m = num_dims
    points: list[list[float]] = []
    if include_onehots:
        points += [[1.0 if j == k else 0.0 for j in range(m)] for k in range(m)]
    if include_uniform:
        points.append([round(1.0 / m, 4)] * m)
    rng = np.random.Generator(np.random.PCG64(seed))
    for row in rng.dirichlet(np.full(m, float(concentration)), size=num) if num else []:
        points.append([round(float(x), 4) for x in row])
    return points


def _simplex_num_dims(opts: Mapping[str, Any], cfg: RaypoConfig) -> Optional[int]:
    if opts.get("dims") is not None:
        return int(opts["dims"])
    if cfg.data.dimensions:
        return len(cfg.data.dimensions)
    from raypo.data.synthetic import is_synthetic_uri, synthetic_dimensions

    if is_synthetic_uri(cfg.data.train_path):
        return len(synthetic_dimensions(cfg.data.train_path))
    return None


def parse_simplex(where: str, opts: Any, cfg: RaypoConfig) -> tuple[Points, list[str]]:
    if opts is None:
        opts = {}
    if not isinstance(opts, Mapping):
        return (), [f"{where}={opts!r} must be a mapping of {', '.join(SIMPLEX_OPTIONS)}"]
    problems = [f"{where}: unknown option '{k}': {did_you_mean(str(k), list(SIMPLEX_OPTIONS))}"
                for k in opts if k not in SIMPLEX_OPTIONS]
    m = _simplex_num_dims(opts, cfg)
    if m is None:
        problems.append(f"{where}: the number of preference dimensions is unknown; give simplex.dims "
                        "(e.g. 4) or set data.dimensions")
    elif m < 2:
        problems.append(f"{where}: dims={m} must be >= 2")
    if cfg.data.dimensions and opts.get("dims") is not None and int(opts["dims"]) != len(cfg.data.dimensions):
        problems.append(f"{where}: dims={opts['dims']} but data.dimensions has {len(cfg.data.dimensions)} "
                        "entries; drop simplex.dims")
    num = opts.get("num", 0)
    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
        problems.append(f"{where}: num={num!r} must be an integer >= 0 (Dirichlet draws)")
    conc = opts.get("concentration", 1.0)
    if not is_number(conc) or conc <= 0:
        problems.append(f"{where}: concentration={conc!r} must be > 0 (1 = uniform on the simplex)")
    for flag in ("include_onehots", "include_uniform"):
        if not isinstance(opts.get(flag, True), bool):
            problems.append(f"{where}: {flag}={opts[flag]!r} must be true or false")
    if problems:
        return (), problems
    points = simplex_points(m, num=num, include_onehots=opts.get("include_onehots", True),
                            include_uniform=opts.get("include_uniform", True), concentration=float(conc),
                            seed=int(opts.get("seed", 0)))
    if not points:
        return (), [f"{where}: the grid is empty; set num > 0 or include_onehots/include_uniform: true"]
    return tuple(tuple(p) for p in points), []
