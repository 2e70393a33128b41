"""The per-worker training loop: DeepSpeed ZeRO-3 policy (+ reference), listwise micro-batches, global
loss normalisation, metrics, evaluation and checkpoints. Runs inside Ray Train workers.

One optimizer step on one rank::

    micro-batches b_1..b_k (k = train.grad_accum_steps, whole prompt groups each)
    D   = all_reduce_sum( sum_j denominator(b_j) )                 # prompts, pairs or items of the step
    for b_j: s = logps(policy, b_j); L_j = numerator(s, labels)    # raypo.losses.listwise_loss
             engine.backward(L_j * world / D)                      # DeepSpeed averages over ranks
    engine.step()

so the gradient is that of sum(numerators) / sum(denominators) over the whole global batch: k accumulation
steps equal one batch k times larger, and 2 workers equal 1 worker with twice the batch.

ZeRO-3 runs collectives inside forward and backward, so every rank must make the same calls: a step runs
only when every rank has k micro-batches (all-reduce MIN), the response-chunk count is agreed across ranks
(all-reduce MAX of N), and evaluation pads the ranks that run out of rows with zero-weight forwards.

Token-budget packing (``train.token_budget = T > 0``, :mod:`raypo.balance`): each rank still reads the same
k micro-batches (so data order, epochs and the resume position do not change) and draws their lambdas, then
the ranks all-gather the step's groups, plan M micro-batches of at most T padded tokens per rank from the
same list (identical plans everywhere), and each rank trains its own M; an empty micro-batch is a
zero-weight forward and backward. M varies from step to step, so the loop tells DeepSpeed where the
accumulation boundary is (``engine.set_gradient_accumulation_boundary``) and calls ``engine.step()`` once.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from raypo.balance import MicroBatchPlan, group_shape, group_tokens, padded_tokens, plan_micro_batches
from raypo.config import RaypoConfig, config_from_dict
from raypo.lambdas import build_lambda_schedule
from raypo.listwise_model import ListwiseLogProbModel, grouped_logprobs
from raypo.losses import listwise_loss
from raypo.losses.mallows import neg_log_dispersion
from raypo.losses.metrics import finalize_metrics, merge_metric_sums, ranking_metrics
from raypo.losses.registry import LossSpec, get_loss_spec
from raypo.microbatch import listwise_backward
from raypo.packing import ListwiseBatch, collate_listwise
from raypo.train.checkpoint import TrainState, checkpoint_dir_name, load_checkpoint, save_checkpoint
from raypo.train.ds_config import reference_ds_config, train_ds_config
from raypo.train.labels import loss_labels, metric_labels
from raypo.train.optim import build_lr_scheduler, build_optimizer

MetricSums = dict[str, tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------


def _all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=op)
    return values


def all_reduce_metric_sums(sums: MetricSums, device: torch.device) -> MetricSums:
    """Sum every (sum, count) pair across ranks in one collective.

    Ranks may hold different metric names (a dimension absent from a rank's batch): the names are
    gathered first so every rank reduces the same vector.
    """
    names = sorted(sums)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names)
        names = sorted(set().union(*gathered))
    zero = torch.zeros((), dtype=torch.float64)
    flat = torch.stack([torch.stack([sums.get(n, (zero, zero))[0].double().cpu(),
                                     sums.get(n, (zero, zero))[1].double().cpu()]) for n in names]) \
        if names else torch.zeros(0, 2, dtype=torch.float64)
    flat = _all_reduce(flat.to(device)).cpu()
    return {n: (flat[i, 0], flat[i, 1]) for i, n in enumerate(names)}


# ----------------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------------


@dataclass
class Engines:
    policy: Any  # DeepSpeed engine around a ListwiseLogProbModel
    reference: Optional[Any]  # DeepSpeed inference engine, or None (precomputed or reference-free)
    hf_config: Any
    tokenizer: Any


def worker_dtype(cfg: RaypoConfig) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if cfg.scaling.use_gpu else "float32"


def s3_options(cfg: RaypoConfig) -> dict[str, Any]:
    """s3fs options for model sources: ``data.s3`` endpoint and region, else the environment's."""
    from raypo.modeling import s3_storage_options

    return s3_storage_options(cfg.data.s3.endpoint_url, cfg.data.s3.region)


def build_engines(cfg: RaypoConfig, policy_path: str, ref_path: str, *, world_size: int,
                  needs_online_reference: bool, total_steps: int) -> Engines:
    import deepspeed
    from transformers import AutoConfig

    from raypo.modeling import load_policy, load_reference, load_tokenizer, resolve_model_source

    # s3:// and tiny:// sources are resolved here, on this worker's node (a node the driver never saw, on
    # an autoscaling cluster); resolving is idempotent and node-locally cached
    options = s3_options(cfg)
    policy_path = resolve_model_source(policy_path, storage_options=options)
    ref_path = resolve_model_source(ref_path, storage_options=options)
    hf_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    dtype = worker_dtype(cfg)
    hidden = int(getattr(hf_config, "hidden_size", 1024))
    ds_train = train_ds_config(cfg, hidden_size=hidden, world_size=world_size, dtype=dtype)
    common = dict(dtype=dtype, attention=cfg.model.attention, prefix_sharing=cfg.model.prefix_sharing,
                  trust_remote_code=cfg.model.trust_remote_code)
    policy = load_policy(policy_path, ds_config=ds_train,
                         gradient_checkpointing=cfg.model.gradient_checkpointing,
                         lora=cfg.model.lora if cfg.model.lora.enabled else None, **common)
    module = ListwiseLogProbModel(policy)
    optimizer = build_optimizer(module.parameters(), cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.optimizer, total_steps)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_train)

    reference = None
    if needs_online_reference:
        ds_ref = reference_ds_config(cfg, hidden_size=hidden, world_size=world_size, dtype=dtype)
        ref_model = ListwiseLogProbModel(load_reference(ref_path, ds_config=ds_ref, **common))
        reference, *_ = deepspeed.initialize(model=ref_model, config=ds_ref)
        reference.eval()
    return Engines(policy=engine, reference=reference, hf_config=hf_config,
                   tokenizer=load_tokenizer(policy_path))


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------


