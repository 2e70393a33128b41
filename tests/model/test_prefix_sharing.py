"""Prefix-shared rows give the unshared log-probs, gradients and entropies; responses see only themselves."""

from __future__ import annotations

import pytest
import torch

from raypo.model.batch import collate_listwise
from raypo.model.layout import shared_layout
from raypo.model.listwise import ListwiseLogProbModel, grouped_logprobs

# ragged on purpose: P = 1, a 1-token response, N = 1, N = 4
GROUPS = [(5, [3, 1, 4, 2]), (1, [2, 3]), (3, [1])]


def _param_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _logps_and_grads(model, batch, prefix_sharing, weights):
    model.zero_grad(set_to_none=True)
    out = grouped_logprobs(model, batch, prefix_sharing=prefix_sharing)
    (out.logps * weights).sum().backward()
    return out.logps.detach(), _param_grads(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "raypo_prefix_sdpa"])
def test_shared_equals_unshared_values_and_grads(tiny_model_f64, make_rows, attn):
    tiny_model_f64.config._attn_implementation = attn
    batch = collate_listwise(make_rows(GROUPS))
    weights = torch.randn(batch.num_groups, batch.num_responses, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))
    shared, g_shared = _logps_and_grads(tiny_model_f64, batch, True, weights)
    unshared, g_unshared = _logps_and_grads(tiny_model_f64, batch, False, weights)
    torch.testing.assert_close(shared, unshared, atol=1e-6, rtol=0)
    assert g_shared.keys() == g_unshared.keys() and len(g_shared) == len(list(tiny_model_f64.parameters()))
    for name in g_shared:
        torch.testing.assert_close(g_shared[name], g_unshared[name], atol=1e-6, rtol=0, msg=name)
    assert (shared[batch.response_mask()] < 0).all() and (shared[~batch.response_mask()] == 0).all()


def test_matches_plain_hf_forward(tiny_model_f64, make_rows):
    rows = make_rows(GROUPS)
    out = grouped_logprobs(tiny_model_f64, collate_listwise(rows), prefix_sharing=True)
    for b, row in enumerate(rows):
        prompt = row["prompt_ids"]
        for i, response in enumerate(row["response_ids"]):
            with torch.no_grad():
                logits = tiny_model_f64(torch.tensor([prompt + response])).logits[0].double()
            logsm = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
            logp = logsm.gather(1, torch.tensor(response)[:, None])
            torch.testing.assert_close(out.logps[b, i].detach(), logp.sum(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "raypo_prefix_sdpa"])
def test_editing_one_response_leaves_others_bitwise_unchanged(tiny_model_f64, make_rows, attn):
    tiny_model_f64.config._attn_implementation = attn
    rows = make_rows(GROUPS)
    with torch.no_grad():
        before = grouped_logprobs(tiny_model_f64, collate_listwise(rows)).logps
        edited = [dict(r, response_ids=[list(x) for x in r["response_ids"]]) for r in rows]
        edited[0]["response_ids"][1] = [9]  # same length, different token
        edited[0]["response_ids"][2] = [12, 13, 14, 15]
        after = grouped_logprobs(tiny_model_f64, collate_listwise(edited)).logps
    changed = torch.zeros_like(before, dtype=torch.bool)
    changed[0, 1] = changed[0, 2] = True
    assert torch.equal(before[~changed], after[~changed])
    assert (before[changed] != after[changed]).all()


def test_changing_a_response_length_leaves_others_unchanged(tiny_model_f64, make_rows):
    rows = make_rows(GROUPS)
    with torch.no_grad():
        before = grouped_logprobs(tiny_model_f64, collate_listwise(rows)).logps
        rows[0]["response_ids"][0] = rows[0]["response_ids"][0] + [20, 21, 22]  # shifts later responses
        after = grouped_logprobs(tiny_model_f64, collate_listwise(rows)).logps
    torch.testing.assert_close(before[0, 1:], after[0, 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(before[1:], after[1:], atol=1e-6, rtol=0)


def test_continuing_positions_would_be_wrong(tiny_model_f64, make_rows):
    """Guards the RoPE handling: positions must restart at P for every response."""
    batch = collate_listwise(make_rows(GROUPS))
    packed = shared_layout(batch)
    wrapper = ListwiseLogProbModel(tiny_model_f64)
    with torch.no_grad():
        right = wrapper(**packed.model_kwargs())["logps"]
        kwargs = packed.model_kwargs()
        kwargs["position_ids"] = torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids)
        wrong = wrapper(**kwargs)["logps"]
    torch.testing.assert_close(right[:, 0], wrong[:, 0])  # the first response does start at P
    torch.testing.assert_close(right[0, 1], wrong[0, 1])  # 1 token: predicted from the prompt alone
    assert (right[0, 2:] - wrong[0, 2:]).abs().min() > 1e-6  # later multi-token responses move


def test_entropy_same_in_both_layouts(tiny_model_f64, make_rows):
    batch = collate_listwise(make_rows(GROUPS))
    with torch.no_grad():
        shared = grouped_logprobs(tiny_model_f64, batch, prefix_sharing=True, with_entropy=True)
        unshared = grouped_logprobs(tiny_model_f64, batch, prefix_sharing=False, with_entropy=True)
    torch.testing.assert_close(shared.entropy, unshared.entropy, atol=1e-6, rtol=0)
    valid = batch.response_mask()
    assert ((shared.entropy[valid] > 0.9) & (shared.entropy[valid] <= 1.0)).all()  # near-uniform random model
    assert torch.equal(shared.num_tokens, batch.response_lengths())


def test_flash_attention_refuses_the_block_mask(tiny_model_f64, make_rows):
    tiny_model_f64.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="prefix_sharing=false"):
        grouped_logprobs(tiny_model_f64, collate_listwise(make_rows(GROUPS)))


