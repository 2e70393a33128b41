"""The collated listwise batch and its two token layouts: prefix-shared rows and unshared rows.

Collated batch (:class:`ListwiseBatch`): B prompt groups, group b with one prompt and N_b >= 1 responses
(N_b varies), kept as token-id lists; ``num_responses`` = N >= max_b N_b is the padded list width, which the
trainer may set to a maximum agreed across ranks. ``response_masks`` (from the data layer's tokenizer) say
which response tokens are scored: 0 marks template scaffolding that is context only (an empty think block),
1 the content and end-of-turn tokens; None scores every response token. Per-response side columns
(reference log-probs, scores, psi, ...) are padded to [B, N, ...] tensors in ``extras`` with NaN where a
response is missing.

Layouts (both give the same per-response log-probs; tests check this in float64):

* **shared** (:func:`pack_shared`): one row per group, ``[prompt | r_1 | r_2 | ... | r_N]``. Positions restart
  at P = len(prompt) for every response, so response i sees RoPE positions P..P+R_i-1 exactly as if it
  followed the prompt alone. A block mask lets prompt tokens see earlier prompt tokens, and response tokens
  see the prompt and the earlier tokens of their own response only:

      allowed(q, k) = same_group(q, k) and k <= q and (seg[k] == 0 or seg[k] == seg[q])

  (seg 0 = prompt, i = response i, -1 = padding; padding queries see only themselves so no softmax row is
  empty, which would put NaNs into the backward). Tokens processed per group: P + sum_i R_i instead of
  N*P + sum_i R_i.
* **unshared** (:func:`pack_unshared`): one row ``[prompt | r_i]`` per valid response, right-padded, with a
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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

# Per-response columns carried through collate when present in the rows (padded with NaN).
PER_RESPONSE_KEYS = ("ref_logps", "ref_entropy", "scores", "ranks", "psi")


def _as_int_list(values) -> list[int]:
    if hasattr(values, "tolist"):  # numpy / torch (Ray Data hands out numpy arrays)
        values = values.tolist()
    return [int(v) for v in values]


@dataclass
class ListwiseBatch:
    """B prompt groups, each a prompt and N_b responses as token ids; see the module docstring.

    prompt_ids: [B][P_b]; response_ids: [B][N_b][R_bi]; response_masks: same shape as response_ids (1 =
    scored) or None (all scored); num_responses: N; extras: per-response tensors [B, N, ...].
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    num_responses: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    response_masks: list[list[list[int]]] | None = None

    def __post_init__(self) -> None:
        if len(self.prompt_ids) != len(self.response_ids):
            raise ValueError(f"{len(self.prompt_ids)} prompts but {len(self.response_ids)} response lists")
        if not self.prompt_ids:
            raise ValueError("a ListwiseBatch needs at least one prompt group")
        for b, (prompt, responses) in enumerate(zip(self.prompt_ids, self.response_ids)):
            if len(prompt) == 0:
                raise ValueError(f"group {b}: empty prompt; the first response token needs a prompt token "
                                 "to be predicted from (apply the chat template or prepend bos)")
            if len(responses) > self.num_responses:
                raise ValueError(f"group {b} has {len(responses)} responses, more than "
                                 f"num_responses={self.num_responses}")
            for i, response in enumerate(responses):
                if len(response) == 0:
                    raise ValueError(f"group {b}, response {i}: empty response (no token to score)")
                if self.response_masks is None:
                    continue
                mask = self.response_masks[b][i]
                if len(mask) != len(response):
                    raise ValueError(f"group {b}, response {i}: response_masks has {len(mask)} entries for "
                                     f"{len(response)} tokens")
                if not any(mask):
                    raise ValueError(f"group {b}, response {i}: response_masks scores no token (the content "
                                     "was truncated away?); reject such rows in the data pipeline")

    @property
    def num_groups(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_response_len(self) -> int:
        return max((len(r) for rs in self.response_ids for r in rs), default=0)

    def response_mask(self) -> torch.Tensor:
        """bool [B, N]: True where response (b, i) exists."""
        counts = torch.tensor([len(rs) for rs in self.response_ids])
        return torch.arange(self.num_responses)[None, :] < counts[:, None]

    def loss_mask(self, b: int, i: int) -> list[int]:
        """1 for each scored token of response (b, i)."""
        if self.response_masks is None:
            return [1] * len(self.response_ids[b][i])
        return self.response_masks[b][i]

    def response_lengths(self) -> torch.Tensor:
        """int64 [B, N]: tokens per response in the sequence (0 where missing)."""
        out = torch.zeros(self.num_groups, self.num_responses, dtype=torch.long)
        for b, responses in enumerate(self.response_ids):
            for i, response in enumerate(responses):
                out[b, i] = len(response)
        return out

    def num_scored_tokens(self) -> torch.Tensor:
        """int64 [B, N]: scored tokens per response (0 where missing) = the log-prob's token count."""
        out = torch.zeros(self.num_groups, self.num_responses, dtype=torch.long)
        for b, responses in enumerate(self.response_ids):
            for i in range(len(responses)):
                out[b, i] = sum(self.loss_mask(b, i))
        return out

    def select_responses(self, start: int, stop: int) -> ListwiseBatch:
        """Responses [start, stop) of every group (a group may keep none: its row holds only the prompt)."""
        extras = {k: v[:, start:stop] for k, v in self.extras.items()}
        masks = None if self.response_masks is None else [ms[start:stop] for ms in self.response_masks]
        return ListwiseBatch(self.prompt_ids, [rs[start:stop] for rs in self.response_ids],
                             num_responses=max(stop - start, 0), extras=extras, response_masks=masks)

    def select_groups(self, start: int, stop: int) -> ListwiseBatch:
        """Groups [start, stop) with the list width N kept (so per-group results stack back to [B, N])."""
        extras = {k: v[start:stop] for k, v in self.extras.items()}
        masks = None if self.response_masks is None else self.response_masks[start:stop]
        return ListwiseBatch(self.prompt_ids[start:stop], self.response_ids[start:stop],
                             num_responses=self.num_responses, extras=extras, response_masks=masks)

    def token_stats(self) -> dict[str, int]:
        """Tokens processed by each layout; ``unshared / shared`` is the achieved prefix-sharing gain rho."""
        prompt = [len(p) for p in self.prompt_ids]
        resp = [sum(len(r) for r in rs) for rs in self.response_ids]
        unshared = sum(p * len(rs) + r for p, rs, r in zip(prompt, self.response_ids, resp))
        return {"shared_tokens": sum(prompt) + sum(resp), "unshared_tokens": unshared,
                "response_tokens": sum(resp)}


def _pad_per_response(values: list, num_responses: int) -> torch.Tensor:
    """[B][N_b](+[m]) floats (None = missing) -> float32 [B, N(, m)] with NaN padding."""
    trailing: tuple[int, ...] = ()
    for group in values:
        for item in group if group is not None else []:
            if isinstance(item, (list, tuple)) or hasattr(item, "__len__"):
                trailing = (len(item),)
                break
        if trailing:
            break
    out = torch.full((len(values), num_responses, *trailing), math.nan, dtype=torch.float32)
    for b, group in enumerate(values):
        for i, item in enumerate(group if group is not None else []):
            if item is None:
                continue
            if trailing:
                out[b, i] = torch.tensor([math.nan if v is None else float(v) for v in item])
            else:
                out[b, i] = float(item)
    return out


def collate_listwise(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    *,
    num_responses: int | None = None,
    per_response_keys: Sequence[str] = PER_RESPONSE_KEYS,
) -> ListwiseBatch:
    """Tokenised rows -> :class:`ListwiseBatch`.

    Args:
        rows: a list of rows ``{"prompt_ids": [int], "response_ids": [[int]], ...}`` (optionally
            ``"response_masks": [[0/1]]``) or the same as columns (``{"prompt_ids": [row0, row1, ...],
            ...}``, e.g. a Ray Data numpy batch).
        num_responses: pad the list width N to this (>= max N_b), e.g. a maximum agreed across ranks so
            every rank runs the same number of response chunks. None: the batch's own max N_b.
        per_response_keys: columns with one value (or one vector, [m]) per response, padded into
            ``extras[key]`` as float32 [B, N(, m)] with NaN for missing responses or missing ratings.
    """
    if isinstance(rows, Mapping):
        size = len(rows["prompt_ids"])
        rows = [{k: v[j] for k, v in rows.items()} for j in range(size)]
    prompts = [_as_int_list(r["prompt_ids"]) for r in rows]
    responses = [[_as_int_list(resp) for resp in r["response_ids"]] for r in rows]
    widest = max((len(rs) for rs in responses), default=0)
    n = widest if num_responses is None else int(num_responses)
    if n < widest:
        raise ValueError(f"num_responses={n} is smaller than the widest group in the batch ({widest})")
    extras = {}
    for key in per_response_keys:
        if rows and all(r.get(key) is not None for r in rows):
            extras[key] = _pad_per_response([list(r[key]) for r in rows], n)
    masks = None
    if rows and all(r.get("response_masks") is not None for r in rows):
        masks = [[_as_int_list(m) for m in r["response_masks"]] for r in rows]
    return ListwiseBatch(prompts, responses, num_responses=n, extras=extras, response_masks=masks)


# ----------------------------------------------------------------------------------------------------
# Packed tensors
# ----------------------------------------------------------------------------------------------------


_TENSOR_FIELDS = ("input_ids", "position_ids", "attention_mask", "group_ids", "segment_ids", "pred_index",
                  "target_ids", "slot_index")


@dataclass
class PackedInputs:
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

    def to(self, device: torch.device | str) -> PackedInputs:
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
              num_groups: int) -> PackedInputs:
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
            return PackedInputs(attention_mask=None, group_ids=pad(self.group, -1),
                                segment_ids=pad(self.seg, -1), **common)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in self.ids], dtype=torch.long)
        return PackedInputs(attention_mask=mask, group_ids=None, segment_ids=None, **common)


def pack_shared(batch: ListwiseBatch, *, pad_token_id: int = 0, pad_to_multiple_of: int = 1) -> PackedInputs:
    """One row per group: ``[prompt | r_1 | ... | r_N_b]`` with restarted positions (module docstring)."""
    builder = _RowBuilder(batch.num_responses, batch.max_response_len)
    for b, (prompt, responses) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        row = builder.new_row()
        last = builder.add_prompt(row, 0, prompt)
        for i, response in enumerate(responses):
            builder.add_response(row, 0, b, i, response, batch.loss_mask(b, i), last, len(prompt))
    return builder.build(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of, shared=True,
                         num_groups=batch.num_groups)


def pack_unshared(batch: ListwiseBatch, *, pad_token_id: int = 0,
                  pad_to_multiple_of: int = 1) -> PackedInputs:
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
