"""The collated listwise batch: B prompt groups, group b with one prompt and N_b >= 1 responses (N_b
varies), kept as token-id lists; ``num_responses`` = N >= max_b N_b is the padded list width, which the
trainer may set to a maximum agreed across ranks. ``response_masks`` (from the data layer's tokenizer) say
which response tokens are scored: 0 marks template scaffolding that is context only (an empty think block),
1 the content and end-of-turn tokens; None scores every response token. Per-response side columns
(reference log-probs, scores, psi, ...) are padded to [B, N, ...] tensors in ``extras`` with NaN where a
response is missing. Its token layouts for the model are in :mod:`raypo.model.layout`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Per-response columns carried through collate when present in the rows (padded with NaN).
PER_RESPONSE_KEYS = ("ref_logps", "ref_entropy", "scores", "ranks", "psi")
# Per-pair columns [N][N] (a win-probability matrix), padded to [B, N, N] with NaN.
PER_PAIR_KEYS = ("win_probs",)


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
    # [B] each prompt's chat messages as JSON, when the data carries them (lambda conditioning renders them)
    prompt_messages: list[str] | None = None

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
        extras = {k: v[:, start:stop, start:stop] if k in PER_PAIR_KEYS else v[:, start:stop]
                  for k, v in self.extras.items()}
        masks = None if self.response_masks is None else [ms[start:stop] for ms in self.response_masks]
        return ListwiseBatch(self.prompt_ids, [rs[start:stop] for rs in self.response_ids],
                             num_responses=max(stop - start, 0), extras=extras, response_masks=masks,
                             prompt_messages=self.prompt_messages)

    def select_groups(self, start: int, stop: int) -> ListwiseBatch:
        """Groups [start, stop) with the list width N kept (so per-group results stack back to [B, N])."""
        extras = {k: v[start:stop] for k, v in self.extras.items()}
        masks = None if self.response_masks is None else self.response_masks[start:stop]
        messages = None if self.prompt_messages is None else self.prompt_messages[start:stop]
        return ListwiseBatch(self.prompt_ids[start:stop], self.response_ids[start:stop],
                             num_responses=self.num_responses, extras=extras, response_masks=masks,
                             prompt_messages=messages)

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


def _pad_per_pair(values: list, num_responses: int) -> torch.Tensor:
    """[B][N_b][N_b] floats (None = missing) -> float32 [B, N, N] with NaN padding."""
    out = torch.full((len(values), num_responses, num_responses), math.nan, dtype=torch.float32)
    for b, matrix in enumerate(values):
        for k, row in enumerate(matrix):
            for i, v in enumerate(row):
                if v is not None:
                    out[b, k, i] = float(v)
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
    for key in PER_PAIR_KEYS:
        if rows and all(r.get(key) is not None for r in rows):
            extras[key] = _pad_per_pair([[list(row) for row in r[key]] for r in rows], n)
    masks = None
    if rows and all(r.get("response_masks") is not None for r in rows):
        masks = [[_as_int_list(m) for m in r["response_masks"]] for r in rows]
    messages = None
    if rows and all(r.get("prompt_messages") is not None for r in rows):
        messages = [str(r["prompt_messages"]) for r in rows]
    return ListwiseBatch(prompts, responses, num_responses=n, extras=extras, response_masks=masks,
                         prompt_messages=messages)


# ----------------------------------------------------------------------------------------------------
# Packed tensors
# ----------------------------------------------------------------------------------------------------
