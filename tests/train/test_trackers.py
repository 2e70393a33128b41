"""Experiment trackers with their real clients and no network: MLflow on a local SQLite store, W&B in
offline mode (its run file read back record by record)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from raypo.config import load_config
from raypo.errors import ConfigError
from raypo.train.trackers import build_trackers, check_tracker_packages, flat_params


def read_wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log of 32 KiB blocks after a
    7-byte header; each chunk has a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle /
    4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, raw = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            raw.append(pending + chunk)
            pending = b""
        else:
            pending = (pending if kind == 3 else b"") + chunk
    records = []
    for item in raw:
        record = pb.Record()
        record.ParseFromString(item)
        records.append(record)
    return records


def config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"checkpoint.storage_path={tmp_path}", "loss.name=dpo", "loss.beta=0.2",
                              *overrides])


def test_mlflow_run_gets_the_config_the_metrics_by_step_and_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = config(tmp_path, "logging.backends=[mlflow]", f"logging.mlflow_tracking_uri={uri}",
                 "logging.group=sweep-a")
    (tracker,) = build_trackers(cfg, str(tmp_path / "run"), "run-1")
    tracker.log({"step": 1, "train/loss": 0.7, "eval/pairwise_accuracy": 0.5, "note": "x"}, 1)
    tracker.log({"train/loss": 0.6, "perf/step_s": float("nan")}, 2)
    tracker.close()
    again = build_trackers(cfg, str(tmp_path / "run"), "run-1")[0]  # a resumed run: the same MLflow run
    again.log({"train/loss": 0.5}, 3)
    again.close()
    assert again.run_id == tracker.run_id
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["loss.name"] == "dpo" and run.data.params["loss.beta"] == "0.2"
    assert run.data.tags["raypo.group"] == "sweep-a" and run.info.run_name == "run-1"
    history = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "train/loss"))
    assert history == [(1, 0.7), (2, 0.6), (3, 0.5)]
    assert "perf/step_s" not in run.data.metrics  # NaN is not sent
    assert run.info.status == "FINISHED"


def test_mlflow_defaults_to_a_sqlite_store_beside_the_runs(tmp_path, monkeypatch):
    from raypo.train.trackers import mlflow_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_tracking_uri(config(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert mlflow_tracking_uri(config(tmp_path)) == "http://mlflow.internal:5000"


def test_wandb_offline_run_file_holds_the_config_group_and_history(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(tmp_path, "logging.backends=[wandb]", "logging.group=sweep-b")
    (tracker,) = build_trackers(cfg, str(tmp_path / "run"), "trial_1")
    for step in (1, 2):
        tracker.log({"train/loss": 1.0 / step, "eval/pairwise_accuracy": 0.25 * step}, step)
    tracker.close()
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "trial_1" and run.run_group == "sweep-b" and run.project == "raypo"
    logged_config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert logged_config["loss"]["name"] == "dpo" and logged_config["loss"]["beta"] == 0.2
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["train/loss"], h["eval/pairwise_accuracy"]) for h in history] == [
        (1, 1.0, 0.25), (2, 0.5, 0.5)]


def tensorboard_scalars(event_file) -> dict[str, tuple[int, float]]:
    """{tag: (step, value)} of a TensorBoard event file (TFRecord framing: length, crc, payload, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, pos, out = event_file.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 16 + length
        for v in event.summary.value:
            out[v.tag] = (event.step, v.simple_value)
    return out


def test_tensorboard_is_the_default_and_logging_tensorboard_false_turns_it_off(tmp_path):
    (tb,) = build_trackers(config(tmp_path), str(tmp_path / "run"), "r")
    tb.log({"train/loss": 1.0, "train/ndcg@1": 0.5}, 1)
    tb.close()
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    # '@' is not allowed in a TensorBoard tag: the same name as in MLflow
    assert tensorboard_scalars(events) == {"train/loss": (1, 1.0), "train/ndcg_at_1": (1, 0.5)}
    assert build_trackers(config(tmp_path, "logging.tensorboard=false"), str(tmp_path / "x"), "r") == []


def test_a_backend_whose_client_is_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ConfigError, match=r"wandb package is not installed.*raypo\[trackers\]"):
        check_tracker_packages(config(tmp_path, "logging.backends=[tensorboard,wandb]"))


def test_an_unknown_backend_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"logging.backends='mlfow'.*mlflow"):
        config(tmp_path, "logging.backends=[mlfow]")


def test_params_are_the_flattened_config():
    params = flat_params(load_config(None, ["lambdas.weights=[0.5,0.5]"]))
    assert params["lambdas.weights"] == "[0.5, 0.5]" and params["model.path"] == "tiny://llama"


@pytest.mark.e2e
def test_a_real_run_from_a_saved_hf_dataset_logs_its_steps_to_mlflow_and_wandb(ray_cluster, tiny_model_dir,
                                                                         tmp_path, monkeypatch):
    """Rank 0 of a real 2-worker ZeRO-3 run writes each row to every tracker: MLflow's store (a SQLite
    file beside the runs) and W&B's offline run file hold the steps and values of metrics.jsonl. The data
    is a Hugging Face ``save_to_disk`` directory (raypo.data.hf_source), read and counted like a file."""
    import json

    import datasets
    from mlflow.tracking import MlflowClient

    from raypo.data.synthetic import DIMENSIONS, generate_table
    from raypo.train.trainer import run_training

    monkeypatch.setenv("WANDB_MODE", "offline")  # forwarded to the workers (raypo.train.trainer)
    monkeypatch.setenv("WANDB_SILENT", "true")
    saved = tmp_path / "hf_dataset"
    datasets.Dataset(generate_table(8, seed=1)).save_to_disk(str(saved))
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", "model.dtype=float32", f"data.train_path={saved}",
        f"data.dimensions=[{','.join(DIMENSIONS)}]", "data.eval_fraction=0.0",
        "data.max_prompt_length=32", "data.max_response_length=16", "loss.name=dpo",
        "train.micro_batch_size=2", "train.max_steps=2", "scaling.num_workers=2",
        f"checkpoint.storage_path={tmp_path}", "checkpoint.run_name=tracked",
        "logging.backends=[tensorboard,mlflow,wandb]"])
    run_training(cfg)
    run_dir = tmp_path / "tracked"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == [1, 2]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("raypo").experiment_id])
    assert run.info.run_name == "tracked" and run.data.params["loss.name"] == "dpo"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(losses)
    assert "train/ndcg_at_1" in run.data.metrics  # MLflow refuses '@' in a name
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    logged = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
              for r in read_wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    assert {h["_step"]: h["train/loss"] for h in logged if "train/loss" in h} == pytest.approx(losses)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    data = json.loads((run_dir / "data_report.json").read_text())
    assert (data["input_rows"], data["accepted_rows"]) == (8, 8)
