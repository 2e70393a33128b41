"""The precomputed-reference stage batched (one forward per batch of rows) gives the per-group stage's
reference log-probs and entropies: equal in float64, within 1e-6 in float32."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from raypo.train.reference import ReferenceScorer

GROUPS = [(17, [9, 30, 4]), (40, [25, 3, 12, 8, 19]), (6, [2, 44]), (23, [13, 13, 7, 1])]


def _table(vocab: int = 500) -> pa.Table:
    gen = torch.Generator().manual_seed(4)

    def ids(n: int) -> list[int]:
        return torch.randint(8, vocab, (n,), generator=gen).tolist()

    return pa.Table.from_pylist([{"prompt_ids": ids(p), "response_ids": [ids(r) for r in rs]}
                                 for p, rs in GROUPS])


@pytest.mark.parametrize(("dtype", "atol"), [("float64", 1e-12), ("float32", 1e-6)])
@pytest.mark.parametrize("attention", ["auto", "cascade"])
def test_batched_stage_equals_per_group(tiny_model_dir, dtype, atol, attention):
    table = _table()
    scored = {}
    for per_group in (True, False):
        scorer = ReferenceScorer(str(tiny_model_dir), dtype, attention, True, with_entropy=True,
                                 per_group=per_group)
        scored[per_group] = scorer(table).to_pylist()
    for exact, batched in zip(scored[True], scored[False]):
        for column in ("ref_logps", "ref_entropy"):
            assert len(exact[column]) == len(batched[column]) == len(exact["response_ids"])
            torch.testing.assert_close(torch.tensor(batched[column]), torch.tensor(exact[column]),
                                       atol=atol, rtol=0 if dtype == "float64" else 1e-6)
        assert all(v < 0 for v in exact["ref_logps"])
