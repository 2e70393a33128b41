"""Fixtures for tests/launch: a real Ray head on loopback per test module (see launch_helpers.py)."""

from __future__ import annotations

import pytest
from launch_helpers import RayHead, start_ray_head, stop_ray_head


@pytest.fixture(scope="module")
def ray_head() -> RayHead:
    head, proc = start_ray_head()
    try:
        yield head
    finally:
        stop_ray_head(proc, head.temp_dir)
