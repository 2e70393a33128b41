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


# ----------------------------------------------------------------------------------------------------
# The epoch readers (raypo.train.recipe.EpochReader): read ahead, same order, same resume
# ----------------------------------------------------------------------------------------------------


class FakeShard:
    """A Ray Data shard stand-in: ``rows`` prompt groups tagged (epoch, row) in their first prompt token,
    ``delay`` seconds before the first batch (Ray Data's iterator start), an error after ``fail_after``."""

    def __init__(self, epoch: int, rows: int, log: list, delay: float = 0.0, fail_after: int | None = None):
        self.epoch, self.rows, self.log, self.delay, self.fail_after = epoch, rows, log, delay, fail_after
        self.read = 0  # batches handed out so far (by the reader's thread)

    def iter_batches(self, *, batch_size, batch_format, drop_last, prefetch_batches):
        assert (batch_format, drop_last) == ("numpy", True)
        self.log.append(("open", self.epoch))
        import time

        time.sleep(self.delay)
        for start in range(0, self.rows - batch_size + 1, batch_size):
            if self.fail_after is not None and self.read >= self.fail_after:
                raise OSError(f"shard {self.epoch} lost")
            ids = range(start, start + batch_size)
            self.read += 1
            yield {"prompt_ids": [[1000 * self.epoch + i + 1] for i in ids],
                   "response_ids": [[[5], [6, 7]] for _ in ids]}


def _recipe(*overrides: str, rows: int = 10, delay: float = 0.0, log: list | None = None):
    from types import SimpleNamespace

    from raypo.config import load_config
    from raypo.train.recipe import ListwiseRecipe

    cfg = load_config(None, ["train.micro_batch_size=2", "train.grad_accum_steps=2", "train.epochs=3",
                             "train.max_steps=100", *overrides])
    recipe = ListwiseRecipe(cfg, None, SimpleNamespace(hf_config=None))
    log = [] if log is None else log
    shards = {}

    def train_shards(epoch):
        log.append(("shard", epoch))  # asked in the main thread, when the reader is made
        shards[epoch] = shards.get(epoch) or FakeShard(epoch, rows, log, delay)
        return shards[epoch]

    recipe.train_shards = train_shards
    return recipe, shards, log


def _consume(recipe, on_step=None) -> list[list[list[int]]]:
    """Drive ``recipe.steps()`` as ``ListwiseRecipe.train`` does; each step's groups' (epoch, row) tags."""
    out = []
    for micro in recipe.steps():
        out.append([b.prompt_ids[g][0] - 1 for b in micro for g in range(b.num_groups)])
        recipe.state.global_step += 1
        recipe.state.batches_in_epoch += recipe.cfg.train.grad_accum_steps
        if on_step is not None:
            on_step(recipe, out)
    return out


def _sequential(epochs: int, rows: int, micro: int, k: int) -> list[list[int]]:
    """The order of reading the epochs one after the other: whole steps of k micro-batches per epoch."""
    steps = []
    for e in range(epochs):
        batches = [[1000 * e + i for i in range(s, s + micro)] for s in range(0, rows - micro + 1, micro)]
        steps += [sum(batches[j:j + k], []) for j in range(0, len(batches) - k + 1, k)]
    return steps


def test_epoch_readers_keep_the_sequential_order_across_epochs():
    recipe, _, log = _recipe(rows=11)  # 5 micro-batches of 2 per epoch: 2 steps, one micro-batch left over
    steps = _consume(recipe)
    assert steps == _sequential(3, 11, 2, 2)
    assert len(steps) == 6 and steps[2][0] == 1000  # epoch 1 starts with its own first rows
    assert recipe.state.epoch == 3  # every epoch ran out, as without read-ahead


def test_the_next_epoch_is_opened_after_the_first_step_of_this_one():
    """Epoch e + 1's shard is asked for (and its reader thread started) right after epoch e's first step
    was read, and that thread reads its first micro-batches while epoch e is still being consumed."""
    recipe, shards, log = _recipe(rows=12)  # 3 steps per epoch
    seen = []

    def on_step(recipe, out):
        seen.append(list(log))
        if len(out) == 1:  # still in epoch 0: epoch 1's reader fills its queue (depth 2k) meanwhile
            import time

            deadline = time.monotonic() + 20
            while shards[1].read < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            # read ahead, and bounded: the queue's depth (2 * grad_accum_steps) and the one being put
            assert shards[1].read == 5

    _consume(recipe, on_step)
    assert seen[0][:2] == [("shard", 0), ("open", 0)] and ("shard", 1) in seen[0]
    assert ("shard", 2) not in seen[2] and ("shard", 2) in seen[3]  # opened on epoch 1's first step


def test_resume_skips_the_consumed_micro_batches_of_the_epoch():
    full = _sequential(3, 12, 2, 2)
    recipe, _, _ = _recipe(rows=12)
    recipe.state.global_step, recipe.state.epoch, recipe.state.batches_in_epoch = 4, 1, 2
    assert _consume(recipe) == full[4:]
    assert _consume(_recipe(rows=12)[0]) == full


def test_the_readers_stop_when_the_run_ends_inside_an_epoch(monkeypatch):
    from raypo.train import recipe as recipe_module

    made = []
    original = recipe_module.ListwiseRecipe.epoch_reader

    def tracking(self, epoch, skip=0):
        made.append(original(self, epoch, skip))
        return made[-1]

    monkeypatch.setattr(recipe_module.ListwiseRecipe, "epoch_reader", tracking)
    recipe, _, _ = _recipe("train.max_steps=2", rows=12)
    assert _consume(recipe) == _sequential(1, 12, 2, 2)[:2]
    assert len(made) == 2  # epoch 0 and the read-ahead of epoch 1
    assert not any(r._thread.is_alive() for r in made)


def test_a_reader_error_is_raised_in_the_loop():
    import pytest

    recipe, shards, log = _recipe(rows=12)
    recipe.train_shards = lambda epoch: FakeShard(epoch, 12, log, fail_after=3)
    with pytest.raises(OSError, match="shard 0 lost"):
        _consume(recipe)
    assert recipe.state.global_step == 1  # micro-batches 1-2 made step 1; the 4th read failed


def test_the_next_epochs_start_is_hidden_behind_this_epochs_steps():
    """A 1 s iterator start per epoch (Ray Data's, ~2 s on CPU, is what this hides) and 0.3 s steps:
    the first step of epoch 1 waits far less than the start."""
    import time

    recipe, _, _ = _recipe("train.epochs=2", rows=16, delay=1.0)  # 4 steps per epoch
    waits, steps = [], recipe.steps()
    while True:
        t0 = time.perf_counter()
        micro = next(steps, None)
        if micro is None:
            break
        waits.append(time.perf_counter() - t0)
        recipe.state.global_step += 1
        recipe.state.batches_in_epoch += 2
        time.sleep(0.3)
    assert len(waits) == 8
    assert waits[0] >= 0.9  # epoch 0's start is waited for (train() opens it before the step-0 evaluation)
    assert waits[4] < 0.5, waits
