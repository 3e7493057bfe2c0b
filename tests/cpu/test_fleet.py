"""One fleet, as a user runs it: a Ray head with logical GPUs, `daguerre serve --address`
with two models (tiny autoscaling 1..2, tiny-xl), and `daguerre generate --via-serve`
sending batch jobs through the same replicas, next to online traffic.

The engines run on the CPU while each replica holds a logical GPU, as Ray schedules them
on a GPU node. Everything here goes through the command line and HTTP, as a user's would;
tests/cpu/fleet_tool.py asks the cluster what the tests check (replica counts, free CPUs)
from a process of its own.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.pipeline.schema import manifest_schema
from PIL import Image

pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).resolve().parent
EXE = Path(sys.executable).with_name("daguerre")
SERVE_YAML = """\
port: {port}
output: {output}
models:
  - name: tiny
    engine: {{model: tiny, max_batch_size: 4, torch_threads: 1}}
    min_replicas: 1
    max_replicas: 2
    target_ongoing_requests: 2
    upscale_delay_s: 1
    downscale_delay_s: 4
    look_back_period_s: 3
    num_cpus: 1
  - name: tiny-xl
    engine: {{model: tiny-xl, max_batch_size: 4, torch_threads: 1}}
    num_cpus: 0.5
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Fleet:
    address: str
    url: str
    root: Path


