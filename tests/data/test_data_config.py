"""The data section of the config: the fields raypo.data adds, and their validation."""

from __future__ import annotations

import pytest

from raypo.config import ConfigError, config_from_dict


def test_data_defaults():
    d = config_from_dict({}).data
    assert d.merge_pairs and not d.keep_system_prompt and d.tokenize_concurrency == 1
    assert d.train_path.startswith("synthetic://")


def test_data_fields_round_trip():
    raw = {"merge_pairs": False, "keep_system_prompt": True, "tokenize_concurrency": 8, "format": "pairwise"}
    d = config_from_dict({"data": raw}).data
    assert (d.merge_pairs, d.keep_system_prompt, d.tokenize_concurrency, d.format) == (
        False, True, 8, "pairwise")


@pytest.mark.parametrize("raw, fragment", [
    ({"tokenize_concurrency": 0}, "data.tokenize_concurrency=0 must be >= 1"),
    ({"overlong": "cut"}, "data.overlong='cut'"),
    ({"format": "trl"}, "data.format='trl'"),
    ({"max_reject_fraction": 2.0}, "data.max_reject_fraction=2.0"),
])
def test_data_mistakes_are_named(raw, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": raw})
    assert fragment in str(err.value)
