"""MallowsPO's dispersion scale c, calibrated from the reference entropies (docs/losses.md "MallowsPO
dispersion"; docs/loss_reference.md §4.3).

The MallowsPO paper sets c so that the dataset mean of phi(x) = -c log Hbar(x) is 1:

    c = 1 / mean_x[ -log Hbar(x) ],   Hbar(x) = (Hbar(y_w) + Hbar(y_l)) / 2

over the training prompts, each with the pair its loss trains on (the chosen and rejected responses that
:func:`raypo.losses.pairwise.pair_labels` picks from the labels, as the loss does; with per-dimension
ratings under ``loss.score_reduction=lambda`` the pair varies with each lambda draw, so the calibration
uses the mean reduction's pair). ``loss.dispersion_c`` is ``auto`` (this calibration, the default) or a
number (used as is; the statistics are still reported when the entropies are at hand).

When. With ``train.reference: precomputed`` the reference stage writes ``ref_entropy`` and the calibration
reads it. With ``train.reference: online`` and ``auto`` there are no entropies before training, so the
driver runs the reference stage once over the training split for them (the cost of one precomputed stage,
repeated on every start; a number in ``loss.dispersion_c``, e.g. the value an earlier run printed, skips
it, and so does ``train.reference: precomputed``, whose cache serves later runs).

Missing entropies. A usable prompt whose pair lacks an entropy (NaN, or 0 for a response without scored
tokens) is an error under ``loss.params.missing_entropy=error`` (the default, raised here on the driver
before training); under ``mean`` it is counted, left out of the mean, and gets phi = 1 in the loss.

Record. :func:`calibrated_config` puts the value into the run's config (``config.yaml`` and the workers'
``loss.dispersion_c``), writes ``dispersion.json`` beside the run's metrics (copied into
``raypo_summary.json``), prints it, and, when the entropies came from the reference cache, writes it next
to the cache entry (``<entry>/dispersion/<settings digest>.json``; a record, not a cached value: c is
recomputed on every run because the pair depends on the labels, which are not part of the cache key).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import torch

from raypo.config import RaypoConfig
from raypo.errors import RunError

RECORD_NAME = "dispersion.json"


@dataclass(frozen=True)
class DispersionCalibration:
    """MallowsPO's c for a run and the statistics behind it.

    Attributes:
        c: the scale in phi(x) = -c log Hbar(x).
        source: ``auto`` (calibrated here) or ``config`` (``loss.dispersion_c`` was a number).
        num_prompts: prompts in the mean (a usable pair with both entropies).
        num_missing: usable prompts whose pair lacks an entropy (an error under missing_entropy=error).
        num_skipped: prompts without a usable pair (tied or fewer than two valid responses).
        mean_neg_log_hbar: mean of -log Hbar(x) over the num_prompts prompts (None when there are none).
        mean_phi: the dataset mean of phi under c (1 when calibrated).
    """

    c: float
    source: str
    num_prompts: int = 0
    num_missing: int = 0
    num_skipped: int = 0
    mean_neg_log_hbar: Optional[float] = None
    mean_phi: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.mean_neg_log_hbar is None:
            return f"raypo: MallowsPO dispersion scale c = {self.c:.6g} (loss.dispersion_c, not calibrated)"
        how = ("calibrated so that the dataset mean of phi is 1" if self.source == "auto"
               else f"loss.dispersion_c; dataset mean of phi {self.mean_phi:.4g}")
        line = (f"raypo: MallowsPO dispersion scale c = {self.c:.6g} ({how}: mean -log Hbar = "
                f"{self.mean_neg_log_hbar:.6g} over {self.num_prompts} training prompts")
        if self.num_skipped:
            line += f", {self.num_skipped} without a usable pair"
        if self.num_missing:
            line += f", {self.num_missing} without a reference entropy (phi = 1, missing_entropy=mean)"
        return line + ")"


# ----------------------------------------------------------------------------------------------------
# The pair's Hbar of each prompt, as the loss sees it
# ----------------------------------------------------------------------------------------------------


def _loss_settings(cfg: RaypoConfig) -> tuple[Any, dict[str, Any], Any]:
    """(spec, hyperparameters, label rules) of ``cfg.loss``, as :class:`raypo.train.objective.Objective`."""
    from raypo.losses.registry import get_loss_spec
    from raypo.train.objective import LabelRules

    spec = get_loss_spec(cfg.loss.name)
    hp = spec.resolved({k: v for k, v in cfg.loss.params.items() if k in spec.defaults})
    reduction = "mean" if cfg.loss.score_reduction == "lambda" else cfg.loss.score_reduction
    rules = LabelRules(missing_ratings=cfg.loss.missing_ratings, score_reduction=reduction,
                       lipo_labels=cfg.loss.lipo_labels,
                       lipo_label_temperature=cfg.loss.lipo_label_temperature)
    return spec, hp, rules


def pair_hbar(cfg: RaypoConfig, rows: list[Mapping[str, Any]]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hbar [B] float64, usable [B], missing [B])`` of tokenised rows: each prompt's pair (chosen by the
    loss's pair selection from the labels) and the mean of its two ``ref_entropy`` values.

    Rows need ``ref_entropy`` (one value per response; None = missing) and the label columns (``scores``,
    ``ranks``, ``win_probs``); token ids are not read.
    """
    from raypo.losses.pairwise import pair_labels
    from raypo.model.batch import collate_listwise
    from raypo.train.objective import loss_labels

    spec, hp, rules = _loss_settings(cfg)
    widths = [len(r["ref_entropy"]) if r.get("ref_entropy") is not None else len(r.get("scores") or [])
              for r in rows]
    # token ids are stand-ins (not read); a row without ref_entropy gets all-missing values of its own
    stub = [{**r, "prompt_ids": [0], "response_ids": [[0]] * max(n, 1), "response_masks": None,
             "ref_entropy": r.get("ref_entropy") if r.get("ref_entropy") is not None else [None] * n}
            for r, n in zip(rows, widths)]
    batch = collate_listwise(stub)
    mask = torch.tensor([[i < n for i in range(batch.num_responses)] for n in widths], dtype=torch.bool)
    scores = loss_labels(spec, batch.extras, rules, None, mask)
    w, lo, usable, _ = pair_labels(spec.name, mask, scores, dtype=torch.float64,
                                   temperature=float(hp.get("temperature", 1.0)))
    entropy = batch.extras.get("ref_entropy")
    if entropy is None:  # no row has a response: nothing to read
        entropy = torch.full(mask.shape, math.nan, dtype=torch.float32)
    h = entropy.to(torch.float64)
    h_w = h.gather(1, w.unsqueeze(1)).squeeze(1)
    h_l = h.gather(1, lo.unsqueeze(1)).squeeze(1)
    present = (h_w > 0) & (h_l > 0)
    return 0.5 * (h_w + h_l), usable, usable & ~present


