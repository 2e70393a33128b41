"""``raypo data convert | validate | synth``: the data tools, in plain Python (no Ray cluster needed).

* ``convert --format F INPUT OUTPUT [--quarantine Q]``: INPUT (Parquet or JSONL, file or directory, local
  or ``s3://``) -> listwise Parquet at OUTPUT (``x.parquet``, ``x.jsonl``, or a directory), with the
  dimension names in the schema metadata; prints the report. Exit 0.
* ``validate PATH``: runs the same rules (and, with ``--tokenizer``, the length limits), prints the counts
  by reason; exit 1 when the rejected fraction exceeds ``--max-reject-fraction`` (default 0.01).
* ``synth OUTPUT``: writes the seeded synthetic dataset (:mod:`raypo.data.synthetic`).

Bad input paths and unusable options exit with status 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from raypo.config import DataConfig, S3Config
from raypo.data.io import write_records, write_table
from raypo.data.pipeline import process_rows
from raypo.data.schema import ListwiseRecord
from raypo.data.synthetic import SyntheticSpec, spec_dimensions, spec_table

EXIT_OK, EXIT_REJECTS, EXIT_USAGE = 0, 1, 2


def _data_config(args: argparse.Namespace, fmt: str, path: str) -> DataConfig:
    raw_dims = getattr(args, "dimensions", None) or ""
    dims = [d.strip() for d in raw_dims.split(",") if d.strip()]
    cfg = DataConfig(train_path=path, format=fmt, dimensions=dims,
                     quarantine_path=getattr(args, "quarantine", None),
                     merge_pairs=not getattr(args, "no_merge_pairs", False),
                     keep_system_prompt=getattr(args, "keep_system_prompt", False),
                     s3=S3Config(endpoint_url=getattr(args, "s3_endpoint_url", None),
                                 region=getattr(args, "s3_region", None)))
    if getattr(args, "max_reject_fraction", None) is not None:
        cfg.max_reject_fraction = args.max_reject_fraction
    for key in ("max_prompt_length", "max_response_length", "overlong"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    return cfg


def _fail(message: str) -> int:
    print(f"raypo data: {message}", file=sys.stderr)
    return EXIT_USAGE


def convert_command(args: argparse.Namespace) -> int:
    cfg = _data_config(args, args.format, args.input)
    try:
        rows, report, dims = process_rows(args.input, cfg, None, "convert")
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    if not rows:
        print(report.format())
        print(f"raypo data convert: every one of the {report.input_rows} input rows was rejected, nothing "
              f"written to {args.output}; check --format ({args.format}) against the input, and the reasons "
              "above", file=sys.stderr)
        return EXIT_REJECTS
    written = write_records([ListwiseRecord.from_row(r) for r in rows], args.output, dims, cfg.s3)
    print(report.format())
    print(f"wrote {report.output_rows} listwise rows to {written}")
    if args.quarantine and report.rejected_rows:
        print(f"wrote {report.rejected_rows} rejected rows to {args.quarantine}")
    return EXIT_OK


def validate_command(args: argparse.Namespace) -> int:
    cfg = _data_config(args, args.format, args.path)
    # --json: stdout carries the report alone; libraries that log to stdout while the tokenizer loads
    # (DeepSpeed's accelerator notice, for one) are sent to stderr
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with quiet:
            _, report, _ = process_rows(args.path, cfg, args.tokenizer, "validate")
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    if report.reject_fraction > cfg.max_reject_fraction:
        print(f"FAIL: {report.reject_fraction:.2%} of the rows were rejected, more than "
              f"--max-reject-fraction={cfg.max_reject_fraction:.2%}", file=sys.stderr)
        return EXIT_REJECTS
    return EXIT_OK


def synth_command(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.num_responses < 2:
        return _fail(f"--num-prompts={args.num_prompts} must be >= 1 and "
                     f"--num-responses={args.num_responses} >= 2")
    spec = SyntheticSpec(args.num_prompts, args.seed, args.num_responses, kind=args.kind)
    try:
        table = spec_table(spec)
    except ValueError as exc:
        return _fail(str(exc))
    s3 = S3Config(endpoint_url=args.s3_endpoint_url, region=args.s3_region)
    written = write_table(table, args.output, s3)
    print(f"wrote {table.num_rows} synthetic prompts x {args.num_responses} responses, dimensions "
          f"{', '.join(spec_dimensions(spec))}, seed {args.seed}, to {written}")
    return EXIT_OK
