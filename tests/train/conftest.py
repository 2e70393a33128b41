"""Fixtures for trainer tests: tokenised synthetic rows and a single-process gloo group for DeepSpeed."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="session")
def tokenized_rows(tiny_model_dir):
    from raypo.config import load_config
    from raypo.data.pipeline import build_rows
    from raypo.model.loading import load_tokenizer

    cfg = load_config(None, ["data.train_path=synthetic://default?num_prompts=24&seed=3",
                             "data.eval_fraction=0.0", "data.max_prompt_length=64",
                             "data.max_response_length=32"])
    train, _, report = build_rows(cfg.data, load_tokenizer(str(tiny_model_dir)))
    return train, list(report.dimensions)


@pytest.fixture(scope="session")
def single_process_group():
    """torch.distributed with world size 1 (gloo), as DeepSpeed needs, in this process."""
    import torch.distributed as dist

    from raypo.train.collectives import init_process_group

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        init_process_group(use_gpu=False)
    yield
