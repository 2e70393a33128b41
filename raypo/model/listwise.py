"""Per-response sequence log-probs of a listwise batch: s[b, i] = sum_t log pi(y_{b,i,t} | x_b, y_{b,i,<t}).

:class:`ListwiseLogProbModel` wraps a Hugging Face causal LM. Its forward takes the layout's tensors
(:mod:`raypo.model.layout`) and returns per-response sums; it is the module handed to
``deepspeed.initialize``, so the decoder, the block mask and the chunked log-prob head
(:mod:`raypo.model.logprobs`) all run inside the engine's forward, which ZeRO-3 needs (parameter gathering,
micro-step bookkeeping, output hooks).

:func:`grouped_logprobs` is the one entry point for policy, reference and precomputed-reference passes, so
step-0 implicit rewards are exactly zero when policy and reference weights agree.

Attention backends for the shared layout (``config._attn_implementation`` of the loaded model):

* ``eager``: dense additive float mask [R, 1, L, L] in the model dtype.
* ``sdpa``: dense boolean mask [R, 1, L, L] (SDPA's flash kernel takes no arbitrary mask, so it runs the
  memory-efficient or math kernel; the mask costs R*L^2 bytes). Opt-in (``model.attention: sdpa``).
* ``raypo_prefix_sdpa`` (``model.attention: prefix_sdpa``, and the default ``auto`` with prefix sharing):
  no dense mask; a [R, 1, 2, L] structure mask from which :mod:`raypo.model.attention` computes only the
  allowed blocks (prompt causal, each response on [prompt | itself]) with batched SDPA: attention cost
  P^2 + sum_i R_i (P + R_i) instead of L^2.
* ``raypo_cascade`` (``model.attention: cascade``): the same structure mask; the prompt's keys attended
  once per group and each response's own causal block, merged by log-sum-exp (:mod:`raypo.model.cascade`):
  no per-response K/V copies, no ``repeat_kv``; the CPU flash kernel on CPU, FlexAttention on CUDA.
* ``flex_attention``: a FlexAttention ``BlockMask`` from :func:`raypo.model.layout.prefix_sharing_mask_mod`
  (GPU; block-sparse, so masked-out response pairs cost nothing); rows padded to 128 tokens and the
  BlockMask cached per (shape, ids) (:func:`flex_block_mask`), so compiled flex does not recompile per
  length. Only its forward is checked, on CPU (an integration test); its backward and the GPU kernels have
  not been run (``bench/gpu.py`` does, on a GPU).
* ``flash_attention_*``: no custom mask, so prefix sharing is refused (use the unshared layout).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from raypo.model import attention as prefix_attention  # registers the prefix_sdpa backend with transformers
from raypo.model import cascade as cascade_attention  # registers the cascade backend
from raypo.model.batch import ListwiseBatch
from raypo.model.layout import (
    LayoutInputs,
    additive_mask,
    prefix_sharing_mask,
    prefix_sharing_mask_mod,
    shared_layout,
    unshared_layout,
)
from raypo.model.logprobs import (
    DEFAULT_HEAD_CHUNK_SIZE,
    check_head_supported,
    lm_head_label_logprobs,
    normalised_entropy,
    output_vocab_size,
)

_DENSE_MASK_BACKENDS = ("eager", "sdpa")


@dataclass
class LogProbOutput:
    """Per-response results, all [B, N]; missing responses (``mask`` False) hold 0.

    logps: summed log-probs s = sum_t log p(y_t | ...), fp32 (float64 for a float64 model); differentiable.
    num_tokens: int64 scored-token counts, so ``logps / num_tokens`` is the length-normalised log-prob.
    entropy: MallowsPO's H̄(y) = sum_t H_t / (num_tokens * ln|V|) when requested (no gradient), else None.
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None

    @property
    def mean_logps(self) -> torch.Tensor:
        return self.logps / self.num_tokens.clamp_min(1).to(self.logps.dtype)


