"""The ``raypo`` command: train | tune | submit | data | export | plan | report | lambdas.

Each subcommand parses its arguments here and hands off to its module under ``raypo/cli/`` (``train.py``,
``tune.py``, ``submit.py``, ``data.py``, ``export.py``, ``plan.py``, ``report.py``, ``lambdas.py``), imported
lazily so
``raypo --help`` stays fast; ``raypo.cli.job`` is the cluster side of ``raypo submit``. Configuration
problems are printed as one list and exit with status 2 before any cluster work starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Optional

from raypo import __version__
from raypo.errors import ConfigError, RunError

EXIT_RUN = 1  # the data or the run stops the command before training (RunError)
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3


class NotBuiltError(RuntimeError):
    """A subcommand whose implementation is not part of this build."""


def _handler(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """Resolve ``module.func`` at call time; a missing implementation is reported, never faked."""

    def run(args: argparse.Namespace) -> int:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
                raise NotBuiltError(f"'raypo {args.command}' is not available in this build of raypo "
                                    f"({module} is missing)") from exc
            raise
        fn = getattr(mod, func, None)
        if fn is None:
            raise NotBuiltError(f"'raypo {args.command}' is not available in this build of raypo "
                                f"({module}.{func} is missing)")
        return int(fn(args) or 0)

    return run


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/; may list `defaults:` to compose)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides in dotted form, e.g. loss.beta=0.1 scaling.num_workers=4")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dimensions", default=None,
                   help="comma-separated score dimension names (listwise: if the file does not record them)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--s3-region", default=None, help="S3 region (default: AWS_REGION)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypo",
        description="Listwise, multi-dimensional preference optimisation of LLMs on Ray clusters.",
    )
    parser.add_argument("--version", action="version", version=f"raypo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_run_commands(sub)
    _add_data_commands(sub)
    _add_model_commands(sub)
    _add_lambdas_commands(sub)
    from raypo.cli.eval import add_commands as add_eval_commands  # eval, generate

    add_eval_commands(sub, _handler)
    return parser


def _add_run_commands(sub) -> None:
    """train, tune, submit."""
    p = sub.add_parser("train", help="train a policy on listwise preference data (Ray Train + DeepSpeed)",
                       description="Train with any raypo loss on a Ray cluster (a local one by default).")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it and exit")
    p.set_defaults(func=_handler("raypo.cli.train", "train_command"))

    p = sub.add_parser("tune", help="run a Ray Tune sweep in which every trial is a training run",
                       description="Search beta, alpha, loss and lambda schedules with Ray Tune.")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep (Tuner.restore)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it and exit")
    p.set_defaults(func=_handler("raypo.cli.tune", "tune_command"))

    p = sub.add_parser("submit", help="submit a job spec (jobs/*.yaml) to a Ray cluster",
                       description="Validate a job spec and its raypo config locally, then submit it with "
                                   "Ray's JobSubmissionClient.")
    p.add_argument("job", help="job spec YAML, e.g. jobs/mpo_llama8b.yaml")
    p.add_argument("--address", default=None, help="Ray dashboard address (default: RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="return as soon as the job is submitted")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--print-ray-cli", action="store_true",
                   help="print the equivalent plain `ray job submit ...` command and exit")
    p.add_argument("--skip-plan", action="store_true",
                   help="submit even when `raypo plan` says the job does not fit the cluster in config.plan")
    p.set_defaults(func=_handler("raypo.cli.submit", "submit_command"))


def _add_data_commands(sub) -> None:
    """data convert | validate | synth | tasks | generate | score."""
    p = sub.add_parser("data", help="convert, validate and synthesise listwise datasets",
                       description="Data tools: convert | validate | synth | tasks | generate | score.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    d = data_sub.add_parser("convert", help="convert a dataset to raypo's listwise schema",
                            description="Convert INPUT (Parquet or JSONL, local or s3://) in format F to "
                                        "raypo's listwise Parquet at OUTPUT.")
    d.add_argument("--format", "-f", required=True,
                   choices=["ultrafeedback", "ranked", "pairwise", "scored", "listwise"])
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--quarantine", default=None, help="write rejected rows with their reason here")
    _add_data_options(d)
    d.add_argument("--no-merge-pairs", action="store_true",
                   help="pairwise: keep every pair as its own row; do not merge a prompt's consistent pairs")
    d.add_argument("--keep-system-prompt", action="store_true",
                   help="ultrafeedback: keep the completions' custom_system_prompt in the row metadata")
    d.set_defaults(func=_handler("raypo.cli.data", "convert_command"))
    d = data_sub.add_parser("validate", help="validate a listwise dataset and print counts by reason",
                            description="Validate PATH and print accepted / rejected counts by reason.")
    d.add_argument("path")
    d.add_argument("--max-reject-fraction", type=float, default=None,
                   help="exit with status 1 when more rows than this are rejected (default 0.01)")
    d.add_argument("--format", "-f", default="listwise",
                   choices=["ultrafeedback", "ranked", "pairwise", "scored", "listwise"])
    d.add_argument("--quarantine", default=None, help="write rejected rows with their reason here")
    _add_data_options(d)
    d.add_argument("--tokenizer", default=None,
                   help="also tokenise (model dir, tiny://llama or s3://) to check the length limits")
    d.add_argument("--max-prompt-length", type=int, default=512)
    d.add_argument("--max-response-length", type=int, default=512)
    d.add_argument("--overlong", choices=["truncate", "drop"], default="truncate")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=_handler("raypo.cli.data", "validate_command"))
    d = data_sub.add_parser("synth", help="write a seeded synthetic multi-dimension listwise dataset",
                            description="Write a synthetic listwise dataset whose preferences a small model "
                                        "can learn.")
    d.add_argument("output")
    d.add_argument("--num-prompts", type=int, default=512)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-responses", type=int, default=4)
    d.add_argument("--kind", choices=["default", "steer"], default="default",
                   help="default: 4 partly conflicting rubric dimensions; steer: 3 dimensions that conflict "
                        "on surface features (docs/steering.md)")
    d.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    d.add_argument("--s3-region", default=None, help="S3 region (default: AWS_REGION)")
    d.set_defaults(func=_handler("raypo.cli.data", "synth_command"))
    from raypo.cli.data_generate import add_commands as add_generate_commands  # tasks, generate, score

    add_generate_commands(data_sub, _handler)


def _add_model_commands(sub) -> None:
    """export, plan, report."""
    p = sub.add_parser("export", help="export a training checkpoint to Hugging Face safetensors",
                       description="Write CHECKPOINT as a Hugging Face model directory (safetensors + "
                                   "tokenizer) at OUT.")
    p.add_argument("checkpoint", help="checkpoint directory or s3:// URI written by raypo train")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=_handler("raypo.cli.export", "export_command"))

    p = sub.add_parser("plan", help="estimate per-GPU memory for a config and check it fits the cluster",
                       description="Estimate per-GPU memory (ZeRO-3 model states, reference, activations, "
                                   "log-prob head) and say whether the job fits.")
    _add_config_args(p)
    p.set_defaults(func=_handler("raypo.cli.plan", "plan_command"))

    p = sub.add_parser("report", help="turn a run or sweep directory into one shareable HTML/Markdown page",
                       description="Write a self-contained report of a run (config, loss and metric curves, "
                                   "eval table per dimension, data report, timings, export path) or of a "
                                   "sweep (results table, plots, best config).")
    p.add_argument("run", help="run directory (<checkpoint.storage_path>/<run_name>) or sweep directory")
    p.add_argument("--out", default=None, help="output file (default: RUN/report.html or RUN/report.md)")
    p.add_argument("--format", choices=("html", "md"), default=None,
                   help="html (one file, images inlined; default) or md (PNG files beside it); default "
                        "from --out's suffix")
    p.set_defaults(func=_handler("raypo.cli.report", "report_command"))


def _add_lambdas_commands(sub) -> None:
    """lambdas fit."""
    p = sub.add_parser("lambdas", help="lambda-schedule tools: fit the learned scheduler to probe results",
                       description="Lambda-schedule tools: fit.")
    lam_sub = p.add_subparsers(dest="lambdas_command", metavar="ACTION")
    lam_sub.required = True
    d = lam_sub.add_parser(
        "fit", help="fit the learned lambda scheduler to (lambda, score) rows and print its table",
        description="Fit the lambda-DPO paper's polynomial scheduler (Appendix D) to RESULTS (a raypo tune "
                    "results.csv, or any CSV with lambda columns and a score column) exactly as "
                    "`lambdas.schedule: learned` does in training; print the polynomial, the residuals at "
                    "the probe points and the candidates with f and p = softmax(tau * f).")
    d.add_argument("results", help="CSV of (lambda, score) rows, local or s3://")
    d.add_argument("--degree", type=int, default=2, help="p: monomials of total degree <= p (default 2)")
    d.add_argument("--tau", type=float, default=100.0,
                   help="p ∝ exp(tau * f): tau multiplies the scores (default 100, the paper's)")
    d.add_argument("--candidates", default="dirichlet:10",
                   help="dirichlet:K[:ALPHA] (K draws of Dirichlet(ALPHA), ALPHA one value or a,b,..; "
                        "default dirichlet:10, alpha 1) or grid:R (every lambda in multiples of 1/R)")
    d.add_argument("--seed", type=int, default=0, help="seed of the Dirichlet candidates (default 0)")
    d.add_argument("--score-column", default="eval/pairwise_accuracy",
                   help="the score column (default eval/pairwise_accuracy)")
    d.add_argument("--lambda-columns", default=None,
                   help="comma-separated lambda columns (default: the table's lambda_0, lambda_1, ...)")
    d.add_argument("--json", action="store_true",
                   help="print one JSON object: weights, features, residuals, candidates")
    d.set_defaults(func=_handler("raypo.cli.lambdas", "fit_command"))


def command_flags(parser: Optional[argparse.ArgumentParser] = None) -> dict[str, list[str]]:
    """The flags each subcommand accepts, ``{"train": ["--dry-run"], "tune": [...], ...}``, read from the
    parser itself. The commands that read job specs hand them to :func:`raypo.launch.jobspec.load_job`,
    which checks a job's ``args`` against them (the launch layer does not import the CLI)."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [o for a in p._actions for o in a.option_strings if o not in ("-h", "--help")]
            for name, p in sub.choices.items()}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"raypo: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NotBuiltError as exc:
        print(f"raypo: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RunError as exc:
        print(f"raypo: {exc}", file=sys.stderr)
        return EXIT_RUN


if __name__ == "__main__":
    sys.exit(main())
