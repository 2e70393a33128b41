"""The listwise training recipe: the loop each Ray Train worker runs, read top to bottom.

One optimizer step on one rank (:meth:`ListwiseRecipe.train_step`)::

    micro-batches b_1..b_k (k = train.grad_accum_steps, whole prompt groups each, as read)
    lambdas drawn per micro-batch in read order                    # raypo.train.lambda_schedules
    forwards f_1..f_M = b_1..b_k, or token-budget bins of them     # raypo.train.token_budget
    D   = all_reduce_sum( sum_j denominator(f_j) )                 # prompts, pairs or items of the step
    for f_j: s = logps(policy, f_j); L_j = numerator(s, labels)    # raypo.train.objective
             engine.backward(L_j * world / D)                      # DeepSpeed averages over ranks
    engine.step()

so the gradient is that of sum(numerators) / sum(denominators) over the whole global batch: k accumulation
steps equal one batch k times larger, and 2 workers equal 1 worker with twice the batch.

ZeRO-3 runs collectives inside forward and backward, so every rank must make the same calls: a step runs
only when every rank has k micro-batches (all-reduce MIN), the response-chunk count is agreed across ranks
(all-reduce MAX of N), evaluation pads the ranks that run out of rows with zero-weight forwards, and under a
token budget every rank runs the same number of bins (docs/training.md).

The rest of the loop (:meth:`ListwiseRecipe.train`): evaluate at step 0 (every implicit reward is 0 there),
then step, and every ``logging.log_every`` steps log the window's metrics (rank 0 writes the row:
:mod:`raypo.train.metrics_log`), evaluating every ``train.eval_every`` steps and checkpointing every
``checkpoint.every_steps`` steps and at the end. Ray Train gets a report only when it needs one (a
checkpoint, an evaluation, the metric a Tune scheduler decides on, the end, and at most every
``logging.report_interval_s`` seconds besides): each report waits on Ray Train's controller, which polls
the workers about every 2 s. The loop's own clock is in :mod:`raypo.train.perf`.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any, Optional

import torch

from raypo.config import RaypoConfig, config_from_dict
from raypo.data.conditioning import CONDITIONING_FILE
from raypo.losses.metrics import merge_metric_sums
from raypo.model.batch import ListwiseBatch, collate_listwise
from raypo.model.listwise import grouped_logprobs
from raypo.model.response_chunks import listwise_backward
from raypo.train import collectives
from raypo.train.checkpoint import (
    MODEL_CARD_FILE,
    TrainState,
    checkpoint_dir_name,
    load_checkpoint,
    save_checkpoint,
)
from raypo.train.collectives import MetricSums, init_process_group
from raypo.train.conditioning import (
    BatchConditioner,
    conditioning_of,
    evaluation_lambdas,
    with_reference_columns,
)
from raypo.train.engines import Engines, build_engines, set_accumulation_boundary
from raypo.train.lambda_schedules import LambdaSchedule, build_lambda_schedule
from raypo.train.metrics import batch_metric_sums, finalize, scalar, window_metrics
from raypo.train.objective import Objective
from raypo.train.perf import FlopsModel, LoopWindow, attended_pairs, peak_flops
from raypo.train.reference import reference_outputs
from raypo.train.token_budget import StepForward, batch_padded_tokens, pack_step


def iter_micro_batches(shard, batch_size: int, skip: int = 0) -> Iterator[ListwiseBatch]:
    """Collated micro-batches of whole prompt groups from a Ray Data shard, skipping the first ``skip``
    (resume: Ray Data has no resumable iterator, so consumed batches are read and dropped)."""
    for i, rows in enumerate(shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                                prefetch_batches=1)):
        if i < skip:
            continue
        yield collate_listwise(rows)


class EpochReader:
    """One epoch's micro-batches (:func:`iter_micro_batches`), read ahead by a background thread.

    The thread opens the shard's iterator as soon as the reader is made and keeps up to ``depth`` collated
    micro-batches in a FIFO queue, so the consumer gets exactly the sequential order (one producer), the
    same ``skip`` (resume drops the same first micro-batches) and the same rows. Why: Ray Data starts each
    epoch's streaming-split iterator on its first read, about 2 s on CPU; a reader made for epoch e + 1
    while epoch e trains has it started, and its first micro-batches read, when the loop gets there.

    The thread makes no torch.distributed call (only Ray Data reads and collation), so every rank's
    collectives stay in the main thread, in the same order as without it. A producer error is raised in
    the consumer at the position it occurred. :meth:`close` stops the thread (also when the run ends inside
    the epoch and the reader was never consumed to the end).
    """

    _DONE = object()

    def __init__(self, shard, batch_size: int, *, skip: int = 0, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(shard, batch_size, skip),
                                        name="raypo-epoch-reader", daemon=True)
        self._thread.start()

    def _produce(self, shard, batch_size: int, skip: int) -> None:
        batches = iter_micro_batches(shard, batch_size, skip=skip)
        try:
            for batch in batches:
                if not self._put(batch):
                    return
            self._put(self._DONE)
        except BaseException as err:  # handed to the consumer, raised where the batch would have been
            self._put(err)
        finally:
            batches.close()  # releases Ray Data's iterator when stopped early

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> EpochReader:
        return self

    def __next__(self) -> ListwiseBatch:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is self._DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; what it read ahead is dropped. Idempotent."""
        self._finished = True
        self._stop.set()
        self._thread.join(timeout)


