"""The prefix_sdpa backend (raypo.model.attention): the dense block mask's values and gradients without the
[L, L] mask, on ragged groups, padding, empty response chunks, GQA and the unshared layout."""

from __future__ import annotations

import pytest
import torch

from raypo.model.attention import NAME, _segments, is_structure_mask, structure_mask
from raypo.model.batch import collate_listwise
from raypo.model.layout import shared_layout
from raypo.model.listwise import ListwiseLogProbModel, grouped_logprobs
from raypo.model.loading import load_policy
from raypo.model.response_chunks import listwise_backward

GROUPS = [(5, [3, 1, 4, 2]), (1, [2, 3]), (3, [1]), (7, [6, 2, 2, 5, 1])]


def _run(model, batch, attn, *, prefix_sharing=True, pad_to_multiple_of=1):
    model.config._attn_implementation = attn
    model.zero_grad(set_to_none=True)
    weights = torch.randn(batch.num_groups, batch.num_responses, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(2))
    out = grouped_logprobs(model, batch, prefix_sharing=prefix_sharing, pad_to_multiple_of=pad_to_multiple_of)
    (out.logps * weights).sum().backward()
    return out.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pad", [1, 16])
def test_equals_dense_mask_values_and_grads(tiny_model_f64, make_rows, pad):
    assert tiny_model_f64.config.num_key_value_heads < tiny_model_f64.config.num_attention_heads  # GQA
    batch = collate_listwise(make_rows(GROUPS))
    dense, g_dense = _run(tiny_model_f64, batch, "sdpa", pad_to_multiple_of=pad)
    blocks, g_blocks = _run(tiny_model_f64, batch, NAME, pad_to_multiple_of=pad)
    torch.testing.assert_close(blocks, dense, atol=1e-10, rtol=0)
    for name, grad in g_dense.items():
        torch.testing.assert_close(g_blocks[name], grad, atol=1e-10, rtol=0, msg=name)


def test_unshared_layout_falls_back_to_sdpa(tiny_model_dir, make_rows, monkeypatch):
    """Without prefix sharing, ``model.attention: auto`` loads transformers' plain ``sdpa``; an explicit
    ``prefix_sdpa`` keeps its backend, but the unshared layout gives it a padding mask, not a structure mask,
    so every attention call goes to transformers' ``sdpa_attention_forward``: log-probs and gradients equal
    the plain sdpa model's, and with prefix sharing the same backend never falls back."""
    import transformers.integrations.sdpa_attention as hf_sdpa

    batch = collate_listwise(make_rows(GROUPS))
    auto = load_policy(tiny_model_dir, dtype="float64", attention="auto", prefix_sharing=False)
    prefix = load_policy(tiny_model_dir, dtype="float64", attention="prefix_sdpa", prefix_sharing=False)
    assert auto.config._attn_implementation == "sdpa"
    assert prefix.config._attn_implementation == NAME
    assert ListwiseLogProbModel(prefix).attn_implementation == NAME

    masks = []
    plain_sdpa = hf_sdpa.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return plain_sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward", spy)
    layers = prefix.config.num_hidden_layers

    dense, g_dense = _run(auto, batch, "sdpa", prefix_sharing=False)
    assert masks == []  # the plain sdpa model calls transformers' registered sdpa function directly
    fallback, g_fallback = _run(prefix, batch, NAME, prefix_sharing=False)
    assert len(masks) == layers and not any(is_structure_mask(m) for m in masks)
    torch.testing.assert_close(fallback, dense, atol=1e-12, rtol=0)
    for name, grad in g_dense.items():
        torch.testing.assert_close(g_fallback[name], grad, atol=1e-12, rtol=0, msg=name)

    masks.clear()
    shared, _ = _run(prefix, batch, NAME)
    assert masks == []  # structure masks: the block computation, no fallback
    torch.testing.assert_close(shared, dense, atol=1e-6, rtol=0)


def test_response_length_change_leaves_others_bitwise_unchanged(tiny_model_f64, make_rows):
    tiny_model_f64.config._attn_implementation = NAME
    rows = make_rows(GROUPS)
    with torch.no_grad():
        before = grouped_logprobs(tiny_model_f64, collate_listwise(rows)).logps
        rows[0]["response_ids"][0] = rows[0]["response_ids"][0] + [20, 21, 22]  # moves later responses
        after = grouped_logprobs(tiny_model_f64, collate_listwise(rows)).logps
    torch.testing.assert_close(before[0, 1:], after[0, 1:], atol=1e-12, rtol=0)
    torch.testing.assert_close(before[1:], after[1:], atol=1e-12, rtol=0)


def test_chunked_listwise_backward_with_empty_chunks(tiny_model_f64, make_rows):
    """Response chunks past a group's N leave prompt-only rows (no response block at all)."""
    tiny_model_f64.config._attn_implementation = NAME
    batch = collate_listwise(make_rows(GROUPS))

    def loss_fn(logps):
        return (logps * batch.response_mask()).sum(), 1.0, {}

    grads = []
    for chunk in (None, 2):
        tiny_model_f64.zero_grad(set_to_none=True)
        listwise_backward(tiny_model_f64, batch, loss_fn, chunk_size=chunk, num_chunks=4 if chunk else None)
        grads.append({n: p.grad.clone() for n, p in tiny_model_f64.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=name)


def test_structure_mask_and_segments():
    batch = collate_listwise([{"prompt_ids": [1, 2, 3], "response_ids": [[4, 5], [6]]},
                              {"prompt_ids": [7], "response_ids": [[8, 9, 10]]}])
    packed = shared_layout(batch, pad_to_multiple_of=8)
    mask = structure_mask(packed.group_ids, packed.segment_ids)
    assert is_structure_mask(mask) and mask.shape == (2, 1, 2, 8)
    assert not is_structure_mask(torch.ones(2, 1, 8, 8, dtype=torch.bool))
    prompts, responses = _segments(packed.group_ids, packed.segment_ids)
    assert prompts == [(0, 0, 3), (1, 0, 1)]
    assert responses == [(0, 0, 3, 3, 2), (0, 0, 3, 5, 1), (1, 0, 1, 1, 3)]
    wrapper = ListwiseLogProbModel.__new__(ListwiseLogProbModel)  # block_mask only reads the backend name
    torch.nn.Module.__init__(wrapper)
    wrapper.causal_lm = type("LM", (), {"config": type("C", (), {"_attn_implementation": NAME})()})()
    assert torch.equal(wrapper.block_mask(packed.group_ids, packed.segment_ids, torch.float32), mask)
