"""Loading policy and reference: sources (local, tiny://, s3://), dtypes, attention, checkpointing, LoRA."""

from __future__ import annotations

import gc

import pytest
import torch

from raypo.model.batch import collate_listwise
from raypo.model.listwise import grouped_logprobs
from raypo.model.loading import (
    COMPLETE_MARKER,
    LoraSettings,
    download_s3_dir,
    hf_attn_implementation,
    load_policy,
    load_reference,
    load_tokenizer,
    parse_dtype,
    resolve_model_source,
    zero3_init_handle,
)
from raypo.storage import s3_options

TINY = "tiny://llama?seed=0"


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype("auto", device="cpu") is torch.float32
    assert parse_dtype("auto", device="cuda") is torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype='int8'"):
        parse_dtype("int8")


def test_attention_choice():
    assert hf_attn_implementation("auto", prefix_sharing=True) == "raypo_prefix_sdpa"
    assert hf_attn_implementation("auto", prefix_sharing=False) == "sdpa"
    assert hf_attn_implementation("sdpa", prefix_sharing=True) == "sdpa"
    assert hf_attn_implementation("flex", prefix_sharing=True) == "flex_attention"
    assert hf_attn_implementation("flash_attention_2", prefix_sharing=False) == "flash_attention_2"
    with pytest.raises(ValueError, match="prefix_sharing=false"):
        hf_attn_implementation("flash_attention_2", prefix_sharing=True)
    with pytest.raises(ValueError, match="model.attention='xformers'"):
        hf_attn_implementation("xformers", prefix_sharing=False)


def test_resolve_model_source(tmp_path, tiny_model_dir):
    assert resolve_model_source(tiny_model_dir) == str(tiny_model_dir)
    assert resolve_model_source("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"  # hub id untouched
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing"))
    built = resolve_model_source(TINY, cache_dir=tmp_path)
    assert built.startswith(str(tmp_path)) and (tmp_path / "tiny").is_dir()


def test_policy_and_reference(tiny_model_dir, make_rows):
    policy = load_policy(tiny_model_dir, dtype="float32", attention="eager")
    reference = load_reference(tiny_model_dir, dtype="float32", attention="eager")
    assert policy.training and not reference.training
    assert all(p.requires_grad for p in policy.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    assert policy.config._attn_implementation == "eager" and policy.config.use_cache is False
    batch = collate_listwise(make_rows([(4, [3, 2, 5]), (2, [1, 4])]))
    # step 0: same weights, same code path -> identical log-probs, so implicit rewards are exactly zero
    with torch.no_grad():
        assert torch.equal(grouped_logprobs(policy, batch).logps, grouped_logprobs(reference, batch).logps)


def test_bf16_load(tiny_model_dir, make_rows):
    model = load_reference(tiny_model_dir, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = collate_listwise(make_rows([(4, [3, 2])]))
    with torch.no_grad():
        lowp = grouped_logprobs(model, batch).logps
        full = grouped_logprobs(load_reference(tiny_model_dir, dtype="float32"), batch).logps
    assert lowp.dtype == torch.float32
    assert (lowp - full).abs().max() < 0.05 * batch.response_lengths().max()


def test_activation_checkpointing_same_gradients(tiny_model_dir, make_rows):
    batch = collate_listwise(make_rows([(4, [3, 2, 5]), (2, [1, 4])]))
    grads = []
    for checkpointing in (False, True):
        model = load_policy(tiny_model_dir, dtype="float32", gradient_checkpointing=checkpointing)
        grouped_logprobs(model, batch).logps.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert model.model.gradient_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_lora(tiny_model_dir, make_rows):
    pytest.importorskip("peft")
    model = load_policy(tiny_model_dir, dtype="float32", lora=LoraSettings(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    grouped_logprobs(model, collate_listwise(make_rows([(3, [2, 2])]))).logps.sum().backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    with pytest.raises(ValueError, match="lm_head"):
        load_policy(tiny_model_dir, dtype="float32", lora=LoraSettings(target_modules=["q_proj", "lm_head"]))


def test_load_tokenizer(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token == "<|pad|>" and tok.chat_template


def test_zero3_handle_is_weakly_held():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    assert zero3_init_handle({"zero_optimization": {"stage": 2}}) is None and zero3_init_handle(None) is None
    handle = zero3_init_handle({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    assert is_deepspeed_zero3_enabled()
    del handle
    gc.collect()
    assert not is_deepspeed_zero3_enabled()  # why load_causal_lm pins it on the model


def _upload_dir(fs, local_dir, remote_prefix):
    for path in local_dir.iterdir():
        fs.put_file(str(path), f"{remote_prefix}/{path.name}")


def test_s3_model_source(s3, tiny_model_dir, tmp_path, make_rows):
    fs = s3.s3fs()
    prefix = f"{s3.bucket}/models/tiny"
    _upload_dir(fs, tiny_model_dir, prefix)
    fs.put_file(str(tiny_model_dir / "config.json"), f"{s3.bucket}/models/tiny2/config.json")  # a sibling

    options = s3_options()  # endpoint from AWS_ENDPOINT_URL_S3 (exported by the test harness)
    assert options["client_kwargs"]["endpoint_url"] == s3.endpoint_url and "key" not in options
    local = download_s3_dir(f"s3://{prefix}", tmp_path, storage_options=options)
    assert (local / COMPLETE_MARKER).exists()
    assert sorted(p.name for p in local.iterdir() if p.name != COMPLETE_MARKER) == sorted(
        p.name for p in tiny_model_dir.iterdir())
    stamp = (local / "model.safetensors").stat().st_mtime_ns
    assert download_s3_dir(f"s3://{prefix}/", tmp_path, storage_options=options) == local  # cached
    assert (local / "model.safetensors").stat().st_mtime_ns == stamp

    model = load_reference(f"s3://{prefix}", dtype="float32", cache_dir=tmp_path)
    batch = collate_listwise(make_rows([(3, [2, 4])]))
    with torch.no_grad():
        expected = grouped_logprobs(load_reference(tiny_model_dir, dtype="float32"), batch).logps
        assert torch.equal(grouped_logprobs(model, batch).logps, expected)
    with pytest.raises(FileNotFoundError, match="no objects"):
        download_s3_dir(f"s3://{s3.bucket}/models/nothing-here", tmp_path, storage_options=options)
