"""Prefix-shared attention without the dense [L, L] mask: per-response KV expansion on SDPA.

The shared layout (:func:`raypo.model.layout.shared_layout`) puts ``[prompt | r_1 | ... | r_N]`` in one row of
L = P + sum_i R_i tokens. With a dense block mask (``sdpa``/``eager``) attention costs L^2 per row, although
a response attends only the prompt and itself: the masked-out response-to-response blocks are computed and
thrown away, so at N = 16 the shared row's attention costs as much as the N unshared rows' (16 * 320^2 =
(256 + 16 * 64)^2 for P = 256, R = 64). This backend computes only the allowed blocks:

    prompt block (one per row):  q = k = v = prompt                 causal               cost P^2
    response i:                  q = r_i,  k = v = [prompt | r_i]   bottom-right causal  cost R_i (P + R_i)

each as a batched ``scaled_dot_product_attention`` over gathered tokens (the prompt's keys and values are
gathered once per response, "KV expansion"; padded at the end to the longest block with a boolean mask, so
a group's values do not depend, bit for bit, on the groups batched with it),
and writes the outputs back to their row positions; padding positions get 0. The allowed (query, key) pairs
are exactly those of :func:`raypo.model.layout.prefix_sharing_mask`, so the values equal the dense path up to
float rounding (tests/model/test_prefix_sharing.py runs its float64 and bitwise checks on both).

How it is wired: the attention function is registered with transformers as :data:`NAME` (attention and
mask interfaces). :class:`raypo.model.listwise.ListwiseLogProbModel` passes, instead of a dense mask, a
*structure mask* ``[R, 1, 2, L]`` int64 (group ids and segment ids stacked, :func:`structure_mask`):
transformers hands any 4-D mask to the attention function unchanged. The gather plan is built once per
forward and cached on that tensor. Any other mask (the unshared layout's padding mask, generation) goes to
transformers' plain ``sdpa`` path. Select it with ``model.attention: prefix_sdpa``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "raypo_prefix_sdpa"
_PLAN_ATTR = "_raypo_prefix_plan"


def structure_mask(group_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[R, L] group and segment ids -> the int64 [R, 1, 2, L] tensor this backend reads as its mask."""
    return torch.stack([group_ids, segment_ids], dim=1)[:, None].to(torch.long)


def is_structure_mask(mask) -> bool:
    return (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype == torch.long
            and mask.shape[2] == 2)


@dataclass
class _Blocks:
    """One batched SDPA call: M blocks of Lq queries and Lk keys, as flat indices into [R * L]."""

    q_index: torch.Tensor  # int64 [M, Lq]
    kv_index: torch.Tensor  # int64 [M, Lk]
    mask: torch.Tensor  # bool [M, 1, Lq, Lk], True = attend
    valid: torch.Tensor  # bool [M, Lq], real queries
    out_index: torch.Tensor  # int64 [n_valid] = q_index[valid]


@dataclass
class _Plan:
    prompts: _Blocks | None
    responses: _Blocks | None


