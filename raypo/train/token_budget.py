"""Token-budget bins: whole prompt groups packed into forwards of at most ``train.token_budget`` padded
tokens, balanced across data-parallel ranks. (Words: a *micro-batch* is what a rank reads,
``train.micro_batch_size`` groups, ``train.grad_accum_steps`` of them per step; a *bin* is one
forward/backward under a token budget; a
*response chunk* is a slice of a group's responses, ``train.response_chunk_size``.)

A listwise group (one prompt, N responses) is never split: its loss couples all N responses. The tokens a
group costs in one forward are

    shared layout:    t_g = P_g + sum_i R_gi        (prompt once; :func:`raypo.model.layout.shared_layout`)
    unshared layout:  t_g = N_g * P_g + sum_i R_gi  (:func:`raypo.model.layout.unshared_layout`)

Both layouts pad their rows to the longest row of the micro-batch, so a micro-batch of groups G really runs
(and holds activations for) a dense ``[rows, L]`` tensor of

    padded(G) = sum_{g in G} rows_g * max_{g in G} width_g      (:func:`group_shape`)
    shared: rows_g = 1, width_g = t_g;   unshared: rows_g = N_g, width_g = P_g + max_i R_gi

tokens. Given the groups' shapes, the planner bounds and balances that padded size (what memory and time
follow); without them it counts t_g alone (a layout that concatenates groups without padding).

1. **Bins** (first-fit decreasing): groups sorted by t_g (by width_g, then t_g, with shapes), each put
   into the first micro-batch whose load stays <= ``token_budget``; a group longer than the budget gets a
   micro-batch of its own (it has to be trained somewhere; :attr:`BinPlan.oversized` lists them).
   FFD uses at most 11/9 OPT + 6/9 bins (for the unpadded load).
2. **Equal counts**: ZeRO-3 runs collectives inside every forward and backward, so every rank must run the
   same number M = ceil(#bins / W) of micro-batches; the plan is padded with empty micro-batches (``[]``),
   which the feed turns into zero-weight forwards (as evaluation does too).
3. **Balance** (sorted greedy / LPT per micro-step): bins sorted by load, taken W at a time so the W
   micro-batches that run *at the same time* (micro-step j on every rank) have similar loads, and within
   each round the largest bin goes to the rank with the smallest running total. The ranks synchronise
   at every layer of every micro-step, so the wall time of a step is about sum_j max_r load[r][j]; the
   plan reports that against the perfectly balanced sum_j mean_r load[r][j] (:attr:`sync_efficiency`)
   and the per-rank totals' max / mean (:attr:`imbalance`).

Where it plugs in (``train.token_budget > 0``; :func:`pack_step`, called by
:meth:`raypo.train.recipe.ListwiseRecipe.train_step`): every rank reads its
``train.micro_batch_size * train.grad_accum_steps`` groups of the step from its equal-row ``streaming_split``
exactly as without packing (so step counts, epochs, data order and the resume position are unchanged) and
draws their lambdas in that order (so the lambda schedule's state is too). The ranks then all-gather the
step's groups (with their lambdas), every rank runs :func:`plan_bins` on the same list with the
groups' :func:`group_shape` and gets the same plan, and rank r trains the groups of ``plan.ranks[r]``:
M micro-batches on every rank, an empty one as a zero-weight forward and backward of the step's cheapest
group. The loss stays normalised over the whole global step (sum of numerators / sum of denominators), so
the gradient equals the unpacked step's up to float rounding; the DeepSpeed engine is told the
accumulation boundary explicitly (the last of the M micro-batches), so it steps once whatever M is.
With ``train.reference: precomputed`` every policy forward holds a single group (bitwise the reference
stage's computation), so a rank's groups run one per micro-batch and the ranks pad to the largest count;
the plan then only balances tokens across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from raypo.model.batch import PER_PAIR_KEYS, ListwiseBatch
from raypo.train.collectives import all_gather_objects


def group_tokens(prompt_length: int, response_lengths: Sequence[int], *, prefix_sharing: bool = True) -> int:
    """Tokens of one group in one forward: P + sum_i R_i (shared) or N * P + sum_i R_i (unshared)."""
    prompt = int(prompt_length)
    responses = [int(r) for r in response_lengths]
    return (prompt if prefix_sharing else prompt * len(responses)) + sum(responses)


def group_shape(prompt_length: int, response_lengths: Sequence[int], *,
                prefix_sharing: bool = True) -> tuple[int, int]:
    """(rows, width) of one group in a padded layout: (1, P + sum_i R_i) shared, (N, P + max_i R_i)
    unshared; a micro-batch of groups G runs sum(rows) * max(width) padded tokens."""
    prompt = int(prompt_length)
    responses = [int(r) for r in response_lengths]
    if prefix_sharing:
        return 1, prompt + sum(responses)
    return max(len(responses), 1), prompt + max(responses, default=0)


def group_token_lengths(rows: Sequence[Mapping[str, Any]], *, prefix_sharing: bool = True) -> list[int]:
    """:func:`group_tokens` of tokenised rows (``prompt_ids`` and ``response_ids``)."""
    return [group_tokens(len(r["prompt_ids"]), [len(x) for x in r["response_ids"]],
                         prefix_sharing=prefix_sharing) for r in rows]


def group_shapes(rows: Sequence[Mapping[str, Any]], *, prefix_sharing: bool = True) -> list[tuple[int, int]]:
    """:func:`group_shape` of tokenised rows (``prompt_ids`` and ``response_ids``)."""
    return [group_shape(len(r["prompt_ids"]), [len(x) for x in r["response_ids"]],
                        prefix_sharing=prefix_sharing) for r in rows]


def padded_tokens(shapes: Sequence[tuple[int, int]]) -> int:
    """sum(rows) * max(width): the dense [rows, L] size of one micro-batch of groups of these shapes."""
    return sum(r for r, _ in shapes) * max((w for _, w in shapes), default=0)


@dataclass
class BinPlan:
    """Whole groups per rank and micro-step; see the module docstring.

    ranks: [W][M] lists of group indices (``[]`` = an empty, zero-weight micro-batch).
    loads: [W][M] tokens of each micro-batch (padded tokens when planned with shapes).
    oversized: indices of groups longer than the budget (each alone in its micro-batch).
    padded: whether ``loads`` count padded tokens (:func:`padded_tokens`) rather than sum t_g.
    """

    ranks: list[list[list[int]]]
    loads: list[list[int]]
    token_budget: int
    oversized: list[int]
    padded: bool = False

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


def first_fit_decreasing(lengths: Sequence[int], token_budget: int,
                         shapes: Sequence[tuple[int, int]] | None = None) -> list[list[int]]:
    """Bins of group indices with load <= token_budget each (an oversized group alone).

    The load of a bin is sum(lengths), or with ``shapes`` (rows_g, width_g) its padded size
    sum(rows) * max(width). Groups are placed longest first (widest first with shapes) into the first bin
    with room (ties: lower index first), so the result is deterministic.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1 token, got {token_budget}")
    if shapes is not None and len(shapes) != len(lengths):
        raise ValueError(f"{len(shapes)} shapes for {len(lengths)} groups; give one (rows, width) per group")
    if shapes is None:
        order = sorted(range(len(lengths)), key=lambda g: (-int(lengths[g]), g))
    else:
        order = sorted(range(len(lengths)), key=lambda g: (-int(shapes[g][1]), -int(lengths[g]), g))
    bins: list[list[int]] = []
    state: list[tuple[int, int]] = []  # (load, 0) or (sum of rows, max width) per bin
    for g in order:
        size = int(lengths[g])
        rows, width = (int(shapes[g][0]), int(shapes[g][1])) if shapes is not None else (0, 0)
        for b, (x, y) in enumerate(state):
            new = (x + size, 0) if shapes is None else (x + rows, max(y, width))
            if (new[0] if shapes is None else new[0] * new[1]) <= token_budget:
                bins[b].append(g)
                state[b] = new
                break
        else:
            bins.append([g])
            state.append((size, 0) if shapes is None else (rows, width))
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


