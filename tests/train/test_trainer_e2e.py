"""End-to-end training on Ray Train with DeepSpeed ZeRO-3 (gloo, 2 CPU workers, a tiny Llama).

Every run trains the same 4 prompts for 4 steps: one global batch per epoch, so each step sees the same
prompts however the rows are split across workers, and runs with different worker counts, accumulation
settings or interruptions must end with the same weights as the uninterrupted 2-worker run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raypo.config import load_config
from raypo.testing import exported_weights, max_abs_diff
from raypo.testing import short_run_overrides as _short_run_overrides
from raypo.train.trainer import run_training

pytestmark = pytest.mark.e2e

STEPS = 4


def base_overrides(model_dir: Path, storage: str, name: str) -> list[str]:
    return _short_run_overrides(model_dir, storage, name, STEPS)


def update_size(a: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - init[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def initial_weights(tiny_model_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(tiny_model_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def baseline_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    """The uninterrupted reference run: 2 workers, 2 prompts each per step; (config, result)."""
    storage = str(tmp_path_factory.mktemp("runs"))
    overrides = base_overrides(tiny_model_dir, storage, "baseline") + ["logging.tensorboard=true"]
    cfg = load_config(None, overrides)
    return cfg, run_training(cfg)


@pytest.fixture(scope="module")
def baseline(baseline_run):
    _, result = baseline_run
    return result, exported_weights(result.export_dir)


def test_running_a_complete_run_again_trains_nothing_and_says_so(baseline_run, capsys):
    cfg, first = baseline_run
    weights = exported_weights(first.export_dir)
    os.remove(os.path.join(first.export_dir, "model.safetensors"))
    again = run_training(cfg)
    out = capsys.readouterr().out
    assert "already complete (step 4 of train.max_steps=4)" in out
    assert os.path.normpath(again.checkpoint) == os.path.normpath(first.checkpoint)
    assert max_abs_diff(exported_weights(again.export_dir), weights) == 0.0  # exported again, same weights
    assert again.metrics["step"] == STEPS and "train/loss" in again.metrics


def test_run_keeps_the_last_checkpoints_and_writes_tensorboard(baseline):
    result, _ = baseline
    run_dir = Path(result.run_dir)
    steps = sorted(p.name for p in run_dir.glob("step_*"))
    assert steps == [f"step_{STEPS - 1:08d}", f"step_{STEPS:08d}"]  # checkpoint.keep_last=2
    assert result.checkpoint.endswith(f"step_{STEPS:08d}")
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert result.metrics["step"] == STEPS
    # the metrics, overall and per rating dimension
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/reward_margin", "train/pairwise_accuracy",
                "train/ndcg", "train/kendall_tau", "train/top1_accuracy", "train/kl_per_token",
                "train/pairwise_accuracy/honesty", "perf/tokens_per_s", "perf/samples_per_s"):
        assert key in result.metrics and result.metrics[key] == result.metrics[key], key  # present, not NaN


def test_rank0_writes_every_step_with_the_loop_timing(baseline):
    """Rank 0 writes one row per step (Ray Train gets only the reports it needs), with the loop's clock:
    step, data and report waits, loop efficiency in (0, 1], tokens/s per device; no MFU on CPU."""
    from raypo.train.callbacks import read_metrics

    result, _ = baseline
    rows = read_metrics(str(Path(result.run_dir) / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert 0 < r["perf/loop_efficiency"] <= 1, r
        assert r["perf/step_s"] > 0 and r["perf/data_wait_s"] >= 0 and r["perf/report_wait_s"] >= 0, r
        assert r["perf/step_s"] <= r["perf/window_s"], r
        assert r["perf/tokens_per_s_per_device"] == pytest.approx(r["perf/tokens_per_s"] / 2), r
        assert "perf/mfu" not in r


# Runs differ only in the order floating-point sums are taken (ranks, micro-batches), so weights agree to
# float32 rounding, far below the size of the update itself.
TOLERANCE = 1e-5


def test_two_workers_equal_one_worker_with_the_same_global_batch(baseline, tiny_model_dir, tmp_path,
                                                                   initial_weights):
    result, weights = baseline
    cfg = load_config(None, base_overrides(tiny_model_dir, str(tmp_path), "one_worker")
                      + ["scaling.num_workers=1", "train.micro_batch_size=4"])
    one = run_training(cfg)
    assert update_size(weights, initial_weights) > 100 * TOLERANCE  # training moved the weights
    assert max_abs_diff(exported_weights(one.export_dir), weights) < TOLERANCE
    assert one.metrics["train/loss"] == pytest.approx(result.metrics["train/loss"], rel=1e-4)


def test_accumulation_equals_a_larger_batch_and_precomputed_reference(baseline, s3, tiny_model_dir, tmp_path):
    """Also loads the model from ``s3://``: the workers and the reference-scoring and tokenising actors are
    handed the URI and copy the model into their own node's cache."""
    _, weights = baseline
    fs = s3.s3fs()
    for f in Path(tiny_model_dir).iterdir():
        fs.put_file(str(f), f"{s3.bucket}/models/accumulate/{f.name}")
    model_uri = f"s3://{s3.bucket}/models/accumulate"
    overrides = [o for o in base_overrides(tiny_model_dir, str(tmp_path), "accumulate")
                 if not o.startswith("model.path=")]
    cfg = load_config(None, overrides + [f"model.path={model_uri}", "scaling.num_workers=1",
                                         "train.grad_accum_steps=2", "train.reference=precomputed"])
    from raypo.train.trainer import model_sources

    assert model_sources(cfg) == (model_uri, model_uri)
    acc = run_training(cfg)
    assert max_abs_diff(exported_weights(acc.export_dir), weights) < TOLERANCE


def test_exported_model_loads_and_generates(baseline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = baseline
    model = AutoModelForCausalLM.from_pretrained(result.export_dir)
    tok = AutoTokenizer.from_pretrained(result.export_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0, ids.shape[1]:]), str)


def test_raypo_export_command_writes_the_same_model(baseline, tmp_path):
    """`raypo export CHECKPOINT OUT` on the run's last checkpoint gives the weights the run exported."""
    from raypo.cli import main

    result, weights = baseline
    out = tmp_path / "cli_export"
    assert main(["export", result.checkpoint, str(out)]) == 0
    assert max_abs_diff(exported_weights(str(out)), weights) == 0.0
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


# The fault cases (a killed worker, a killed driver, a resume mid-epoch, a damaged checkpoint) are in
# tests/reliability/test_faults_e2e.py.
