"""Cascade attention for the shared layout: the prompt's keys attended once per group, no K/V copies.

In a shared row ``[prompt | r_1 | ... | r_N]`` a response token's softmax runs over two disjoint key sets,
the P prompt keys and the earlier tokens of its own response. Attention splits exactly over them: with
the two parts' outputs o_a, o_b and log-sum-exps lse_a, lse_b,

    o = (e^lse_a o_a + e^lse_b o_b) / (e^lse_a + e^lse_b) = w o_a + (1 - w) o_b,   w = sigmoid(lse_a - lse_b)

(the merge of cascade / split-KV attention, as in FlashInfer's cascade inference). This backend computes

    part A, once per group:  q = [prompt | all responses of the group], k = v = prompt only
                             (prompt queries causal, response queries every prompt key)      cost (P+T) P
    part B, per response:    q = k = v = r_i, causal                                         cost R_i^2

and merges the response tokens by their log-sum-exps. The prompt's K/V enter one attention call per group
(never copied per response, as :mod:`raypo.model.attention`'s ``prefix_sdpa`` does) and grouped-query
heads are handled by a grouped reshape, query heads [KV, G] against KV key heads (no ``repeat_kv``). The
allowed (query, key) pairs are those of :func:`raypo.model.layout.prefix_sharing_mask`; padding queries get
output 0. Values equal the dense path up to float rounding (tests/model/test_cascade.py, float64, values
and gradients).

Kernels (:func:`use_kernel`): ``math`` computes each part with explicit scores and ``logsumexp`` and a
custom exact backward; ``flash`` runs each part on PyTorch's fused CPU flash kernel, which returns the
log-sum-exp (its backward gets the log-sum-exp gradient through one extra zero channel,
:class:`_CpuFlashPart`); ``flex`` runs each part through FlexAttention with ``enable_gqa`` and
``return_aux=AuxRequest(lse=True)`` (its backward takes the gradient of the log-sum-exp), compiled on
CUDA. ``auto`` is ``flex`` on CUDA, ``flash`` on CPU. For flex, block widths are padded to multiples of
:data:`FLEX_PAD` and BlockMasks are cached per (shape, prompt lengths), so a compiled kernel sees few
distinct shapes and masks are not rebuilt per layer.

Wiring: registered with transformers as :data:`NAME` (``model.attention: cascade``); it reads the same
``[R, 1, 2, L]`` structure mask as ``prefix_sdpa`` (:func:`raypo.model.attention.structure_mask`) and sends
any other mask (unshared layout, generation) to transformers' ``sdpa``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from raypo.model.attention import _segments, is_structure_mask

NAME = "raypo_cascade"
FLEX_PAD = 128  # FlexAttention's default block size
_PLAN_ATTR = "_raypo_cascade_plan"
_KERNEL = {"name": "auto"}
_BWD_PAD = 1  # the one extra channel that carries the log-sum-exp gradient


@contextlib.contextmanager
def use_kernel(name: str):
    """Force the kernel (``auto`` | ``math`` | ``flex``) inside the block (benchmarks, tests)."""
    if name not in ("auto", "math", "flash", "flex"):
        raise ValueError(f"cascade kernel must be auto, math, flash or flex, got {name!r}")
    previous, _KERNEL["name"] = _KERNEL["name"], name
    try:
        yield
    finally:
        _KERNEL["name"] = previous


def _kernel(device: torch.device) -> str:
    name = _KERNEL["name"]
    if name != "auto":
        return name
    if device.type == "cuda":
        return "flex"
    has_flash = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    return "flash" if device.type == "cpu" and has_flash else "math"


@dataclass
class _Plan:
    """Gather indices, flat into [R * L]. M groups padded to S queries / Pw prompt keys; Mr responses
    padded to Rw tokens."""

    q_index: torch.Tensor  # int64 [M, S]: the group's prompt tokens, then its response tokens
    q_valid: torch.Tensor  # bool [M, S]
    kv_index: torch.Tensor  # int64 [M, Pw]: the group's prompt tokens
    prompt_len: torch.Tensor  # int64 [M]
    prompt_lens: tuple[int, ...]
    r_index: torch.Tensor | None  # int64 [Mr, Rw]
    r_valid: torch.Tensor | None  # bool [Mr, Rw]
    out_index: torch.Tensor  # int64 [n]: q_index[q_valid]
    r_out: torch.Tensor | None  # int64 [n_r]: r_index[r_valid]
    rows_are_groups: bool = False  # row m is group m from position 0 (the shared layout): no gathers
    masks: dict = field(default_factory=dict)  # per (kernel, groups, dtype), see _masks


def _round(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def _padded(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.long)
    valid = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], dtype=torch.bool)
    return index, valid


def build_plan(mask: torch.Tensor, multiple: int = 1) -> _Plan:
    """The gather plan of a structure mask (widths rounded up to ``multiple``)."""
    ids = mask[:, 0].cpu()
    length = mask.shape[-1]
    prompts, responses = _segments(ids[:, 0], ids[:, 1])
    by_prompt = {(row, start): i for i, (row, start, _) in enumerate(prompts)}
    queries = [[row * length + start + t for t in range(n)] for row, start, n in prompts]
    keys = [list(q) for q in queries]
    own = []
    for row, p_start, _, start, n in responses:
        tokens = [row * length + start + t for t in range(n)]
        queries[by_prompt[(row, p_start)]] += tokens
        own.append(tokens)
    q_index, q_valid = _padded(queries, _round(max(map(len, queries)), multiple))
    kv_index, _ = _padded(keys, _round(max(map(len, keys)), multiple))
    r_index = r_valid = r_out = None
    if own:
        r_index, r_valid = _padded(own, _round(max(map(len, own)), multiple))
        r_out = r_index[r_valid]
    lens = tuple(n for _, _, n in prompts)
    dev = mask.device

    def move(t):
        return None if t is None else t.to(dev)

    rows_are_groups = multiple == 1 and len(queries) == mask.shape[0] and all(
        q == list(range(m * length, m * length + len(q))) for m, q in enumerate(queries))
    if rows_are_groups:  # row-shaped part A: S = L, padding queries at the row ends
        q_index, q_valid = _padded(queries, length)
    return _Plan(move(q_index), move(q_valid), move(kv_index), torch.tensor(lens, device=dev), lens,
                 move(r_index), move(r_valid), move(q_index[q_valid]), move(r_out), rows_are_groups)


def plan_for(mask: torch.Tensor, multiple: int) -> _Plan:
    """Built once per forward (cached on the structure-mask tensor every layer receives)."""
    plan = getattr(mask, _PLAN_ATTR, None)
    if plan is None or plan[0] != multiple:
        plan = (multiple, build_plan(mask, multiple))
        setattr(mask, _PLAN_ATTR, plan)
    return plan[1]


# ----------------------------------------------------------------------------------------------------
# The two parts, math kernel: explicit scores, grouped-query reshape, exact log-sum-exp
# ----------------------------------------------------------------------------------------------------


class _MathPart(torch.autograd.Function):
    """``(q [M, KV, G*S, D], k/v [M, KV, K, D], allowed bool [M, 1, 1, S, K]) -> (o, lse [M, KV, G*S])``.

    Explicit scores with few passes (in-place mask, exp and backward updates) and an exact backward that
    includes the log-sum-exp's gradient: with p = softmax(s), D = rowsum(dO * O) and g = d lse,

        dV = p^T dO,   ds = p * (dO V^T - D + g),   dQ = scale ds K,   dK = scale ds^T Q.
    """

    @staticmethod
    def forward(ctx, q, k, v, allowed, scale: float, groups: int):
        m, kv_heads, gs, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 for bf16
        scores = ((q * scale) @ k.transpose(-1, -2)).to(acc)  # [M, KV, G*S, K]; scale on the smaller q
        width = scores.shape[-1]
        scores.view(m, kv_heads, groups, gs // groups, width).masked_fill_(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = scores.sub_(lse[..., None]).exp_().to(v.dtype)
        out = probs @ v
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, probs, out = ctx.saved_tensors
        grad_v = probs.transpose(-1, -2) @ grad_out
        rows = (grad_out * out).sum(-1, keepdim=True)
        if grad_lse is not None:
            rows = rows - grad_lse[..., None].to(rows.dtype)
        grad_s = (grad_out @ v.transpose(-1, -2)).sub_(rows).mul_(probs)
        return ((grad_s @ k) * ctx.scale, (grad_s.transpose(-1, -2) @ q) * ctx.scale, grad_v, None, None,
                None)


def _math_part(q, k, v, allowed, scale: float):
    """q [M, H, S, D], k/v [M, KV, K, D], allowed bool [M, S, K] -> (o [M, H, S, D], lse [M, H, S])."""
    m, heads, s, d = q.shape
    kv_heads = k.shape[1]
    g = heads // kv_heads
    qg = q.reshape(m, kv_heads, g * s, d)  # query heads kv*G .. kv*G+G-1 share key head kv (repeat_kv order)
    out, lse = _MathPart.apply(qg, k, v, allowed[:, None, None], scale, g)
    return out.view(m, heads, s, d), lse.view(m, heads, s)


class _CpuFlashPart(torch.autograd.Function):
    """:class:`_MathPart` on PyTorch's fused CPU flash-attention kernel, which returns the log-sum-exp.

    Its backward takes no log-sum-exp gradient, so one zero channel is appended to q, k and v (scores and
    outputs unchanged) and the backward is handed ``out' = [O, 1]`` and ``dO' = [dO, -g]``: the kernel's
    row term rowsum(dO' * out') is then D - g and dO' V'^T is dO V^T, so ds = p (dO V^T - D + g), the exact
    gradient through both outputs. ``bias``: additive float mask [M, 1, G*S, K] (0 or -inf).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                              attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        d = q.shape[-1]
        pad = _BWD_PAD
        qp, kp, vp, outp = (torch.nn.functional.pad(t, (0, pad)) for t in (q, k, v, out))
        outp[..., d] = 1
        gradp = torch.nn.functional.pad(grad_out, (0, pad))
        if grad_lse is not None:
            gradp[..., d] = -grad_lse.to(grad_out.dtype)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            gradp, qp, kp, vp, outp, lse, 0.0, False, attn_mask=bias, scale=ctx.scale)
        return dq[..., :d], dk[..., :d], dv[..., :d], None, None


