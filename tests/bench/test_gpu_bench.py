"""bench/gpu.py --dry-run: the GPU report's code paths on CPU-sized shapes, with sane JSON values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_dry_run_report():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert {"attention", "listwise_step", "head", "flex_backward", "total_s"} <= report.keys()

    paths = report["attention"]["paths"]
    assert set(paths) == {"dense_sdpa", "eager", "prefix_sdpa", "cascade_math", "cascade_flash",
                          "cascade_flex", "flex_attention"}
    assert paths["dense_sdpa"]["logps_max_abs_diff"] == 0.0
    for name in ("eager", "prefix_sdpa", "cascade_math", "cascade_flash"):  # float32: agreement to rounding
        row = paths[name]
        assert row["fwd_bwd_s"] > 0 and row["logps_max_abs_diff"] < 1e-3 and row["grad_rel_err"] < 1e-4, name
    assert "skipped" in paths["cascade_flex"] and "skipped" in report["flex_backward"]

    step = report["listwise_step"]
    assert step["step_s"] > 0 and step["model_tflops"] > 0 and step["mfu"] is None  # no peak for a CPU
    head = report["head"]
    assert head["vocab"] == 4096 and head["full_s"] > 0 and head["chunked_s"] > 0
    assert head["chunked_peak_mib"] < head["full_peak_mib"] and math.isfinite(head["memory_ratio"])
