"""DeepSpeed configs generated from raypo's config, with explicit values (no "auto").

DeepSpeed drops "auto" entries outside the Hugging Face Trainer, so the hidden-size-dependent bucket sizes
are computed here: reduce_bucket_size = H², stage3_prefetch_bucket_size = 0.9·H²,
stage3_param_persistence_threshold = 10·H.
"""

from __future__ import annotations

from typing import Any

from raypo.config import RaypoConfig


def _deep_update(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def _precision(dtype: str) -> dict[str, Any]:
    if dtype == "bfloat16":
        return {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    if dtype == "float16":
        return {"fp16": {"enabled": True, "initial_scale_power": 16}}
    return {}


def _zero_section(cfg: RaypoConfig, hidden_size: int, train: bool) -> dict[str, Any]:
    h = hidden_size
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        zero.update({
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": h * h,
            "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h,
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if cfg.deepspeed.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if train and cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    return zero


def train_ds_config(cfg: RaypoConfig, *, hidden_size: int, world_size: int, dtype: str) -> dict[str, Any]:
    """The policy engine's config.

    Batch sizes count prompts. Gradient accumulation is driven by raypo's loop (it normalises the loss
    globally over micro-batches and ranks), so the engine is told the true accumulation count and the loop
    calls ``engine.backward(loss, scale_wrt_gas=False)``.
    """
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": _zero_section(cfg, hidden_size, train=True),
        # A client torch.optim.AdamW is passed in; on CPU this avoids JIT-building DeepSpeedCPUAdam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    _deep_update(ds, _precision(dtype))
    return _deep_update(ds, dict(cfg.deepspeed.overrides))


def reference_ds_config(cfg: RaypoConfig, *, hidden_size: int, world_size: int, dtype: str) -> dict[str, Any]:
    """The frozen reference engine's config: same partitioning, no optimizer."""
    t = cfg.train
    zero = _zero_section(cfg, hidden_size, train=False)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    return _deep_update(ds, _precision(dtype))
