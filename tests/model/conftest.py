"""Fixtures for the model-side tests: a tiny float64 Llama and random listwise groups."""

from __future__ import annotations

import pytest
import torch

from raypo.model.tiny import TinySpec, build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model_f64(tiny_tokenizer):
    """A fresh tiny Llama in float64 (sdpa attention); tests may set ``config._attn_implementation``."""
    return build_tiny_model(TinySpec(seed=0), tiny_tokenizer, dtype=torch.float64)


@pytest.fixture
def make_rows(tiny_tokenizer):
    """``make_rows([(prompt_len, [response_lens]), ...], seed)`` -> tokenised rows with random ids."""

    def make(groups: list[tuple[int, list[int]]], seed: int = 0) -> list[dict]:
        gen = torch.Generator().manual_seed(seed)

        def ids(n: int) -> list[int]:
            return torch.randint(8, len(tiny_tokenizer), (n,), generator=gen).tolist()

        return [{"prompt_ids": ids(p), "response_ids": [ids(r) for r in rs]} for p, rs in groups]

    return make
