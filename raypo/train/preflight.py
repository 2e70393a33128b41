"""Driver-side checks before Ray starts: what would otherwise fail on the workers a minute later.

Each is a config problem (:class:`~raypo.errors.ConfigError`, exit 2) naming the key, the value and the
fix, and all are reported at once: a data or model path that does not exist (local paths; ``s3://``
with one cheap ``exists`` call), and lambda settings whose length does not match the data's dimensions
(``data.dimensions``, a known format's own, synthetic data's, or the Parquet schema metadata).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from raypo.config import RaypoConfig
from raypo.errors import ConfigError


def _missing(path: str, s3_cfg: Any) -> Optional[bool]:
    """True/False whether ``path`` is absent; None when it cannot be told cheaply (a hub id, no access)."""
    from raypo.storage import fsspec_for

    if path.startswith("s3://"):
        try:
            return not fsspec_for(path, s3_cfg).exists(path)
        except Exception:  # no credentials or no network here: the workers will say
            return None
    if "://" in path:
        return None
    return not os.path.exists(os.path.expanduser(path))


def path_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    s3 = cfg.data.s3
    for key in ("train_path", "eval_path"):
        value = getattr(cfg.data, key)
        if isinstance(value, str) and _missing(value, s3):
            p.append(f"data.{key}={value!r} does not exist; fix the path (a Parquet/JSONL file or directory, "
                     "local or s3://, or synthetic://default)")
    for key in ("path", "reference_path"):
        value = getattr(cfg.model, key)
        if not value or str(value).startswith("tiny://"):
            continue
        value = str(value)
        if value.startswith("smollm2://"):  # the extra's package must be installed (no download)
            from raypo.model.gguf_source import shipped_gguf_path

            try:
                shipped_gguf_path(value)
            except (ModuleNotFoundError, ValueError) as err:
                p.append(f"model.{key}: {err}")
            continue
        local_like = value.startswith(("/", ".", "~")) or value.count("/") > 1
        if (value.startswith("s3://") or local_like) and _missing(value, s3):
            p.append(f"model.{key}={value!r} does not exist; give a local model directory, s3://..., "
                     "tiny://llama or a Hugging Face model id such as org/name")
    return p


def data_dimensions(cfg: RaypoConfig) -> Optional[list[str]]:
    """The dimension names training will see, when cheaply known (None: not known before reading)."""
    from raypo.data.formats import dimensions_for
    from raypo.data.io import read_dimensions
    from raypo.data.pipeline import convert_options
    from raypo.data.synthetic import is_synthetic_uri, synthetic_dimensions

    d = cfg.data
    if d.dimensions:
        return list(d.dimensions)
    path = d.train_path
    if isinstance(path, str) and is_synthetic_uri(path):
        return synthetic_dimensions(path)
    try:
        if d.format != "listwise":
            return dimensions_for(d.format, convert_options(d)) or None
        return read_dimensions(path, d.s3) if isinstance(path, str) else None
    except Exception:  # unreadable here: the pipeline reports it with the data report
        return None


def lambda_problems(cfg: RaypoConfig, dims: Optional[list[str]]) -> list[str]:
    """Lambda vectors must have one entry per dimension (for a loss that weights dimensions)."""
    from raypo.losses.registry import get_loss_spec

    if not dims:
        return []
    try:
        if not get_loss_spec(cfg.loss.name).needs_lambda:
            return []
    except Exception:  # an unknown loss is reported by the config checks
        return []
    la, m = cfg.lambdas, len(dims)
    vectors = {"fixed": ("weights", la.weights), "dirichlet": ("alpha", la.alpha),
               "gaussian": ("gaussian_mean", la.gaussian_mean)}
    p: list[str] = []
    key, value = vectors.get(la.schedule, (None, None))
    if value is not None and len(value) != m:
        p.append(f"lambdas.{key}={list(value)} has {len(value)} entries but the data has {m} dimensions "
                 f"({', '.join(dims)}); give one value per dimension")
    if la.schedule == "table":
        for i, row in enumerate(la.table or []):
            if len(row) != m:
                p.append(f"lambdas.table[{i}]={list(row)} has {len(row)} entries but the data has {m} "
                         f"dimensions ({', '.join(dims)}); give one weight per dimension")
    return p


def preflight(cfg: RaypoConfig) -> None:
    """Raise one :class:`ConfigError` listing every problem found, before any cluster work."""
    problems = path_problems(cfg) + lambda_problems(cfg, data_dimensions(cfg))
    if problems:
        raise ConfigError(problems, source="driver checks")
