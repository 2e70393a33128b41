"""MallowsPO's dispersion scale c (raypo/train/dispersion.py; docs/losses.md "MallowsPO dispersion"):
calibrated so that the dataset mean of phi is 1 over each prompt's own pair, overridden by a number,
recorded with the run and the reference cache; missing entropies are an error or a counted phi = 1."""

from __future__ import annotations

import json
import math

import pytest
import torch

from raypo.config import load_config
from raypo.errors import RunError
from raypo.losses import listwise_loss
from raypo.model.batch import collate_listwise
from raypo.train import dispersion as disp
from raypo.train.objective import Objective
from raypo.train.reference import reference_outputs

D64 = torch.float64


def _cfg(*overrides: str):
    return load_config(None, ["loss.name=mallows_theta", "train.reference=precomputed", *overrides])


def _rows():
    """Rows with per-dimension ratings (2 dims) and per-response entropies; best / worst by mean rating."""
    ratings = [[[1, 1], [5, 5], [3, 3]], [[4, 4], [2, 2], [4, 5], [1, 1]], [[2, 2], [2, 2]],
               [[5, 4], [1, 2]]]
    entropy = [[0.10, 0.02, 0.30], [0.20, 0.05, 0.40, 0.01], [0.3, 0.3], [0.07, 0.15]]
    return [{"prompt_id": f"p{i}", "prompt_ids": [1, 2], "response_ids": [[3]] * len(r),
             "scores": r, "ref_entropy": h} for i, (r, h) in enumerate(zip(ratings, entropy))]


def _pairs():
    """Hbar of each usable prompt's (best, worst) pair, by hand; prompt 2 is tied (skipped)."""
    return [0.5 * (0.02 + 0.10), 0.5 * (0.40 + 0.01), 0.5 * (0.07 + 0.15)]


def test_calibration_makes_the_mean_phi_one_over_each_prompts_pair():
    cal = disp.calibrate_rows(_cfg(), [_rows()[:2], _rows()[2:]])
    neg = [-math.log(h) for h in _pairs()]
    assert cal.source == "auto" and cal.num_prompts == 3 and cal.num_skipped == 1 and cal.num_missing == 0
    assert cal.mean_neg_log_hbar == pytest.approx(sum(neg) / 3, rel=1e-6)  # float32 entropies, as in training
    assert cal.c == pytest.approx(3 / sum(neg), rel=1e-6)
    assert cal.mean_phi == pytest.approx(1.0, rel=1e-12)
    phi = [cal.c * n for n in neg]
    assert sum(phi) / 3 == pytest.approx(1.0, rel=1e-6)
    # not the mean over all N responses
    all_n = [-math.log(sum(r["ref_entropy"]) / len(r["ref_entropy"]))
             for i, r in enumerate(_rows()) if i != 2]
    assert abs(3 / sum(all_n) - cal.c) > 0.01
    assert "calibrated so that the dataset mean of phi is 1" in cal.describe()


def test_a_number_overrides_and_is_reported_with_its_mean_phi():
    cal = disp.calibrate_rows(_cfg("loss.dispersion_c=0.5"), [_rows()])
    neg = [-math.log(h) for h in _pairs()]
    assert cal.source == "config" and cal.c == 0.5
    assert cal.mean_phi == pytest.approx(0.5 * sum(neg) / 3, rel=1e-6)


def test_missing_entropy_is_an_error_or_counted():
    rows = _rows()
    rows[1]["ref_entropy"] = [0.20, 0.05, None, 0.01]  # prompt 1's chosen response (ratings 4, 5)
    with pytest.raises(RunError, match="missing_entropy=mean"):
        disp.calibrate_rows(_cfg(), [rows])
    cal = disp.calibrate_rows(_cfg("loss.params.missing_entropy=mean"), [rows])
    assert cal.num_missing == 1 and cal.num_prompts == 2
    neg = [-math.log(h) for h in (_pairs()[0], _pairs()[2])]
    assert cal.c == pytest.approx(2 / sum(neg), rel=1e-6)
    rows[3]["ref_entropy"] = None  # a row without the column at all: both of its responses missing
    assert disp.calibrate_rows(_cfg("loss.params.missing_entropy=mean"), [rows]).num_missing == 2


def test_calibration_without_a_usable_prompt_names_the_fix():
    rows = [r for r in _rows() if r["prompt_id"] == "p2"]  # tied only
    with pytest.raises(RunError, match="set loss.dispersion_c to a number"):
        disp.calibrate_rows(_cfg(), [rows])


def test_calibrated_config_records_the_value(tmp_path):
    cfg = _cfg()
    cal = disp.calibrate_rows(cfg, [_rows()])
    resolved = disp.calibrated_config(cfg, cal, None, "unused", str(tmp_path))
    assert resolved.loss.dispersion_c == cal.c and cfg.loss.dispersion_c == "auto"
    record = json.loads((tmp_path / disp.RECORD_NAME).read_text())
    assert record["c"] == cal.c and record["num_prompts"] == 3 and record["source"] == "auto"
    assert disp.read_record(str(tmp_path)) == record
    # the objective gets the number as the loss's dispersion_c; an unresolved auto is refused
    assert Objective.from_config(resolved, None).hparams["dispersion_c"] == cal.c
    with pytest.raises(ValueError, match="unresolved"):
        Objective.from_config(cfg, None)
    # a loss without a dispersion is left alone
    plain = load_config(None, ["loss.name=dpo"])
    assert disp.calibrated_config(plain, None, None, "unused", str(tmp_path / "x")) is plain


