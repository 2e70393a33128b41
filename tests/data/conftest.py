"""Fixtures for the data tests: records in their real source schemas, a tiny tokenizer, DataConfig factory."""

from __future__ import annotations

import copy

import pytest
from data_records import oasst_messages, ultrafeedback_record

from raypo.config import DataConfig


@pytest.fixture
def uf_record():
    return copy.deepcopy(ultrafeedback_record())


@pytest.fixture
def oasst_rows():
    return oasst_messages()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from raypo.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def data_cfg():
    def make(**changes):
        cfg = DataConfig()
        for k, v in changes.items():
            setattr(cfg, k, v)
        return cfg

    return make


SYNTH_URI = "synthetic://default?num_prompts=96&seed=0"


@pytest.fixture(scope="session")
def synthetic_datasets(ray_cluster, tiny_model_dir):
    """Tokenised synthetic train/eval Ray Datasets (built once per session) and their config and report."""
    from raypo.data.pipeline import build_datasets

    cfg = DataConfig(train_path=SYNTH_URI, eval_fraction=0.25, split_seed=3)
    train, evals, report = build_datasets(cfg, str(tiny_model_dir))
    return cfg, train, evals, report