def _stop_head(temp_dir: str) -> None:
    """Stop this test's Ray head by the processes under its temp dir (never `ray stop`)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    temp_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")
    port, http_port = free_port(), free_port()
    start = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
             "--num-cpus=8", "--num-gpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             "--include-dashboard=false", "--node-ip-address=127.0.0.1"]  # fmt: skip
    # Load reports every second (Serve's default is 10 s), so autoscaling shows within a test.
    env = {**os.environ, "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}  # fmt: skip
    subprocess.run(start, check=True, capture_output=True, timeout=120, env=env)
    address = f"127.0.0.1:{port}"
    config = root / "fleet.yaml"
    config.write_text(SERVE_YAML.format(port=http_port, output=root / "serve-out"))
    server = subprocess.Popen([str(EXE), "serve", "--config", str(config), "--address", address],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if "daguerre serving" in line:
                break
        assert server.poll() is None, "".join(lines)[-3000:]
        yield Fleet(address=address, url=f"http://127.0.0.1:{http_port}", root=root)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        _stop_head(temp_dir)


def manifest(root: Path, name: str, n: int, steps: int = 3, photos: bool = False) -> str:
    rows = [{"id": f"{name}-{i:03d}", "prompt": f"a fleet painting {i % 5}", "seed": i,
             "steps": steps, "width": 64 if i % 3 else 96, "height": 64} for i in range(n)]  # fmt: skip
    if photos:  # every fourth row restyles a photo (img2img), its pixels sent to the replicas
        pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "photo.png")
        for row in rows[::4]:
            row.update(init_image="photo.png", strength=0.5)
    rows.append({"id": f"{name}-bad", "prompt": "x", "steps": 0})
    path = root / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), path)
    return str(path)


def generate(*args: str, cwd: Path, timeout: float = 540) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), "generate", *args, "--no-progress"], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def metadata(out: Path) -> list[dict]:
    return pads.dataset(out / "metadata", format="parquet").to_table().to_pylist()


def last_run(out: Path) -> dict:
    return json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())


def exactly_once(out: Path, ids: set[str]) -> list[dict]:
    rows = metadata(out)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for row in rows:
        data = (out / "images" / f"{row['id']}.png").read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"], row["id"]
    return rows


def tool(*args: str) -> str:
    return subprocess.run([sys.executable, str(HERE / "fleet_tool.py"), *args], check=True,
                          capture_output=True, text=True, timeout=120).stdout  # fmt: skip


def wait_for(condition, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


# -- batch through the online replicas --------------------------------------------------


def test_via_serve_equals_the_dedicated_pool(fleet, tmp_path):
    m = manifest(tmp_path, "same", 10, photos=True)
    shared, dedicated = tmp_path / "shared", tmp_path / "dedicated"
    a = generate(m, "--out", str(shared), "--address", fleet.address, "--via-serve", cwd=tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    b = generate(m, "--out", str(dedicated), "--address", fleet.address, "--model", "tiny",
                 "--batch-size", "4", cwd=tmp_path)  # fmt: skip
    assert b.returncode == 0, b.stderr[-3000:]
    ids = {f"same-{i:03d}" for i in range(10)}
    via = {r["id"]: r for r in exactly_once(shared, ids)}
    own = {r["id"]: r for r in exactly_once(dedicated, ids)}
    for key in ids:
        for field in ("seed", "width", "height", "steps", "scheduler", "model", "weights_hash",
                      "request_fingerprint", "init_sha256", "steps_run"):  # fmt: skip
            assert via[key][field] == own[key][field], (key, field)
        x = np.asarray(Image.open(shared / "images" / f"{key}.png")).astype(int)
        y = np.asarray(Image.open(dedicated / "images" / f"{key}.png")).astype(int)
        assert np.abs(x - y).max() <= 1  # 1/255
    assert not {r["actor_id"] for r in via.values()} & {r["actor_id"] for r in own.values()}
    assert sum(r["init_image"] == "photo.png" for r in via.values()) == 3
    record = last_run(shared)
    assert record["config"]["engine_pool"] == "serve" and record["errors"] == 1
    errors = pads.dataset(shared / "errors", format="parquet").to_table().to_pylist()
    assert [e["id"] for e in errors] == ["same-bad"]
    again = generate(m, "--out", str(shared), "--address", fleet.address, "--via-serve",
                     cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0 and last_run(shared)["skipped_done"] == 10  # resume


def test_online_is_answered_while_a_job_saturates_the_replicas(fleet, tmp_path):
    m = manifest(tmp_path, "busy", 60, steps=6)
    out = tmp_path / "busy-out"
    job = subprocess.Popen([str(EXE), "generate", m, "--out", str(out), "--address",
                            fleet.address, "--via-serve", "--no-progress"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    count = lambda: len(metadata(out)) if (out / "metadata").exists() else 0  # noqa: E731
    wait_for(lambda: count() > 0, "the batch job's first images")
    before = count()
    for i in range(4):
        resp = httpx.post(f"{fleet.url}/v1/images/generations", timeout=300,
                          json={"prompt": f"online {i}", "size": "64x64", "steps": 4})  # fmt: skip
        assert resp.status_code == 200, resp.text
        image = Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"])))
        assert image.size == (64, 64)
    assert job.poll() is None or count() > before  # the job went on meanwhile
    _, err = job.communicate(timeout=540)
    assert job.returncode == 0, err[-3000:]
    exactly_once(out, {f"busy-{i:03d}" for i in range(60)})
    stats = httpx.get(f"{fleet.url}/v1/stats").json()["tiny"]
    assert stats["images_online"] + stats["images_batch"] > 0


def test_a_replica_killed_mid_job_loses_nothing(fleet, tmp_path):
    m = manifest(tmp_path, "kill", 40, steps=6)
    out = tmp_path / "kill-out"
    job = subprocess.Popen([str(EXE), "generate", m, "--out", str(out), "--address",
                            fleet.address, "--via-serve", "--no-progress"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: (out / "metadata").exists() and len(metadata(out)) >= 4, "some images")
    killed = json.loads(tool("kill-replica", fleet.address, "daguerre", "Engine-tiny"))
    assert killed["killed"].startswith("SERVE_REPLICA::daguerre#Engine-tiny#")
    _, err = job.communicate(timeout=540)
    assert job.returncode == 0, err[-3000:]
    exactly_once(out, {f"kill-{i:03d}" for i in range(40)})
    assert last_run(out)["generated"] == 40


# -- autoscaling -----------------------------------------------------------------------------


def test_serve_replicas_scale_up_under_load_and_back_down(fleet, tmp_path):
    log = tmp_path / "replicas.log"
    watcher = subprocess.Popen([sys.executable, str(HERE / "fleet_tool.py"), "watch",
                                fleet.address, "daguerre", "Engine-tiny", str(log)])  # fmt: skip
    try:
        counts = lambda: [int(line.split()[1]) for line in log.read_text().splitlines()]  # noqa: E731
        wait_for(lambda: log.exists() and counts() and counts()[-1] == 1, "one replica at rest")
        m = manifest(tmp_path, "load", 160, steps=20)
        out = tmp_path / "load-out"
        job = subprocess.Popen([str(EXE), "generate", m, "--out", str(out), "--address",
                                fleet.address, "--via-serve", "--no-progress"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # online traffic besides
            online = [pool.submit(httpx.post, f"{fleet.url}/v1/images/generations", timeout=300,
                                  json={"prompt": f"o{i}", "size": "64x64", "steps": 4})
                      for i in range(8)]  # fmt: skip
            wait_for(lambda: max(counts()) >= 2, "a second replica under load")
            assert all(f.result().status_code == 200 for f in online)
        _, err = job.communicate(timeout=540)
        assert job.returncode == 0, err[-3000:]
        rows = exactly_once(out, {f"load-{i:03d}" for i in range(160)})
        wait_for(lambda: counts()[-1] == 1, "back to one replica when idle", timeout=120)
    finally:
        watcher.kill()
    by_replica = {}
    for row in rows:
        by_replica[row["actor_id"]] = by_replica.get(row["actor_id"], 0) + 1
    assert len(by_replica) >= 2, by_replica  # the added replica took batch work
    assert min(by_replica.values()) >= 0.1 * len(rows), by_replica


def test_dedicated_pool_grows_under_backlog_and_gives_actors_back(fleet, tmp_path):
    free_before = json.loads(tool("free-cpus", fleet.address))
    config = tmp_path / "job.yaml"
    config.write_text("engine: {model: tiny, device: cpu, torch_threads: 1}\n"
                      "batch_size: 2\nactor_num_cpus: 1\n")  # fmt: skip
    m = manifest(tmp_path, "grow", 120, steps=20)  # long enough for added actors to help
    out = tmp_path / "grow-out"
    result = generate(m, "--out", str(out), "--address", fleet.address, "--config", str(config),
                      "--actors", "1:3", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = last_run(out)
    assert record["engine_actors"] >= 2, record["engine_actors_over_time"]
    assert max(n for _, n in record["engine_actors_over_time"]) >= 2, record[
        "engine_actors_over_time"
    ]
    wait_for(lambda: json.loads(tool("free-cpus", fleet.address)) >= free_before,
             "the job's actors to give their CPUs back", timeout=120)  # fmt: skip


# -- several models, bad --via-serve ---------------------------------------------------------


def test_two_models_on_one_fleet(fleet, tmp_path):
    models = httpx.get(f"{fleet.url}/v1/models").json()["data"]
    assert sorted(m["id"] for m in models) == ["tiny", "tiny-xl"]
    resp = httpx.post(f"{fleet.url}/v1/generate", timeout=300, json={
        "model": "tiny-xl", "requests": [{"prompt": "an xl cup", "steps": 3}]})  # fmt: skip
    assert resp.status_code == 200 and resp.json()["data"][0]["record"]["model"] == "tiny-xl"
    missing = httpx.post(f"{fleet.url}/v1/images/generations", json={"prompt": "x", "model": "sd3"})
    assert missing.status_code == 404
    assert "served: tiny, tiny-xl" in missing.json()["error"]["message"]
    m = manifest(tmp_path, "xl", 4)
    out = tmp_path / "xl-out"
    job = generate(m, "--out", str(out), "--address", fleet.address, "--via-serve", "--model",
                   "tiny-xl", cwd=tmp_path)  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    assert {r["model"] for r in exactly_once(out, {f"xl-{i:03d}" for i in range(4)})} == {"tiny-xl"}


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--via-serve", "nope"], "--via-serve: no Serve app 'nope' on this cluster (apps: daguerre)"),
        (["--via-serve", "--model", "small"],
         "--via-serve: Serve app 'daguerre' serves tiny, tiny-xl, not 'small'"),
        (["--via-serve", "--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    ],
    ids=["no-such-app", "other-model", "unreachable"],
)  # fmt: skip
def test_a_bad_via_serve_is_one_line_before_any_row_is_read(fleet, tmp_path, flags, reason):
    args = ["no-such-manifest.parquet", "--out", str(tmp_path / "o")]  # never read
    if "--address" not in flags:
        args += ["--address", fleet.address]
    result = generate(*args, *flags, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"daguerre: error: {reason}"), lines