class ListwiseLogProbModel(nn.Module):
    """A causal LM seen as a function from packed listwise inputs to per-response log-prob sums.

    Args:
        causal_lm: a Hugging Face ``*ForCausalLM`` (or a PEFT model around one) whose logits are
            ``lm_head(decoder(...))`` with a linear ``lm_head``.
        head_chunk_size: response tokens per chunk of [chunk, V] logits in the head.
    """

    def __init__(self, causal_lm: nn.Module, *, head_chunk_size: int = DEFAULT_HEAD_CHUNK_SIZE):
        super().__init__()
        self.causal_lm = causal_lm
        self.head_chunk_size = head_chunk_size
        check_head_supported(causal_lm.get_output_embeddings(), getattr(causal_lm, "config", None))

    @property
    def attn_implementation(self) -> str:
        return getattr(self.causal_lm.config, "_attn_implementation", None) or "eager"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def block_mask(self, group_ids: torch.Tensor, segment_ids: torch.Tensor, dtype: torch.dtype):
        """The prefix-sharing mask in the format the model's attention backend consumes."""
        impl = self.attn_implementation
        if impl == "sdpa":
            return prefix_sharing_mask(group_ids, segment_ids)
        if impl == "eager":
            return additive_mask(prefix_sharing_mask(group_ids, segment_ids), dtype)
        if impl in (prefix_attention.NAME, cascade_attention.NAME):
            return prefix_attention.structure_mask(group_ids, segment_ids)
        if impl == "flex_attention":
            return flex_block_mask(group_ids, segment_ids)
        raise ValueError(f"attention implementation {impl!r} cannot take the prefix-sharing block mask; set "
                         "model.attention to prefix_sdpa, cascade, sdpa, eager or flex, or "
                         "model.prefix_sharing=false")

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pred_index: torch.Tensor,
        target_ids: torch.Tensor,
        slot_index: torch.Tensor,
        *,
        num_groups: int,
        num_responses: int,
        max_response_len: int,
        attention_mask: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        with_entropy: bool = False,
    ) -> dict[str, torch.Tensor]:
        """:class:`raypo.model.layout.LayoutInputs` -> ``{"logps": [B, N], "entropy": [B, N]}``.

        ``logps`` are sums over each response's tokens; ``entropy`` (only with ``with_entropy``) are sums of
        per-token entropies in nats. A plain dict of tensors, so DeepSpeed's output hooks see them.
        """
        if group_ids is not None:
            mask = self.block_mask(group_ids, segment_ids, self.causal_lm.dtype)
        else:
            mask = attention_mask  # 2D padding mask: transformers builds the causal mask itself
        decoder = self.causal_lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_index)  # [T, H] response positions
        lm_head = self.causal_lm.get_output_embeddings()
        token_logps, token_entropy = lm_head_label_logprobs(lm_head, hidden, target_ids,
                                                            chunk_size=self.head_chunk_size,
                                                            with_entropy=with_entropy)
        shape = (num_groups, num_responses, max_response_len)
        out = {"logps": _sum_slots(token_logps, slot_index, shape)}
        if with_entropy:
            out["entropy"] = _sum_slots(token_entropy, slot_index, shape)
        return out


_FLEX_MASKS: OrderedDict = OrderedDict()
_FLEX_MASK_CACHE_SIZE = 32