def _runs(values: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Maximal runs of equal (group, segment) pairs: (group, segment, start, stop)."""
    out, start = [], 0
    for t in range(1, len(values) + 1):
        if t == len(values) or values[t] != values[start]:
            out.append((*values[start], start, t))
            start = t
    return out


def _segments(group_ids: torch.Tensor, segment_ids: torch.Tensor):
    """Per row: prompt spans (row, start, length) and response spans (row, prompt start, prompt length,
    start, length); a response belongs to the last prompt of its group before it."""
    prompts, responses = [], []
    for row, (groups, segs) in enumerate(zip(group_ids.tolist(), segment_ids.tolist())):
        last_prompt: dict[int, tuple[int, int]] = {}
        for group, seg, start, stop in _runs(list(zip(groups, segs))):
            if group < 0 or seg < 0:
                continue  # padding
            if seg == 0:
                last_prompt[group] = (start, stop - start)
                prompts.append((row, start, stop - start))
            elif group in last_prompt:
                p_start, p_len = last_prompt[group]
                responses.append((row, p_start, p_len, start, stop - start))
            else:
                raise ValueError(f"row {row}: response segment {seg} of group {group} has no prompt "
                                 "before it")
    return prompts, responses


def _prompt_blocks(prompts, length: int, device) -> _Blocks | None:
    if not prompts:
        return None
    width = max(n for _, _, n in prompts)
    t = torch.arange(width)
    base = torch.tensor([row * length + start for row, start, _ in prompts])[:, None]
    sizes = torch.tensor([n for _, _, n in prompts])[:, None]
    valid = t[None, :] < sizes  # [M, P]
    index = base + torch.where(valid, t[None, :], 0)
    q, k = t[:, None], t[None, :]
    mask = ((k <= q)[None] & valid[:, None, :]) | (~valid[:, :, None] & (k == 0)[None])
    return _to(_Blocks(index, index, mask[:, None], valid, index[valid]), device)


def _response_blocks(responses, length: int, device) -> _Blocks | None:
    """Response i's keys are gathered contiguously, ``[prompt | r_i]``, and padded at the end only.

    Why not ``[prompt padded to the longest prompt | r_i]``: padding in the middle of the keys shifts the
    real keys by an amount that depends on the other groups in the batch, which changes how the kernel
    blocks its sums and so the last bits of the result. With trailing padding a group's log-probs are the
    same bit for bit whatever it is batched with, so precomputed reference log-probs (scored in other
    batches) give exactly zero rewards at step 0.
    """
    if not responses:
        return None
    r_width = max(r[4] for r in responses)
    kv_width = max(r[2] + r[4] for r in responses)
    tr, tk = torch.arange(r_width), torch.arange(kv_width)
    row_base = torch.tensor([row * length for row, *_ in responses])[:, None]
    p_start = torch.tensor([r[1] for r in responses])[:, None]
    p_len = torch.tensor([r[2] for r in responses])[:, None]
    r_start = torch.tensor([r[3] for r in responses])[:, None]
    r_len = torch.tensor([r[4] for r in responses])[:, None]
    r_valid = tr[None] < r_len  # [M, Rw]
    q_index = row_base + r_start + torch.where(r_valid, tr[None], 0)
    in_prompt = tk[None] < p_len  # [M, Kw]
    k_resp = tk[None] - p_len  # key position inside the response (negative in the prompt)
    in_resp = (k_resp >= 0) & (k_resp < r_len)
    kv_index = row_base + torch.where(in_prompt, p_start + tk[None],
                                      torch.where(in_resp, r_start + k_resp.clamp_min(0), 0))
    causal = k_resp[:, None, :] <= tr[None, :, None]  # [M, Rw(q), Kw]: a response key at or before q
    mask = in_prompt[:, None, :] | (in_resp[:, None, :] & causal)
    first_key = torch.zeros(kv_width, dtype=torch.bool)
    first_key[0] = True
    mask = torch.where(r_valid[:, :, None], mask, first_key[None, None, :])  # padded queries: key 0 only
    return _to(_Blocks(q_index, kv_index, mask[:, None], r_valid, q_index[r_valid]), device)


def _to(blocks: _Blocks, device) -> _Blocks:
    return _Blocks(*(getattr(blocks, f).to(device) for f in ("q_index", "kv_index", "mask", "valid",
                                                            "out_index")))


def plan_for(mask: torch.Tensor) -> _Plan:
    """The gather plan of a structure mask, built once and cached on the tensor."""
    plan = getattr(mask, _PLAN_ATTR, None)
    if plan is None:
        ids = mask[:, 0].cpu()
        prompts, responses = _segments(ids[:, 0], ids[:, 1])
        length = mask.shape[-1]
        plan = _Plan(_prompt_blocks(prompts, length, mask.device),
                     _response_blocks(responses, length, mask.device))
        setattr(mask, _PLAN_ATTR, plan)
    return plan


def _attend(out, q, k, v, blocks: _Blocks, *, groups: int, scaling, dropout: float) -> torch.Tensor:
    """SDPA over the gathered blocks; the valid outputs are written into ``out`` (out of place)."""
    qb = q[blocks.q_index].transpose(1, 2)  # [M, H, Lq, D]
    kb = k[blocks.kv_index].transpose(1, 2)  # [M, KV, Lk, D]
    vb = v[blocks.kv_index].transpose(1, 2)
    if groups > 1:
        kb, vb = kb.repeat_interleave(groups, dim=1), vb.repeat_interleave(groups, dim=1)
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=blocks.mask, dropout_p=dropout, scale=scaling)
    return out.index_put((blocks.out_index,), ob.transpose(1, 2)[blocks.valid])


def prefix_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          **kwargs):
    """transformers attention function: query [B, H, L, D], key/value [B, KV, L, D] -> ([B, L, H, D], None).

    A structure mask runs the block computation of the module docstring; anything else goes to
    transformers' ``sdpa_attention_forward``.
    """
    if not is_structure_mask(attention_mask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    plan = plan_for(attention_mask)
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    out = query.new_zeros(batch * length, heads, dim)
    for blocks in (plan.prompts, plan.responses):
        if blocks is not None:
            out = _attend(out, q, k, v, blocks, groups=heads // kv_heads, scaling=scaling, dropout=dropout)
    return out.view(batch, length, heads, dim), None


def register() -> None:
    """Register :data:`NAME` with transformers (idempotent): the attention function, and the plain SDPA
    mask builder for 2-D padding masks (the unshared layout)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, prefix_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()
