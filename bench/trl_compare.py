"""End to end: raypo's listwise train step vs TRL's DPOTrainer, same model, same data.

Both sides run one optimizer step per call on plain PyTorch in one process (fp32, CPU, one thread), with an
online reference model (a frozen copy of the initial policy), AdamW (betas 0.9 / 0.95, no weight decay),
gradient clipping at 1.0, constant learning rate:

* raypo: :meth:`raypo.train.recipe.ListwiseRecipe.train_step` (the worker's step: reference forward, loss,
  metrics, listwise forward/backward with prefix sharing, optimizer step) with a plain-torch stand-in for the
  DeepSpeed engine (:class:`TorchEngine`: ``engine(...)``, ``backward``, ``step``); micro-batches are
  collated before the clock starts, as TRL's are.
* raypo unshared: the same with ``model.prefix_sharing=false`` (one right-padded row per response, as TRL
  builds), to separate the gain of prefix sharing from the rest;
* TRL compact: the same with TRL's compact log-prob path forced on. TRL's fused head scores only the
  labelled (response) positions when ``_use_triton(device)`` is true, i.e. on CUDA/XPU only; on CPU it
  scores every position, prompt and padding included. Forcing it (``trl.trainer.utils._use_triton`` patched
  to true for this runner; the kernel itself stays TRL's torch tile on CPU) gives TRL the head a GPU user
  gets, which is the fair peer of raypo's head on CPU.
* TRL: ``DPOTrainer.train()`` (loss ``sigmoid``, beta 0.1, its fused log-prob head, padding to the longest
  sequence of the batch; TRL's padding-free mode is disabled in this version); the time of each optimizer
  step is read by a callback (``on_step_begin`` -> ``on_step_end``: forward, backward, clipping, AdamW,
  scheduler), so the trainer's set-up and data loading are not counted. Both clocks are CPU time
  (:func:`bench.common.clock`).

Data (random token ids, lengths uniform in +-50 % around the means): prompts of 128, responses of 64 tokens.

* N = 2: each group is one pair; raypo's ``dpo`` loss vs TRL's DPO on the same pairs, 4 pairs per step.
* N = 8: raypo's ``lipo_lambda`` on whole groups vs the pairs a TRL user must build from each group: all
  C(8, 2) = 28 ordered pairs (1 group, raypo 1 group per step) or the 7 best-vs-other pairs (2 groups,
  raypo 2 groups = 16 responses per step); 8 pairs (16 sequences) per TRL step.

Rounds alternate the runners over the same groups (one pass over all groups per round); the best round of
each runner is compared (:func:`bench.common.paired_ratio`), the per-round ratios' median and range shown.
Throughput is in *group tokens*: sum_i (P + R_i) per group, the data each system learns from, whatever it
recomputes. Peak memory: a fresh process per system, peak extra RSS over steps 2-3
(after a warm-up step, so optimizer states already exist).

Run: ``python -m bench.trl_compare [--smoke]``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import tempfile

import torch

from bench.common import (
    BENCH_MODEL,
    SMOKE_MODEL,
    bench_main,
    build_llama,
    clock,
    describe_model,
    measure_memory,
    paired_ratio,
    ragged_rows,
    reset_peak_rss,
    setup_torch,
)
from raypo.model.shape import ModelShape

PROMPT_MEAN, RESPONSE_MEAN = 128, 64
LR, BETA = 1e-5, 0.1


# ----------------------------------------------------------------------------------------------------
# raypo side
# ----------------------------------------------------------------------------------------------------


class TorchEngine:
    """What :meth:`raypo.train.recipe.ListwiseRecipe.train_step` uses of a DeepSpeed engine, on plain
    PyTorch."""

    def __init__(self, module, optimizer, grad_clip: float):
        self.module, self.optimizer, self.grad_clip = module, optimizer, grad_clip

    @property
    def device(self) -> torch.device:
        return self.module.device

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, objective: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        objective.backward()

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """train_step marks the step's last micro-batch; here ``step()`` is called once per step anyway."""

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def raypo_config(loss: str, prefix_sharing: bool = True):
    from raypo.config import load_config

    return load_config(None, [f"loss.name={loss}", f"optimizer.lr={LR}", "optimizer.betas=[0.9, 0.95]",
                              "optimizer.weight_decay=0.0", "optimizer.grad_clip=1.0",
                              "optimizer.lr_scheduler=constant", f"model.prefix_sharing={prefix_sharing}",
                              "train.response_chunk_size=0", "model.dtype=float32"])


