"""The benchmarks in bench/ run end to end with tiny sizes (not timed; the numbers mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_runs_with_tiny_sizes(tmp_path):
    benches = ["prefix_sharing", "head", "response_chunks"]
    if importlib.util.find_spec("trl") is not None:  # optional: pip install trl (the TRL comparison)
        benches.append("trl")
    proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--smoke", "--out", str(tmp_path), "--only",
                           *benches], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert results["smoke"] is True and all(name in results for name in benches)
    assert results["prefix_sharing"]["rows"][0]["shared_tokens"] < results["prefix_sharing"]["rows"][0][
        "unshared_tokens"]
    assert {t["target"] for t in results["targets"]}  # the target checks ran on the smoke numbers
    assert "## Prefix sharing" in (tmp_path / "smoke.md").read_text()


def test_peak_memory_method_reads_a_known_allocation(monkeypatch):
    """A step that holds 64 MiB of tensors reads as ~64 MiB of extra peak RSS in a fresh process."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.common import peak_in_subprocess

    result = peak_in_subprocess("bench.common", {"mib": 64})
    assert 60 <= result["peak_mib"] <= 72, result


def test_docs_results_section_is_replaced_below_the_marker(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.run_all import RESULTS_MARKER, write_docs

    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nmethod text\n\n{RESULTS_MARKER}\n\n"
                   "## Latest run (old)\n\nstale table\n")
    assert RESULTS_MARKER in (ROOT / "docs" / "performance.md").read_text()  # the real doc has its marker
    write_docs("# raypo benchmarks (2026-11-22)\n\n## Targets\n\n| a |\n", path=str(doc))
    text = doc.read_text()
    assert text.startswith("# Performance\n\nmethod text\n\n") and "stale table" not in text
    assert "## Latest run (2026-11-22)" in text and "\n### Targets\n" in text
    doc.write_text("# no marker\n")
    with pytest.raises(ValueError, match="no line"):
        write_docs("# raypo benchmarks (x)\n", path=str(doc))
