"""The loop's clock, the FLOP count and the metric history's cut-back on resume (pure functions; the real
runs that write these metrics are checked in tests/train/test_trainer_e2e.py)."""

from __future__ import annotations

import json

import torch

from raypo.model.batch import collate_listwise
from raypo.train.metrics_log import truncate_history
from raypo.train.perf import FlopsModel, LoopWindow, attended_pairs, peak_flops


def test_attended_pairs_count_the_prompt_once_with_prefix_sharing():
    row = {"prompt_ids": [1] * 3, "response_ids": [[2] * 2, [3] * 1], "scores": [1.0, 0.0]}
    batch = collate_listwise([row])
    # shared: prompt 3*4/2 = 6; response 2: 2*3 + 2*3/2 = 9; response 1: 1*3 + 1 = 4
    assert attended_pairs(batch, prefix_sharing=True) == 6 + 9 + 4
    # unshared: rows of 5 and 4 tokens, causal
    assert attended_pairs(batch, prefix_sharing=False) == 15 + 10


def test_flops_model_reads_a_llama_config():
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=32)
    model = FlopsModel.from_hf_config(hf)
    per_layer = 2 * 16 * 16 + 2 * 16 * 8 + 3 * 16 * 32  # q, o; k, v (2 KV heads of 4); SwiGLU
    assert model.matmul_params == 2 * per_layer + 100 * 16
    assert model.flops(10, 7) == 6 * model.matmul_params * 10 + 12 * 2 * 16 * 7
    assert peak_flops(torch.device("cpu")) is None  # no MFU on CPU


def test_loop_window_efficiency_leaves_out_evaluations():
    clock = LoopWindow(start=100.0)
    clock.add_step(data_wait_s=0.5, step_s=2.0)
    clock.add_step(data_wait_s=0.5, step_s=2.0)
    clock.excluded_s = 5.0  # an evaluation
    sums = clock.sums(now=110.0)  # wall 10 s - 5 s evaluation = 5 s, 4 s of it in train_step
    eff = sums["perf/loop_efficiency"]
    assert abs(float(eff[0] / eff[1]) - 0.8) < 1e-12
    step = sums["perf/step_s"]
    assert float(step[0] / step[1]) == 2.0


def test_truncate_history_keeps_one_row_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s} for s in (0, 1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    assert truncate_history(str(path), keep_through=2) == 3  # steps 3, 4 and the torn line
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert truncate_history(str(path), keep_through=-1) == 3  # no checkpoint: everything is redone
    assert path.read_text() == ""
    assert truncate_history(str(tmp_path / "absent.jsonl"), 5) == 0


def test_a_negative_report_interval_is_a_config_error():
    import pytest

    from raypo.config import load_config
    from raypo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"logging.report_interval_s=-1.0 must be a number of seconds >= 0"):
        load_config(None, ["logging.report_interval_s=-1"])
    assert load_config(None, ["logging.report_interval_s=0"]).logging.report_interval_s == 0


def test_the_progress_line_gives_an_eta_from_the_measured_pace(tmp_path, monkeypatch, capsys):
    from raypo.config import load_config
    from raypo.train import metrics_log
    from raypo.train.metrics_log import MetricsLog

    now = [100.0]
    monkeypatch.setattr(metrics_log.time, "time", lambda: now[0])
    cfg = load_config(None, ["train.max_steps=12", "logging.tensorboard=false"])
    log = MetricsLog(cfg, str(tmp_path), "r", keep_through=-1)
    for step in (1, 2, 3):  # one row every 10 s
        log.write({"step": step, "train/loss": 1.0})
        now[0] += 10.0
    lines = capsys.readouterr().out.splitlines()
    assert "eta" not in lines[0]  # no pace measured yet
    assert lines[1].endswith("| eta 1m40s") and lines[2].endswith("| eta 1m30s")  # 10 s/step, 10 then 9 left
    log.close()


def test_a_failing_tracker_is_switched_off_and_the_history_keeps_every_row(tmp_path, capsys):
    import json

    from raypo.config import load_config
    from raypo.train.metrics_log import MetricsLog

    class Unreachable:
        calls = 0

        def log(self, metrics, step):
            Unreachable.calls += 1
            raise ConnectionError("tracking server down")

        def close(self):
            pass

    log = MetricsLog(load_config(None, ["logging.tensorboard=false"]), str(tmp_path), "r", keep_through=-1)
    log.trackers.append(Unreachable())
    for step in (1, 2):
        log.write({"step": step, "train/loss": 1.0})
    log.close()
    assert Unreachable.calls == 1
    assert "Unreachable failed at step 1 and is switched off" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