class RaypoRunner:
    """raypo's worker step over fixed micro-batches of whole groups."""

    def __init__(self, model, rows: list[dict], loss: str, groups_per_step: int, prefix_sharing: bool = True):
        from raypo.model.batch import collate_listwise
        from raypo.model.listwise import ListwiseLogProbModel
        from raypo.train.engines import Engines
        from raypo.train.objective import Objective
        from raypo.train.optim import build_optimizer
        from raypo.train.recipe import ListwiseRecipe

        self.cfg = raypo_config(loss, prefix_sharing)
        ref = ListwiseLogProbModel(copy.deepcopy(model).requires_grad_(False).eval())
        policy = ListwiseLogProbModel(model)
        engine = TorchEngine(policy, build_optimizer(policy.parameters(), self.cfg.optimizer),
                             self.cfg.optimizer.grad_clip)
        engines = Engines(policy=engine, reference=ref, hf_config=model.config, tokenizer=None)
        self.recipe = ListwiseRecipe(self.cfg, Objective.from_config(self.cfg, None), engines)
        self.batches = [collate_listwise(rows[i:i + groups_per_step])
                        for i in range(0, len(rows), groups_per_step)]
        self.next = 0

    def step(self) -> float:
        """One optimizer step on the next micro-batch; returns its seconds."""
        batch = self.batches[self.next % len(self.batches)]
        self.next += 1
        start = clock()
        self.recipe.train_step([batch])
        return clock() - start

    def epoch(self) -> float:
        """Seconds for one pass over all groups."""
        return sum(self.step() for _ in self.batches)


# ----------------------------------------------------------------------------------------------------
# TRL side
# ----------------------------------------------------------------------------------------------------


def to_pairs(rows: list[dict], mode: str) -> list[dict]:
    """Pairs a TRL user builds from listwise groups: ``all`` C(N, 2) ordered by score, or ``best`` vs each
    other response (N - 1); chosen = the higher score."""
    pairs = []
    for row in rows:
        order = sorted(range(len(row["response_ids"])), key=lambda i: -row["scores"][i])
        if mode == "all":
            chosen_rejected = list(itertools.combinations(order, 2))
        elif mode == "best":
            chosen_rejected = [(order[0], j) for j in order[1:]]
        else:
            raise ValueError(f"unknown pair mode {mode!r}")
        for c, r in chosen_rejected:
            pairs.append({"prompt_ids": list(row["prompt_ids"]), "chosen_ids": list(row["response_ids"][c]),
                          "rejected_ids": list(row["response_ids"][r])})
    return pairs


class TRLRunner:
    """TRL's DPOTrainer on pre-tokenised pairs; step times from a callback."""

    def __init__(self, model, pairs: list[dict], pairs_per_step: int, max_steps: int = -1, on_step_end=None,
                 compact: bool = False):
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        from raypo.model.tiny import build_tiny_tokenizer

        runner = self

        class StepClock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                runner._start = clock()

            def on_step_end(self, args, state, control, **kwargs):
                runner.step_times.append(clock() - runner._start)
                if on_step_end is not None:
                    on_step_end(state.global_step)

        self.step_times: list[float] = []
        self.compact = compact
        args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="raypo-bench-trl-"),
                         per_device_train_batch_size=pairs_per_step, gradient_accumulation_steps=1,
                         num_train_epochs=1, max_steps=max_steps, learning_rate=LR,
                         lr_scheduler_type="constant",
                         adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                         optim="adamw_torch", beta=BETA, loss_type=["sigmoid"], max_length=None,
                         logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                         dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=False, fp16=False,
                         precompute_ref_log_probs=False, gradient_checkpointing=False)
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        # TRL tokenises text at construction; give it one dummy example, then the pre-tokenised pairs.
        dummy = Dataset.from_list([{"prompt": "Hi", "chosen": " yes", "rejected": " no"}])
        self.trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dummy,
                                  processing_class=build_tiny_tokenizer())
        self.trainer.train_dataset = Dataset.from_list(pairs)
        self.trainer.add_callback(StepClock())

    def epoch(self) -> float:
        """Seconds of the optimizer steps of one ``train()`` (one pass over the pairs)."""
        done = len(self.step_times)
        with contextlib.redirect_stdout(io.StringIO()), _compact_head(self.compact):
            self.trainer.train()  # (it prints a metrics dict per train())
        return sum(self.step_times[done:])


