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
