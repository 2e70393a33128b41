"""The reference log-prob cache: same key -> read, any change of model, data or settings -> a new key;
a stale entry is never used (in particular a checkpoint replaced in place with the same size and mtime)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from raypo.config import load_config
from raypo.data.schema import tokenized_schema
from raypo.model.tiny import save_tiny_model
from raypo.train import reference as reference_stage
from raypo.train.reference_cache import (
    cached_reference_logprobs,
    model_fingerprint,
    reference_cache_key,
    row_digest,
    rows_fingerprint,
)

SETTINGS = {"with_entropy": False, "dtype": "float32", "attention": "auto", "prefix_sharing": True,
            "batch_size": 8}


def _cfg(loss: str = "lipo_lambda"):
    return load_config(None, ["model.dtype=float32", f"loss.name={loss}", "train.reference=precomputed"])


def _replace_weights_keeping_size_and_mtime(model_dir: Path, tmp_path: Path, seed: int) -> None:
    """Overwrite model.safetensors with another seed's weights (same architecture: same byte size) and
    set its mtime back, as ``cp -p`` / ``rsync -t`` of another checkpoint would."""
    other = save_tiny_model(tmp_path / f"seed{seed}", seed=seed)
    target = model_dir / "model.safetensors"
    before = target.stat()
    shutil.copyfile(other / "model.safetensors", target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


# ----------------------------------------------------------------------------------------------------
# Keys (no Ray)
# ----------------------------------------------------------------------------------------------------


def test_model_fingerprint_sees_content_not_size_or_mtime(tiny_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    before = model_fingerprint(str(model))
    assert "config.json" in before and "model.safetensors" in before
    assert model_fingerprint(str(model)) == before
    _replace_weights_keeping_size_and_mtime(model, tmp_path, seed=1)
    after = model_fingerprint(str(model))
    assert after["model.safetensors"] != before["model.safetensors"]
    assert after["config.json"] == before["config.json"]


def test_model_fingerprint_ignores_docs_and_markers(tiny_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    before = model_fingerprint(str(model))
    (model / "README.md").write_text("notes")
    (model / ".raypo-complete").write_text("")
    assert model_fingerprint(str(model)) == before
    with pytest.raises(ValueError, match="no config.json"):
        model_fingerprint(str(tmp_path))
    with pytest.raises(ValueError, match="cannot fingerprint"):
        model_fingerprint(str(tmp_path / "missing"))


def test_rows_fingerprint_is_order_free_but_content_exact():
    rows = [([1, 2], [[3], [4, 5]], None), ([1], [[2, 3]], [[1, 0]]), ([7], [[8]], None)]
    digests = [row_digest(*r) for r in rows]
    assert rows_fingerprint(digests) == rows_fingerprint(digests[::-1])
    assert row_digest([1, 2], [[3], [4, 5]]) != row_digest([1, 2], [[3, 4], [5]])  # same tokens, re-split
    assert row_digest([1, 2], [[3]]) != row_digest([1], [[2, 3]])  # prompt/response boundary moved
    assert row_digest([1], [[2, 3]], [[1, 1]]) != row_digest([1], [[2, 3]], [[1, 0]])  # scored mask
    assert rows_fingerprint(digests[:2]) != rows_fingerprint(digests)


def test_key_covers_model_rows_and_settings(tiny_model_dir, tmp_path):
    digests = [row_digest([1, 2], [[3], [4]])]
    key = reference_cache_key(digests, str(tiny_model_dir), **SETTINGS)
    assert reference_cache_key(digests, str(tiny_model_dir), **SETTINGS).digest == key.digest
    changed = [reference_cache_key(digests + [row_digest([9], [[9]])], str(tiny_model_dir), **SETTINGS),
               reference_cache_key(digests, str(save_tiny_model(tmp_path / "m1", seed=1)), **SETTINGS)]
    for name, value in [("with_entropy", True), ("dtype", "bfloat16"), ("attention", "eager"),
                        ("prefix_sharing", False), ("batch_size", 4)]:
        changed.append(reference_cache_key(digests, str(tiny_model_dir), **{**SETTINGS, name: value}))
    assert len({k.digest for k in changed} | {key.digest}) == len(changed) + 1


# ----------------------------------------------------------------------------------------------------
# The Ray Data stage with a cache
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def count_reference_runs(monkeypatch):
    calls = []
    original = reference_stage.add_reference_logprobs

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference_stage, "add_reference_logprobs", counting)
    return calls


def _dataset(rows):
    import ray.data

    return ray.data.from_arrow(pa.Table.from_pylist(rows, schema=tokenized_schema()))


def _ref_values(ds, column="ref_logps") -> dict[str, list[float]]:
    return {r["prompt_id"]: list(r[column]) for r in ds.take_all()}


@pytest.mark.integration
def test_second_call_reads_the_cache_and_any_change_recomputes(ray_cluster, tiny_model_dir, tokenized_rows,
                                                                tmp_path, count_reference_runs):
    rows = tokenized_rows[0][:6]
    cfg, cache = _cfg(), str(tmp_path / "cache")
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))

    first = _ref_values(cached_reference_logprobs(_dataset(rows), cfg, str(model), cache))
    assert len(count_reference_runs) == 1 and len(first) == 6
    assert all(v < 0 for vs in first.values() for v in vs)
    # same key, rows in another order: read from the cache, bitwise equal
    again = cached_reference_logprobs(_dataset(rows[::-1]), cfg, str(model), cache)
    assert len(count_reference_runs) == 1 and _ref_values(again) == first
    assert "_ref_key" not in again.columns()

    # data change: one response truncated by a token (as a lower max length would) -> new key
    edited = [dict(r) for r in rows]
    edited[0]["response_ids"] = [list(x) for x in rows[0]["response_ids"]]
    edited[0]["response_ids"][0] = edited[0]["response_ids"][0][:-1]
    edited[0]["response_masks"] = [list(m) for m in rows[0]["response_masks"]]
    edited[0]["response_masks"][0] = edited[0]["response_masks"][0][:-1]
    changed = _ref_values(cached_reference_logprobs(_dataset(edited), cfg, str(model), cache))
    assert len(count_reference_runs) == 2
    pid = rows[0]["prompt_id"]
    assert changed[pid][0] != first[pid][0] and changed[pid][1:] == pytest.approx(first[pid][1:], abs=1e-5)

    # the checkpoint replaced in place (same size, same mtime): never the stale values
    _replace_weights_keeping_size_and_mtime(model, tmp_path, seed=1)
    stale_check = _ref_values(cached_reference_logprobs(_dataset(rows), cfg, str(model), cache))
    assert len(count_reference_runs) == 3
    assert all(stale_check[p] != first[p] for p in first)
    fresh = _ref_values(reference_stage.add_reference_logprobs(_dataset(rows), cfg, str(model)))
    for p in fresh:
        assert stale_check[p] == pytest.approx(fresh[p], abs=1e-5)


@pytest.mark.integration
def test_entropies_are_part_of_the_key_and_serve_logps_requests(ray_cluster, tiny_model_dir, tokenized_rows,
                                                                 tmp_path, count_reference_runs):
    rows, cache = tokenized_rows[0][:4], str(tmp_path / "cache")
    mallows = cached_reference_logprobs(_dataset(rows), _cfg("mallows_theta"), str(tiny_model_dir), cache)
    assert len(count_reference_runs) == 1 and count_reference_runs[0]["with_entropy"] is True
    entropy = _ref_values(mallows, "ref_entropy")
    assert all(0 < v <= 1 for vs in entropy.values() for v in vs)
    # a loss without dispersion is served by the entry that has entropies (ref_logps identical)
    plain = cached_reference_logprobs(_dataset(rows), _cfg("lipo_lambda"), str(tiny_model_dir), cache)
    assert len(count_reference_runs) == 1
    assert _ref_values(plain) == _ref_values(mallows)
    # ... but an entry without entropies never serves a request that needs them
    cache2 = str(tmp_path / "cache2")
    cached_reference_logprobs(_dataset(rows), _cfg("lipo_lambda"), str(tiny_model_dir), cache2)
    cached_reference_logprobs(_dataset(rows), _cfg("mallows_theta"), str(tiny_model_dir), cache2)
    assert [c["with_entropy"] for c in count_reference_runs[1:]] == [False, True]


@pytest.mark.integration
def test_s3_cache(ray_cluster, s3, tiny_model_dir, tokenized_rows, tmp_s3_prefix, count_reference_runs):
    rows, cfg = tokenized_rows[0][:3], _cfg()
    first = _ref_values(cached_reference_logprobs(_dataset(rows), cfg, str(tiny_model_dir), tmp_s3_prefix))
    second = _ref_values(cached_reference_logprobs(_dataset(rows), cfg, str(tiny_model_dir), tmp_s3_prefix))
    assert len(count_reference_runs) == 1 and first == second


def test_stage_settings_key_the_resolved_attention_backend():
    from raypo.config import load_config
    from raypo.train.reference_cache import stage_settings

    shared = stage_settings(load_config(None, ["model.attention=auto"]), with_entropy=False)
    assert shared["attention"] == "raypo_prefix_sdpa"  # what auto means with prefix sharing
    assert stage_settings(load_config(None, ["model.attention=prefix_sdpa"]), False) == shared
    unshared = stage_settings(load_config(None, ["model.prefix_sharing=false"]), with_entropy=False)
    assert unshared["attention"] == "sdpa" and not unshared["prefix_sharing"]
