"""Preference data: converters to the listwise schema, validation, targets, tokenisation, Ray Data pipeline.

Modules: :mod:`~raypo.data.schema` (the record and its Arrow schema), :mod:`~raypo.data.formats`
(converters), :mod:`~raypo.data.validate` (rules, report, quarantine), :mod:`~raypo.data.targets`
(labels via :mod:`raypo.losses.labels`), :mod:`~raypo.data.tokenize`, :mod:`~raypo.data.synthetic`,
:mod:`~raypo.data.io` (files, S3), :mod:`~raypo.data.pipeline` (Ray Data, and the same in plain Python),
:mod:`~raypo.cli.data`. See docs/data.md.
"""

from raypo.data.schema import DIMENSIONS_KEY, ListwiseRecord, listwise_schema, tokenized_schema
from raypo.data.validate import DataQualityError, ValidationReport

__all__ = ["DIMENSIONS_KEY", "DataQualityError", "ListwiseRecord", "ValidationReport", "listwise_schema",
           "tokenized_schema"]
