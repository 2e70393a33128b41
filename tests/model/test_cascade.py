"""Cascade attention (raypo.model.cascade): exact against the dense block mask and prefix_sdpa in float64,
values and gradients, on ragged groups, several groups per row, GQA, padding; flex kernel on CPU."""

from __future__ import annotations

import pytest
import torch

from raypo.model import attention as prefix_attention
from raypo.model import cascade
from raypo.model.batch import collate_listwise
from raypo.model.layout import prefix_sharing_mask, shared_layout
from raypo.model.listwise import grouped_logprobs
from raypo.model.loading import hf_attn_implementation

GROUPS = [(5, [3, 1, 4, 2]), (1, [2, 3]), (3, [1]), (7, [6, 2, 2, 5, 1])]


def _ids():
    """Two rows: row 0 holds two groups (prompt, responses, prompt, responses), row 1 one, then padding."""
    g = [[0] * 4 + [0] * 5 + [1] * 3 + [1] * 4 + [-1] * 2, [0] * 6 + [0] * 6 + [-1] * 6]
    s = [[0] * 4 + [1, 1, 2, 2, 2] + [0] * 3 + [1, 2, 2, 2] + [-1] * 2,
         [0] * 6 + [1, 1, 1, 2, 3, 3] + [-1] * 6]
    return torch.tensor(g), torch.tensor(s)


def _qkv(heads=4, kv_heads=2, dim=8, length=18, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, dim, dtype=torch.float64, generator=gen)
    k = torch.randn(2, kv_heads, length, dim, dtype=torch.float64, generator=gen)
    v = torch.randn(2, kv_heads, length, dim, dtype=torch.float64, generator=gen)
    return [t.requires_grad_(True) for t in (q, k, v)]


def _dense(q, k, v, allowed):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out.transpose(1, 2)


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_cascade_equals_dense_values_and_grads_float64(kernel):
    group_ids, segment_ids = _ids()
    mask = prefix_attention.structure_mask(group_ids, segment_ids)
    real = (segment_ids >= 0)[..., None, None]
    q, k, v = _qkv()
    dense = _dense(q, k, v, prefix_sharing_mask(group_ids, segment_ids)) * real
    weight = torch.randn(dense.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads_dense = torch.autograd.grad((dense * weight).sum(), (q, k, v))
    out = cascade.cascade(q, k, v, mask, kernel=kernel)
    assert out.shape == dense.shape
    assert (out * ~real == 0).all()  # padding queries: output 0
    torch.testing.assert_close(out, dense, atol=1e-12, rtol=0)
    for got, want in zip(torch.autograd.grad((out * weight).sum(), (q, k, v)), grads_dense):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_flex_kernel_forward_equals_dense_float64():
    """FlexAttention's backward runs on CUDA only (bench/gpu.py checks it there); its CPU forward here."""
    group_ids, segment_ids = _ids()
    real = (segment_ids >= 0)[..., None, None]
    q, k, v = (t.detach() for t in _qkv(seed=3))
    dense = _dense(q, k, v, prefix_sharing_mask(group_ids, segment_ids)) * real
    out = cascade.cascade(q, k, v, prefix_attention.structure_mask(group_ids, segment_ids), kernel="flex")
    torch.testing.assert_close(out, dense, atol=1e-12, rtol=0)


def test_cascade_takes_no_per_response_kv_copy():
    """The plan gathers each prompt token once as a key (part A) and each response token once (part B)."""
    group_ids, segment_ids = _ids()
    plan = cascade.build_plan(prefix_attention.structure_mask(group_ids, segment_ids))
    assert plan.kv_index.shape[0] == 3 and plan.prompt_lens == (4, 3, 6)
    assert sorted(plan.r_out.tolist()) == sorted(set(plan.r_out.tolist()))
    assert plan.r_index.shape[0] == 7  # 7 responses, each its own causal block
    assert not plan.rows_are_groups  # row 0 holds two groups: the gathered path
    packed = shared_layout(collate_listwise([{"prompt_ids": [1, 2], "response_ids": [[3], [4, 5]]},
                                             {"prompt_ids": [6], "response_ids": [[7]]}]))
    plan = cascade.build_plan(prefix_attention.structure_mask(packed.group_ids, packed.segment_ids))
    assert plan.rows_are_groups and plan.prompt_lens == (2, 1)  # the shared layout: no query gathers


def _run(model, batch, attn):
    model.config._attn_implementation = attn
    model.zero_grad(set_to_none=True)
    weights = torch.randn(batch.num_groups, batch.num_responses, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(2))
    out = grouped_logprobs(model, batch)
    (out.logps * weights).sum().backward()
    return out.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_log_probs_equal_dense_and_prefix_sdpa_float64(tiny_model_f64, make_rows):
    assert tiny_model_f64.config.num_key_value_heads < tiny_model_f64.config.num_attention_heads  # GQA
    batch = collate_listwise(make_rows(GROUPS))
    results = {attn: _run(tiny_model_f64, batch, attn) for attn in ("sdpa", prefix_attention.NAME,
                                                                    cascade.NAME)}
    got, g_got = results[cascade.NAME]
    for attn in ("sdpa", prefix_attention.NAME):
        want, g_want = results[attn]
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        for name, grad in g_want.items():
            torch.testing.assert_close(g_got[name], grad, atol=1e-10, rtol=0, msg=f"{attn}: {name}")


def test_config_selects_cascade():
    assert hf_attn_implementation("cascade", prefix_sharing=True) == cascade.NAME
    with pytest.raises(ValueError, match="kernel"):
        with cascade.use_kernel("triton"):
            pass


def test_flex_block_masks_are_cached_and_widths_padded():
    group_ids, segment_ids = _ids()
    mask = prefix_attention.structure_mask(group_ids, segment_ids)
    plan = cascade.build_plan(mask, cascade.FLEX_PAD)
    assert plan.q_index.shape[1] % cascade.FLEX_PAD == 0 and plan.r_index.shape[1] % cascade.FLEX_PAD == 0
    first = cascade._block_mask_a(plan.prompt_lens, plan.q_index.shape[1], plan.kv_index.shape[1], "cpu")
    again = cascade._block_mask_a(plan.prompt_lens, plan.q_index.shape[1], plan.kv_index.shape[1], "cpu")
    assert first is again


def test_transformers_flex_path_caches_block_masks_and_pads_rows(tiny_model_f64, make_rows):
    from raypo.model.listwise import ListwiseLogProbModel, default_pad_multiple, flex_block_mask

    group_ids, segment_ids = _ids()
    assert flex_block_mask(group_ids, segment_ids) is flex_block_mask(group_ids.clone(), segment_ids.clone())
    assert flex_block_mask(group_ids, segment_ids) is not flex_block_mask(group_ids, segment_ids.flip(1))
    wrapped = ListwiseLogProbModel(tiny_model_f64)
    assert default_pad_multiple(wrapped) == 1  # sdpa: no padding
    tiny_model_f64.config._attn_implementation = "flex_attention"
    assert default_pad_multiple(wrapped) == cascade.FLEX_PAD  # rows padded to the flex block size
