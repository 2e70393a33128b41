"""Loading the policy and the reference model (no Ray here).

A model source is one of

* a local directory in Hugging Face format,
* ``s3://bucket/prefix`` — copied once per node into a local cache directory with s3fs (endpoint and region
  from arguments or the environment, credentials from the environment / botocore's usual chain; neither is
  ever logged),
* ``tiny://llama?hidden=64&layers=2`` — a tiny random Llama built locally (:mod:`raypo.model.tiny`),
* ``smollm2://135m-instruct`` or a ``.gguf`` file — converted once to a cached safetensors directory
  (:mod:`raypo.model.gguf_source`; the optional ``smollm2`` extra),
* a Hugging Face model id (needs a hub or a populated HF cache; nothing is downloaded on CPU CI).

ZeRO-3: :func:`load_causal_lm` creates ``transformers.integrations.HfDeepSpeedConfig(ds_config)`` *before*
``from_pretrained`` when the DeepSpeed config has stage 3, so transformers builds the model under
``deepspeed.zero.Init`` (every parameter partitioned at construction; rank 0 alone reads the checkpoint and
scatters it layer by layer). transformers keeps only a weakref to that object and silently stops treating
the run as ZeRO-3 once it is garbage-collected, so the object is pinned on the returned model as
``model.raypo_hf_ds_config`` (and returned by :func:`zero3_init_handle` for callers that build models
themselves). Create the policy and the reference with their own DeepSpeed configs, each while its handle
is alive; then call ``deepspeed.initialize`` on :class:`raypo.model.listwise.ListwiseLogProbModel` wrappers.
transformers' global points at the most recently created handle only, so keep both models (and so both
handles) alive for the whole run.

Other pieces, each a small function: :func:`parse_dtype`, :func:`hf_attn_implementation`,
:func:`enable_activation_checkpointing`, :func:`apply_lora` (PEFT; optional dependency), :func:`freeze`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raypo.model.gguf_source import is_gguf_source, resolve_gguf_source
from raypo.model.tiny import is_tiny_spec, resolve_tiny_spec
from raypo.model.zero3 import without_zero3_init  # noqa: F401 (raypo.model.loading.without_zero3_init)
from raypo.storage import s3_options

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,  # tests only
}
_ATTENTION = {"eager": "eager", "sdpa": "sdpa", "prefix_sdpa": "raypo_prefix_sdpa",
              "cascade": "raypo_cascade", "flex": "flex_attention",
              "flex_attention": "flex_attention", "flash_attention_2": "flash_attention_2",
              "flash_attention_3": "flash_attention_3"}
COMPLETE_MARKER = ".raypo-complete"


def parse_dtype(name: str | torch.dtype, *, device: str | torch.device | None = None) -> torch.dtype:
    """``float32|bfloat16|float16`` (fp32/bf16/fp16) -> torch dtype; ``auto``: bf16 on GPU, fp32 on CPU."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key == "auto":
        on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu else torch.float32
    if key not in _DTYPES:
        raise ValueError(f"model.dtype={name!r} is not supported; use auto, float32, bfloat16 or float16")
    return _DTYPES[key]


