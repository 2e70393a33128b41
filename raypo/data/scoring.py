"""Rating responses with plain scorer functions, as a Ray Data stage (``raypo data score``).

A scorer is ``fn(response: str, task: dict) -> float`` named ``module:function`` (optionally
``module:function=dimension``; the dimension name defaults to the function's name). ``task`` is the row's
``task`` object (kept in the listwise row's metadata JSON by ``raypo data generate``, ``{}`` when absent)
plus ``prompt``, the text of the last user message. Each scorer gives one dimension, in the order given.

A scorer that raises on a response, or returns something that is not a finite number, gives that response
no rating on its dimension (``null``: a missing rating, which the losses skip) and is counted per scorer;
the run goes on. The output is listwise Parquet with the dimension names in its schema metadata.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa

from raypo.data.schema import LISTWISE_FIELDS, listwise_schema

ERRORS_COLUMN = "_score_errors"  # per row: "dimension\tdetail" for every failed rating
MAX_EXAMPLES = 5


def load_scorer(spec: str) -> tuple[str, Callable[[str, dict], Any]]:
    """``module:function[=name]`` -> (dimension name, function); ValueError naming the spec otherwise.

    The current directory is importable (as with ``python -m``), so ``myscorers:fn`` finds ./myscorers.py.
    """
    target, _, name = spec.partition("=")
    module_name, sep, func_name = target.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--scorer {spec!r} must be module:function (e.g. raypo.data.tasks:correctness)")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--scorer {spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"--scorer {spec!r}: {module_name} has no function {func_name!r}")
    return (name.strip() or func_name), fn


def dimension_names(specs: Sequence[str]) -> list[str]:
    names = [load_scorer(s)[0] for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--scorer: dimension names {dup} repeat; rename with module:function=name")
    return names


def row_task(row: dict[str, Any]) -> dict[str, Any]:
    """The scorer's ``task``: the metadata's ``task`` object plus the last user message as ``prompt``."""
    try:
        meta = json.loads(row.get("metadata") or "{}")
    except ValueError:
        meta = {}
    task = dict(meta.get("task") or {}) if isinstance(meta, dict) else {}
    prompt = row.get("prompt") or []
    task["prompt"] = prompt[-1]["content"] if prompt else ""
    return task


def _rate(fn: Callable, response: str, task: dict) -> tuple[Optional[float], str]:
    try:
        value = fn(response, dict(task))
    except Exception as exc:  # noqa: BLE001 - any scorer failure is one missing rating, counted
        return None, f"{type(exc).__name__}: {exc}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"returned {value!r}, not a finite number"
    return float(value), ""


def score_row(row: dict[str, Any], scorers: Sequence[tuple[str, Callable]]) -> tuple[dict, list[str]]:
    """One listwise row with ``scores`` [N][m] from the scorers; and its failures ``dimension\\tdetail``."""
    task, errors, scores = row_task(row), [], []
    for i, response in enumerate(row["responses"]):
        ratings = []
        for name, fn in scorers:
            value, detail = _rate(fn, response, task)
            ratings.append(value)
            if value is None:
                errors.append(f"{name}\t{row['prompt_id']} response {i}: {detail}")
        scores.append(ratings)
    out = {f.name: row.get(f.name) for f in LISTWISE_FIELDS}
    out["scores"] = scores
    return out, errors


def score_batch(batch: pa.Table, scorers: Sequence[tuple[str, Callable]]) -> pa.Table:
    """``map_batches`` body: listwise rows -> rated listwise rows plus :data:`ERRORS_COLUMN`."""
    names = [n for n, _ in scorers]
    rows, errors = [], []
    for row in batch.to_pylist():
        scored, errs = score_row(row, scorers)
        rows.append(scored)
        errors.append(errs)
    table = pa.Table.from_pylist(rows, schema=listwise_schema(names))
    return table.append_column(ERRORS_COLUMN, pa.array(errors, pa.list_(pa.string())))


@dataclass
class ScoreReport:
    """Rows and ratings written, and the failed ratings per dimension (with a few examples)."""

    dimensions: list[str]
    rows: int = 0
    ratings: int = 0
    failed: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, errors: Sequence[str], num_responses: int) -> None:
        self.rows += 1
        self.ratings += num_responses * len(self.dimensions)
        for e in errors:
            name, _, detail = e.partition("\t")
            self.failed[name] += 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{name}: {detail}")

    def format(self) -> str:
        lines = [f"scored {self.rows} rows, {self.ratings} ratings on {', '.join(self.dimensions)}",
                 f"  failed ratings (stored as missing) {sum(self.failed.values())}"]
        lines += [f"    {name:<26}{self.failed[name]:>8}" for name in self.dimensions if self.failed[name]]
        lines += [f"    e.g. {e}" for e in self.examples]
        return "\n".join(lines)


def score_table(table: pa.Table, specs: Sequence[str], *, batch_size: int = 64
                ) -> tuple[pa.Table, ScoreReport]:
    """Rate every response of a listwise table with the scorers (a Ray Data ``map_batches`` stage)."""
    import ray
    import ray.data

    names = dimension_names(specs)
    scorers = [load_scorer(s) for s in specs]
    for _, fn in scorers:  # ship scorers from modules the workers may not have (a local file) by value
        module = sys.modules.get(getattr(fn, "__module__", "") or "")
        if module is not None and not module.__name__.startswith("raypo.") and \
                "site-packages" not in str(getattr(module, "__file__", "")):
            ray.cloudpickle.register_pickle_by_value(module)
    ds = ray.data.from_arrow(table).map_batches(score_batch, fn_kwargs={"scorers": scorers},
                                                batch_format="pyarrow", batch_size=batch_size)
    parts = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    schema = listwise_schema(names).append(pa.field(ERRORS_COLUMN, pa.list_(pa.string())))
    scored = pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()
    report = ScoreReport(names)
    for errs, responses in zip(scored.column(ERRORS_COLUMN).to_pylist(),
                               scored.column("responses").to_pylist()):
        report.add(errs or [], len(responses))
    return scored.drop_columns([ERRORS_COLUMN]).replace_schema_metadata(listwise_schema(names).metadata), \
        report
