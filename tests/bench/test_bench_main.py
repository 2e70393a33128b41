"""The command line the benchmarks share (bench.common.bench_main) and the benchmark model's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.common

    return bench.common


def test_bench_main_parses_the_shared_flags(common, capsys):
    calls = []

    def run(smoke: bool, rounds: int, memory: str) -> dict:
        calls.append((smoke, rounds, memory))
        return {"ok": True}

    common.bench_main(run, "A benchmark.\n\nMore.", rounds=4, argv=["--smoke", "--no-memory"])
    common.bench_main(run, "A benchmark.", argv=[])
    assert calls == [(True, 4, "off"), (False, 3, "subprocess")]
    assert json.loads(capsys.readouterr().out.split("}\n")[0] + "}") == {"ok": True}


def test_bench_model_line_is_unchanged(common):
    """The results files' model line (bench/results/results.json) from the shared ModelShape."""
    assert common.describe_model(common.BENCH_MODEL) == (
        "Llama, hidden 256, 4 layers, 4 heads / 2 KV, MLP 768, vocab 4096 "
        "(lm_head 25% of matmul FLOPs/token)")
