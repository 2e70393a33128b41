"""What the driver hands to the cluster's processes: non-secret settings only, and model sources that every
node resolves for itself."""

from __future__ import annotations

import pytest

from raypo.config import load_config
from raypo.train import trainer

SECRETS = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "AKIA123", "AWS_SESSION_TOKEN": "tok",
           "HF_TOKEN": "hf_abc", "RAYPO_API_TOKEN": "x", "WANDB_API_KEY": "0123abcd",
           "MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_PASSWORD": "p"}
SETTINGS = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9001",
            "AWS_REGION": "eu-west-1", "HF_HUB_OFFLINE": "1", "RAYPO_FAIL_AT_STEP": "3",
            "WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}  # the trackers on rank 0


@pytest.fixture
def environment(monkeypatch):
    for k, v in {**SECRETS, **SETTINGS}.items():
        monkeypatch.setenv(k, v)


def test_driver_environment_forwards_settings_but_never_secrets(environment):
    env = trainer.driver_environment()
    for k, v in SETTINGS.items():
        assert env[k] == v
    assert not set(SECRETS) & set(env)


def test_init_ray_puts_no_secret_into_the_runtime_env(environment, monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    trainer.init_ray(load_config(None, []))
    env_vars = calls[0]["runtime_env"]["env_vars"]
    assert env_vars["AWS_ENDPOINT_URL"] == SETTINGS["AWS_ENDPOINT_URL"]
    assert not set(SECRETS) & set(env_vars)
    assert "s3cr3t" not in repr(calls)


def test_model_sources_stay_uris_for_the_nodes_to_resolve():
    cfg = load_config(None, ["model.path=s3://bucket/models/llama", "model.reference_path=tiny://llama"])
    assert trainer.model_sources(cfg) == ("s3://bucket/models/llama", "tiny://llama")
    assert trainer.model_sources(load_config(None, ["model.path=org/name"])) == ("org/name", "org/name")


def test_epoch_accounting_names_the_prompts_a_step_cannot_hold():
    cfg = load_config(None, ["scaling.num_workers=2", "train.micro_batch_size=3", "train.grad_accum_steps=2"])
    plan = trainer.epoch_plan(29, cfg)  # 14 rows per rank -> 2 steps of 6 -> 24 trained
    assert (plan.steps, plan.trained, plan.left_over) == (2, 24, 5)
    assert "5 prompt(s) per epoch do not fill a step" in trainer.describe_epochs(29, cfg)
    assert "left out" not in trainer.describe_epochs(24, cfg)
    with pytest.raises(trainer.RunError, match="fewer than one global batch"):
        trainer.describe_epochs(11, cfg)