def iter_micro_batches(shard, batch_size: int, skip: int = 0) -> Iterator[ListwiseBatch]:
    """Collated micro-batches of whole prompt groups from a Ray Data shard, skipping the first ``skip``
    (resume: Ray Data has no resumable iterator, so consumed batches are read and dropped)."""
    for i, rows in enumerate(shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                                prefetch_batches=1)):
        if i < skip:
            continue
        yield collate_listwise(rows)


def _has_batches(count: int, device: torch.device) -> int:
    """The number of batches every rank can supply (all-reduce MIN)."""
    return int(_all_reduce(torch.tensor([count], device=device), op=dist.ReduceOp.MIN).item())


def _agreed_max(value: int, device: torch.device) -> int:
    return int(_all_reduce(torch.tensor([value], device=device), op=dist.ReduceOp.MAX).item())


# ----------------------------------------------------------------------------------------------------
# Loss and metrics of one micro-batch
# ----------------------------------------------------------------------------------------------------


@dataclass
class LossSetup:
    spec: LossSpec
    hparams: dict[str, Any]
    reduction: str  # "sum" or "mean" log-probs
    uses_reference: bool
    dispersion_c: float
    dim_names: Optional[list[str]]


def loss_setup(cfg: RaypoConfig, dim_names: Optional[list[str]]) -> LossSetup:
    spec = get_loss_spec(cfg.loss.name)
    hparams = dict(cfg.loss.params)
    if cfg.loss.beta is not None:
        hparams["beta"] = cfg.loss.beta
    return LossSetup(spec=spec, hparams=hparams, reduction=spec.logp_reduction_for(hparams),
                     uses_reference=spec.uses_reference(hparams), dispersion_c=cfg.loss.dispersion_c,
                     dim_names=dim_names)


