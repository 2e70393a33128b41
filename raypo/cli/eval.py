"""``raypo eval MODEL [--data PATH] [--generate --prompts HELDOUT.jsonl [--scorer M:F ...]] [--lambda W ...]
[--plot OUT.png] [--local] [--json]`` and
``raypo generate MODEL --lambda W [--prompt TEXT | --prompts FILE.jsonl] [--max-new-tokens K] [--json]``.

MODEL is a run directory, a checkpoint or an exported model (:mod:`raypo.eval.models`); lambdas are
comma-separated weights in the model's dimension order, ``name=weight`` pairs or ``uniform``
(:func:`raypo.data.conditioning.parse_lambda`). docs/steering.md walks through both.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from raypo.data.conditioning import LambdaError, parse_lambda
from raypo.data.validate import DataQualityError
from raypo.errors import ConfigError
from raypo.eval.models import EvalModel, ModelNotFound, resolve_eval_model

EXIT_OK, EXIT_USAGE = 0, 2


def _model(args: argparse.Namespace) -> EvalModel:
    try:
        return resolve_eval_model(args.model)
    except ModelNotFound as exc:
        raise ConfigError([str(exc)], source="command line") from None


def _lambdas(args: argparse.Namespace, model: EvalModel) -> list[list[float]]:
    if not args.lambdas:
        return []
    if not model.dimensions:
        raise ConfigError(["the model records no dimension names, so --lambda has nothing to weight"],
                          source="command line")
    try:
        return [parse_lambda(text, model.dimensions) for text in args.lambdas]
    except LambdaError as exc:
        raise ConfigError([str(exc)], source="command line") from None


def eval_command(args: argparse.Namespace) -> int:
    from raypo.eval.steering import (
        EvalDataError,
        along_path,
        edge_lambdas,
        evaluate_model,
        format_steering,
        format_table,
        steering_lambdas,
        steering_plot,
        steering_report,
    )

    model = _model(args)
    lambdas = _lambdas(args, model)
    generation = args.generate or bool(args.prompts)
    if args.generate and not args.prompts:
        raise ConfigError(["--generate needs --prompts HELDOUT.jsonl (prompt rows, as raypo data tasks "
                           "writes)"], source="command line")
    if not args.data and not generation:
        raise ConfigError(["give --data PATH (ranking evaluation), --generate --prompts PATH (evaluation by "
                           "generation), or both"], source="command line")
    if args.plot and not args.data:
        raise ConfigError(["--plot draws the ranking evaluation: it needs --data"], source="command line")
    if args.steering and (lambdas or not args.data):
        raise ConfigError(["--steering evaluates at its own lambdas (each one-hot, the uniform lambda and "
                           "every edge of the simplex): give it --data and no --lambda"],
                          source="command line")
    gen_lambdas = list(lambdas)  # the plot's path below is for the ranking evaluation only
    if args.steering:
        lambdas = steering_lambdas(len(model.dimensions), points=args.points)
    elif args.plot and not lambdas:
        lambdas = edge_lambdas(model.dimensions, points=args.points)
    result: dict[str, Any] = {"model": model.path, "conditioned": model.conditioning is not None,
                              "dimensions": model.dimensions}
    if args.data:
        try:
            result = evaluate_model(model, args.data, lambdas or None, local=args.local,
                                    data_format=args.format, batch_size=args.batch_size, log=sys.stderr)
        except (EvalDataError, FileNotFoundError) as exc:
            raise ConfigError([str(exc)], source="command line") from None
        except DataQualityError as exc:
            print(f"raypo: {exc}", file=sys.stderr)
            return 1
    if generation:
        from raypo.eval.by_generation import (
            GenerationEvalError,
            GenerationEvalSettings,
            evaluate_by_generation,
        )

        settings = GenerationEvalSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          seed=args.seed, batch_size=args.batch_size,
                                          concurrency=args.concurrency)
        try:
            result["generation"] = evaluate_by_generation(
                model, args.prompts, gen_lambdas or None, scorers=args.scorer, reference=args.reference,
                settings=settings, local=args.local, quarantine=args.quarantine,
                responses_out=args.responses_out, log=sys.stderr)
        except GenerationEvalError as exc:
            raise ConfigError([str(exc)], source="command line") from None
    if args.steering:
        result["steering"] = steering_report(result, points=args.points)
    if args.plot:
        # with --steering the plot follows the path e_1 -> e_2 -> ... -> e_m, a subset of its lambdas
        plotted = along_path(result, args.points) if args.steering else result
        result["plot"] = steering_plot(plotted, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        if args.data:
            print(format_table(result), end="")
        if args.steering:
            print(format_steering(result["steering"]), end="")
        if generation:
            from raypo.eval.by_generation import format_generation_table

            print(format_generation_table(result["generation"]), end="")
        if args.plot:
            print(f"plot: {args.plot}")
    return EXIT_OK


def _prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    if bool(args.prompt) == bool(args.prompts):
        raise ConfigError(["give exactly one of --prompt TEXT or --prompts FILE.jsonl"],
                          source="command line")
    if args.prompt:
        return [{"prompt_id": "prompt-0", "prompt": [{"role": "user", "content": args.prompt}]}]
    from raypo.data.generate import read_prompts

    try:
        rows, rejected, _ = read_prompts(args.prompts)
    except FileNotFoundError as exc:
        raise ConfigError([f"--prompts {args.prompts!r} does not exist ({exc})"],
                          source="command line") from None
    for o in rejected:
        print(f"raypo: skipped a prompt row: {o.reason}: {o.detail}", file=sys.stderr)
    if not rows:
        raise ConfigError([f"--prompts {args.prompts!r} holds no usable prompt row"], source="command line")
    return rows


def generate_command(args: argparse.Namespace) -> int:
    from raypo.eval.generation import generate_responses

    model = _model(args)
    lambdas = _lambdas(args, model)
    if len(lambdas) > 1:
        raise ConfigError(["raypo generate takes one --lambda"], source="command line")
    if model.conditioning is None and lambdas:
        print("raypo: this model was not trained with lambdas.condition=prompt; --lambda has no effect",
              file=sys.stderr)
    rows = _prompts(args)
    outputs = generate_responses(model, rows, lambdas[0] if lambdas else None,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 seed=args.seed)
    for row, text in zip(rows, outputs):
        if args.json:
            print(json.dumps({"prompt_id": row["prompt_id"], "lambda": lambdas[0] if lambdas else None,
                              "response": text}))
        else:
            print(f"[{row['prompt_id']}] {text}")
    return EXIT_OK


def add_commands(sub, handler) -> None:
    """eval and generate."""
    p = sub.add_parser("eval", help="rank held-out lists with a trained policy at chosen lambdas",
                       description="Score held-out listwise data with a trained policy's implicit rewards at "
                                   "each lambda and report pairwise accuracy, NDCG and Kendall tau per "
                                   "dimension (docs/steering.md).")
    p.add_argument("model", help="a run directory, a checkpoint (<run>/step_00000040) or an exported model")
    p.add_argument("--data", default=None, help="listwise data to rank (a file or directory, local or s3://)")
    p.add_argument("--format", "-f", default="listwise",
                   choices=["ultrafeedback", "ranked", "pairwise", "scored", "listwise"])
    p.add_argument("--lambda", dest="lambdas", action="append", default=[], metavar="W",
                   help="weights in the model's dimension order (0.5,0.5,0,0), name=weight pairs or uniform; "
                        "repeatable (default: each one-hot and the uniform lambda)")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="draw each dimension's accuracy as lambda moves between one-hots (without --lambda: "
                        "the path e_1 -> e_2 -> ... -> e_m)")
    p.add_argument("--points", type=int, default=5,
                   help="lambdas per edge of the plotted path and of --steering's edges (default 5)")
    p.add_argument("--steering", action="store_true",
                   help="check that the model steers: the matrix A[k][j] (accuracy on dimension j at lambda "
                        "= e_k), whether each dimension is ranked best at its own one-hot, and whether "
                        "moving lambda along each edge of the simplex raises the accuracy monotonically")
    p.add_argument("--local", action="store_true",
                   help="score (and generate) in this process instead of on Ray Data")
    p.add_argument("--batch-size", type=int, default=8,
                   help="lists per forward; prompts per generation batch (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("evaluation by generation (raypo.eval.by_generation)")
    g.add_argument("--generate", action="store_true",
                   help="generate with the model (at each lambda) and its reference for --prompts, rate both "
                        "with the scorers and report mean scores, win rates and lengths per dimension")
    g.add_argument("--prompts", default=None, metavar="HELDOUT.jsonl",
                   help="held-out prompt rows (JSONL/Parquet: prompt [, prompt_id, task]); implies "
                        "--generate")
    g.add_argument("--scorer", action="append", default=None, metavar="MODULE:FUNCTION[=NAME]",
                   help="repeatable; default: the four scorers of raypo.data.tasks (as raypo data score)")
    g.add_argument("--reference", default=None, metavar="SOURCE",
                   help="the model to compare with (default: the reference in the model's record)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: seeded sampling")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--concurrency", type=int, default=1, help="generator actors on Ray Data (default 1)")
    g.add_argument("--quarantine", default=None, help="write rejected prompt rows with their reason here")
    g.add_argument("--responses-out", default=None, metavar="OUT.jsonl",
                   help="write every generated response with its ratings here")
    p.set_defaults(func=handler("raypo.cli.eval", "eval_command"))

    p = sub.add_parser("generate", help="generate with a trained (lambda-conditioned) policy",
                       description="Generate a response per prompt with a trained policy, conditioned on "
                                   "the lambda given (docs/steering.md).")
    p.add_argument("model", help="a run directory, a checkpoint or an exported model")
    p.add_argument("--lambda", dest="lambdas", action="append", default=[], metavar="W",
                   help="the preference weights to generate at (as for raypo eval)")
    p.add_argument("--prompt", default=None, help="one user message")
    p.add_argument("--prompts", default=None,
                   help="a JSONL or Parquet file of prompt rows (as raypo data tasks writes)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: seeded sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=handler("raypo.cli.eval", "generate_command"))