def _flash_bias(allowed: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """bool [M, S, K] -> the additive mask [M, 1, G*S, K] of the grouped-query rows (0 or -inf)."""
    m, s, width = allowed.shape
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias[:, None, None].expand(m, 1, groups, s, width).reshape(m, 1, groups * s, width)


def _flash_part(q, k, v, bias, scale: float):
    """:func:`_math_part` on the CPU flash kernel (same shapes and values); ``bias`` from
    :func:`_flash_bias`."""
    m, heads, s, d = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(m, kv_heads, heads // kv_heads * s, d)
    out, lse = _CpuFlashPart.apply(qg, k, v, bias, scale)
    return out.reshape(m, heads, s, d), lse.reshape(m, heads, s)


def _masks(plan: _Plan, kernel: str, groups: int, dtype: torch.dtype):
    """Part A's and part B's masks for the math (bool) or flash (additive) kernel, built once per forward
    and cached on the plan (every layer reuses them)."""
    key = (kernel, groups, dtype)
    if key not in plan.masks:
        s, pw, device = plan.q_index.shape[1], plan.kv_index.shape[1], plan.q_index.device
        t, j = torch.arange(s, device=device), torch.arange(pw, device=device)
        plen = plan.prompt_len[:, None, None]
        qpos = torch.where(t[None, :, None] < plen, t[None, :, None], pw)  # responses see every prompt key
        mask_a = (j[None, None, :] < plen) & (j[None, None, :] <= qpos)  # [M, S, Pw]
        mask_b = None
        if plan.r_index is not None:
            mr, rw = plan.r_index.shape
            r = torch.arange(rw, device=device)
            mask_b = (r[None, :] <= r[:, None])[None].expand(mr, rw, rw)  # causal [Mr, Rw, Rw]
        if kernel == "flash":
            mask_a = _flash_bias(mask_a, groups, dtype)
            mask_b = None if mask_b is None else _flash_bias(mask_b[:1], groups, dtype).expand(
                mask_b.shape[0], -1, -1, -1)
        plan.masks[key] = (mask_a, mask_b)
    return plan.masks[key]


# ----------------------------------------------------------------------------------------------------
# Flex kernel: cached BlockMasks, compiled on CUDA
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _block_mask_a(prompt_lens: tuple[int, ...], s: int, pw: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    plen = torch.tensor(prompt_lens, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < plen[b]) & ((kv_idx <= q_idx) | (q_idx >= plen[b]))

    return create_block_mask(mask_mod, len(prompt_lens), None, s, pw, device=device)


@functools.lru_cache(maxsize=64)
def _block_mask_b(m: int, rw: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return create_block_mask(causal, m, None, rw, rw, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_part(q, k, v, block_mask, scale: float):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    fn = _compiled_flex() if q.is_cuda else flex_attention
    out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                  return_aux=AuxRequest(lse=True))
    return out, aux.lse


# ----------------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------------


def _gather(x_flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x_flat [R*L, heads, D], index [M, W] -> [M, heads, W, D]."""
    return x_flat[index].transpose(1, 2)


def cascade(query, key, value, mask: torch.Tensor, *, scaling: float | None = None,
            kernel: str | None = None) -> torch.Tensor:
    """query [B, H, L, D], key/value [B, KV, L, D], structure mask -> [B, L, H, D] (module docstring)."""
    batch, heads, length, dim = query.shape
    kernel = kernel or _kernel(query.device)
    scale = dim ** -0.5 if scaling is None else float(scaling)
    plan = plan_for(mask, FLEX_PAD if kernel == "flex" else 1)
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    s, pw = plan.q_index.shape[1], plan.kv_index.shape[1]
    rw = plan.r_index.shape[1] if plan.r_index is not None else 0
    if plan.rows_are_groups:
        qa, ka, va = query, key[:, :, :pw], value[:, :, :pw]
    else:
        qa, ka, va = _gather(q, plan.q_index), _gather(k, plan.kv_index), _gather(v, plan.kv_index)
    if kernel == "flex":
        dev = str(query.device)
        o_a, lse_a = _flex_part(qa, ka, va, _block_mask_a(plan.prompt_lens, s, pw, dev), scale)
    else:
        mask_a, mask_b = _masks(plan, kernel, heads // key.shape[1], query.dtype)
        part = _flash_part if kernel == "flash" else _math_part
        o_a, lse_a = part(qa, ka, va, mask_a, scale)
    if plan.rows_are_groups:
        flat_o = (o_a.transpose(1, 2) * plan.q_valid[..., None, None]).reshape(batch * length, heads, dim)
    else:
        flat_o = query.new_zeros(batch * length, heads, dim)
        flat_o = flat_o.index_put((plan.out_index,), o_a.transpose(1, 2)[plan.q_valid])
    if plan.r_index is None:
        return flat_o.view(batch, length, heads, dim)
    qb, kb, vb = (_gather(x, plan.r_index) for x in (q, k, v))
    if kernel == "flex":
        o_b, lse_b = _flex_part(qb, kb, vb, _block_mask_b(qb.shape[0], rw, dev), scale)
    else:
        o_b, lse_b = part(qb, kb, vb, mask_b, scale)
    if plan.rows_are_groups:
        flat_lse = lse_a.transpose(1, 2).reshape(batch * length, heads)
    else:
        flat_lse = lse_a.new_zeros(batch * length, heads)
        flat_lse = flat_lse.index_put((plan.out_index,), lse_a.transpose(1, 2)[plan.q_valid])
    o_b = o_b.transpose(1, 2)[plan.r_valid]  # [n_r, H, D]
    lse_b = lse_b.transpose(1, 2)[plan.r_valid]
    w = torch.sigmoid(flat_lse[plan.r_out] - lse_b).to(o_b.dtype)[..., None]
    merged = w * flat_o[plan.r_out] + (1 - w) * o_b
    return flat_o.index_put((plan.r_out,), merged).view(batch, length, heads, dim)


def cascade_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      **kwargs):
    """transformers attention function: ([B, L, H, D], None); non-structure masks go to plain ``sdpa``."""
    if not is_structure_mask(attention_mask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout:
        raise NotImplementedError("cascade attention has no attention dropout; set attention_dropout=0")
    return cascade(query, key, value, attention_mask, scaling=scaling), None


def register() -> None:
    """Register :data:`NAME` with transformers (idempotent), with the plain SDPA mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, cascade_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()