@contextlib.contextmanager
def _compact_head(on: bool):
    """TRL's fused head scores only the labelled positions where ``_use_triton(device)`` holds (CUDA/XPU);
    ``on`` makes it hold on CPU too, for the duration of one ``train()``."""
    if not on:
        yield
        return
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def raypo_model(shape: ModelShape, prefix_sharing: bool):
    """The benchmark model with raypo's default attention for the layout (``model.attention=auto``:
    prefix_sdpa with prefix sharing, SDPA without), as ``raypo train`` would load it."""
    from raypo.model.loading import hf_attn_implementation

    return build_llama(shape, attention=hf_attn_implementation("auto", prefix_sharing=prefix_sharing))


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------


def _group_tokens(rows: list[dict]) -> int:
    return sum(len(r["prompt_ids"]) * len(r["response_ids"]) + sum(len(x) for x in r["response_ids"])
               for r in rows)


def _data(n: int, groups: int, shape: ModelShape, prompt_mean: int, response_mean: int) -> list[dict]:
    return ragged_rows(groups, n, prompt_mean, response_mean, shape.vocab_size, seed=100 + n)


CASES = {
    # name: (N, groups, raypo loss, raypo groups per step, pair mode, TRL pairs per step)
    "n2": (2, 8, "dpo", 4, "all", 4),
    "n8_all_pairs": (8, 1, "lipo_lambda", 1, "all", 8),  # one group: its 28 TRL pairs take ~12 s
    "n8_best_vs_others": (8, 2, "lipo_lambda", 2, "best", 8),
}
SMOKE_CASES = {"n2": (2, 2, "dpo", 2, "all", 2), "n8_best_vs_others": (4, 1, "lipo_lambda", 1, "best", 3)}


def memory_case(case: dict):
    """Subprocess entry: raypo returns a step; TRL measures its own steps 2-3 with a callback."""
    shape = ModelShape(**case["shape"])
    n, groups, loss, per_step, mode, pairs_per_step = case["spec"]
    rows = _data(n, groups, shape, case["prompt_mean"], case["response_mean"])
    if case["system"] == "raypo":
        runner = RaypoRunner(raypo_model(shape, True), rows, loss, per_step)
        return runner.step
    model = build_llama(shape)
    marks: dict[str, int] = {}

    def on_step_end(step: int) -> None:
        from bench.common import peak_rss

        if step == 1:
            marks["before"] = reset_peak_rss()
        elif step == 3:
            marks["peak"] = peak_rss()

    TRLRunner(model, to_pairs(rows, mode), pairs_per_step, max_steps=3, on_step_end=on_step_end).epoch()
    return {"peak_mib": (marks["peak"] - marks["before"]) / 2**20, "baseline_mib": marks["before"] / 2**20}