def plan_bins(lengths: Sequence[int], token_budget: int, world_size: int, *,
                       shapes: Sequence[tuple[int, int]] | None = None) -> BinPlan:
    """Micro-batches of whole groups under ``token_budget`` tokens, balanced across ``world_size`` ranks.

    Args:
        lengths: tokens of each group of the global step (:func:`group_tokens`).
        token_budget: the most tokens one micro-batch may hold (one packed forward).
        world_size: data-parallel ranks W.
        shapes: optional (rows, width) of each group in a padded layout (:func:`group_shape`); then the
            budget bounds, and the balance evens out, each micro-batch's padded size (:func:`padded_tokens`).

    Returns:
        A :class:`BinPlan`; every group appears exactly once, every rank has the same number of
        micro-batches (padding ones are empty).
    """
    bins = first_fit_decreasing(lengths, token_budget, shapes)
    if shapes is None:
        bin_loads = [sum(int(lengths[g]) for g in b) for b in bins]
        oversized = sorted(g for g, n in enumerate(lengths) if int(n) > token_budget)
    else:
        bin_loads = [padded_tokens([shapes[g] for g in b]) for b in bins]
        oversized = sorted(g for g, s in enumerate(shapes) if padded_tokens([s]) > token_budget)
    ranks, loads = assign_balanced(bins, bin_loads, world_size)
    return BinPlan(ranks=ranks, loads=loads, token_budget=int(token_budget), oversized=oversized,
                          padded=shapes is not None)


def fixed_count_plan(lengths: Sequence[int], groups_per_micro: int, world_size: int) -> BinPlan:
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
    return BinPlan(ranks=ranks, loads=loads, token_budget=budget, oversized=[])


# ----------------------------------------------------------------------------------------------------
# The step's forwards: bins routed to this rank
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepForward:
    """One forward/backward of a step: whole groups, their lambdas [B, m] (or None) and whether they count.

    ``real=False`` marks a padding forward: it runs forward and backward with zero weight, only so that
    every rank makes the same ZeRO-3 collectives; it adds nothing to the loss, gradient or metrics.
    """

    batch: ListwiseBatch
    lam: Optional[torch.Tensor]
    real: bool = True