def sequence_logps(logps: torch.Tensor, num_tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    """Summed log-probs, or divided by the response's token count (length-normalised)."""
    if reduction == "mean":
        return logps / num_tokens.clamp(min=1).to(logps.dtype)
    return logps


@dataclass
class ReferenceOutputs:
    logps: torch.Tensor  # [B, N] reduced as the loss wants (sum or mean over tokens)
    raw_logps: torch.Tensor  # [B, N] summed log-probs
    dispersion: Optional[torch.Tensor]  # [B] for MallowsPO


def _precomputed(batch: ListwiseBatch, key: str) -> Optional[torch.Tensor]:
    """A precomputed per-response column, if every real response of the batch has a value."""
    values = batch.extras.get(key)
    if values is None or torch.isnan(values[batch.response_mask()]).any():
        return None
    return values


def per_group_forward(cfg: RaypoConfig) -> bool:
    """Policy log-probs one group per forward when the reference was scored that way (precomputed), so
    that policy and reference values of a group come from identical computations (exact zero at step 0)."""
    return cfg.train.reference == "precomputed"


def reference_outputs(setup: LossSetup, engines: Engines, batch: ListwiseBatch, prefix_sharing: bool,
                      device: torch.device) -> ReferenceOutputs:
    """Reference log-probs from the data (precomputed) or from the reference engine (online); the same
    function (:func:`raypo.listwise_model.grouped_logprobs`) computes both."""
    num_tokens = batch.num_scored_tokens().to(device)
    needs_entropy = setup.spec.needs_dispersion
    pre_logps, pre_entropy = _precomputed(batch, "ref_logps"), _precomputed(batch, "ref_entropy")
    if pre_logps is not None and (not needs_entropy or pre_entropy is not None):
        raw = torch.nan_to_num(pre_logps.to(device=device, dtype=torch.float32))
        entropy = pre_entropy
    elif engines.reference is not None:
        with torch.no_grad():
            out = grouped_logprobs(engines.reference, batch, prefix_sharing=prefix_sharing,
                                   with_entropy=needs_entropy)
        raw, entropy = out.logps.float(), out.entropy
    elif not setup.uses_reference and not needs_entropy:
        zeros = torch.zeros(batch.num_groups, batch.num_responses, device=device)
        return ReferenceOutputs(zeros, zeros, None)
    else:
        raise RuntimeError("train.reference=precomputed but the batch has no ref_logps (or ref_entropy) "
                           "values; precompute them (raypo does so when train.reference=precomputed) or "
                           "set train.reference=online")
    dispersion = None
    if needs_entropy:
        mask = batch.response_mask().to(device)
        hbar = torch.nan_to_num(entropy.to(device).double(), nan=1.0).clamp(min=1e-12)
        dispersion = neg_log_dispersion(hbar, mask, c=setup.dispersion_c).float()
    return ReferenceOutputs(sequence_logps(raw, num_tokens, setup.reduction), raw, dispersion)


def micro_batch_loss(setup: LossSetup, batch: ListwiseBatch, policy_logps_raw: torch.Tensor,
                     ref: ReferenceOutputs, lam: Optional[torch.Tensor], device: torch.device):
    """listwise_loss on one micro-batch; ``policy_logps_raw`` are summed log-probs [B, N]."""
    mask = batch.response_mask().to(device)
    num_tokens = batch.num_scored_tokens().to(device)
    extras = {k: v.to(device) for k, v in batch.extras.items()}
    policy = sequence_logps(policy_logps_raw.float(), num_tokens, setup.reduction)
    return listwise_loss(setup.spec.name, policy, ref.logps if setup.uses_reference else None, mask=mask,
                         scores=loss_labels(setup.spec, extras), lam=lam, dispersion=ref.dispersion,
                         **setup.hparams)


def denominator_of(setup: LossSetup, batch: ListwiseBatch, lam: Optional[torch.Tensor],
                   device: torch.device) -> float:
    """The loss's denominator (count of prompts, pairs or items) for a batch; it depends only on labels and
    masks, so it is computed before any forward to normalise the whole step at once."""
    zeros = torch.zeros(batch.num_groups, batch.num_responses, device=device)
    disp = torch.ones(batch.num_groups, device=device) if setup.spec.needs_dispersion else None
    ref = ReferenceOutputs(zeros, zeros, disp)
    with torch.no_grad():
        return float(micro_batch_loss(setup, batch, zeros, ref, lam, device).denominator)


def batch_metric_sums(setup: LossSetup, batch: ListwiseBatch, out, policy_logps_raw: torch.Tensor,
                      ref: ReferenceOutputs, prefix: str, device: torch.device) -> MetricSums:
    """Loss, ranking metrics of the implicit rewards, KL estimate and token counts as (sum, count)."""
    mask = batch.response_mask().to(device)
    num_tokens = batch.num_scored_tokens().to(device)
    rewards = out.rewards.detach() if getattr(out, "rewards", None) is not None else None
    one = torch.ones((), dtype=torch.float64)
    sums: MetricSums = {f"{prefix}loss_numerator": (out.numerator.detach().double().cpu(), one),
                        f"{prefix}loss_denominator": (torch.as_tensor(out.denominator).double().cpu(), one)}
    labels = metric_labels({k: v.to(device) for k, v in batch.extras.items()})
    if rewards is not None and labels is not None:
        sums.update(ranking_metrics(rewards, labels, mask, prefix=prefix))
        per_dim = batch.extras.get("scores")
        if per_dim is not None and per_dim.dim() == 3 and per_dim.shape[-1] > 1:
            sums.update(ranking_metrics(rewards, per_dim.to(device), mask, ndcg_ks=(None,), prefix=prefix,
                                        dim_names=setup.dim_names if setup.dim_names and
                                        len(setup.dim_names) == per_dim.shape[-1] else None))
    # KL estimate on the data's responses, per token: mean over tokens of log pi - log pi_ref (k1).
    if setup.uses_reference:
        diff = torch.where(mask, policy_logps_raw.detach().float() - ref.raw_logps,
                           torch.zeros_like(ref.raw_logps))
        sums[f"{prefix}kl_per_token"] = (diff.sum().double().cpu(), num_tokens[mask].sum().double().cpu())
        sums[f"{prefix}reward_abs_mean"] = (rewards.abs()[mask].sum().double().cpu() if rewards is not None
                                            else torch.zeros((), dtype=torch.float64),
                                            mask.sum().double().cpu())
    return sums


def finalize(sums: MetricSums, prefix: str) -> dict[str, float]:
    """Per-metric means, and the loss as sum(numerators) / sum(denominators)."""
    num = sums.pop(f"{prefix}loss_numerator", None)
    den = sums.pop(f"{prefix}loss_denominator", None)
    out = finalize_metrics(sums)
    if num is not None and den is not None:
        out[f"{prefix}loss"] = float(num[0] / den[0]) if float(den[0]) > 0 else 0.0
    return {k: v for k, v in out.items() if isinstance(v, float) and math.isfinite(v)}


# ----------------------------------------------------------------------------------------------------
# Token-budget packing of the step's groups (raypo.balance)
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepMicroBatch:
    """One forward/backward of a step: whole groups, their lambdas [B, m] (or None) and whether they count.

    ``real=False`` marks a padding micro-batch: it runs forward and backward with zero weight, only so
    that every rank makes the same ZeRO-3 collectives; it adds nothing to the loss, gradient or metrics.
    """

    batch: ListwiseBatch
    lam: Optional[torch.Tensor]
    real: bool = True


def concat_groups(parts: Sequence[ListwiseBatch]) -> ListwiseBatch:
    """The groups of several batches as one batch, as :func:`raypo.packing.collate_listwise` would collate
    their rows: list width N = the widest group, per-response extras NaN-padded (kept when every part has
    them), response masks kept when every part has them."""
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
            cols.append(value)
        extras[key] = torch.cat(cols)
    masks = None
    if all(p.response_masks is not None for p in parts):
        masks = [m for p in parts for m in p.response_masks]
    return ListwiseBatch([g for p in parts for g in p.prompt_ids], [g for p in parts for g in p.response_ids],
                         num_responses=n, extras=extras, response_masks=masks)


def _group_cost(group: ListwiseBatch, prefix_sharing: bool) -> tuple[int, tuple[int, int]]:
    """(tokens, (rows, width)) of a one-group batch in the layout of the forward (:mod:`raypo.balance`)."""
    prompt, responses = len(group.prompt_ids[0]), [len(r) for r in group.response_ids[0]]
    return (group_tokens(prompt, responses, prefix_sharing=prefix_sharing),
            group_shape(prompt, responses, prefix_sharing=prefix_sharing))


def batch_padded_tokens(batch: ListwiseBatch, prefix_sharing: bool, per_group: bool = False) -> int:
    """Tokens of the dense [rows, L] input(s) one forward of ``batch`` runs (padding included)."""
    shapes = [_group_cost(batch.select_groups(b, b + 1), prefix_sharing)[1] for b in range(batch.num_groups)]
    if per_group:
        return sum(padded_tokens([s]) for s in shapes)
    return padded_tokens(shapes)


def _all_gather_objects(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def route_packed(groups: Sequence[ListwiseBatch], lams: Sequence[Optional[torch.Tensor]],
                 plan: MicroBatchPlan, rank: int, *, per_group: bool = False,
                 dummy: int = 0) -> list[StepMicroBatch]:
    """Rank ``rank``'s micro-batches of the step under ``plan`` (the same plan on every rank).

    ``groups`` / ``lams``: the step's groups of all ranks (one-group batches, rank order) and their
    lambdas [1, m]. An empty micro-batch of the plan becomes a zero-weight copy of group ``dummy`` (the
    step's cheapest). ``per_group`` (one forward per group, precomputed reference): the rank's groups run
    one per micro-batch and every rank pads to the largest group count, so forward counts still match.
    """
    if per_group:
        mine = [[g] for micro in plan.ranks[rank] for g in micro]
        count = max(sum(len(micro) for micro in row) for row in plan.ranks)
        mine += [[] for _ in range(count - len(mine))]
    else:
        mine = plan.ranks[rank]
    out = []
    for micro in mine:
        if not micro:
            out.append(StepMicroBatch(groups[dummy], lams[dummy], real=False))
            continue
        lam = None if lams[micro[0]] is None else torch.cat([lams[g] for g in micro])
        out.append(StepMicroBatch(concat_groups([groups[g] for g in micro]), lam))
    return out


def pack_step(micro: Sequence[ListwiseBatch], lams: Sequence[Optional[torch.Tensor]], token_budget: int, *,
              rank: int, world_size: int, prefix_sharing: bool, per_group: bool,
              device: torch.device) -> tuple[list[StepMicroBatch], MicroBatchPlan]:
    """This rank's token-budget micro-batches for the step whose groups every rank read as ``micro``.

    All ranks exchange their groups and lambdas (one ``all_gather_object``; the lambdas were drawn before,
    in read order, so the schedule's state is that of an unpacked run), plan the same global list with
    :func:`raypo.balance.plan_micro_batches` on the groups' padded shapes, and keep their share.
    """
    local = [(b.select_groups(g, g + 1), None if lam is None else lam[g:g + 1].detach().cpu())
             for b, lam in zip(micro, lams) for g in range(b.num_groups)]
    everything = [item for part in _all_gather_objects(local) for item in part]
    groups = [g for g, _ in everything]
    group_lams = [None if lam is None else lam.to(device) for _, lam in everything]
    costs = [_group_cost(g, prefix_sharing) for g in groups]
    lengths, shapes = [c[0] for c in costs], [c[1] for c in costs]
    plan = plan_micro_batches(lengths, token_budget, world_size, shapes=shapes)
    dummy = min(range(len(groups)), key=lambda g: (padded_tokens([shapes[g]]), lengths[g], g))
    return route_packed(groups, group_lams, plan, rank, per_group=per_group, dummy=dummy), plan


def _set_accumulation_boundary(engine, is_boundary: bool) -> None:
    """Tell DeepSpeed whether the next backward ends the step (its own counter assumes a fixed count).

    Unmanaged accumulation (``managed_gradient_accumulation: false`` in a DeepSpeed override) has no such
    switch: there ``engine.step()`` itself is the boundary."""
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if managed is not None and not managed():
        return
    engine.set_gradient_accumulation_boundary(is_boundary)


# ----------------------------------------------------------------------------------------------------
# Train step and evaluation
# ----------------------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def train_step(cfg: RaypoConfig, setup: LossSetup, engines: Engines, micro: list[ListwiseBatch], schedule,
               device: torch.device, world_size: int) -> MetricSums:
    """One optimizer step over ``micro`` (the k micro-batches this rank read); returns local metric sums.

    With ``train.token_budget > 0`` the step's groups of all ranks are repacked first (:func:`pack_step`);
    otherwise the k micro-batches run as read.
    """
    engine = engines.policy
    prefix_sharing, per_group = cfg.model.prefix_sharing, per_group_forward(cfg)
    # Lambdas are drawn per read micro-batch, in read order, packed or not: same draws, same schedule state.
    lams = [schedule.sample(b.num_groups, device=device) if setup.spec.needs_lambda else None for b in micro]
    sums: MetricSums = {}
    if cfg.train.token_budget:
        steps, plan = pack_step(micro, lams, cfg.train.token_budget, rank=_rank(), world_size=world_size,
                                prefix_sharing=prefix_sharing, per_group=per_group, device=device)
        one = torch.ones((), dtype=torch.float64)
        sums["perf/plan_sync_efficiency"] = (torch.tensor(plan.sync_efficiency, dtype=torch.float64), one)
    else:
        steps = [StepMicroBatch(b, lam) for b, lam in zip(micro, lams)]
    local_den = sum(denominator_of(setup, m.batch, m.lam, device) for m in steps if m.real)
    global_den = float(_all_reduce(torch.tensor([local_den], dtype=torch.float64, device=device)).item())
    scale = world_size / global_den if global_den > 0 else 0.0
    chunk = cfg.train.response_chunk_size
    layout = "shared_tokens" if prefix_sharing else "unshared_tokens"
    tokens = padded = 0.0
    for j, m in enumerate(steps):
        batch, lam = m.batch, m.lam
        # M varies per step when packing: the last backward of the step is the accumulation boundary.
        _set_accumulation_boundary(engine, j == len(steps) - 1)
        ref = reference_outputs(setup, engines, batch, prefix_sharing, device)
        num_chunks = None
        if chunk:
            num_chunks = max(1, math.ceil(_agreed_max(batch.num_responses, device) / chunk))
        holder: dict[str, Any] = {}

        def loss_fn(policy_logps: torch.Tensor, batch=batch, ref=ref, lam=lam, holder=holder):
            out = micro_batch_loss(setup, batch, policy_logps, ref, lam, device)
            holder["out"] = out
            return out.numerator, out.denominator, out.metrics

        result = listwise_backward(engine, batch, loss_fn, chunk_size=chunk or None, num_chunks=num_chunks,
                                   prefix_sharing=prefix_sharing, loss_scale=scale if m.real else 0.0,
                                   backward_fn=lambda obj: engine.backward(obj, scale_wrt_gas=False),
                                   per_group=per_group)
        padded += batch_padded_tokens(batch, prefix_sharing, per_group)
        if not m.real:
            continue
        sums = merge_metric_sums(sums, batch_metric_sums(setup, batch, holder["out"], result.logps, ref,
                                                         "train/", device))
        tokens += float(batch.token_stats()[layout])
        one = torch.ones((), dtype=torch.float64)
        sums = merge_metric_sums(sums, {
            "perf/prompts": (torch.tensor(float(batch.num_groups), dtype=torch.float64), one)})
    engine.step()  # the optimizer steps here, once: the boundary was set on the last micro-batch
    one = torch.ones((), dtype=torch.float64)
    return merge_metric_sums(sums, {
        "perf/tokens": (torch.tensor(tokens, dtype=torch.float64), one),
        "perf/padded_tokens": (torch.tensor(padded, dtype=torch.float64), one),
        "perf/micro_batches": (torch.tensor(float(len(steps)), dtype=torch.float64), one)})


def evaluate(cfg: RaypoConfig, setup: LossSetup, engines: Engines, eval_shard, rank: int, world_size: int,
             device: torch.device, schedule) -> dict[str, float]:
    """Loss and ranking metrics on this rank's share of the eval split, reduced across ranks.

    Ranks may hold different numbers of eval batches; a rank that has run out repeats its last batch with
    zero weight so that every rank makes the same forward calls (ZeRO-3 collectives).
    """
    from raypo.data.pipeline import eval_rows_for_rank

    engine = engines.policy
    engine.eval()
    batches = []
    for rows in eval_shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy"):
        keep = eval_rows_for_rank([str(p) for p in rows["prompt_id"]], rank, world_size)
        rows = {k: v[keep] for k, v in rows.items()}
        if len(rows["prompt_id"]):
            batches.append(collate_listwise(rows))
        if cfg.train.eval_batches and len(batches) >= cfg.train.eval_batches:
            break
    total = _agreed_max(len(batches), device)
    sums: MetricSums = {}
    with torch.no_grad():
        for i in range(total):
            real = i < len(batches)
            batch = batches[i] if real else (batches[-1] if batches else None)
            if batch is None:
                raise RuntimeError(f"rank {rank} has no eval rows at all; lower train.eval_batches or use a "
                                   "larger eval split (data.eval_fraction) so every worker gets some")
            ref = reference_outputs(setup, engines, batch, cfg.model.prefix_sharing, device)
            out_lp = grouped_logprobs(engine, batch, prefix_sharing=cfg.model.prefix_sharing,
                                      per_group=per_group_forward(cfg))
            # Evaluation weighs every dimension equally (the uniform mixture), not a sampled lambda.
            lam = None
            if setup.spec.needs_lambda:
                m = batch.extras["scores"].shape[-1]
                lam = torch.full((m,), 1.0 / m, device=device)
            if real:
                out = micro_batch_loss(setup, batch, out_lp.logps, ref, lam, device)
                sums = merge_metric_sums(
                    sums, batch_metric_sums(setup, batch, out, out_lp.logps, ref, "eval/", device))
    engine.train()
    return finalize(all_reduce_metric_sums(sums, device), "eval/")


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def _restore(engine, schedule) -> TrainState:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return TrainState()
    with ckpt.as_directory() as local:
        state = load_checkpoint(engine, local)
    if dist.get_rank() == 0:
        print(f"raypo: resuming from {ckpt.path} at step {state.global_step} (epoch {state.epoch}, "
              f"{state.batches_in_epoch} micro-batches into it)", flush=True)
    if state.lambda_state and schedule is not None:
        schedule.load_state_dict(state.lambda_state)
    return state


def _report(metrics: dict[str, float], state: TrainState, engines: Engines, schedule, *, rank: int,
            checkpoint: bool) -> None:
    import ray.train
    from ray.train import Checkpoint

    metrics = {**metrics, "step": state.global_step, "epoch": state.epoch}
    if not checkpoint:
        ray.train.report(metrics)
        return
    state.lambda_state = schedule.state_dict() if schedule is not None else {}
    local = save_checkpoint(engines.policy, state, rank=rank, hf_config=engines.hf_config,
                            tokenizer=engines.tokenizer)
    try:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(local),
                         checkpoint_dir_name=checkpoint_dir_name(state.global_step))
    finally:
        shutil.rmtree(local, ignore_errors=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (see the module docstring)."""
    import deepspeed
    import ray.train

    from raypo.data.pipeline import EVAL_KEY
    from raypo.train.quiet import quiet

    quiet()
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if cfg.scaling.use_gpu:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    torch.manual_seed(cfg.train.seed)

    dims = list(loop_config.get("dimensions") or cfg.data.dimensions) or None
    setup = loss_setup(cfg, dims)
    needs_online_ref = setup.uses_reference and cfg.train.reference == "online" or (
        setup.spec.needs_dispersion and cfg.train.reference == "online")
    engines = build_engines(cfg, loop_config["policy_path"], loop_config["ref_path"], world_size=world_size,
                            needs_online_reference=needs_online_ref, total_steps=cfg.train.max_steps)
    schedule = None
    if setup.spec.needs_lambda:
        from dataclasses import replace

        schedule = build_lambda_schedule(replace(cfg.lambdas, seed=cfg.lambdas.seed + 1000 * rank),
                                         num_dims=len(dims) if dims else None)
    state = _restore(engines.policy, schedule)
    eval_shard = ray.train.get_dataset_shard(EVAL_KEY) if loop_config.get("has_eval") else None
    t = cfg.train
    log_every, ckpt_every = cfg.logging.log_every, cfg.checkpoint.every_steps
    window: MetricSums = {}
    window_start = time.time()

    if eval_shard is not None and state.global_step == 0:
        # The baseline: at step 0 the policy equals the reference, so every implicit reward is 0.
        _report(evaluate(cfg, setup, engines, eval_shard, rank, world_size, device, schedule), state, engines,
                schedule, rank=rank, checkpoint=False)
    last_checkpoint = state.global_step if state.global_step > 0 else -1
    for micro in _steps(state, t, device):
        if state.global_step == 0 and not window:
            window_start = time.time()
        sums = train_step(cfg, setup, engines, micro, schedule, device, world_size)
        window = merge_metric_sums(window, sums)
        state.global_step += 1
        state.batches_in_epoch += t.grad_accum_steps
        state.tokens_seen += int(sum(b.token_stats()["shared_tokens"] for b in micro))
        _maybe_inject_failure(state.global_step, rank)

        last = state.global_step >= t.max_steps
        do_eval = eval_shard is not None and (bool(t.eval_every and state.global_step % t.eval_every == 0)
                                              or last)
        do_ckpt = bool(ckpt_every and state.global_step % ckpt_every == 0) or last
        if state.global_step % log_every == 0 or do_eval or do_ckpt or state.global_step == 1:
            metrics = _window_metrics(window, window_start, engines.policy, device)
            window, window_start = {}, time.time()
            if do_eval:
                metrics.update(evaluate(cfg, setup, engines, eval_shard, rank, world_size, device, schedule))
            _report(metrics, state, engines, schedule, rank=rank, checkpoint=do_ckpt)
            if do_ckpt:
                last_checkpoint = state.global_step

    if state.global_step < t.max_steps:
        if rank == 0:
            print(f"raypo: the data ran out after {state.global_step} of {t.max_steps} steps "
                  f"({t.epochs} epoch(s)); raise train.epochs or lower train.max_steps", flush=True)
        if state.global_step != last_checkpoint:  # the run still ends with an evaluated checkpoint
            metrics = _window_metrics(window, window_start, engines.policy, device) if window else {}
            if eval_shard is not None:
                metrics.update(evaluate(cfg, setup, engines, eval_shard, rank, world_size, device, schedule))
            _report(metrics, state, engines, schedule, rank=rank, checkpoint=True)


def _steps(state: TrainState, t, device: torch.device) -> Iterator[list[ListwiseBatch]]:
    """This rank's micro-batches, k per optimizer step, epoch after epoch, resuming at ``state``'s
    position; stops everywhere at once when any rank runs out (ranks must agree on the step count)."""
    import ray.train

    from raypo.data.pipeline import train_key

    while state.global_step < t.max_steps and state.epoch < t.epochs:
        shard = ray.train.get_dataset_shard(train_key(state.epoch))
        batches = iter_micro_batches(shard, t.micro_batch_size, skip=state.batches_in_epoch)
        while state.global_step < t.max_steps:
            micro = [b for _, b in zip(range(t.grad_accum_steps), batches)]
            if _has_batches(len(micro), device) < t.grad_accum_steps:
                break
            yield micro
        if state.global_step >= t.max_steps:
            return
        state.epoch += 1
        state.batches_in_epoch = 0


def _maybe_inject_failure(step: int, rank: int) -> None:
    """Fault injection for resilience tests: ``RAYPO_FAIL_AT_STEP=k`` kills the rank
    ``RAYPO_FAIL_RANK`` (default 1) right after step k, once (``RAYPO_FAIL_MARKER`` records that it did)."""
    at = os.environ.get("RAYPO_FAIL_AT_STEP")
    marker = os.environ.get("RAYPO_FAIL_MARKER")
    if not at or not marker or step != int(at) or rank != int(os.environ.get("RAYPO_FAIL_RANK", "1")):
        return
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"killed rank {rank} after step {step}\n")
    os._exit(1)


def _window_metrics(window: MetricSums, start: float, engine, device: torch.device) -> dict[str, float]:
    reduced = all_reduce_metric_sums(dict(window), device)
    elapsed = max(time.time() - start, 1e-9)
    tokens = float(reduced.pop("perf/tokens", (torch.zeros(()), torch.zeros(())))[0])
    prompts = float(reduced.pop("perf/prompts", (torch.zeros(()), torch.zeros(())))[0])
    padded = float(reduced.pop("perf/padded_tokens", (torch.zeros(()), torch.zeros(())))[0])
    metrics = finalize(reduced, "train/")
    metrics["perf/tokens_per_s"] = tokens / elapsed
    if padded > 0:  # real tokens / tokens the forwards ran, padding and zero-weight micro-batches included
        metrics["perf/padding_efficiency"] = tokens / padded
    metrics["perf/samples_per_s"] = prompts / elapsed
    lr = engine.get_lr()
    metrics["train/lr"] = float(lr[0] if isinstance(lr, (list, tuple)) else lr)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics
