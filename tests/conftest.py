"""Shared fixtures: a local Ray cluster for the session, the tiny engine, temp outputs."""

from __future__ import annotations

import os
import tempfile

import pytest

# Ray's sockets live under its temp dir; keep the path short (AF_UNIX limit) and private.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, on 127.0.0.1 only."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(
        num_cpus=4,  # logical CPUs: an engine actor (1) leaves room for reads and writes
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_engine():
    """A DiffusionEngine on the tiny preset (CPU, float32)."""
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine

    return DiffusionEngine(EngineConfig(model="tiny", device="cpu", max_batch_size=8))