def hf_attn_implementation(attention: str, *, prefix_sharing: bool) -> str:
    """raypo's ``model.attention`` -> transformers' ``attn_implementation``.

    ``auto`` is ``prefix_sdpa`` with prefix sharing (:mod:`raypo.model.attention`: SDPA on the allowed blocks
    only, attention cost P^2 + sum_i R_i (P + R_i) instead of the dense mask's L^2; exact, on CPU and GPU
    alike) and ``sdpa`` without it. ``sdpa``/``eager`` (dense block mask), ``cascade``
    (:mod:`raypo.model.cascade`) and ``flex`` (block-sparse mask, GPU) are opt-in. Flash-attention
    kernels take no custom mask, so they need ``prefix_sharing=false``.
    """
    if attention == "auto":
        attention = "prefix_sdpa" if prefix_sharing else "sdpa"
    if attention not in _ATTENTION:
        raise ValueError(f"model.attention={attention!r} is not supported; use auto, eager, sdpa, "
                         "prefix_sdpa, cascade, flex or flash_attention_2")
    impl = _ATTENTION[attention]
    if attention == "prefix_sdpa":
        import raypo.model.attention  # noqa: F401 - registers the backend before from_pretrained validates the name
    if attention == "cascade":
        import raypo.model.cascade  # noqa: F401 - registers the backend
    if prefix_sharing and impl.startswith("flash_attention"):
        raise ValueError(f"model.attention={attention} cannot take the prefix-sharing block mask; set "
                         "model.prefix_sharing=false, or model.attention=sdpa or flex")
    return impl


# ----------------------------------------------------------------------------------------------------
# Sources: local, tiny://, s3://, hub id
# ----------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYPO_CACHE_DIR", Path.home() / ".cache" / "raypo"))


def _s3_cache_path(uri: str, endpoint: str | None, cache_dir: Path) -> Path:
    digest = hashlib.sha256(f"{endpoint or ''}|{uri.rstrip('/')}".encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    return cache_dir / "s3" / f"{name}-{digest}"


def download_s3_dir(uri: str, cache_dir: str | os.PathLike | None = None, *,
                    storage_options: Mapping[str, Any] | None = None) -> Path:
    """Copy every object under ``s3://bucket/prefix/`` to a local cache directory; return the directory.

    Idempotent and safe for concurrent callers on a node: a file lock serialises them and a marker file
    records a finished copy, so later calls return at once. The copy goes to a temp directory renamed into
    place, so a crash never leaves a half-copied model that looks complete.
    """
    import s3fs
    from filelock import FileLock

    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    options = dict(storage_options or {})
    endpoint = options.get("client_kwargs", {}).get("endpoint_url")
    target = _s3_cache_path(uri, endpoint, Path(cache_dir) if cache_dir else default_cache_dir())
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE_MARKER).exists():
            return target
        fs = s3fs.S3FileSystem(**options)
        prefix = uri.removeprefix("s3://").rstrip("/")
        remote_files = [p for p in fs.find(prefix) if not p.endswith("/")]
        if not remote_files:
            raise FileNotFoundError(f"no objects under {uri} (check the path, the endpoint and credentials)")
        logger.info("copying %d objects from %s to %s", len(remote_files), uri, target)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            for remote in remote_files:
                local = tmp / remote[len(prefix):].lstrip("/")
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
            (tmp / COMPLETE_MARKER).write_text(uri)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_source(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                         storage_options: Mapping[str, Any] | None = None) -> str:
    """A path or id that ``from_pretrained`` accepts: local dirs and hub ids as they are, ``tiny://`` built
    and ``s3://`` copied into ``cache_dir``."""
    source = str(source)
    if is_tiny_spec(source):
        root = Path(cache_dir) / "tiny" if cache_dir else None
        return str(resolve_tiny_spec(source, root))
    if source.startswith("s3://"):
        options = storage_options if storage_options is not None else s3_options()
        return str(download_s3_dir(source, cache_dir, storage_options=options))
    if is_gguf_source(source):
        return str(resolve_gguf_source(source, Path(cache_dir) if cache_dir else default_cache_dir()))
    expanded = Path(source).expanduser()
    if expanded.exists():
        return str(expanded)
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"model path {source!r} does not exist (expected a local directory, "
                                "s3://..., tiny://llama or a Hugging Face model id such as org/name)")
    return source  # a Hugging Face model id


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def zero3_init_handle(ds_config: Mapping[str, Any] | None):
    """``HfDeepSpeedConfig(ds_config)`` when the config is ZeRO stage 3, else None.

    While the returned object is alive, ``from_pretrained`` builds models under ``deepspeed.zero.Init``.
    Keep a reference for as long as the model lives (transformers holds only a weakref).
    """
    if not ds_config or int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(dict(ds_config))


