"""Fixtures for tests/cluster: a two-node Ray cluster on loopback (cluster_helpers.py) whose nodes share
nothing with the driver but the S3 endpoint, and the run's inputs on that endpoint.

The nodes may not touch the driver's directories (its HOME and working directory under ``driver/``) nor
pytest's temporary directories, where a test keeps its local files: on a real cluster those exist only on
the machine the driver runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_helpers import LocalCluster, new_cluster

from raypo.testing import S3Endpoint


@dataclass
class Driver:
    """Where a driver runs: its own HOME and working directory, both off limits to the nodes."""

    home: Path
    cwd: Path


@dataclass
class S3Inputs:
    """A run's inputs, on S3 only: the tiny model and the training data."""

    prefix: str  # s3://bucket/cluster
    model: str
    data: str


@pytest.fixture(scope="module")
def driver_dirs(tmp_path_factory) -> Driver:
    root = Path(tmp_path_factory.mktemp("driver"))
    home, cwd = root / "home", root / "cwd"
    home.mkdir()
    cwd.mkdir()
    return Driver(home=home, cwd=cwd)


@pytest.fixture(scope="module")
def two_nodes(driver_dirs, tmp_path_factory, s3) -> LocalCluster:
    """A head (3 CPUs: the driver's Ray Data stages and one training worker) and ``node2`` (2 CPUs), each
    with its own HOME, working directory and temp dir; pytest's temporary directories (the driver's among
    them) are off limits to both."""
    cluster = new_cluster(forbidden=[str(tmp_path_factory.getbasetemp())])
    try:
        cluster.start_head(cpus=3)
        cluster.start_node("node2", cpus=2)
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def s3_inputs(s3: S3Endpoint, tiny_model_dir: Path) -> S3Inputs:
    """The tiny Llama and 4 synthetic prompts uploaded to S3 (the nodes never see the local copies)."""
    from raypo.data.io import write_table
    from raypo.data.synthetic import generate_table

    prefix = f"s3://{s3.bucket}/cluster"
    fs = s3.s3fs()
    for path in sorted(tiny_model_dir.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{s3.bucket}/cluster/model/{path.relative_to(tiny_model_dir)}")
    data = write_table(generate_table(num_prompts=4, seed=1), f"{prefix}/data/train.parquet")
    return S3Inputs(prefix=prefix, model=f"{prefix}/model", data=data)
