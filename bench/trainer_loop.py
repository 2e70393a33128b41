"""The trainer as a user runs it: ``raypo train`` end to end, and how much of its time is the train step.

Each case runs the real command (``python -m raypo.cli train CONFIG ...``: a private local Ray cluster, 2
CPU workers, DeepSpeed ZeRO-3 on gloo, evaluations and checkpoints as configured) and reads the run's
``metrics.jsonl`` (rank 0's per-step rows, :mod:`raypo.train.perf`):

* ``loop_efficiency``: seconds in ``train_step`` / wall seconds of the logging windows (evaluations and
  checkpoints left out; step 1, which includes the first forward's warm-up, is skipped);
* ``trainer_tokens_per_s``: trained tokens / those wall seconds, all ranks together;
* ``train_step_tokens_per_s``: the same tokens / the seconds spent inside ``train_step`` (the bare step on
  the very same micro-batches, measured in the same run), so ``trainer / train_step`` isolates what the loop
  adds around the step (waiting for data, all-reduces of the metrics, reports to Ray, the metrics row) and
  equals the loop efficiency;
* ``wall_s``: the whole command (cluster start, data preparation, evaluations, checkpoints included), and
  ``end_to_end_tokens_per_s``: trained tokens / the time from the first to the last step's row.

Cases: the quickstart (``configs/quickstart.yaml``: tiny Llama hidden 64, 2 layers, 60 steps of 2 x 4
prompts) and the same run on a larger tiny Llama (hidden 256, 4 layers); with ``--only``, also the
quickstart with a precomputed reference scored and trained per group or batched
(``train.reference_batching``). Times are wall clock (the loop's
overhead is waiting, which CPU time would not show), so they move with the load of the shared cores.

Run: ``python -m bench.trainer_loop [--smoke]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")

CASES = {
    "quickstart": [],
    "tiny_h256_l4": ["model.path=tiny://llama?hidden=256&layers=4&heads=4&kv_heads=2&intermediate=768"],
    # train.reference_batching with a precomputed reference (run with --only): B = 4 policy forwards per
    # micro-batch against 1
    "precomputed_per_group": ["train.reference=precomputed", "train.reference_batching=per_group"],
    "precomputed_batched": ["train.reference=precomputed", "train.reference_batching=batched"],
}
DEFAULT_CASES = ("quickstart", "tiny_h256_l4")
SMOKE = ["train.max_steps=6", "train.eval_every=3", "checkpoint.every_steps=3",
         "data.train_path=synthetic://default?num_prompts=96&seed=0"]


def _loop(rows: list[dict]) -> dict:
    window = sum(r["perf/window_s"] for r in rows)
    in_step = sum(r["perf/step_s"] for r in rows)  # log_every = 1: one step per row
    tokens = sum(r["perf/tokens_per_s"] * r["perf/window_s"] for r in rows)
    return {"loop_efficiency": in_step / window, "trainer_tokens_per_s": tokens / window,
            "train_step_tokens_per_s": tokens / in_step, "trainer_over_train_step": in_step / window,
            "window_s": window, "trained_tokens": tokens}


def summarize(rows: list[dict]) -> dict:
    """The loop figures of a run's metric rows (see the module docstring): over every step after step 1,
    and ``steady_*`` without steps 2-4 (allocations and start-up reports) and without the steps that
    opened an epoch (Ray Data starts the epoch's iterator: ~2 s of data wait)."""
    steps = [r for r in rows if "perf/step_s" in r and r.get("step", 0) > 1]
    if not steps:
        raise RuntimeError("the run's metrics.jsonl has no perf/step_s rows after step 1")
    epochs = {}
    for r in steps:
        epochs.setdefault(r.get("epoch", 0), r["step"])
    steady = [r for r in steps if r["step"] > 4 and r["step"] not in set(epochs.values())]
    out = {"steps_measured": len(steps), **_loop(steps),
           **{f"steady_{k}": v for k, v in _loop(steady or steps).items()},
           "mean_step_s": _mean(steps, "perf/step_s"), "mean_data_wait_s": _mean(steps, "perf/data_wait_s"),
           "mean_report_wait_s": _mean(steps, "perf/report_wait_s"),
           "epoch_start_data_wait_s": [r["perf/data_wait_s"] for r in steps if r["step"] in epochs.values()],
           "final_eval_pairwise_accuracy": next((r["eval/pairwise_accuracy"] for r in reversed(rows)
                                                 if "eval/pairwise_accuracy" in r), None),
           # 0 exactly with an online or a per-group precomputed reference; float rounding when batched
           "step0_eval_reward_abs_mean": next((r["eval/reward_abs_mean"] for r in rows
                                               if r.get("step") == 0 and "eval/reward_abs_mean" in r), None)}
    return out


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / max(len(values), 1)


def run_case(name: str, overrides: list[str], storage: str) -> dict:
    cmd = [sys.executable, "-m", "raypo.cli", "train", QUICKSTART, *overrides,
           f"checkpoint.storage_path={storage}", f"checkpoint.run_name={name}", "checkpoint.export_path=null",
           "logging.tensorboard=false"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(storage, name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = {"case": name, "overrides": overrides, "wall_s": wall, **summarize(rows)}
    return out


def run(smoke: bool = False) -> dict:
    storage = tempfile.mkdtemp(prefix="raypo-bench-loop-")
    cases = {"quickstart": []} if smoke else {name: CASES[name] for name in DEFAULT_CASES}
    rows = [run_case(name, overrides + (SMOKE if smoke else []), storage)
            for name, overrides in cases.items()]
    return {"config": "configs/quickstart.yaml", "rows": rows}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a 6-step quickstart (about a minute)")
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=None)
    args = parser.parse_args(argv)
    if args.only:
        storage = tempfile.mkdtemp(prefix="raypo-bench-loop-")
        result = {"rows": [run_case(n, CASES[n] + (SMOKE if args.smoke else []), storage) for n in args.only]}
    else:
        result = run(smoke=args.smoke)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
