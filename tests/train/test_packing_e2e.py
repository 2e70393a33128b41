"""Token-budget packing and response chunks on Ray Train with 2 DeepSpeed ZeRO-3 workers (gloo, tiny Llama).

Four prompts with ragged N (5, 2, 4, 3 responses) and ragged lengths, one global batch per epoch, 2 steps.
The packed run (``train.token_budget``: the ranks exchange the step's groups and pack them into 3
micro-batches, so one rank also runs a zero-weight padding micro-batch; ``train.response_chunk_size=1``:
every rank runs as many response chunks as the widest group of the micro-step on *any* rank) must end with
the weights and losses of the plain run (2 groups per rank, all responses at once). A forward-count mismatch
between the ranks would hang ZeRO-3's collectives or break that equality.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raypo.config import load_config
from raypo.train.trainer import run_training

pytestmark = pytest.mark.e2e

STEPS = 2
RAGGED_N = [5, 2, 4, 3]
# Padded tokens per micro-batch (rows x longest row). The groups have 112, 62, 103 and 88 tokens (prefix
# shared), so every step packs [88, 62] (176 padded) | [112] | [103], and the rank with the pair pads with
# an empty micro-batch: a zero-weight copy of the cheapest group (62).
TOKEN_BUDGET = 200
PACKED_EFFICIENCY = (112 + 62 + 103 + 88) / (176 + 62 + 112 + 103)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ragged_data(tmp_path_factory) -> str:
    from raypo.data.io import write_records
    from raypo.data.synthetic import DIMENSIONS, generate

    records = generate(num_prompts=len(RAGGED_N), seed=1, num_responses=max(RAGGED_N))
    for record, n in zip(records, RAGGED_N):
        record.responses, record.scores = record.responses[:n], record.scores[:n]
    return write_records(records, str(tmp_path_factory.mktemp("ragged") / "train.parquet"), list(DIMENSIONS))


def overrides(model_dir: Path, data: str, storage: str, name: str) -> list[str]:
    return [
        f"model.path={model_dir}", "model.dtype=float32",
        f"data.train_path={data}", "data.eval_fraction=0.0",
        "data.max_prompt_length=64", "data.max_response_length=32",
        "loss.name=lipo_lambda", "loss.params.scale=valid",
        "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "optimizer.lr_scheduler=constant",
        "train.micro_batch_size=2", "train.grad_accum_steps=1", f"train.max_steps={STEPS}",
        f"train.epochs={STEPS}", "scaling.num_workers=2", "logging.tensorboard=false",
        f"checkpoint.storage_path={storage}", f"checkpoint.run_name={name}", "checkpoint.keep_last=1",
        f"checkpoint.export_path={storage}/{name}/export",
    ]


def exported_weights(export_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(export_dir, "model.safetensors"))


def test_packing_and_response_chunks_across_two_workers_give_the_plain_run(ray_cluster, tiny_model_dir,
                                                                          ragged_data, tmp_path):
    from safetensors.torch import load_file

    plain = run_training(load_config(None, overrides(tiny_model_dir, ragged_data, str(tmp_path), "plain")))
    packing = [f"train.token_budget={TOKEN_BUDGET}", "train.response_chunk_size=1"]
    packed = run_training(load_config(None, overrides(tiny_model_dir, ragged_data, str(tmp_path), "packed")
                                      + packing))
    assert plain.metrics["step"] == packed.metrics["step"] == STEPS
    assert plain.metrics["perf/forwards"] == 1.0  # k = 1 read micro-batch per rank and step
    assert packed.metrics["perf/forwards"] == 2.0  # 3 packed micro-batches + 1 padding on 2 ranks
    assert packed.metrics["perf/padding_efficiency"] == pytest.approx(PACKED_EFFICIENCY)
    assert packed.metrics["train/loss"] == pytest.approx(plain.metrics["train/loss"], rel=1e-4)

    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    a, b = exported_weights(plain.export_dir), exported_weights(packed.export_dir)
    assert max(float((a[k] - initial[k]).abs().max()) for k in a) > 100 * TOLERANCE  # training moved them
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE
