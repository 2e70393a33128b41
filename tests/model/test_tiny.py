"""The tiny local model and tokenizer: deterministic, loadable with from_pretrained, chat template works."""

from __future__ import annotations

import pytest
import torch

from raypo.model.tiny import (
    EOS_TOKEN,
    ROLE_TOKENS,
    TinySpec,
    build_tiny_model,
    build_tiny_tokenizer,
    parse_tiny_spec,
    resolve_tiny_spec,
)


def test_tokenizer_is_deterministic(tiny_tokenizer):
    again = build_tiny_tokenizer()
    assert again.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()
    assert len(tiny_tokenizer) == 512


@pytest.mark.parametrize("text", ["What is 12 + 7? The answer is 19.", "Please, thank you!  Sorry :)",
                                  "naïve café 日本 \n\ttabs", ""])
def test_tokenizer_round_trips(tiny_tokenizer, text):
    ids = tiny_tokenizer(text).input_ids
    assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_learned_useful_pieces(tiny_tokenizer):
    text = "What is the answer? The answer is 42, thank you."
    pieces = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer(text).input_ids)
    assert len(pieces) < len(text) / 3  # merged words, not bytes
    assert {"Ġanswer", "Ġthank", "Ġyou"} <= set(pieces)
    for marker in (*ROLE_TOKENS, EOS_TOKEN):
        assert len(tiny_tokenizer(marker).input_ids) == 1


def test_chat_template(tiny_tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|user|>\nWhat is 2 + 3?<|end|>\n<|assistant|>\n5<|end|>\n"
    prompt = tiny_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and text.startswith(prompt)
    ids = tiny_tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id and tiny_tokenizer.eos_token_id in ids


def test_model_is_deterministic_for_a_seed(tiny_tokenizer):
    a = build_tiny_model(TinySpec(seed=3), tiny_tokenizer).state_dict()
    b = build_tiny_model(TinySpec(seed=3), tiny_tokenizer).state_dict()
    c = build_tiny_model(TinySpec(seed=4), tiny_tokenizer).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[key], c[key])


def test_global_rng_untouched(tiny_tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(TinySpec(), tiny_tokenizer)
    assert torch.equal(torch.rand(3), expected)


def test_saved_dir_loads_and_runs(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    fresh = build_tiny_model(TinySpec(seed=0), build_tiny_tokenizer())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, logits)


def test_parse_tiny_spec():
    spec = parse_tiny_spec("tiny://llama?hidden=32&layers=1&num_heads=2&kv_heads=1&tie_embeddings=true&seed=7")
    shape = spec.shape
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads,
            shape.tie_word_embeddings, spec.seed) == (32, 1, 2, 1, True, 7)
    assert parse_tiny_spec("tiny://llama") == TinySpec()
    with pytest.raises(ValueError, match="unknown key 'width'"):
        parse_tiny_spec("tiny://llama?width=3")
    with pytest.raises(ValueError, match="must be an integer"):
        parse_tiny_spec("tiny://llama?hidden=big")
    with pytest.raises(ValueError, match="not supported"):
        resolve_tiny_spec("tiny://gpt2", cache_dir="/nonexistent-never-created")


def test_resolve_tiny_spec_caches(tmp_path):
    uri = "tiny://llama?hidden=32&layers=1&heads=2&kv_heads=1&intermediate=64"
    first = resolve_tiny_spec(uri, cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = resolve_tiny_spec(uri, cache_dir=tmp_path)
    assert first == second and (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftover temp dirs


def test_tiny_spec_is_a_model_shape_and_its_cache_key_is_stable(tiny_tokenizer):
    from raypo.model.shape import ModelShape
    from raypo.model.tiny import TINY_SHAPE, tiny_llama_config

    spec = TinySpec()
    assert isinstance(spec.shape, ModelShape) and spec.shape == TINY_SHAPE
    # cached tiny models stay valid: the key is the one written before the shape had its own type
    assert spec.cache_key() == ("archllama-hidden64-layers2-heads4-kv_heads2-intermediate128-vocab512-"
                                "max_positions2048-tie_embeddings0-seed0")
    config = tiny_llama_config(spec.with_options(hidden=32, tie_embeddings=True), tiny_tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (32, 2, True)
    assert config.vocab_size == len(tiny_tokenizer)
