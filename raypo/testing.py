"""Helpers for tests and local runs: a loopback S3-compatible endpoint (moto in server mode).

Kept in the package (not only in tests/) because local demos and benchmarks use the same endpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class S3Endpoint:
    """An S3-compatible endpoint and the settings s3fs, pyarrow and boto3 need to reach it."""

    endpoint_url: str
    bucket: str
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.endpoint_url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def environment(self) -> dict[str, str]:
        """Environment for clients that read it (boto3, s3fs via botocore, pyarrow >= 15)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def export_environment(self) -> None:
        os.environ.update(self.environment())

    def s3fs_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem``."""
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region}}

    def s3fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.s3fs_options())

    def pyarrow_filesystem(self):
        from pyarrow import fs

        host, port = self.host_port
        return fs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, region=self.region,
                               endpoint_override=f"{host}:{port}", scheme="http")


def start_moto_server(endpoint: S3Endpoint):
    """Start moto's S3 server on the endpoint's loopback port and create the bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    host, port = endpoint.host_port
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=endpoint.endpoint_url, region_name=endpoint.region,
                          aws_access_key_id=endpoint.access_key, aws_secret_access_key=endpoint.secret_key)
    client.create_bucket(Bucket=endpoint.bucket)
    return server


# ----------------------------------------------------------------------------------------------------
# Short deterministic training runs (the end-to-end and fault tests compare their weights)
# ----------------------------------------------------------------------------------------------------


def short_run_overrides(model_dir: Any, storage: str, name: str, steps: int = 4) -> list[str]:
    """Config overrides of a short deterministic run: the same 4 prompts for ``steps`` steps (one global
    batch of 2 workers x 2 prompts per epoch), a checkpoint every step and an export at the end, so runs
    that differ only in workers, accumulation or interruptions must end with the same weights."""
    return [
        f"model.path={model_dir}", "model.dtype=float32",
        "data.train_path=synthetic://default?num_prompts=4&seed=1", "data.eval_fraction=0.0",
        "data.max_prompt_length=64", "data.max_response_length=32",
        "loss.name=lipo_lambda", "loss.params.scale=valid",
        "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "optimizer.lr_scheduler=constant",
        "train.micro_batch_size=2", "train.grad_accum_steps=1", f"train.max_steps={steps}",
        f"train.epochs={steps}", "scaling.num_workers=2", "logging.tensorboard=false",
        f"checkpoint.storage_path={storage}", f"checkpoint.run_name={name}", "checkpoint.every_steps=1",
        "checkpoint.keep_last=2", f"checkpoint.export_path={storage}/{name}/export",
    ]


def exported_weights(export_dir: str) -> dict[str, Any]:
    """The tensors of an exported model's ``model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(os.path.join(export_dir, "model.safetensors"))


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