class ListwiseRecipe:
    """A worker's training state and loop: config, objective, engines, lambda schedule and position.

    Construct it directly (one process, tests) or with :meth:`setup` inside a Ray Train worker.
    """

    def __init__(self, cfg: RaypoConfig, objective: Objective, engines: Engines, *,
                 schedule: Optional[LambdaSchedule] = None, device: torch.device = torch.device("cpu"),
                 rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.objective, self.engines, self.schedule = cfg, objective, engines, schedule
        self.device, self.rank, self.world_size = device, rank, world_size
        self.state = TrainState()
        # Policy log-probs one group per forward when the reference was scored that way (precomputed,
        # train.reference_batching=per_group), so that policy and reference values of a group come from
        # identical computations (exact 0 at step 0); batched: one forward per micro-batch, as online.
        self.per_group = cfg.train.reference == "precomputed" and cfg.train.reference_batching == "per_group"
        self.train_shards: Any = None  # epoch -> Ray Data shard, set by setup()
        self.eval_shard: Any = None
        self.metrics_log: Any = None  # rank 0's raypo.train.metrics_log.MetricsLog, set by setup()
        # lambdas.condition=prompt: renders each prompt with its lambda (raypo.train.conditioning)
        self.conditioner: Optional[BatchConditioner] = None
        self.reference_source: Optional[str] = None  # the reference model's source, for raypo_model.json
        self.report_metric: Optional[str] = None  # a Tune trial's metric: every row carrying it goes to Ray
        self.checkpoint_base: Optional[str] = None  # <storage>/<run name>, for the progress line
        self._last_ray_report = time.perf_counter()
        # Model FLOPs only where a peak is known to divide them by (perf/mfu on listed GPUs).
        self.flops_model = FlopsModel.from_hf_config(engines.hf_config) \
            if engines.hf_config is not None and peak_flops(device) is not None else None

    # ------------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def setup(cls, loop_config: dict[str, Any]) -> ListwiseRecipe:
        """Inside a Ray Train worker: process group, engines, lambda schedule, data shards, resume."""
        import ray.train

        from raypo.data.splits import EVAL_KEY, train_key

        cfg = config_from_dict(loop_config["config"])
        ctx = ray.train.get_context()
        rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
        if cfg.scaling.use_gpu:
            torch.cuda.set_device(device)
        init_process_group(cfg.scaling.use_gpu)
        torch.manual_seed(cfg.train.seed)

        dims = list(loop_config.get("dimensions") or cfg.data.dimensions) or None
        objective = Objective.from_config(cfg, dims)
        online_reference = objective.needs_reference_model() and cfg.train.reference == "online"
        engines = build_engines(cfg, loop_config["policy_path"], loop_config["ref_path"],
                                world_size=world_size, needs_online_reference=online_reference,
                                total_steps=cfg.train.max_steps)
        schedule = None
        if objective.needs_lambda:  # each rank its own stream of lambdas
            schedule = build_lambda_schedule(replace(cfg.lambdas, seed=cfg.lambdas.seed + 1000 * rank),
                                             num_dims=len(dims) if dims else None)
        recipe = cls(cfg, objective, engines, schedule=schedule, device=device, rank=rank,
                     world_size=world_size)
        recipe.reference_source = loop_config.get("ref_path")
        conditioning = conditioning_of(cfg, dims)
        if conditioning is not None:
            recipe.conditioner = BatchConditioner(conditioning, engines.tokenizer)
        recipe.train_shards = lambda epoch: ray.train.get_dataset_shard(train_key(epoch))
        if loop_config.get("has_eval"):
            recipe.eval_shard = ray.train.get_dataset_shard(EVAL_KEY)
        resumed = recipe.restore()
        recipe.report_metric = loop_config.get("report_metric")
        recipe.checkpoint_base = loop_config.get("checkpoint_base")
        if rank == 0 and loop_config.get("run_dir"):
            from raypo.train.metrics_log import MetricsLog

            recipe.metrics_log = MetricsLog(cfg, loop_config["run_dir"], loop_config["run_name"],
                                            keep_through=recipe.state.global_step if resumed else -1,
                                            remote_path=loop_config.get("remote_metrics_path"))
        return recipe

    # ------------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------------

    def step_forwards(self, micro: list[ListwiseBatch]) -> tuple[list[StepForward], MetricSums]:
        """The step's forwards: the read micro-batches with their lambdas, or token-budget bins of them."""
        # Lambdas are drawn per read micro-batch, in read order, packed or not: same draws, same state.
        lams = [self.schedule.sample(b.num_groups, device=self.device) if self.objective.needs_lambda
                else None for b in micro]
        if self.conditioner is not None:  # the policy sees (x, lambda); the reference the plain x
            micro = [self.conditioner(self.plain_reference(b), lam) for b, lam in zip(micro, lams)]
        if not self.cfg.train.token_budget:
            return [StepForward(b, lam) for b, lam in zip(micro, lams)], {}
        forwards, plan = pack_step(micro, lams, self.cfg.train.token_budget, rank=self.rank,
                                   world_size=self.world_size, prefix_sharing=self.cfg.model.prefix_sharing,
                                   per_group=self.per_group, device=self.device)
        return forwards, {"perf/plan_sync_efficiency": scalar(plan.sync_efficiency)}

    def plain_reference(self, batch: ListwiseBatch) -> ListwiseBatch:
        """``batch`` carrying the online reference's values on its plain prompts (conditioning only)."""
        return with_reference_columns(self.objective, self.engines.reference, batch,
                                      prefix_sharing=self.cfg.model.prefix_sharing, per_group=self.per_group)

    def train_step(self, micro: list[ListwiseBatch]) -> MetricSums:
        """One optimizer step over ``micro`` (the k micro-batches this rank read); local metric sums."""
        engine, prefix_sharing = self.engines.policy, self.cfg.model.prefix_sharing
        forwards, sums = self.step_forwards(micro)
        local_den = sum(self.objective.denominator(f.batch, f.lam, self.device) for f in forwards if f.real)
        global_den = float(collectives.all_reduce(
            torch.tensor([local_den], dtype=torch.float64, device=self.device)).item())
        scale = self.world_size / global_den if global_den > 0 else 0.0
        chunk = self.cfg.train.response_chunk_size
        tokens = padded = 0.0
        for j, f in enumerate(forwards):
            # The number of forwards varies per step under a token budget: the last one is the boundary.
            set_accumulation_boundary(engine, j == len(forwards) - 1)
            ref = reference_outputs(self.objective, self.engines.reference, f.batch, prefix_sharing,
                                    self.device)
            num_chunks = None
            if chunk:
                widest = collectives.agreed_max(f.batch.num_responses, self.device)
                num_chunks = max(1, math.ceil(widest / chunk))
            holder: dict[str, Any] = {}

            def loss_fn(policy_logps: torch.Tensor, f=f, ref=ref, holder=holder):
                out = self.objective.loss(f.batch, policy_logps, ref.logps, ref.dispersion, f.lam,
                                          self.device)
                holder["out"] = out
                return out.numerator, out.denominator, out.metrics

            result = listwise_backward(engine, f.batch, loss_fn, chunk_size=chunk or None,
                                       num_chunks=num_chunks, prefix_sharing=prefix_sharing,
                                       loss_scale=scale if f.real else 0.0,
                                       backward_fn=lambda obj: engine.backward(obj, scale_wrt_gas=False),
                                       per_group=self.per_group)
            padded += batch_padded_tokens(f.batch, prefix_sharing, self.per_group)
            if not f.real:
                continue
            sums = merge_metric_sums(sums, batch_metric_sums(self.objective, f.batch, holder["out"],
                                                             result.logps, ref, "train/", self.device,
                                                             f.lam))
            tokens += float(f.batch.token_stats()["shared_tokens" if prefix_sharing else "unshared_tokens"])
            pairs = attended_pairs(f.batch, prefix_sharing)
            sums = merge_metric_sums(sums, {"perf/prompts": scalar(f.batch.num_groups),
                                            "perf/attn_pairs": scalar(pairs)})
        engine.step()  # the optimizer steps here, once: the boundary was set on the last forward
        return merge_metric_sums(sums, {"perf/tokens": scalar(tokens), "perf/padded_tokens": scalar(padded),
                                        "perf/forwards": scalar(len(forwards))})

    # ------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------

    def _eval_batches(self) -> list[ListwiseBatch]:
        """This rank's share of the eval split (``train.eval_batches`` batches at most; 0: all)."""
        from raypo.data.splits import eval_rows_for_rank

        batches = []
        for rows in self.eval_shard.iter_batches(batch_size=self.cfg.train.micro_batch_size,
                                                 batch_format="numpy"):
            keep = eval_rows_for_rank([str(p) for p in rows["prompt_id"]], self.rank, self.world_size)
            rows = {k: v[keep] for k, v in rows.items()}
            if len(rows["prompt_id"]):
                batches.append(collate_listwise(rows))
            if self.cfg.train.eval_batches and len(batches) >= self.cfg.train.eval_batches:
                break
        return batches

    def evaluate(self) -> dict[str, float]:
        """Loss and ranking metrics on this rank's share of the eval split, reduced across ranks.

        Evaluation weighs every dimension equally (the uniform lambda, metrics ``eval/...``), not a sampled
        lambda. A lambda-conditioned policy is evaluated at the uniform lambda and at each one-hot e_k too
        (``eval_at_<dimension>/...``): the steering matrix of docs/steering.md.
        """
        batches = self._eval_batches()
        if self.conditioner is None:
            return self.evaluate_at(batches, None, "eval/")
        metrics: dict[str, float] = {}
        for prefix, lam in evaluation_lambdas(list(self.conditioner.conditioning.dimensions)):
            metrics.update(self.evaluate_at(batches, lam.to(self.device), prefix))
        return metrics

    def evaluate_at(self, batches: list[ListwiseBatch], lam: Optional[torch.Tensor], prefix: str
                    ) -> dict[str, float]:
        """:meth:`evaluate` at one lambda (None: uniform), metric names under ``prefix``.

        Ranks may hold different numbers of eval batches; a rank that has run out repeats its last batch
        with zero weight so that every rank makes the same forward calls (ZeRO-3 collectives).
        """
        engine, prefix_sharing = self.engines.policy, self.cfg.model.prefix_sharing
        engine.eval()
        total = collectives.agreed_max(len(batches), self.device)
        if total and not batches:
            raise RuntimeError(f"rank {self.rank} has no eval rows at all; lower train.eval_batches or use a "
                               "larger eval split (data.eval_fraction) so every worker gets some")
        sums: MetricSums = {}
        with torch.no_grad():
            for i in range(total):
                batch = batches[min(i, len(batches) - 1)]
                ref = reference_outputs(self.objective, self.engines.reference, batch, prefix_sharing,
                                        self.device)
                at = lam
                if at is None and self.objective.needs_lambda:
                    m = batch.extras["scores"].shape[-1]
                    at = torch.full((m,), 1.0 / m, device=self.device)
                # The reference scored the plain prompts above; the policy sees them with lambda.
                seen = self.conditioner(batch, at) if self.conditioner is not None else batch
                missing = self._missing_group_forwards(seen)  # a collective: before any forward
                out_lp = grouped_logprobs(engine, seen, prefix_sharing=prefix_sharing,
                                          per_group=self.per_group)
                for _ in range(missing):  # discarded, so every rank runs the same per-group forwards
                    grouped_logprobs(engine, seen.select_groups(0, 1), prefix_sharing=prefix_sharing)
                if i >= len(batches):
                    continue
                out = self.objective.loss(seen, out_lp.logps, ref.logps, ref.dispersion, at, self.device)
                sums = merge_metric_sums(sums, batch_metric_sums(self.objective, seen, out, out_lp.logps,
                                                                 ref, prefix, self.device, at))
        engine.train()
        return finalize(collectives.all_reduce_metric_sums(sums, self.device), prefix)

    def _missing_group_forwards(self, batch: ListwiseBatch) -> int:
        """Per group (``self.per_group``), the forwards this rank runs short of the rank whose eval batch
        holds the most groups (ranks keep different eval rows, so their batches hold different group
        counts; ZeRO-3 needs the same forward calls on every rank); 0 when batched. Agreed by a collective,
        so call it where every rank does, outside any forward."""
        if not self.per_group:
            return 0
        return collectives.agreed_max(batch.num_groups, self.device) - batch.num_groups

    # ------------------------------------------------------------------------------------------------
    # State: checkpoints and resume
    # ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds besides the engine's shards: the position and the lambda schedule."""
        self.state.lambda_state = self.schedule.state_dict() if self.schedule is not None else {}
        return asdict(self.state)

    def load_state_dict(self, state: TrainState) -> None:
        self.state = state
        if state.lambda_state and self.schedule is not None:
            self.schedule.load_state_dict(state.lambda_state)

    def model_files(self) -> dict[str, dict[str, Any]]:
        """What travels with the weights (raypo.train.checkpoint.MODEL_FILES): the record ``raypo eval``
        scores with, and the lambda-conditioning rule of a conditioned policy."""
        card = {"format": 1, "loss": self.objective.spec.name,
                "beta": float(self.objective.hparams.get("beta") or self.objective.spec.defaults.get("beta")
                              or 1.0),
                "logp_reduction": self.objective.reduction, "reference": self.reference_source,
                "uses_reference": self.objective.uses_reference, "dimensions": self.objective.dim_names,
                "conditioning": self.cfg.lambdas.condition}
        files = {MODEL_CARD_FILE: card}
        if self.conditioner is not None:
            files[CONDITIONING_FILE] = self.conditioner.conditioning.to_dict()
        return files

    def restore(self) -> bool:
        """Resume from Ray Train's latest checkpoint, if any (a worker failure or a driver restart); whether
        there was one."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as local:
            state = load_checkpoint(self.engines.policy, local)
        if self.rank == 0:
            print(f"raypo: resuming from {ckpt.path} at step {state.global_step} (epoch {state.epoch}, "
                  f"{state.batches_in_epoch} micro-batches into it)", flush=True)
        self.load_state_dict(state)
        return True

    def report(self, metrics: dict[str, float], *, checkpoint: bool) -> None:
        """Hand metrics (and, when ``checkpoint``, this rank's shards of a checkpoint) to Ray Train."""
        import ray.train
        from ray.train import Checkpoint

        metrics = {**metrics, "step": self.state.global_step, "epoch": self.state.epoch}
        if not checkpoint:
            ray.train.report(metrics)
            return
        self.state_dict()
        local = save_checkpoint(self.engines.policy, self.state, rank=self.rank,
                                hf_config=self.engines.hf_config, tokenizer=self.engines.tokenizer,
                                model_files=self.model_files())
        try:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(local),
                             checkpoint_dir_name=checkpoint_dir_name(self.state.global_step))
        finally:
            shutil.rmtree(local, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------

    def epoch_reader(self, epoch: int, skip: int = 0) -> EpochReader:
        """A started :class:`EpochReader` of ``epoch``'s shard, reading up to two steps ahead."""
        t = self.cfg.train
        return EpochReader(self.train_shards(epoch), t.micro_batch_size, skip=skip,
                           depth=2 * t.grad_accum_steps)

    def steps(self, reader: Optional[EpochReader] = None) -> Iterator[list[ListwiseBatch]]:
        """This rank's micro-batches, k per optimizer step, epoch after epoch, from the state's position;
        stops everywhere at once when any rank runs out (ranks must agree on the step count).

        ``reader``: the state's epoch already opened at the state's position (:meth:`train` opens it before
        the step-0 evaluation). Once an epoch has yielded its first step, the next epoch's reader is opened,
        so Ray Data starts that epoch's iterator while this one trains; the order is that of reading the
        epochs one after the other (tests/train/test_loop_perf.py).
        """
        t, state = self.cfg.train, self.state
        following: Optional[EpochReader] = None
        if reader is None and state.global_step < t.max_steps and state.epoch < t.epochs:
            reader = self.epoch_reader(state.epoch, skip=state.batches_in_epoch)
        try:
            while reader is not None and state.global_step < t.max_steps and state.epoch < t.epochs:
                while state.global_step < t.max_steps:
                    micro = [b for _, b in zip(range(t.grad_accum_steps), reader)]
                    if collectives.agreed_min(len(micro), self.device) < t.grad_accum_steps:
                        break
                    if following is None and state.epoch + 1 < t.epochs:
                        following = self.epoch_reader(state.epoch + 1)
                    yield micro
                reader.close()
                if state.global_step >= t.max_steps:
                    return
                state.epoch += 1
                state.batches_in_epoch = 0
                reader, following = following, None
                if reader is None and state.epoch < t.epochs:  # the epoch had no full step
                    reader = self.epoch_reader(state.epoch)
        finally:
            for r in (reader, following):
                if r is not None:
                    r.close()

    def log_eval_checkpoint(self, window: MetricSums, clock: LoopWindow, *, evaluate: bool,
                            checkpoint: bool, last: bool = False) -> LoopWindow:
        """Cut the logging window: its metrics reduced over ranks (with the loop's timing), an evaluation
        and a checkpoint when asked; the row goes out through :meth:`emit`. Returns the next window's clock:
        the evaluation and the checkpoint are left out of its wall time, a plain Ray report is counted."""
        now = time.perf_counter()
        metrics: dict[str, float] = {}
        if window:
            metrics = window_metrics(merge_metric_sums(window, clock.sums(now)), clock.wall(now),
                                     self.engines.policy, self.device, world_size=self.world_size,
                                     flops_model=self.flops_model)
        following = LoopWindow(start=now)
        if evaluate and self.eval_shard is not None:
            metrics.update(self.evaluate())
            following.excluded_s += time.perf_counter() - now
        self.emit(metrics, checkpoint=checkpoint, force=evaluate or last, clock=following)
        return following

    def emit(self, metrics: dict[str, float], *, checkpoint: bool, force: bool,
             clock: Optional[LoopWindow] = None) -> None:
        """The one place a step's results leave the worker: rank 0 writes the row (metrics.jsonl, trackers,
        console) and every rank reports to Ray Train when it needs it: a checkpoint, ``force`` (evaluations,
        the end), the Tune trial's metric, or ``logging.report_interval_s`` elapsed on rank 0."""
        started = time.perf_counter()
        row = {**metrics, "step": self.state.global_step, "epoch": self.state.epoch}
        if self.metrics_log is not None:
            note = None
            if checkpoint:
                note = checkpoint_dir_name(self.state.global_step)
                note = f"{self.checkpoint_base}/{note}" if self.checkpoint_base else note
            self.metrics_log.write(row, checkpoint=note)
        if checkpoint or force or (self.report_metric is not None and self.report_metric in metrics) \
                or self._report_due():
            self.report(metrics, checkpoint=checkpoint)
            self._last_ray_report = time.perf_counter()
            if self.metrics_log is not None:
                self.metrics_log.sync()
        if clock is not None:
            if checkpoint:
                clock.excluded_s += time.perf_counter() - started
            else:
                clock.report_wait_s += time.perf_counter() - started

    def _report_due(self) -> bool:
        """Rank 0's clock decides, for every rank (a report is a collective call in Ray Train)."""
        interval = self.cfg.logging.report_interval_s
        if not interval:
            return False
        due = self.rank == 0 and time.perf_counter() - self._last_ray_report >= interval
        return bool(collectives.agreed_max(int(due), self.device))

    def train(self) -> None:
        t, state = self.cfg.train, self.state
        log_every, ckpt_every = self.cfg.logging.log_every, self.cfg.checkpoint.every_steps
        # opened first, so Ray Data starts the epoch's iterator while the baseline evaluation runs
        reader = self.epoch_reader(state.epoch, skip=state.batches_in_epoch) \
            if state.global_step < t.max_steps and state.epoch < t.epochs else None
        steps = self.steps(reader)
        last_checkpoint = state.global_step if state.global_step > 0 else -1
        window: MetricSums = {}
        try:
            if self.eval_shard is not None and state.global_step == 0:
                # the baseline: every implicit reward is 0
                self.emit(self.evaluate(), checkpoint=False, force=True)
            clock = LoopWindow()
            while True:
                waited = time.perf_counter()
                micro = next(steps, None)
                if micro is None:
                    break
                started = time.perf_counter()
                sums = self.train_step(micro)
                clock.add_step(started - waited, time.perf_counter() - started)
                window = merge_metric_sums(window, sums)
                state.global_step += 1
                state.batches_in_epoch += t.grad_accum_steps
                state.tokens_seen += int(sum(b.token_stats()["shared_tokens"] for b in micro))
                _maybe_inject_failure(state.global_step, self.rank)
                last = state.global_step >= t.max_steps
                do_eval = bool(t.eval_every and state.global_step % t.eval_every == 0) or last
                do_ckpt = bool(ckpt_every and state.global_step % ckpt_every == 0) or last
                if state.global_step % log_every == 0 or do_eval or do_ckpt or state.global_step == 1:
                    clock = self.log_eval_checkpoint(window, clock, evaluate=do_eval, checkpoint=do_ckpt,
                                                     last=last)
                    window = {}
                    last_checkpoint = state.global_step if do_ckpt else last_checkpoint
                _maybe_hold(state.global_step)
        finally:  # the readers' threads stop with the loop, also on an error
            steps.close()
            if reader is not None:
                reader.close()
        if state.global_step < t.max_steps:
            if self.rank == 0:
                print(f"raypo: the data ran out after {state.global_step} of {t.max_steps} steps "
                      f"({t.epochs} epoch(s)); raise train.epochs or lower train.max_steps", flush=True)
            if state.global_step != last_checkpoint:  # the run still ends with an evaluated checkpoint
                self.log_eval_checkpoint(window, clock, evaluate=True, checkpoint=True, last=True)
        if self.metrics_log is not None:
            self.metrics_log.close()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: set the recipe up and train."""
    from raypo.train.quiet import quiet

    quiet()
    ListwiseRecipe.setup(loop_config).train()


def _maybe_inject_failure(step: int, rank: int) -> None:
    """Fault injection for resilience tests: ``RAYPO_FAIL_AT_STEP=k`` kills the rank
    ``RAYPO_FAIL_RANK`` (default 1) right after step k, once (``RAYPO_FAIL_MARKER`` records that it did).
    ``RAYPO_FAIL_DELAY_S`` waits that long first, so that Ray Train's controller, which collects reports
    every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), has committed step k-1's checkpoint by then."""
    at = os.environ.get("RAYPO_FAIL_AT_STEP")
    marker = os.environ.get("RAYPO_FAIL_MARKER")
    if not at or not marker or step != int(at) or rank != int(os.environ.get("RAYPO_FAIL_RANK", "1")):
        return
    if os.path.exists(marker):
        return
    time.sleep(float(os.environ.get("RAYPO_FAIL_DELAY_S", "0")))
    with open(marker, "w") as f:
        f.write(f"killed rank {rank} after step {step}\n")
    os._exit(1)


def _maybe_hold(step: int) -> None:
    """Fault injection for the driver-restart and node-loss tests: ``RAYPO_HOLD_AFTER_STEP=k`` stops every
    rank after step k's results (and checkpoint) were reported, until the process is killed, so that the test
    can stop the driver (or a node) once Ray Train has committed that checkpoint and before the run could
    end."""
    at = os.environ.get("RAYPO_HOLD_AFTER_STEP")
    if not at or step != int(at):
        return
    while True:
        time.sleep(1.0)
