"""The ``raypo`` command line: :mod:`raypo.cli.main` builds the parser and dispatches, one module per command
(``train``, ``tune``, ``submit``, ``data``, ``export``, ``plan``) does the work."""

from raypo.cli.main import main

__all__ = ["main"]
