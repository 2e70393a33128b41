"""The two token layouts of a collated listwise batch (:class:`raypo.model.batch.ListwiseBatch`) for the
model: prefix-shared rows and unshared rows, with their attention masks.

Layouts (both give the same per-response log-probs; tests check this in float64):

* **shared** (:func:`shared_layout`): one row per group, ``[prompt | r_1 | r_2 | ... | r_N]``. Positions
  restart at P = len(prompt) for every response, so response i sees RoPE positions P..P+R_i-1 exactly as if it
  followed the prompt alone. A block mask lets prompt tokens see earlier prompt tokens, and response tokens
  see the prompt and the earlier tokens of their own response only:

      allowed(q, k) = same_group(q, k) and k <= q and (seg[k] == 0 or seg[k] == seg[q])

  (seg 0 = prompt, i = response i, -1 = padding; padding queries see only themselves so no softmax row is
  empty, which would put NaNs into the backward). Tokens processed per group: P + sum_i R_i instead of
  N*P + sum_i R_i.
* **unshared** (:func:`unshared_layout`): one row ``[prompt | r_i]`` per valid response, right-padded, with a
  plain 2D padding mask (any attention backend, including flash-attention).

In both layouts response token t of response (b, i) is predicted by the hidden state at ``pred_index``: the
previous token of the same response, or for t = 0 the last prompt token (whose hidden state is the same
for every response: it has seen only the prompt). Its log-prob is written to slot (b*N + i)*R_max + t of a
[B*N*R_max] buffer and summed per response, a fixed-order reduction (bitwise reproducible, unlike atomics).

Trap (from transformers' masking_utils): with ``attention_mask=None`` transformers infers packed sequences
from ``position_ids`` restarting, which would make a shared row one causal sequence and let responses see
each other. The shared layout therefore always passes an explicit 4D mask (or a flex ``BlockMask``), which
transformers uses as-is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from raypo.model.batch import ListwiseBatch

_TENSOR_FIELDS = ("input_ids", "position_ids", "attention_mask", "group_ids", "segment_ids", "pred_index",
                  "target_ids", "slot_index")


@dataclass
class LayoutInputs:
    """Model-ready tensors for one layout. R rows of length L; T scored response tokens.

    input_ids, position_ids: int64 [R, L].
    attention_mask: int64 [R, L] padding mask (unshared layout) or None.
    group_ids, segment_ids: int64 [R, L] (shared layout) or None; the block mask is built from them on the
        device by the model wrapper, in the format its attention backend takes.
    pred_index: int64 [T], flat index into [R*L] of the hidden state predicting each scored response token.
    target_ids: int64 [T], the scored response tokens.
    slot_index: int64 [T], flat index into [B*N*R_max] = (b*N + i)*R_max + t.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    group_ids: torch.Tensor | None
    segment_ids: torch.Tensor | None
    pred_index: torch.Tensor
    target_ids: torch.Tensor
    slot_index: torch.Tensor
    num_groups: int
    num_responses: int
    max_response_len: int

    def to(self, device: torch.device | str) -> LayoutInputs:
        moved = {name: getattr(self, name) for name in _TENSOR_FIELDS}
        moved = {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in moved.items()}
        return replace(self, **moved)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ListwiseLogProbModel.forward``."""
        names = (*_TENSOR_FIELDS, "num_groups", "num_responses", "max_response_len")
        return {name: getattr(self, name) for name in names}

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens processed (throughput accounting)."""
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return int((self.segment_ids >= 0).sum())


