"""Packing whole prompt groups into token-budget micro-batches, balanced across data-parallel ranks.

A listwise group (one prompt, N responses) is never split: its loss couples all N responses. The tokens a
group costs in one forward are

    shared layout:    t_g = P_g + sum_i R_gi            (prompt once, :func:`raypo.packing.pack_shared`)
    unshared layout:  t_g = N_g * P_g + sum_i R_gi      (:func:`raypo.packing.pack_unshared`)

:func:`plan_micro_batches` turns the lengths of the groups of one global step into a plan

    plan.ranks[r][j] = the group indices of rank r's micro-batch j,   j = 0 .. M-1 on every rank

in three steps:

1. **Bins** (first-fit decreasing): groups sorted by t_g, each put into the first micro-batch whose load
   stays <= ``token_budget``; a group longer than the budget gets a micro-batch of its own (it has to be
   trained somewhere; :attr:`MicroBatchPlan.oversized` lists them). FFD uses at most 11/9 OPT + 6/9 bins.
2. **Equal counts**: ZeRO-3 runs collectives inside every forward and backward, so every rank must run the
   same number M = ceil(#bins / W) of micro-batches; the plan is padded with empty micro-batches (``[]``),
   which the feed turns into zero-weight forwards (as :func:`raypo.train.loop.evaluate` does).
3. **Balance** (sorted greedy / LPT per micro-step): bins sorted by load, taken W at a time so the W
   micro-batches that run *at the same time* (micro-step j on every rank) have similar loads, and within
   each round the largest bin goes to the rank with the smallest running total. The ranks synchronise
   at every layer of every micro-step, so the wall time of a step is about sum_j max_r load[r][j]; the
   plan reports that against the perfectly balanced sum_j mean_r load[r][j] (:attr:`sync_efficiency`)
   and the per-rank totals' max / mean (:attr:`imbalance`).

Where it plugs in: the trainer feeds each rank ``train.micro_batch_size`` groups per micro-batch from an
equal-row ``streaming_split`` (:func:`raypo.data.pipeline.data_config`), which balances rows, not tokens.
A token-budget feed would read the rows of one global step (``W * k`` groups, or a token total), call
:func:`plan_micro_batches` on their ``num_tokens`` (or :func:`group_token_lengths`), and hand rank r the
groups of ``plan.ranks[r]`` — e.g. a Ray Data ``map_batches`` over global-step blocks that tags each row
with (step, rank, micro) before the split, or an all-gather of the lengths in the worker loop. Not wired
in yet: the current loop keeps its fixed group count per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def group_tokens(prompt_length: int, response_lengths: Sequence[int], *, prefix_sharing: bool = True) -> int:
    """Tokens of one group in one forward: P + sum_i R_i (shared) or N * P + sum_i R_i (unshared)."""
    prompt = int(prompt_length)
    responses = [int(r) for r in response_lengths]
    return (prompt if prefix_sharing else prompt * len(responses)) + sum(responses)


def group_token_lengths(rows: Sequence[Mapping[str, Any]], *, prefix_sharing: bool = True) -> list[int]:
    """:func:`group_tokens` of tokenised rows (``prompt_ids`` and ``response_ids``)."""
    return [group_tokens(len(r["prompt_ids"]), [len(x) for x in r["response_ids"]],
                         prefix_sharing=prefix_sharing) for r in rows]


@dataclass
class MicroBatchPlan:
    """Whole groups per rank and micro-step; see the module docstring.

    ranks: [W][M] lists of group indices (``[]`` = an empty, zero-weight micro-batch).
    loads: [W][M] tokens of each micro-batch.
    oversized: indices of groups longer than the budget (each alone in its micro-batch).
    """

    ranks: list[list[list[int]]]
    loads: list[list[int]]
    token_budget: int
    oversized: list[int]

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def num_micro_batches(self) -> int:
        """M, the same on every rank."""
        return len(self.ranks[0]) if self.ranks else 0

    @property
    def num_padding(self) -> int:
        """Empty micro-batches added so every rank runs M of them."""
        return sum(1 for rank in self.ranks for micro in rank if not micro)

    def rank_loads(self) -> list[int]:
        """Tokens per rank over the whole step."""
        return [sum(row) for row in self.loads]

    @property
    def imbalance(self) -> float:
        """max_r load_r / mean_r load_r (1 = perfectly balanced totals)."""
        totals = self.rank_loads()
        mean = sum(totals) / len(totals) if totals else 0.0
        return max(totals) / mean if mean > 0 else 1.0

    @property
    def sync_efficiency(self) -> float:
        """sum_j mean_r load[r][j] / sum_j max_r load[r][j]: the share of the step's synchronised wall time
        (every rank waits for the slowest at each micro-step) that does useful work; 1 = no waiting."""
        if not self.num_micro_batches:
            return 1.0
        columns = list(zip(*self.loads))
        useful = sum(sum(col) / len(col) for col in columns)
        wall = sum(max(col) for col in columns)
        return useful / wall if wall > 0 else 1.0

    def fill(self) -> float:
        """Tokens / (real micro-batches * budget): how full the non-empty micro-batches are."""
        real = sum(1 for rank in self.ranks for micro in rank if micro)
        total = sum(self.rank_loads())
        return total / (real * self.token_budget) if real else 0.0


def first_fit_decreasing(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Bins of group indices with sum(lengths) <= token_budget each (an oversized group alone).

    Groups are placed longest first into the first bin with room (ties: lower index first), so the result is
    deterministic.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1 token, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda g: (-int(lengths[g]), g))
    bins: list[list[int]] = []
    loads: list[int] = []
    for g in order:
        size = int(lengths[g])
        for b, load in enumerate(loads):
            if load + size <= token_budget:
                bins[b].append(g)
                loads[b] += size
                break
        else:
            bins.append([g])
            loads.append(size)
    return bins


def assign_balanced(bins: list[list[int]], bin_loads: list[int], world_size: int
                    ) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Bins -> ([W][M] bins, [W][M] loads): rounds of W bins of similar load, LPT within each round.

    Bins sorted by load (descending) are padded with empty bins to a multiple of W and taken W at a time;
    in each round, bins go largest first to the rank with the smallest running total (ties: lower rank).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(bins)), key=lambda b: (-bin_loads[b], b))
    rounds = math.ceil(len(order) / world_size) if order else 0
    order += [-1] * (rounds * world_size - len(order))  # -1: an empty padding micro-batch
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    loads: list[list[int]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    for j in range(rounds):
        free = list(range(world_size))
        for b in order[j * world_size:(j + 1) * world_size]:  # largest first
            r = min(free, key=lambda q: (totals[q], q))
            free.remove(r)
            load = bin_loads[b] if b >= 0 else 0
            ranks[r].append(list(bins[b]) if b >= 0 else [])
            loads[r].append(load)
            totals[r] += load
    return ranks, loads


def plan_micro_batches(lengths: Sequence[int], token_budget: int, world_size: int) -> MicroBatchPlan:
    """Micro-batches of whole groups under ``token_budget`` tokens, balanced across ``world_size`` ranks.

    Args:
        lengths: tokens of each group of the global step (:func:`group_tokens`).
        token_budget: the most tokens one micro-batch may hold (one packed forward).
        world_size: data-parallel ranks W.

    Returns:
        A :class:`MicroBatchPlan`; every group appears exactly once, every rank has the same number of
        micro-batches (padding ones are empty).
    """
    bins = first_fit_decreasing(lengths, token_budget)
    bin_loads = [sum(int(lengths[g]) for g in b) for b in bins]
    ranks, loads = assign_balanced(bins, bin_loads, world_size)
    oversized = sorted(g for g, n in enumerate(lengths) if int(n) > token_budget)
    return MicroBatchPlan(ranks=ranks, loads=loads, token_budget=int(token_budget), oversized=oversized)


def fixed_count_plan(lengths: Sequence[int], groups_per_micro: int, world_size: int) -> MicroBatchPlan:
    """The baseline the trainer uses today: rows dealt in order, ``groups_per_micro`` per micro-batch, an
    equal number of groups per rank (contiguous shards, as an equal-row split gives). For comparison."""
    n = len(lengths)
    per_rank = math.ceil(n / world_size) if n else 0
    ranks: list[list[list[int]]] = []
    loads: list[list[int]] = []
    micro = math.ceil(per_rank / groups_per_micro) if per_rank else 0
    for r in range(world_size):
        shard = list(range(r * per_rank, min((r + 1) * per_rank, n)))
        chunks = [shard[i:i + groups_per_micro] for i in range(0, len(shard), groups_per_micro)]
        chunks += [[] for _ in range(micro - len(chunks))]
        ranks.append(chunks)
        loads.append([sum(int(lengths[g]) for g in c) for c in chunks])
    budget = max((load for row in loads for load in row), default=1) or 1
    return MicroBatchPlan(ranks=ranks, loads=loads, token_budget=budget, oversized=[])