@pytest.mark.integration
def test_flex_attention_block_mask_forward(tiny_tokenizer, make_rows):
    """The FlexAttention BlockMask path (the GPU choice) gives the dense-mask values; CPU, forward only.

    transformers compiles flex_attention, so this takes ~30 s on CPU; flex backward on CPU is unsupported.
    """
    from raypo.model.tiny import TinySpec, build_tiny_model

    model = build_tiny_model(TinySpec(seed=0), tiny_tokenizer, dtype=torch.float32)
    batch = collate_listwise(make_rows(GROUPS))
    with torch.no_grad():
        dense = grouped_logprobs(model, batch).logps
        model.config._attn_implementation = "flex_attention"
        flex = grouped_logprobs(model, batch).logps
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


@pytest.mark.integration
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only")
@pytest.mark.parametrize("attn", ["flex_attention", "raypo_prefix_sdpa", "raypo_cascade"])
def test_gpu_shared_layout_values_and_grads(tiny_tokenizer, make_rows, attn):
    """On a GPU: the shared layout with FlexAttention (or prefix_sdpa) gives the unshared layout's log-probs
    and gradients (fp32; GPU kernels differ from CPU, so a float32 tolerance) and editing one response
    leaves the others' log-probs bitwise unchanged."""
    from raypo.model.tiny import TinySpec, build_tiny_model

    model = build_tiny_model(TinySpec(seed=0), tiny_tokenizer, dtype=torch.float32).cuda()
    batch = collate_listwise(make_rows(GROUPS))
    weights = torch.randn(batch.num_groups, batch.num_responses, generator=torch.Generator().manual_seed(1))
    weights = weights.cuda()
    unshared, g_unshared = _logps_and_grads(model, batch, False, weights)
    model.config._attn_implementation = attn
    shared, g_shared = _logps_and_grads(model, batch, True, weights)
    torch.testing.assert_close(shared, unshared, atol=1e-4, rtol=1e-4)
    for name in g_shared:
        torch.testing.assert_close(g_shared[name], g_unshared[name], atol=1e-4, rtol=1e-3, msg=name)
    rows = make_rows(GROUPS)
    edited = [dict(r, response_ids=[list(x) for x in r["response_ids"]]) for r in rows]
    edited[0]["response_ids"][1] = [9]  # same length, different token
    with torch.no_grad():
        before = grouped_logprobs(model, collate_listwise(rows)).logps
        after = grouped_logprobs(model, collate_listwise(edited)).logps
    keep = torch.ones_like(before, dtype=torch.bool)
    keep[0, 1] = False
    assert torch.equal(before[keep], after[keep]) and before[0, 1] != after[0, 1]


def test_response_masks_score_only_marked_tokens(tiny_model_f64, make_rows):
    rows = make_rows(GROUPS)
    gen = torch.Generator().manual_seed(5)
    for row in rows:  # random masks with at least one scored token
        row["response_masks"] = []
        for response in row["response_ids"]:
            mask = torch.randint(0, 2, (len(response),), generator=gen).tolist()
            mask[-1] = 1
            row["response_masks"].append(mask)
    batch = collate_listwise(rows)
    with torch.no_grad():
        shared = grouped_logprobs(tiny_model_f64, batch, prefix_sharing=True)
        unshared = grouped_logprobs(tiny_model_f64, batch, prefix_sharing=False)
    torch.testing.assert_close(shared.logps, unshared.logps, atol=1e-6, rtol=0)
    assert torch.equal(shared.num_tokens, batch.num_scored_tokens())
    for b, row in enumerate(rows):
        prompt = row["prompt_ids"]
        for i, (response, mask) in enumerate(zip(row["response_ids"], row["response_masks"])):
            with torch.no_grad():
                logits = tiny_model_f64(torch.tensor([prompt + response])).logits[0]
            logsm = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
            per_token = logsm.gather(1, torch.tensor(response)[:, None])
            expected = (per_token[:, 0] * torch.tensor(mask, dtype=per_token.dtype)).sum()
            torch.testing.assert_close(shared.logps[b, i], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "raypo_prefix_sdpa"])
def test_per_group_forward_is_independent_of_the_batch_bitwise(tiny_tokenizer, make_rows, attn):
    """``per_group=True``: a group's fp32 log-probs and entropies are bitwise those of the group scored
    alone, whatever it is batched with (the precomputed reference relies on it for exact zero rewards)."""
    from raypo.model.tiny import TinySpec, build_tiny_model

    model = build_tiny_model(TinySpec(seed=0), tiny_tokenizer, dtype=torch.float32)
    model.config._attn_implementation = attn
    groups = [(17, [9, 30, 4]), (40, [25, 3, 12, 8, 19]), (6, [2, 44]), (23, [13, 13, 7, 1])]
    rows = make_rows(groups, seed=3)
    with torch.no_grad():
        alone = [grouped_logprobs(model, collate_listwise([r]), with_entropy=True) for r in rows]
        for order in ([0, 1, 2, 3], [3, 1], [2, 0, 3]):
            out = grouped_logprobs(model, collate_listwise([rows[j] for j in order]), with_entropy=True,
                                   per_group=True)
            assert out.logps.shape == (len(order), max(len(groups[j][1]) for j in order))
            for b, j in enumerate(order):
                n = len(groups[j][1])
                assert torch.equal(out.logps[b, :n], alone[j].logps[0]), (order, j)
                assert torch.equal(out.entropy[b, :n], alone[j].entropy[0]), (order, j)
                assert torch.equal(out.num_tokens[b, :n], alone[j].num_tokens[0])
                assert (out.logps[b, n:] == 0).all() and not out.mask[b, n:].any()
