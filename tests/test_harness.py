"""The shared fixtures work against real services: S3 over HTTP on loopback, a Ray cluster, HF models."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

TABLE = pa.table({"prompt_id": ["a", "b"], "responses": [["x", "y"], ["u", "v", "w"]]})


def test_s3_parquet_through_s3fs(s3, tmp_s3_prefix):
    fs = s3.s3fs()
    path = f"{tmp_s3_prefix}/s3fs.parquet".removeprefix("s3://")
    with fs.open(path, "wb") as f:
        pq.write_table(TABLE, f)
    # A fresh client, so nothing comes from a cache: the bytes went over HTTP to the server.
    fresh = type(fs)(skip_instance_cache=True, **s3.s3fs_options())
    assert fresh.exists(path)
    with fresh.open(path, "rb") as f:
        assert pq.read_table(f).equals(TABLE)


def test_s3_parquet_through_pyarrow(s3, tmp_s3_prefix):
    fs = s3.pyarrow_filesystem()
    path = f"{tmp_s3_prefix}/arrow.parquet".removeprefix("s3://")
    pq.write_table(TABLE, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(TABLE)
    # The object is visible to an independent client (boto3) too.
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert path.split("/", 1)[1] in keys


def test_s3_environment_reaches_default_clients(s3, tmp_s3_prefix):
    # Code that is given only an s3:// URI (no explicit endpoint) must find the loopback server through
    # the environment that the harness exported.
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    path = f"{tmp_s3_prefix}/env.txt".removeprefix("s3://")
    fs.pipe(path, b"hello")
    assert s3.s3fs().cat(path) == b"hello"


@pytest.mark.integration
def test_ray_cluster_runs_a_task(ray_cluster):
    ray = ray_cluster

    @ray.remote
    def square(x):
        import os

        return x * x, os.getpid()

    results = ray.get([square.remote(i) for i in range(4)])
    assert [r[0] for r in results] == [0, 1, 4, 9]
    assert ray.cluster_resources()["CPU"] == 2


def test_tiny_model_loads_and_runs(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    ids = tok("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tok.decode(ids[0], skip_special_tokens=True).replace(" ", "") == "Whatis2+3?"