def flex_block_mask(group_ids: torch.Tensor, segment_ids: torch.Tensor):
    """The FlexAttention ``BlockMask`` of the prefix-sharing rule, cached per (shape, ids): a repeated
    micro-batch shape (eval, the reference pass after the policy's, response chunks) reuses it."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (str(group_ids.device), tuple(group_ids.shape), group_ids.cpu().numpy().tobytes(),
           segment_ids.cpu().numpy().tobytes())
    mask = _FLEX_MASKS.get(key)
    if mask is None:
        rows, length = group_ids.shape
        mask_mod = prefix_sharing_mask_mod(group_ids, segment_ids)
        mask = create_block_mask(mask_mod, rows, None, length, length, device=group_ids.device)
        _FLEX_MASKS[key] = mask
        if len(_FLEX_MASKS) > _FLEX_MASK_CACHE_SIZE:
            _FLEX_MASKS.popitem(last=False)
    else:
        _FLEX_MASKS.move_to_end(key)
    return mask


def _sum_slots(values: torch.Tensor, slot_index: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """[T] -> [B, N]: place each token value in its (b, i, t) slot, then sum over t.

    Slots are unique, so the placement is a copy and the sum runs in a fixed order: the result for one
    response does not depend on any other response's tokens, bit for bit (no atomics, unlike index_add).
    """
    flat = values.new_zeros(shape[0] * shape[1] * shape[2]).index_copy(0, slot_index, values)
    return flat.view(shape).sum(-1)


def as_logprob_model(model: nn.Module) -> nn.Module:
    """Wrap a bare causal LM in :class:`ListwiseLogProbModel`; pass wrappers and DeepSpeed engines through."""
    if isinstance(model, ListwiseLogProbModel):
        return model
    if isinstance(getattr(model, "module", None), ListwiseLogProbModel):  # DeepSpeed engine, DDP
        return model
    if hasattr(model, "get_output_embeddings") and hasattr(model, "get_decoder"):
        return ListwiseLogProbModel(model)
    raise TypeError(f"expected a causal LM, a ListwiseLogProbModel or an engine wrapping one, got "
                    f"{type(model).__name__}")


def _input_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    return next(model.parameters()).device


def _inner(model: nn.Module) -> ListwiseLogProbModel:
    return model.module if isinstance(getattr(model, "module", None), ListwiseLogProbModel) else model


def _lm_head(model: nn.Module) -> nn.Module:
    return _inner(model).causal_lm.get_output_embeddings()


def default_pad_multiple(model: nn.Module) -> int:
    """Row-length multiple for the model's attention: FlexAttention's block size for ``flex_attention``
    (so a compiled kernel sees few distinct lengths instead of recompiling per length), else 1."""
    return cascade_attention.FLEX_PAD if _inner(model).attn_implementation == "flex_attention" else 1


def pack(batch: ListwiseBatch, *, prefix_sharing: bool, pad_token_id: int = 0,
         pad_to_multiple_of: int = 1) -> LayoutInputs:
    """The shared or unshared layout of ``batch`` (:mod:`raypo.model.layout`)."""
    packer = shared_layout if prefix_sharing else unshared_layout
    return packer(batch, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def grouped_logprobs(
    model: nn.Module,
    batch: ListwiseBatch,
    *,
    prefix_sharing: bool = True,
    with_entropy: bool = False,
    pad_to_multiple_of: int | None = None,
    per_group: bool = False,
) -> LogProbOutput:
    """Per-response sequence log-probs [B, N] of ``batch`` under ``model``.

    ``model`` is a causal LM (wrapped on the fly), a :class:`ListwiseLogProbModel`, or a DeepSpeed engine
    around one (then the forward goes through ``engine.forward``, as ZeRO-3 requires). Gradients flow when
    called with grad enabled; wrap in ``torch.no_grad()`` for reference / scoring passes.

    ``prefix_sharing`` picks the layout; both give the same values (up to float rounding; bitwise identical
    per response within one layout). ``with_entropy`` adds MallowsPO's normalised entropy H̄ (reference).
    ``pad_to_multiple_of``: row-length multiple (None: :func:`default_pad_multiple`).

    ``per_group``: one forward per prompt group. A batched forward gives a group's log-probs that depend,
    in their last bits, on the other groups of the batch (kernels block their sums by the padded shapes),
    so values scored in one batch composition and compared in another are equal only to float rounding.
    One forward per group makes every shape a function of the group alone: the precomputed-reference stage
    and a run with ``train.reference: precomputed`` both use it, so rewards are exactly zero at step 0.
    """
    model = as_logprob_model(model)
    if pad_to_multiple_of is None:
        pad_to_multiple_of = default_pad_multiple(model)
    if per_group and batch.num_groups > 1:
        parts = [grouped_logprobs(model, batch.select_groups(b, b + 1), prefix_sharing=prefix_sharing,
                                  with_entropy=with_entropy, pad_to_multiple_of=pad_to_multiple_of)
                 for b in range(batch.num_groups)]
        entropy = torch.cat([p.entropy for p in parts]) if with_entropy else None
        return LogProbOutput(logps=torch.cat([p.logps for p in parts]),
                             num_tokens=torch.cat([p.num_tokens for p in parts]),
                             mask=torch.cat([p.mask for p in parts]), entropy=entropy)
    packed = pack(batch, prefix_sharing=prefix_sharing, pad_to_multiple_of=pad_to_multiple_of)
    device = _input_device(model)
    out = model(**packed.to(device).model_kwargs(), with_entropy=with_entropy)
    mask = batch.response_mask().to(device)
    num_tokens = batch.num_scored_tokens().to(device)
    entropy = None
    if with_entropy:
        entropy = normalised_entropy(out["entropy"], num_tokens, output_vocab_size(_lm_head(model)))
    return LogProbOutput(logps=out["logps"], num_tokens=num_tokens, mask=mask, entropy=entropy)
