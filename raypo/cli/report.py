"""``raypo report RUN [--out FILE] [--format html|md]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from raypo.report.artifacts import RunArtifacts, load
from raypo.report.render import write_report


def report_command(args: argparse.Namespace) -> int:
    artifacts = load(args.run)
    fmt = args.format or ("md" if args.out and args.out.endswith(".md") else "html")
    out = Path(args.out) if args.out else artifacts.path / f"report.{fmt}"
    write_report(artifacts, out, fmt)
    kind = "run" if isinstance(artifacts, RunArtifacts) else "sweep"
    print(f"raypo: report of {kind} {artifacts.name} written to {out}")
    return 0