def load_tokenizer(source: str | os.PathLike, *, trust_remote_code: bool = False, cache_dir=None,
                   storage_options: Mapping[str, Any] | None = None):
    """The tokenizer of ``source``; a missing pad token is set to eos (padding is always masked out)."""
    from transformers import AutoTokenizer

    path = resolve_model_source(source, cache_dir=cache_dir, storage_options=storage_options)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    attention: str = "auto",
    prefix_sharing: bool = True,
    ds_config: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with raypo's conventions.

    ``dtype`` is the parameter dtype (``auto``: bf16 on GPU, fp32 on CPU); ``attention`` and
    ``prefix_sharing`` pick the attention backend (:func:`hf_attn_implementation`); a stage-3 ``ds_config``
    builds the model partitioned (module docstring). ``trust_remote_code`` runs code from the checkpoint:
    only when asked. The KV cache is turned off (training and scoring never decode).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_source(source, cache_dir=cache_dir, storage_options=storage_options)
    handle = zero3_init_handle(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=parse_dtype(dtype),
        attn_implementation=hf_attn_implementation(attention, prefix_sharing=prefix_sharing),
        trust_remote_code=trust_remote_code,
    )
    model.config.use_cache = False
    if handle is not None:
        model.raypo_hf_ds_config = handle  # pins the weakref'd object for the model's lifetime
    return model


def enable_activation_checkpointing(model: nn.Module, *, use_reentrant: bool = False) -> None:
    """Recompute each decoder layer's activations in backward (transformers' layer-level checkpointing).

    Non-reentrant is the default. With ZeRO-3 and frozen parameters (LoRA), DeepSpeed reports recompute
    shape mismatches in some versions; ``use_reentrant=True`` is the known workaround (TRL does the same),
    and then the inputs must require grad, which is arranged here.
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


@dataclass
class LoraSettings:
    """LoRA adapter settings (mirrors ``raypo.config.LoraConfig``; any object with these fields works)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Sequence[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model; only adapter weights stay trainable.

    ``lora`` has fields ``r``, ``alpha``, ``dropout``, ``target_modules``. The output head must not be a
    target (raypo's chunked head needs a plain linear lm_head).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("model.lora.enabled=true needs the `peft` package (a dependency of raypo): "
                          "pip install 'peft>=0.21'") from err
    targets = list(lora.target_modules)
    if "lm_head" in targets:
        raise ValueError("model.lora.target_modules must not contain lm_head (the chunked log-prob head "
                         "needs a plain linear output layer)")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the reference model."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_policy(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    attention: str = "auto",
    prefix_sharing: bool = True,
    ds_config: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    lora=None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The trainable policy: :func:`load_causal_lm`, then optional checkpointing and LoRA, in train mode.

    ``lora``: None, or an object with ``r, alpha, dropout, target_modules`` (and optionally ``enabled``).
    """
    model = load_causal_lm(source, dtype=dtype, attention=attention, prefix_sharing=prefix_sharing,
                           ds_config=ds_config, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                           storage_options=storage_options)
    use_lora = lora is not None and getattr(lora, "enabled", True)
    if gradient_checkpointing:
        enable_activation_checkpointing(model, use_reentrant=bool(use_lora and ds_config))
    if use_lora:
        model = apply_lora(model, lora)
    return model.train()


def load_reference(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    attention: str = "auto",
    prefix_sharing: bool = True,
    ds_config: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The frozen reference model (eval mode, no gradients). Use the policy's dtype and attention backend so
    that at step 0 policy and reference log-probs agree exactly."""
    model = load_causal_lm(source, dtype=dtype, attention=attention, prefix_sharing=prefix_sharing,
                           ds_config=ds_config, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                           storage_options=storage_options)
    return freeze(model)