def concat_groups(parts: Sequence[ListwiseBatch]) -> ListwiseBatch:
    """The groups of several batches as one batch, as :func:`raypo.model.batch.collate_listwise` would
    collate their rows: list width N = the widest group, per-response extras NaN-padded (kept when every part
    has them), response masks kept when every part has them."""
    n = max(len(rs) for p in parts for rs in p.response_ids)
    extras = {}
    for key in parts[0].extras:
        if not all(key in p.extras for p in parts):
            continue
        cols = []
        for p in parts:
            value = p.extras[key][:, :n]
            if value.shape[1] < n:
                pad = torch.full((value.shape[0], n - value.shape[1], *value.shape[2:]), math.nan,
                                 dtype=value.dtype)
                value = torch.cat([value, pad], dim=1)
            if key in PER_PAIR_KEYS:  # [B, N, N]: the second response axis too
                value = value[:, :, :n]
                if value.shape[2] < n:
                    pad = torch.full((*value.shape[:2], n - value.shape[2]), math.nan, dtype=value.dtype)
                    value = torch.cat([value, pad], dim=2)
            cols.append(value)
        extras[key] = torch.cat(cols)
    masks = None
    if all(p.response_masks is not None for p in parts):
        masks = [m for p in parts for m in p.response_masks]
    return ListwiseBatch([g for p in parts for g in p.prompt_ids], [g for p in parts for g in p.response_ids],
                         num_responses=n, extras=extras, response_masks=masks)


def _group_cost(group: ListwiseBatch, prefix_sharing: bool) -> tuple[int, tuple[int, int]]:
    """(tokens, (rows, width)) of a one-group batch in the layout of the forward."""
    prompt, responses = len(group.prompt_ids[0]), [len(r) for r in group.response_ids[0]]
    return (group_tokens(prompt, responses, prefix_sharing=prefix_sharing),
            group_shape(prompt, responses, prefix_sharing=prefix_sharing))


def batch_padded_tokens(batch: ListwiseBatch, prefix_sharing: bool, per_group: bool = False) -> int:
    """Tokens of the dense [rows, L] input(s) one forward of ``batch`` runs (padding included)."""
    shapes = [_group_cost(batch.select_groups(b, b + 1), prefix_sharing)[1] for b in range(batch.num_groups)]
    if per_group:
        return sum(padded_tokens([s]) for s in shapes)
    return padded_tokens(shapes)


def route_packed(groups: Sequence[ListwiseBatch], lams: Sequence[Optional[torch.Tensor]],
                 plan: BinPlan, rank: int, *, per_group: bool = False,
                 dummy: int = 0) -> list[StepForward]:
    """Rank ``rank``'s forwards of the step under ``plan`` (the same plan on every rank).

    ``groups`` / ``lams``: the step's groups of all ranks (one-group batches, rank order) and their
    lambdas [1, m]. An empty bin of the plan becomes a zero-weight copy of group ``dummy`` (the step's
    cheapest). ``per_group`` (one forward per group, precomputed reference): the rank's groups run one per
    forward and every rank pads to the largest group count, so forward counts still match.
    """
    if per_group:
        mine = [[g] for micro in plan.ranks[rank] for g in micro]
        count = max(sum(len(micro) for micro in row) for row in plan.ranks)
        mine += [[] for _ in range(count - len(mine))]
    else:
        mine = plan.ranks[rank]
    out = []
    for members in mine:
        if not members:
            out.append(StepForward(groups[dummy], lams[dummy], real=False))
            continue
        lam = None if lams[members[0]] is None else torch.cat([lams[g] for g in members])
        out.append(StepForward(concat_groups([groups[g] for g in members]), lam))
    return out


def pack_step(micro: Sequence[ListwiseBatch], lams: Sequence[Optional[torch.Tensor]], token_budget: int, *,
              rank: int, world_size: int, prefix_sharing: bool, per_group: bool,
              device: torch.device) -> tuple[list[StepForward], BinPlan]:
    """This rank's token-budget forwards for the step whose groups every rank read as ``micro``.

    All ranks exchange their groups and lambdas (one ``all_gather_object``; the lambdas were drawn before,
    in read order, so the schedule's state is that of an unpacked run), plan the same global list with
    :func:`plan_bins` on the groups' padded shapes, and keep their share.
    """
    local = [(b.select_groups(g, g + 1), None if lam is None else lam[g:g + 1].detach().cpu())
             for b, lam in zip(micro, lams) for g in range(b.num_groups)]
    everything = [item for part in all_gather_objects(local) for item in part]
    groups = [g for g, _ in everything]
    group_lams = [None if lam is None else lam.to(device) for _, lam in everything]
    costs = [_group_cost(g, prefix_sharing) for g in groups]
    lengths, shapes = [c[0] for c in costs], [c[1] for c in costs]
    plan = plan_bins(lengths, token_budget, world_size, shapes=shapes)
    dummy = min(range(len(groups)), key=lambda g: (padded_tokens([shapes[g]]), lengths[g], g))
    return route_packed(groups, group_lams, plan, rank, per_group=per_group, dummy=dummy), plan
