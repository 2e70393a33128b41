"""``raypo data tasks | generate | score``: on-policy listwise data from a model and code-checked scorers.

* ``tasks --out PROMPTS.jsonl``: the seeded verifiable prompt family (:mod:`raypo.data.tasks`), training
  prompts at ``--out`` and disjoint held-out prompts at ``--heldout-out`` (default ``<out>.heldout.jsonl``).
* ``generate --model M --prompts P --out OUT``: N sampled responses per prompt on a Ray Data actor pool
  (:mod:`raypo.data.generate`); bad prompt rows are counted and, with ``--quarantine``, written there.
* ``score IN --out OUT --scorer module:function ...``: ratings per dimension as a Ray Data stage
  (:mod:`raypo.data.scoring`); a scorer that fails on a response leaves that rating missing, counted.

Bad paths and options exit with status 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import sys

# imported by raypo.cli.main to build the parser: everything heavier is imported in the commands

EXIT_OK, EXIT_REJECTS, EXIT_USAGE = 0, 1, 2


def _fail(message: str) -> int:
    print(f"raypo data: {message}", file=sys.stderr)
    return EXIT_USAGE


def _s3(args: argparse.Namespace):
    from raypo.config import S3Config

    return S3Config(endpoint_url=getattr(args, "s3_endpoint_url", None),
                    region=getattr(args, "s3_region", None))


def _init_ray(num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)


def _write_jsonl(rows: list[dict], path: str, s3_cfg) -> None:
    from raypo.storage import atomic_output, s3_options_of

    options = s3_options_of(s3_cfg) if path.startswith("s3://") else None
    with atomic_output(path, "w", options, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def tasks_command(args: argparse.Namespace) -> int:
    from raypo.data.tasks import DIMENSIONS, train_and_heldout

    if args.num_prompts < 1 or args.num_heldout < 0:
        return _fail(f"--num-prompts={args.num_prompts} must be >= 1 and "
                     f"--num-heldout={args.num_heldout} >= 0")
    heldout_path = args.heldout_out or args.out.removesuffix(".jsonl") + ".heldout.jsonl"
    train, heldout = train_and_heldout(args.num_prompts, args.num_heldout, args.seed)
    _write_jsonl(train, args.out, _s3(args))
    if heldout:
        _write_jsonl(heldout, heldout_path, _s3(args))
    print(f"wrote {len(train)} training prompts to {args.out} and {len(heldout)} held-out prompts to "
          f"{heldout_path} (seed {args.seed}); score with the scorers of dimensions {', '.join(DIMENSIONS)}")
    return EXIT_OK


def generate_command(args: argparse.Namespace) -> int:
    from raypo.data.generate import GenerateSettings, generate_table, read_prompts
    from raypo.data.io import write_table
    from raypo.data.validate import quarantine_row, write_quarantine
    from raypo.progress import ray_data_stage
    from raypo.storage import s3_options_of

    settings = GenerateSettings(num_responses=args.num_responses, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, seed=args.seed, dtype=args.dtype)
    problems = settings.problems() + [f"--{k.replace('_', '-')}={getattr(args, k)} must be >= 1"
                                      for k in ("batch_size", "concurrency") if getattr(args, k) < 1]
    if problems:
        return _fail("; ".join(problems))
    try:
        rows, rejected, report = read_prompts(args.prompts, _s3(args))
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    print(report.format())
    if args.quarantine and rejected:
        options = s3_options_of(_s3(args)) if args.quarantine.startswith("s3://") else None
        n = write_quarantine((quarantine_row(o, "generate") for o in rejected), args.quarantine, options)
        print(f"wrote {n} rejected prompt rows to {args.quarantine}")
    if not rows:
        print(f"raypo data generate: no usable prompt in {args.prompts}; nothing written", file=sys.stderr)
        return EXIT_REJECTS
    _init_ray(args.num_cpus)
    with ray_data_stage(f"data generate ({len(rows)} prompts x {args.num_responses})", unit="prompts") as st:
        table = generate_table(rows, args.model, settings, batch_size=args.batch_size,
                               concurrency=args.concurrency, num_gpus=args.num_gpus)
        st.done = table.num_rows
    written = write_table(table, args.out, _s3(args))
    print(f"wrote {table.num_rows} prompts x {args.num_responses} responses (unscored: run raypo data score) "
          f"to {written}")
    return EXIT_OK


def score_command(args: argparse.Namespace) -> int:
    from raypo.data.io import read_table, write_table
    from raypo.data.scoring import dimension_names, score_table
    from raypo.data.tasks import SCORERS
    from raypo.progress import ray_data_stage

    specs = args.scorer or list(SCORERS)
    try:
        dimension_names(specs)
        table = read_table(args.input, _s3(args))
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    _init_ray(args.num_cpus)
    with ray_data_stage(f"data score ({len(specs)} scorers)") as st:
        scored, report = score_table(table, specs, batch_size=args.batch_size)
        st.done = scored.num_rows
    written = write_table(scored, args.out, _s3(args))
    print(report.format())
    print(f"wrote {scored.num_rows} scored listwise rows to {written}")
    return EXIT_OK


def add_commands(data_sub, _handler) -> None:
    """The parsers of ``raypo data tasks | generate | score``; ``_handler(module, func)`` is raypo.cli.main's
    lazy resolver (passed in: this module does not import main)."""
    d = data_sub.add_parser("tasks", help="write the seeded verifiable prompt family (train + held-out)",
                            description="Write prompts for small arithmetic / string tasks with a word limit "
                                        "and a keyword, for raypo data generate and score.")
    d.add_argument("--out", required=True, help="training prompts (JSONL)")
    d.add_argument("--heldout-out", default=None, help="held-out prompts (default <out>.heldout.jsonl)")
    d.add_argument("--num-prompts", type=int, default=1000)
    d.add_argument("--num-heldout", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_handler("raypo.cli.data_generate", "tasks_command"))

    d = data_sub.add_parser("generate", help="sample N responses per prompt from a model (Ray Data)",
                            description="Sample responses from MODEL for every prompt of PROMPTS on a Ray "
                                        "Data actor pool; write unscored listwise rows to OUT.")
    d.add_argument("--model", required=True,
                   help="model dir, smollm2://135m-instruct, a .gguf file, tiny://llama, s3:// or a hub id")
    d.add_argument("--prompts", required=True, help="JSONL/Parquet rows with prompt [, prompt_id, task]")
    d.add_argument("--out", required=True, help="output .parquet, .jsonl or directory")
    d.add_argument("--num-responses", type=int, default=4)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--temperature", type=float, default=0.8)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    d.add_argument("--concurrency", type=int, default=1, help="generator actors (one model each)")
    d.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    d.add_argument("--num-gpus", type=float, default=0, help="GPUs per generator actor (default 0: CPU)")
    d.add_argument("--quarantine", default=None, help="write rejected prompt rows with their reason here")
    d.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster")
    d.set_defaults(func=_handler("raypo.cli.data_generate", "generate_command"))

    d = data_sub.add_parser("score", help="rate responses with scorer functions (Ray Data)",
                            description="Rate every response of INPUT with each scorer (module:function, one "
                                        "dimension each); write scored listwise rows to OUT.")
    d.add_argument("input")
    d.add_argument("--out", required=True)
    d.add_argument("--scorer", action="append", default=None, metavar="MODULE:FUNCTION[=NAME]",
                   help="repeatable; default: the four scorers of raypo.data.tasks")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster")
    for p in data_sub.choices["generate"], d:
        p.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
        p.add_argument("--s3-region", default=None, help="S3 region (default: AWS_REGION)")
    d.set_defaults(func=_handler("raypo.cli.data_generate", "score_command"))
