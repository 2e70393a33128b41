"""Shared test harness: one local Ray cluster, a loopback S3 endpoint, tiny Hugging Face models.

Fixtures (all lazy: a test pays only for what it asks for):

* ``ray_cluster``   one local Ray cluster (2 CPUs) shared by the whole session.
* ``s3``            a real S3-compatible server (moto in server mode) on 127.0.0.1 with a bucket; the
                    endpoint and dummy credentials are exported through the environment *before* Ray
                    starts, so Ray workers, s3fs, pyarrow and boto3 all reach it.
* ``tiny_model_dir`` a tiny random LlamaForCausalLM and its tokenizer saved in Hugging Face format.
* ``tmp_s3_prefix``  a fresh ``s3://bucket/<test>/`` prefix per test.

Markers: ``integration`` (Ray clusters, DeepSpeed engines, subprocesses) and ``e2e`` (whole CLI runs).
Run the fast unit tests alone with ``pytest -m "not integration and not e2e"``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from raypo.testing import S3Endpoint, start_moto_server

# Ray must not try to reach the internet or write usage stats from CI.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The S3 endpoint is fixed at import time and exported at once, so every process started later (Ray
# workers included) inherits it, whichever fixture a test session happens to start first.
S3_ENDPOINT = S3Endpoint(endpoint_url=f"http://127.0.0.1:{_free_port()}", bucket="raypo-test")
S3_ENDPOINT.export_environment()


@pytest.fixture(autouse=True, scope="module")
def _forget_zero3_after_module():
    """transformers keeps a process-global weakref to the last ``HfDeepSpeedConfig``; a module that built
    a ZeRO-3 engine in this process must not make a later module's ``from_pretrained`` build a
    partitioned (empty) model."""
    yield
    import sys

    hf_ds = sys.modules.get("transformers.integrations.deepspeed")
    if hf_ds is not None:
        hf_ds.unset_hf_deepspeed_config()


@pytest.fixture(scope="session")
def s3() -> S3Endpoint:
    server = start_moto_server(S3_ENDPOINT)
    yield S3_ENDPOINT
    server.stop()


@pytest.fixture
def tmp_s3_prefix(s3: S3Endpoint, request) -> str:
    safe = request.node.name.replace("[", "_").replace("]", "_").replace("/", "_")
    return f"s3://{s3.bucket}/{safe}"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from raypo.model.tiny import save_tiny_model

    out = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_model(out, seed=0)
    return out


def _curve_pixels(png: bytes) -> int:
    """How many pixels of a PNG are coloured (a plotted line), not white, grey or black (axes, text)."""
    import io

    import matplotlib.image

    rgb = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    return int(((rgb.max(-1) - rgb.min(-1)) > 0.2).sum())


@pytest.fixture
def curve_pixels():
    """``curve_pixels(png) -> int``: coloured pixels of a plot; 0 for a plot with no line drawn."""
    return _curve_pixels
