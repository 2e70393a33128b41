"""The DeepSpeed engines of a worker: the ZeRO-3 policy (with its optimizer and LR schedule) and, when the
reference is scored online, a ZeRO-3 reference in inference mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from raypo.config import RaypoConfig
from raypo.model.listwise import ListwiseLogProbModel
from raypo.storage import s3_options_of
from raypo.train.ds_config import reference_ds_config, train_ds_config
from raypo.train.optim import build_lr_scheduler, build_optimizer


@dataclass
class Engines:
    policy: Any  # DeepSpeed engine around a ListwiseLogProbModel
    reference: Optional[Any]  # DeepSpeed inference engine, or None (precomputed or reference-free)
    hf_config: Any
    tokenizer: Any


def worker_dtype(cfg: RaypoConfig) -> str:
    """``model.dtype``, with ``auto`` meaning bfloat16 on GPUs and float32 on CPUs."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if cfg.scaling.use_gpu else "float32"


def s3_options(cfg: RaypoConfig) -> dict[str, Any]:
    """s3fs options for model sources: ``data.s3`` endpoint and region, else the environment's."""
    return s3_options_of(cfg.data.s3)


def build_engines(cfg: RaypoConfig, policy_path: str, ref_path: str, *, world_size: int,
                  needs_online_reference: bool, total_steps: int) -> Engines:
    import deepspeed
    from transformers import AutoConfig

    from raypo.model.loading import load_policy, load_reference, load_tokenizer, resolve_model_source

    # s3:// and tiny:// sources are resolved here, on this worker's node (a node the driver never saw, on
    # an autoscaling cluster); resolving is idempotent and node-locally cached
    options = s3_options(cfg)
    policy_path = resolve_model_source(policy_path, storage_options=options)
    ref_path = resolve_model_source(ref_path, storage_options=options)
    hf_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    dtype = worker_dtype(cfg)
    hidden = int(getattr(hf_config, "hidden_size", 1024))
    ds_train = train_ds_config(cfg, hidden_size=hidden, world_size=world_size, dtype=dtype)
    common = dict(dtype=dtype, attention=cfg.model.attention, prefix_sharing=cfg.model.prefix_sharing,
                  trust_remote_code=cfg.model.trust_remote_code)
    policy = load_policy(policy_path, ds_config=ds_train,
                         gradient_checkpointing=cfg.model.gradient_checkpointing,
                         lora=cfg.model.lora if cfg.model.lora.enabled else None, **common)
    module = ListwiseLogProbModel(policy)
    optimizer = build_optimizer(module.parameters(), cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.optimizer, total_steps)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_train)

    reference = None
    if needs_online_reference:
        ds_ref = reference_ds_config(cfg, hidden_size=hidden, world_size=world_size, dtype=dtype)
        ref_model = ListwiseLogProbModel(load_reference(ref_path, ds_config=ds_ref, **common))
        reference, *_ = deepspeed.initialize(model=ref_model, config=ds_ref)
        reference.eval()
    return Engines(policy=engine, reference=reference, hf_config=hf_config,
                   tokenizer=load_tokenizer(policy_path))


def set_accumulation_boundary(engine, is_boundary: bool) -> None:
    """Tell DeepSpeed whether the next backward ends the step (its own counter assumes a fixed count).

    Unmanaged accumulation (``managed_gradient_accumulation: false`` in a DeepSpeed override) has no such
    switch: there ``engine.step()`` itself is the boundary."""
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if managed is not None and not managed():
        return
    engine.set_gradient_accumulation_boundary(is_boundary)