def run_case(name: str, spec: tuple, shape: ModelShape, *, rounds: int, memory: str, prompt_mean: int,
             response_mean: int) -> dict:
    n, groups, loss, per_step, mode, pairs_per_step = spec
    rows = _data(n, groups, shape, prompt_mean, response_mean)
    pairs = to_pairs(rows, mode)
    model = build_llama(shape)  # every runner starts from the same weights (seed 0)
    runners = {"raypo": RaypoRunner(raypo_model(shape, True), rows, loss, per_step),
               "raypo_unshared": RaypoRunner(raypo_model(shape, False), rows, loss, per_step,
                                             prefix_sharing=False),
               "trl": TRLRunner(copy.deepcopy(model), pairs, pairs_per_step),
               "trl_compact": TRLRunner(copy.deepcopy(model), pairs, pairs_per_step, compact=True)}
    times: dict[str, list[float]] = {label: [] for label in runners}
    for r in range(rounds + 1):  # round 0 warms every runner up
        for label in list(runners) if r % 2 == 0 else list(runners)[::-1]:
            elapsed = runners[label].epoch()
            if r:
                times[label].append(elapsed)
    ratio = paired_ratio(times["trl"], times["raypo"])
    unshared = paired_ratio(times["trl"], times["raypo_unshared"])
    compact = paired_ratio(times["trl_compact"], times["raypo"])
    compact_unshared = paired_ratio(times["trl_compact"], times["raypo_unshared"])
    best = {label: min(t) for label, t in times.items()}
    tokens = _group_tokens(rows)
    pair_tokens = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    per_group = {label: t / groups for label, t in best.items()}
    row = {"case": name, "n": n, "groups": groups, "raypo_loss": loss,
           "pairs_per_group": len(pairs) // groups, "trl_pairs_per_step": pairs_per_step,
           "raypo_groups_per_step": per_step, "raypo_s_per_group": per_group["raypo"],
           "trl_s_per_group": per_group["trl"], "raypo_unshared_s_per_group": per_group["raypo_unshared"],
           "trl_over_raypo_time": ratio["best"], "ratio_median": ratio["median"], "ratio_min": ratio["min"],
           "ratio_max": ratio["max"], "trl_over_raypo_unshared_time": unshared["best"],
           "trl_compact_s_per_group": per_group["trl_compact"],
           "trl_compact_over_raypo_time": compact["best"], "compact_ratio_median": compact["median"],
           "trl_compact_over_raypo_unshared_time": compact_unshared["best"],
           # N = 2: the same loss, one pair per group, the same optimizer steps: time per pair. N > 2: the
           # cost of learning from one listwise group; the losses differ and TRL takes
           # pairs_per_group / trl_pairs_per_step optimizer steps per group where raypo takes one.
           "measures": "time per pair" if n == 2 else "cost per listwise group",
           "raypo_group_tokens_per_s": tokens / best["raypo"], "trl_group_tokens_per_s": tokens / best["trl"],
           "trl_pair_tokens_per_s": pair_tokens / best["trl"]}
    if n == 2:
        row["raypo_s_per_pair"], row["trl_s_per_pair"] = row["raypo_s_per_group"], row["trl_s_per_group"]
    if memory != "off":
        for system in ("raypo", "trl"):
            case = {"shape": vars(shape), "spec": list(spec), "system": system, "prompt_mean": prompt_mean,
                    "response_mean": response_mean}
            row[f"{system}_peak_mib"] = measure_memory("bench.trl_compare", case,
                                                       in_process=memory == "in_process")["peak_mib"]
    return row


def run(smoke: bool = False, rounds: int = 3, memory: str = "subprocess") -> dict:
    setup_torch(1)
    shape, cases, p_mean, r_mean = BENCH_MODEL, CASES, PROMPT_MEAN, RESPONSE_MEAN
    if smoke:
        shape = SMOKE_MODEL
        cases, p_mean, r_mean, rounds = SMOKE_CASES, 16, 8, 1
        memory = "off"  # TRL's trainer holds the process's memory; in-process numbers would mean nothing
    # N = 2 rounds are short: more of them (the all-pairs TRL round takes ~25 s here)
    rows = [run_case(name, spec, shape, rounds=rounds + 2 * (spec[0] == 2 and not smoke), memory=memory,
                     prompt_mean=p_mean, response_mean=r_mean) for name, spec in cases.items()]
    return {"model": describe_model(shape), "prompt_mean": p_mean, "response_mean": r_mean, "rows": rows}


if __name__ == "__main__":
    bench_main(run, __doc__)
