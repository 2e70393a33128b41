"""Errors every layer raises, and the "did you mean" hint their messages share.

``raypo`` exits with status 2 on a :class:`ConfigError` (before any cluster work) and with status 1 on a
:class:`RunError` (the data or the run stops the command before training), printing the message without a
traceback (``raypo/cli/main.py``).
"""

from __future__ import annotations

import difflib
from typing import Optional


class RunError(RuntimeError):
    """A problem with the data or the run (not the config's syntax) that stops the command: found before
    training starts, or a run that cannot go on (its workers cannot be placed); the message says what is
    wrong and what to do. ``raypo`` prints it and exits with status 1."""


class ConfigError(ValueError):
    """One or more configuration problems; each names the key, the value and the fix."""

    def __init__(self, problems: list[str], source: Optional[str] = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid raypo config{where}:\n{lines}")


def did_you_mean(key: str, options: list[str]) -> str:
    """``"did you mean 'x'?"`` for the closest of ``options``, else the list of known keys."""
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known keys: " + ", ".join(sorted(options))
