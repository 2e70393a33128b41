"""Steering benchmark: does one lambda-conditioned model rank each dimension best at its own lambda?

    python -m bench.steering                  # trains configs/steer_quickstart.yaml and its unconditioned
                                              # twin, then evaluates both (about 15-20 minutes on 2 CPUs)
    python -m bench.steering --run-dir raypo_runs/steer_quickstart [--control-dir DIR]
                                              # evaluates runs that already exist
    python -m bench.steering --smoke          # 4 steps each on 64 prompts: checks that the chain runs

Each model is scored on held-out ``synthetic://steer`` data (:mod:`raypo.data.synthetic_steer`; every two
of its dimensions conflict on some pairs) at each one-hot lambda, the uniform lambda and ``--points``
lambdas along every edge of the simplex (:func:`raypo.eval.steering.steering_lambdas`), as
``raypo eval MODEL --data D --steering`` does. The report (:func:`raypo.eval.steering.steering_report`)
gives the matrix A[k][j] = held-out pairwise accuracy on dimension j at lambda = e_k, whether each dimension
is ranked best at its own one-hot, and whether the accuracy rises monotonically along each edge. The twin
is the same config with ``lambdas.condition=none``: its policy never sees lambda, so its rows must be equal.

Writes ``--out`` (bench/results/steering.json), steering.md next to it and steering.png (the conditioned
model along e_1 -> e_2 -> e_3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "steer_quickstart.yaml"
EVAL_DATA = "synthetic://steer?num_prompts=200&seed=7"
SMOKE = ["data.train_path=synthetic://steer?num_prompts=64&seed=0", "train.max_steps=4", "train.eval_every=4",
         "checkpoint.every_steps=4"]
SMOKE_EVAL_DATA = "synthetic://steer?num_prompts=16&seed=7"


def train(config: Path, workdir: Path, run_name: str, overrides: list[str]) -> tuple[Path, float]:
    """``raypo train CONFIG`` in a subprocess, its run under ``workdir``; (run directory, seconds)."""
    storage = workdir / "raypo_runs"
    cmd = [sys.executable, "-m", "raypo.cli", "train", str(config), f"checkpoint.storage_path={storage}",
           f"checkpoint.run_name={run_name}", f"checkpoint.export_path={storage / run_name / 'export'}",
           *overrides]
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=workdir, check=True)
    return storage / run_name, time.time() - start


def evaluate(run_dir: Path, data: str, points: int) -> dict:
    """The run's policy at :func:`steering_lambdas`, with its :func:`steering_report` under "steering"."""
    from raypo.eval.models import resolve_eval_model
    from raypo.eval.steering import evaluate_model, steering_lambdas, steering_report

    model = resolve_eval_model(str(run_dir))
    result = evaluate_model(model, data, steering_lambdas(len(model.dimensions), points), local=True)
    result["steering"] = steering_report(result, points=points)
    return result


def rows_spread(result: dict) -> float:
    """The largest difference between two one-hot rows of the matrix (0 for a model blind to lambda)."""
    matrix = result["steering"]["matrix"]
    return max(abs(a - b) for row in matrix for other in matrix for a, b in zip(row, other))


def markdown(results: dict) -> str:
    from raypo.eval.steering import format_steering

    out = [f"# Steering benchmark ({results['date']})", "",
           f"Config `{results['config']}`{' (smoke)' if results['smoke'] else ''}; held-out data "
           f"`{results['eval_data']}` ({results['conditioned']['num_prompts']} prompts), {results['points']} "
           "lambdas per edge.", ""]
    for key, title in (("conditioned", "Lambda-conditioned (lambdas.condition=prompt)"),
                       ("control", "Unconditioned twin (lambdas.condition=none)")):
        if key not in results:
            continue
        r = results[key]
        seconds = results.get("train_seconds", {}).get(key)
        timing = f", trained in {seconds:.0f} s" if seconds else ""
        out += [f"## {title}", "", f"Run `{r['run_dir']}`{timing}. Steers: **{r['steering']['steers']}**, "
                f"monotone along every edge: **{r['steering']['monotone']}**, largest difference between "
                f"two rows: {rows_spread(r):.3f}.", "", format_steering(r["steering"])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--run-dir", type=Path, default=None, help="evaluate this conditioned run (no training)")
    p.add_argument("--control-dir", type=Path, default=None, help="evaluate this unconditioned run")
    p.add_argument("--no-control", action="store_true", help="skip the unconditioned twin")
    p.add_argument("--eval-data", default=None)
    p.add_argument("--points", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=None, help="where new runs go (default: a temp dir)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "steering.json")
    args = p.parse_args(argv)
    data = args.eval_data or (SMOKE_EVAL_DATA if args.smoke else EVAL_DATA)
    overrides = SMOKE if args.smoke else []
    workdir = args.workdir
    if workdir is None and (args.run_dir is None or (args.control_dir is None and not args.no_control)):
        import tempfile

        workdir = Path(tempfile.mkdtemp(prefix="raypo_steering_"))
    seconds: dict[str, float] = {}
    run_dir, control_dir = args.run_dir, args.control_dir
    if run_dir is None:
        run_dir, seconds["conditioned"] = train(args.config, workdir, "steer_conditioned", overrides)
    if control_dir is None and not args.no_control:
        control_dir, seconds["control"] = train(args.config, workdir, "steer_unconditioned",
                                                [*overrides, "lambdas.condition=none"])
    results = {"date": time.strftime("%Y-%m-%d"), "config": os.path.relpath(args.config, ROOT),
               "smoke": args.smoke, "eval_data": data, "points": args.points, "train_seconds": seconds}
    results["conditioned"] = {"run_dir": str(run_dir), **evaluate(run_dir, data, args.points)}
    if control_dir is not None:
        results["control"] = {"run_dir": str(control_dir), **evaluate(control_dir, data, args.points)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    md = markdown(results)
    args.out.with_suffix(".md").write_text(md)
    from raypo.eval.steering import along_path, steering_plot

    steering_plot(along_path(results["conditioned"], args.points), str(args.out.with_suffix(".png")))
    print(md)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
