"""Checkpoints: DeepSpeed shards per rank plus raypo's own state, merged by Ray Train in storage.

Layout of one checkpoint directory (``{storage_path}/{run_name}/step_00000040/``)::

    ds/latest, ds/<tag>/zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt   every rank writes its shard
    hf/config.json, hf/tokenizer*                                              rank 0: what export needs
    hf/raypo_lora.json                                                         rank 0, LoRA runs: r, alpha
    hf/raypo_model.json, hf/raypo_conditioning.json                            rank 0: the loss, beta,
                                                                               reference and dimensions
                                                                               (raypo eval); the lambda
                                                                               conditioning rule
    raypo_state.json                                                           rank 0: step, data position,
                                                                               lambda-schedule state
    raypo_manifest_r<r>.json                                                   every rank, last: its files'
                                                                               sizes and SHA-256 checksums
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from raypo.train.checkpoint_integrity import STATE_FILE, write_manifest

DS_DIR = "ds"
HF_DIR = "hf"
WRAPPER_PREFIX = "causal_lm."
LORA_FILE = "raypo_lora.json"
PEFT_PREFIX = "base_model.model."
MODEL_CARD_FILE = "raypo_model.json"
# Files of hf/ that an export carries next to the weights (raypo.data.conditioning.CONDITIONING_FILE too).
MODEL_FILES = (MODEL_CARD_FILE, "raypo_conditioning.json")


@dataclass
class TrainState:
    """Where training stands; enough to continue without repeating or skipping data."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in ``epoch`` (same on every rank)
    lambda_state: dict[str, Any] = field(default_factory=dict)
    tokens_seen: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine, state: TrainState, *, rank: int, hf_config=None, tokenizer=None,
                    model_files: Optional[dict[str, dict[str, Any]]] = None) -> str:
    """Write this rank's part of a checkpoint into a fresh local directory and return it.

    ``model_files``: small JSON files that travel with the model (``raypo_model.json``, the conditioning
    rule), written next to its config and copied into every export.

    Every rank must call this (DeepSpeed's save is a collective). The directory is made with mkdtemp, not a
    context manager, because Ray may upload it after this function returns.
    """
    local = tempfile.mkdtemp(prefix=f"raypo_ckpt_r{rank}_")
    engine.save_checkpoint(os.path.join(local, DS_DIR), tag=f"step{state.global_step}",
                           client_state={"raypo": asdict(state)})
    if rank == 0:
        Path(local, STATE_FILE).write_text(state.to_json())
        if hf_config is not None:
            hf_config.save_pretrained(os.path.join(local, HF_DIR))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(local, HF_DIR))
        for name, content in (model_files or {}).items():
            os.makedirs(os.path.join(local, HF_DIR), exist_ok=True)
            Path(local, HF_DIR, name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        lora = lora_settings(engine)
        if lora:
            os.makedirs(os.path.join(local, HF_DIR), exist_ok=True)
            Path(local, HF_DIR, LORA_FILE).write_text(json.dumps(lora, indent=2, sort_keys=True))
    write_manifest(local, rank=rank, world_size=_world_size(), global_step=state.global_step)  # last
    return local


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def lora_settings(engine) -> dict[str, Any]:
    """``{adapter: {"r", "lora_alpha", "use_rslora"}}`` of a PEFT-wrapped policy, else ``{}``."""
    causal_lm = getattr(getattr(engine, "module", engine), "causal_lm", None)
    configs = getattr(causal_lm, "peft_config", None) or {}
    return {name: {"r": int(c.r), "lora_alpha": float(c.lora_alpha), "use_rslora": bool(c.use_rslora)}
            for name, c in configs.items()}


def merge_lora(state_dict: dict[str, Any], lora: dict[str, Any]) -> dict[str, Any]:
    """A PEFT LoRA state dict -> the plain model's: W = W_0 + s * B @ A with s = alpha / r (alpha / sqrt(r)
    with rsLoRA), for every adapted linear layer; the ``base_model.model.`` prefix is dropped.

    Keys: ``...q_proj.base_layer.weight`` (W_0), ``...q_proj.lora_A.<adapter>.weight`` (A, [r, in]),
    ``...q_proj.lora_B.<adapter>.weight`` (B, [out, r]); plain keys pass through.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        key = key.removeprefix(PEFT_PREFIX)
        if ".lora_A." in key or ".lora_B." in key or ".lora_embedding_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for key, a in state_dict.items():
        if ".lora_A." not in key:
            continue
        module, rest = key.removeprefix(PEFT_PREFIX).split(".lora_A.", 1)
        adapter = rest.removesuffix(".weight")
        settings = lora.get(adapter)
        if settings is None:
            raise RuntimeError(f"checkpoint has LoRA adapter {adapter!r} but {LORA_FILE} lists only "
                               f"{sorted(lora)}")
        b = state_dict[key.replace(".lora_A.", ".lora_B.")]
        r = settings["r"]
        scale = settings["lora_alpha"] / (r ** 0.5 if settings["use_rslora"] else r)
        weight = f"{module}.weight"
        out[weight] = out[weight] + scale * (b.float() @ a.float()).to(out[weight].dtype)
    return out


def load_checkpoint(engine, checkpoint_dir: str) -> TrainState:
    """Load DeepSpeed states (this rank's shard) and raypo's state from a downloaded checkpoint."""
    try:
        _, client = engine.load_checkpoint(os.path.join(checkpoint_dir, DS_DIR))
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # torch's errors for a damaged shard
        raise RuntimeError(f"cannot load the checkpoint {checkpoint_dir}: {exc}; its files are damaged (on "
                           "s3:// only their sizes are verified before a start; docs/training.md, \"Damaged "
                           "checkpoints\")") from exc
    if client is None:
        raise RuntimeError(f"no DeepSpeed checkpoint found under {checkpoint_dir}/{DS_DIR}; the checkpoint "
                           "is incomplete (was a rank's upload interrupted?)")
    return TrainState(**client["raypo"])


def local_copy(uri: str, storage_options: Optional[dict] = None) -> tuple[str, bool]:
    """A local directory holding ``uri`` (local path or ``s3://``); True if it is a temporary copy."""
    if "://" not in uri:
        return uri, False
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    tmp = tempfile.mkdtemp(prefix="raypo_dl_")
    fs.get(path.rstrip("/") + "/", tmp, recursive=True)
    return tmp, True


def export_checkpoint(checkpoint: str, out_dir: str, *, dtype: str = "float32") -> str:
    """Write a checkpoint as a Hugging Face model: safetensors weights, config and tokenizer.

    The ZeRO-3 shards are merged on CPU with DeepSpeed's ``zero_to_fp32`` (the full model in fp32 must fit
    in host RAM: 4 bytes per parameter). The result loads with ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from raypo.model.loading import without_zero3_init

    local, temporary = local_copy(checkpoint)
    try:
        ds_dir, hf_dir = os.path.join(local, DS_DIR), os.path.join(local, HF_DIR)
        if not os.path.isdir(ds_dir) or not os.path.isdir(hf_dir):
            raise FileNotFoundError(f"{checkpoint} is not a raypo checkpoint (expected {DS_DIR}/ and "
                                    f"{HF_DIR}/ inside); pass a directory like <run>/step_00000040")
        # The engine wraps the causal LM in ListwiseLogProbModel, whose attribute is ``causal_lm``.
        state_dict = {k.removeprefix(WRAPPER_PREFIX): v
                      for k, v in get_fp32_state_dict_from_zero_checkpoint(ds_dir).items()}
        lora_file = os.path.join(hf_dir, LORA_FILE)
        if os.path.exists(lora_file):  # a LoRA run: export the merged model, not the adapter
            with open(lora_file) as f:
                state_dict = merge_lora(state_dict, json.load(f))
        config = AutoConfig.from_pretrained(hf_dir)
        with without_zero3_init(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        torch_dtype = getattr(torch, dtype)
        state_dict = {k: v.to(torch_dtype) for k, v in state_dict.items()}
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        missing = [k for k in missing if k not in _tied_keys(model)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint and model disagree: missing {missing[:5]}, unexpected "
                               f"{unexpected[:5]}")
        model.tie_weights()
        files = [os.path.join(hf_dir, n) for n in MODEL_FILES if os.path.exists(os.path.join(hf_dir, n))]
        _write_export(model, AutoTokenizer.from_pretrained(hf_dir), out_dir, files)
        return out_dir
    finally:
        if temporary:
            shutil.rmtree(local, ignore_errors=True)


def _write_export(model, tokenizer, out_dir: str, files: Sequence[str] = ()) -> None:
    """Save into a hidden sibling directory, then rename it to ``out_dir``: a full disk leaves no half
    export, and :class:`~raypo.storage.StorageWriteError` names the path."""
    from raypo.storage import temporary_sibling, write_failed

    out_dir = os.path.abspath(out_dir)
    tmp, old = temporary_sibling(out_dir), None
    try:
        os.makedirs(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for path in files:
            shutil.copy(path, tmp)
        if os.path.exists(out_dir):
            old = temporary_sibling(out_dir)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except OSError as exc:
        if old is not None and not os.path.exists(out_dir):
            os.rename(old, out_dir)  # put the previous export back
            old = None
        raise write_failed(out_dir, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(tied, dict):
        return set(tied)
    return set(tied)