def calibrate_rows(cfg: RaypoConfig, batches: Iterable[list[Mapping[str, Any]]]) -> DispersionCalibration:
    """:class:`DispersionCalibration` over batches of rows (the training split): ``auto`` calibrates c,
    a number is reported with the dataset mean of phi under it. Raises :class:`RunError` for missing
    entropies under ``missing_entropy=error`` and when no prompt has a usable pair."""
    _, hp, _ = _loss_settings(cfg)
    total = 0.0
    used = missing = skipped = 0
    for rows in batches:
        if not rows:
            continue
        hbar, usable, miss = pair_hbar(cfg, rows)
        ok = usable & ~miss
        total += float((-torch.log(hbar[ok])).sum())
        used += int(ok.sum())
        missing += int(miss.sum())
        skipped += int((~usable).sum())
    if missing and hp.get("missing_entropy", "error") == "error":
        raise RunError(
            f"MallowsPO: {missing} of {used + missing} training prompts have no reference entropy for their "
            "chosen or rejected response (NaN, or 0 for a response without scored tokens), so their "
            "dispersion is unknown; recompute the reference stage (train.reference=precomputed), or set "
            "loss.params.missing_entropy=mean to give them phi = 1 (counted)")
    value = cfg.loss.dispersion_c
    if used == 0 or not total > 0:
        if value != "auto":
            return DispersionCalibration(c=float(value), source="config", num_missing=missing,
                                         num_skipped=skipped)
        raise RunError(
            f"MallowsPO: cannot calibrate loss.dispersion_c=auto: {used} training prompts have a usable pair "
            f"with reference entropies (mean -log Hbar = {total / max(used, 1):.3g}, must be > 0); set "
            "loss.dispersion_c to a number, e.g. 0.29 (MallowsPO's value for Llama-3-Instruct on "
            "UltraFeedback)")
    mean = total / used
    c = 1.0 / mean if value == "auto" else float(value)
    return DispersionCalibration(c=c, source="auto" if value == "auto" else "config", num_prompts=used,
                                 num_missing=missing, num_skipped=skipped, mean_neg_log_hbar=mean,
                                 mean_phi=c * mean)


_COLUMNS = ("ref_entropy", "scores", "ranks", "win_probs")


def _dataset_batches(ds, batch_size: int = 1024) -> Iterable[list[dict[str, Any]]]:
    names = [c for c in _COLUMNS if c in ds.schema().names]
    for table in ds.select_columns(names).iter_batches(batch_format="pyarrow", batch_size=batch_size):
        yield table.to_pylist()


def calibrate_dataset(cfg: RaypoConfig, ds) -> DispersionCalibration:
    """:func:`calibrate_rows` over a Ray dataset that carries ``ref_entropy``."""
    return calibrate_rows(cfg, _dataset_batches(ds))


# ----------------------------------------------------------------------------------------------------
# The trainer's hooks
# ----------------------------------------------------------------------------------------------------


def needs_calibration(cfg: RaypoConfig) -> bool:
    from raypo.losses.registry import get_loss_spec

    return get_loss_spec(cfg.loss.name).needs_dispersion


def resolve_dispersion(cfg: RaypoConfig, train_ds, ref_path: str, *, scored: bool
                       ) -> Optional[DispersionCalibration]:
    """The run's :class:`DispersionCalibration` (None when the loss has no dispersion).

    ``scored``: ``train_ds`` carries the reference entropies (the precomputed stage ran). Otherwise, under
    ``auto``, the reference stage runs once here for them (docstring of this module); a number is used as
    is. Prints the value; records it next to the reference-cache entry the entropies came from.
    """
    if not needs_calibration(cfg):
        return None
    value = cfg.loss.dispersion_c
    source_ds = train_ds
    if not scored:
        if value != "auto":
            calibration = DispersionCalibration(c=float(value), source="config")
            print(calibration.describe(), flush=True)
            return calibration
        print(f"raypo: loss.dispersion_c=auto with train.reference={cfg.train.reference}: scoring the "
              "training split with the reference once for its entropies, to calibrate MallowsPO's c (set "
              "loss.dispersion_c to a number to skip this)", flush=True)
        from raypo.train.reference import add_reference_logprobs

        source_ds = add_reference_logprobs(train_ds, cfg, ref_path, with_entropy=True)
    calibration = calibrate_dataset(cfg, source_ds)
    print(calibration.describe(), flush=True)
    _record_in_cache(cfg, source_ds, calibration)
    return calibration


def _settings_digest(cfg: RaypoConfig) -> str:
    """What decides each prompt's pair and phi besides the entropies: the loss and its label rules."""
    _, hp, rules = _loss_settings(cfg)
    blob = json.dumps({"loss": cfg.loss.name, "temperature": hp.get("temperature", 1.0),
                       "missing_entropy": hp.get("missing_entropy"), "rules": asdict(rules)},
                      sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def _record_in_cache(cfg: RaypoConfig, ds, calibration: DispersionCalibration) -> None:
    from raypo.train.reference_cache import cache_entry_of, write_entry_record

    entry = cache_entry_of(ds)
    if entry is not None:
        write_entry_record(entry, f"dispersion/{_settings_digest(cfg)}.json",
                           {"loss": cfg.loss.name, "dispersion_c": cfg.loss.dispersion_c,
                            **calibration.to_dict()}, cfg.data.s3)


def calibrated_config(cfg: RaypoConfig, calibration: Optional[DispersionCalibration], train_ds, ref_path: str,
                      run_dir: Optional[str] = None) -> RaypoConfig:
    """``cfg`` with ``loss.dispersion_c`` the run's number (calibrating here when no calibration came
    with the datasets), and ``dispersion.json`` in ``run_dir``. Unchanged when the loss has none."""
    if not needs_calibration(cfg):
        return cfg
    if calibration is None:
        scored = cfg.train.reference == "precomputed"
        calibration = resolve_dispersion(cfg, train_ds, ref_path, scored=scored)
    if run_dir is not None:
        write_record(run_dir, calibration)
    return replace(cfg, loss=replace(cfg.loss, dispersion_c=float(calibration.c)))


def write_record(run_dir: str, calibration: DispersionCalibration) -> None:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, RECORD_NAME)
    with open(f"{path}.tmp", "w") as f:
        json.dump(calibration.to_dict(), f, indent=1)
    os.replace(f"{path}.tmp", path)


def read_record(run_dir: str) -> Optional[dict[str, Any]]:
    """The run's ``dispersion.json`` (None when the run has none)."""
    path = os.path.join(run_dir, RECORD_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