class _RowBuilder:
    """Accumulates rows of token ids and the scoring indices that point into them."""

    def __init__(self, num_responses: int, max_response_len: int):
        self.n, self.rmax = num_responses, max(max_response_len, 1)
        self.ids: list[list[int]] = []
        self.pos: list[list[int]] = []
        self.group: list[list[int]] = []
        self.seg: list[list[int]] = []
        self.pred: list[tuple[int, list[int]]] = []  # (row, local predictor positions)
        self.targets: list[int] = []
        self.slots: list[int] = []

    def new_row(self) -> int:
        for lst in (self.ids, self.pos, self.group, self.seg):
            lst.append([])
        return len(self.ids) - 1

    def add_prompt(self, row: int, group: int, prompt: list[int]) -> int:
        """Append a prompt to ``row``; returns the row position of its last token."""
        start = len(self.ids[row])
        self.ids[row] += prompt
        self.pos[row] += range(len(prompt))
        self.group[row] += [group] * len(prompt)
        self.seg[row] += [0] * len(prompt)
        return start + len(prompt) - 1

    def add_response(self, row: int, group: int, b: int, i: int, response: list[int], loss_mask: list[int],
                     last_prompt_pos: int, prompt_len: int) -> None:
        start = len(self.ids[row])
        self.ids[row] += response
        self.pos[row] += range(prompt_len, prompt_len + len(response))
        self.group[row] += [group] * len(response)
        self.seg[row] += [i + 1] * len(response)
        # token 0 is predicted by the last prompt token, token t by token t-1 of the same response
        predictors = [last_prompt_pos] + list(range(start, start + len(response) - 1))
        scored = [t for t, m in enumerate(loss_mask) if m]
        self.pred.append((row, [predictors[t] for t in scored]))
        self.targets += [response[t] for t in scored]
        base = (b * self.n + i) * self.rmax
        self.slots += [base + t for t in scored]

    def build(self, *, pad_token_id: int, pad_to_multiple_of: int, shared: bool,
              num_groups: int) -> LayoutInputs:
        length = max(len(r) for r in self.ids)
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of

        def pad(rows: list[list[int]], value: int) -> torch.Tensor:
            return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)

        pred = [row * length + p for row, local in self.pred for p in local]
        common = {
            "input_ids": pad(self.ids, pad_token_id),
            "position_ids": pad(self.pos, 0),
            "pred_index": torch.tensor(pred, dtype=torch.long),
            "target_ids": torch.tensor(self.targets, dtype=torch.long),
            "slot_index": torch.tensor(self.slots, dtype=torch.long),
            "num_groups": num_groups, "num_responses": self.n, "max_response_len": self.rmax,
        }
        if shared:
            return LayoutInputs(attention_mask=None, group_ids=pad(self.group, -1),
                                segment_ids=pad(self.seg, -1), **common)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in self.ids], dtype=torch.long)
        return LayoutInputs(attention_mask=mask, group_ids=None, segment_ids=None, **common)


def shared_layout(batch: ListwiseBatch, *, pad_token_id: int = 0,
                  pad_to_multiple_of: int = 1) -> LayoutInputs:
    """One row per group: ``[prompt | r_1 | ... | r_N_b]`` with restarted positions (module docstring)."""
    builder = _RowBuilder(batch.num_responses, batch.max_response_len)
    for b, (prompt, responses) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        row = builder.new_row()
        last = builder.add_prompt(row, 0, prompt)
        for i, response in enumerate(responses):
            builder.add_response(row, 0, b, i, response, batch.loss_mask(b, i), last, len(prompt))
    return builder.build(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of, shared=True,
                         num_groups=batch.num_groups)


def unshared_layout(batch: ListwiseBatch, *, pad_token_id: int = 0,
                  pad_to_multiple_of: int = 1) -> LayoutInputs:
    """One right-padded row ``[prompt | r_i]`` per existing response.

    A batch with no response at all (a chunk past every group's N_b) still gets one prompt-only row, so
    the forward and backward run (ZeRO-3 needs the same number of them on every rank).
    """
    builder = _RowBuilder(batch.num_responses, batch.max_response_len)
    for b, (prompt, responses) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        for i, response in enumerate(responses):
            row = builder.new_row()
            last = builder.add_prompt(row, 0, prompt)
            builder.add_response(row, 0, b, i, response, batch.loss_mask(b, i), last, len(prompt))
    if not builder.ids:
        builder.add_prompt(builder.new_row(), 0, batch.prompt_ids[0])
    return builder.build(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of, shared=False,
                         num_groups=batch.num_groups)


# ----------------------------------------------------------------------------------------------------
# Masks for the shared layout
# ----------------------------------------------------------------------------------------------------


def prefix_sharing_mask(group_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [R, 1, L, L], True = query may attend to key (formula in the module docstring)."""
    length = group_ids.shape[1]
    g_q, g_k = group_ids[:, :, None], group_ids[:, None, :]
    s_q, s_k = segment_ids[:, :, None], segment_ids[:, None, :]
    idx = torch.arange(length, device=group_ids.device)
    causal = idx[:, None] >= idx[None, :]
    allowed = (g_q == g_k) & (g_q >= 0) & causal & ((s_k == 0) | (s_k == s_q))
    allowed |= torch.eye(length, dtype=torch.bool, device=group_ids.device)
    return allowed[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> additive float mask (0 where allowed, dtype's min elsewhere), as eager attention uses."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def prefix_sharing_mask_mod(group_ids: torch.Tensor, segment_ids: torch.Tensor):
    """The same rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` (for ``create_block_mask``)."""

    def mask_mod(b, h, q_idx, kv_idx):
        g_q, g_k = group_ids[b, q_idx], group_ids[b, kv_idx]
        s_q, s_k = segment_ids[b, q_idx], segment_ids[b, kv_idx]
        allowed = (g_q == g_k) & (g_q >= 0) & (kv_idx <= q_idx) & ((s_k == 0) | (s_k == s_q))
        return allowed | (q_idx == kv_idx)

    return mask_mod
