"""The learning-rate schedule and the generated DeepSpeed configs (pure functions, no engine)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from raypo.config import load_config
from raypo.train.ds_config import reference_ds_config, train_ds_config
from raypo.train.optim import build_lr_scheduler, build_optimizer, lr_multiplier


def test_cosine_schedule_with_warmup_follows_its_formula():
    cfg = load_config(None, ["optimizer.lr=0.1", "optimizer.lr_scheduler=cosine", "optimizer.warmup_steps=4",
                             "optimizer.min_lr_ratio=0.1"]).optimizer
    total = 24
    expected = [(s + 1) / 4 if s < 4 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 4) / 20)))
                for s in range(total + 2)]
    got = [lr_multiplier(s, total_steps=total, cfg=cfg) for s in range(total + 2)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[3] == 1.0 and got[4] == pytest.approx(1.0) and got[total] == pytest.approx(0.1)
    assert got[-1] == pytest.approx(0.1)  # stays at the floor past the end
    # the torch scheduler the engine steps gives the same learning rates
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    sched = build_lr_scheduler(opt, cfg, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * m for m in expected[:total]], rel=1e-12)


def test_linear_and_constant_schedules():
    lin = load_config(None, ["optimizer.lr_scheduler=linear", "optimizer.warmup_steps=0",
                             "optimizer.min_lr_ratio=0.0"]).optimizer
    assert [lr_multiplier(s, total_steps=10, cfg=lin) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = load_config(None, ["optimizer.lr_scheduler=constant", "optimizer.warmup_steps=2"]).optimizer
    assert [lr_multiplier(s, total_steps=10, cfg=const) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepspeed_configs_are_explicit_and_sized_from_the_model(dtype):
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum_steps=2",
                             "optimizer.grad_clip=0.7", "deepspeed.offload_optimizer=true"])
    h = 4096
    train = train_ds_config(cfg, hidden_size=h, world_size=8, dtype=dtype)
    ref = reference_ds_config(cfg, hidden_size=h, world_size=8, dtype=dtype)
    for ds in (train, ref):
        assert '"auto"' not in json.dumps(ds)  # DeepSpeed drops "auto" outside the HF Trainer
        assert ds["train_batch_size"] == 3 * 2 * 8
        zero = ds["zero_optimization"]
        assert zero["stage"] == 3 and zero["reduce_bucket_size"] == h * h
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
        assert zero["stage3_param_persistence_threshold"] == 10 * h
        assert ds.get("bf16", {}).get("enabled", False) is (dtype == "bfloat16")
    assert train["gradient_clipping"] == 0.7
    assert train["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_optimizer" not in ref["zero_optimization"]  # the frozen reference has no optimizer
    assert train["zero_force_ds_cpu_optimizer"] is False


def test_deepspeed_overrides_are_merged_last():
    cfg = load_config(None, ["deepspeed.overrides={zero_optimization: {reduce_bucket_size: 123}, "
                             "steps_per_print: 5}"])
    ds = train_ds_config(cfg, hidden_size=64, world_size=1, dtype="float32")
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123 and ds["steps_per_print"] == 5
    assert ds["zero_optimization"]["stage"] == 3  # the rest of the section is kept