def test_online_with_a_number_needs_no_reference_pass(capsys):
    cfg = load_config(None, ["loss.name=mallows_phi", "loss.dispersion_c=0.3"])
    cal = disp.resolve_dispersion(cfg, None, "unused", scored=False)
    assert cal.c == 0.3 and cal.source == "config"
    assert "c = 0.3" in capsys.readouterr().out


def _batch(rows):
    scored = []
    for r in rows:
        n = len(r["response_ids"])
        scored.append({**r, "ref_logps": [-1.0 - i for i in range(n)]})
    return collate_listwise(scored)


def test_the_training_path_takes_each_pairs_dispersion():
    cfg = _cfg("loss.dispersion_c=0.4", "loss.params.reference_free=false", "loss.beta=0.5")
    objective = Objective.from_config(cfg, None)
    rows = [r for r in _rows() if r["prompt_id"] != "p2"]
    batch = _batch(rows)
    ref = reference_outputs(objective, None, batch, True, torch.device("cpu"))
    assert ref.dispersion.shape == (3, 4) and ref.dispersion.dtype == D64  # per-response Hbar
    policy = torch.tensor([[-0.5, -2.0, -2.5, 0.0], [-1.0, -1.5, -2.0, -3.5], [-0.2, -2.2, 0.0, 0.0]])
    out = objective.loss(batch, policy, ref.logps, ref.dispersion, None, torch.device("cpu"))
    phi = torch.tensor([-0.4 * math.log(h) for h in _pairs()], dtype=torch.float32)
    want = listwise_loss("mallows_theta", policy, ref.logps, mask=batch.response_mask(),
                         scores=objective.labels(batch, torch.device("cpu")), dispersion=phi, beta=0.5,
                         reference_free=False)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)


def test_the_training_path_never_turns_a_missing_entropy_into_phi_zero():
    rows = [r for r in _rows() if r["prompt_id"] != "p2"]
    rows[1] = {**rows[1], "ref_entropy": [0.20, 0.05, None, 0.01]}
    batch = _batch(rows)
    policy = torch.zeros(3, 4)
    strict = Objective.from_config(_cfg("loss.dispersion_c=0.4"), None)
    ref = reference_outputs(strict, None, batch, True, torch.device("cpu"))
    assert torch.isnan(ref.dispersion[1, 2])
    with pytest.raises(ValueError, match="missing_entropy=mean"):
        strict.loss(batch, policy, ref.logps, ref.dispersion, None, torch.device("cpu"))
    lenient = Objective.from_config(_cfg("loss.dispersion_c=0.4", "loss.params.missing_entropy=mean"), None)
    out = lenient.loss(batch, policy, ref.logps, ref.dispersion, None, torch.device("cpu"))
    assert out.metrics["num_missing_entropy"].item() == 1.0 and out.denominator.item() == 3.0
    # the training metrics carry the count, as a fraction of the step's prompts
    from raypo.train.metrics import batch_metric_sums, finalize

    sums = batch_metric_sums(lenient, batch, out, policy, ref, "train/", torch.device("cpu"))
    logged = finalize(sums, "train/")
    assert logged["train/missing_entropy_prompt_fraction"] == pytest.approx(1 / 3)


@pytest.mark.integration
def test_auto_calibrates_from_the_reference_stage_and_records_in_the_cache(ray_cluster, tiny_model_dir,
                                                                           tokenized_rows, tmp_path):
    """Precomputed through the reference cache: c makes the mean phi over the pairs 1 and is written next
    to the cache entry. Online with auto: one reference pass over the training split gives the same c."""
    import pyarrow as pa
    import ray.data

    from raypo.data.schema import tokenized_schema
    from raypo.train.reference_cache import cache_entry_of, cached_reference_logprobs

    rows = tokenized_rows[0][:6]
    cache = tmp_path / "cache"
    cfg = load_config(None, ["loss.name=mallows_theta", "model.dtype=float32", "train.reference=precomputed"])
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=tokenized_schema()))
    scored = cached_reference_logprobs(ds, cfg, str(tiny_model_dir), str(cache))
    assert cache_entry_of(scored) is not None and cache_entry_of(ds) is None
    cal = disp.resolve_dispersion(cfg, scored, str(tiny_model_dir), scored=True)
    records = list(cache.glob("*/dispersion/*.json"))
    assert len(records) == 1
    stored = json.loads(records[0].read_text())
    assert stored["c"] == cal.c and stored["loss"] == "mallows_theta" and stored["source"] == "auto"
    assert cal.num_prompts + cal.num_skipped == 6 and cal.num_prompts > 0
    assert cal.mean_phi == pytest.approx(1.0, rel=1e-12) and cal.c > 0
    by_hand = disp.calibrate_rows(cfg, [scored.take_all()])
    assert by_hand.c == cal.c
    online = load_config(None, ["loss.name=mallows_theta", "model.dtype=float32"])
    assert disp.resolve_dispersion(online, ds, str(tiny_model_dir), scored=False).c == \
        pytest.approx(cal.c, rel=1e-6)
