"""The ``raypo`` command line: :mod:`raypo.cli.main` builds the parser and dispatches, one module per command
(``train``, ``tune``, ``submit``, ``data``, ``export``, ``plan``) does the work; :mod:`raypo.cli.job` runs a
submitted job on the cluster."""

from raypo.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
