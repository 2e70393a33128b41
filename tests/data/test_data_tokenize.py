"""Tokenisation: chat template on the prompt, responses as continuations, masks, truncation, lengths."""

from __future__ import annotations

import pyarrow as pa

from raypo.data.schema import staged_schema, tokenized_schema
from raypo.data.tokenize import TokenizeBatch, TokenizeConfig, render_continuation, tokenize_rows


def _row(**kw):
    row = {"prompt_id": "p", "prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
           "responses": ["It is 5.", "Sure! It is 5. step by step.", "No."], "scores": [[4.0], [5.0], [1.0]],
           "ranks": None}
    row.update(kw)
    return row


def test_prompt_and_responses_concatenate_to_the_templated_conversation(tiny_tokenizer):
    row = _row()
    out = tokenize_rows([row], tiny_tokenizer, TokenizeConfig())[0]
    expected_prompt = tiny_tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                         tokenize=False)
    assert tiny_tokenizer.decode(out["prompt_ids"]) == expected_prompt
    for resp_text, ids, mask in zip(row["responses"], out["response_ids"], out["response_masks"]):
        turn = {"role": "assistant", "content": resp_text}
        conv = tiny_tokenizer.apply_chat_template(row["prompt"] + [turn], tokenize=False)
        assert tiny_tokenizer.decode(out["prompt_ids"] + ids) == conv
        assert tiny_tokenizer.eos_token_id in ids  # the end-of-turn token is learned
        assert len(mask) == len(ids) and all(m == 1 for m in mask)
    assert out["num_responses"] == 3 and out["response_lengths"] == [len(r) for r in out["response_ids"]]
    assert out["num_tokens"] == out["prompt_length"] + sum(out["response_lengths"])
    assert out["_reject_reason"] is None and out["psi"] == [0.5, 5 / 6, 1 / 6]


def test_template_scaffolding_before_the_response_is_masked(tiny_tokenizer):
    tok = tiny_tokenizer
    original = tok.chat_template
    # A template that writes a header inside the assistant turn (like an empty think block).
    tok.chat_template = original.replace("message['content']", "('<think></think>' if message['role'] == "
                                         "'assistant' else '') + message['content']")
    try:
        pre, content, post = render_continuation(tok, _row()["prompt"], tok.apply_chat_template(
            _row()["prompt"], add_generation_prompt=True, tokenize=False), "It is 5.")
        assert pre == "<think></think>" and content == "It is 5." and post.startswith(tok.eos_token)
        out = tokenize_rows([_row()], tok, TokenizeConfig())[0]
        n_pre = len(tok("<think></think>", add_special_tokens=False)["input_ids"])
        assert out["response_masks"][0][:n_pre] == [0] * n_pre and out["response_masks"][0][n_pre] == 1
    finally:
        tok.chat_template = original


def test_truncation_policy(tiny_tokenizer):
    row = _row(responses=["short", "word " * 50])
    row["scores"] = [[1.0], [2.0]]
    cut = tokenize_rows([row], tiny_tokenizer, TokenizeConfig(max_prompt_length=8, max_response_length=10))[0]
    full = tokenize_rows([row], tiny_tokenizer, TokenizeConfig())[0]
    assert cut["prompt_ids"] == full["prompt_ids"][-8:]  # the end of the prompt is kept
    assert cut["response_ids"][1] == full["response_ids"][1][:10]  # the start of the response is kept
    assert cut["response_ids"][0] == full["response_ids"][0]
    assert cut["_repairs"] == ["truncated_prompt", "truncated_response"]
    drop = tokenize_rows([row], tiny_tokenizer, TokenizeConfig(max_response_length=10, overlong="drop"))[0]
    assert drop["_reject_reason"] == "overlong_response" and '"word word' in drop["_raw"]


def test_ranks_give_psi_and_the_arrow_stage_keeps_one_row_per_group(tiny_tokenizer, tmp_path):
    from raypo.model.tiny import save_tiny_model

    rows = [_row(prompt_id=f"p{i}", ranks=[1, 1, 3], scores=[[], [], []]) for i in range(5)]
    d = save_tiny_model(tmp_path / "tiny")
    stage = TokenizeBatch(str(d), TokenizeConfig(), [])
    table = pa.Table.from_pylist(rows)
    out = stage(table)
    assert out.num_rows == 5 and out.schema.equals(staged_schema(tokenized_schema([])), check_metadata=False)
    first = out.slice(0, 1).to_pylist()[0]
    assert first["psi"] == [2 / 3, 2 / 3, 1 / 6] and first["ranks"] == [1, 1, 3]
    assert out.schema.field("response_ids").type == pa.list_(pa.list_(pa.int32()))
