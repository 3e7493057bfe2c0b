"""Exactly once under faults, on the real S3 server: a worker node killed mid-job, and the
driver killed mid-job then rerun. Every valid id ends with exactly one metadata row, its
image exists and its sha256 matches the row."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.pipeline.schema import manifest_schema

pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).resolve().parent


def manifest_rows(n: int, bad: int = 2) -> list[dict]:
    rows = [{"id": f"img-{i:03d}", "prompt": f"a fault-tolerant painting {i % 7}", "seed": i,
             "steps": 6} for i in range(n)]  # fmt: skip
    rows += [{"id": f"bad-{i}", "prompt": "x", "steps": 0} for i in range(bad)]
    return rows


def put_manifest(s3_server, uri: str, rows: list[dict]) -> str:
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    with s3_server.fs().open(uri, "wb") as fh:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), fh)
    return uri


def assert_exactly_once(s3_server, out: str, valid_ids: set[str]) -> list[dict]:
    """Each valid id has exactly one metadata row; its image exists with the row's sha256."""
    fs = s3_server.fs()
    prefix = out.removeprefix("s3://")
    rows = pads.dataset(f"{prefix}/metadata", format="parquet", filesystem=fs).to_table()
    rows = rows.select(["id", "uri", "sha256"]).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate metadata rows"
    assert set(ids) == valid_ids
    for row in rows:
        assert hashlib.sha256(fs.cat_file(row["uri"])).hexdigest() == row["sha256"], row["id"]
    images = {p.rsplit("/", 1)[-1] for p in fs.find(f"{prefix}/images")}
    assert images == {f"{i}.png" for i in valid_ids}
    return rows


def run_summaries(s3_server, out: str) -> list[dict]:
    fs = s3_server.fs()
    paths = sorted(fs.find(f"{out.removeprefix('s3://')}/runs"))
    return [json.loads(fs.cat_file(p)) for p in paths]


def test_worker_node_killed_mid_job(s3_server):
    rows = manifest_rows(40)
    manifest = put_manifest(s3_server, "s3://daguerre/faults/node/manifest.parquet", rows)
    out = "s3://daguerre/faults/node/out"
    env = {**os.environ, **s3_server.env()}
    result = subprocess.run(
        [sys.executable, str(HERE / "cluster_job.py"), manifest, out],
        env=env, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (result.stdout + result.stderr)[-4000:]
    report = json.loads(lines[-1].removeprefix("RESULT "))
    assert report["killed"] is not None, "no worker node was killed mid-job"
    assert report["killed"]["images_before_kill"] < 40
    assert len(report["nodes_with_images"]) >= 2  # the actor pool spanned both worker nodes
    summary = report["summary"]
    assert summary["generated"] == 40 and summary["errors"] == 2  # each id counted once
    valid = {r["id"] for r in rows if r["id"].startswith("img-")}
    assert_exactly_once(s3_server, out, valid)


def test_driver_killed_mid_job_then_rerun_at_once(s3_server, tmp_path):
    """SIGKILL the driver, rerun at once: the rerun takes over the lease of the dead driver,
    the orphaned workers stop writing at their next lease check, and every id ends with
    one row whose sha256 matches its image, whatever the orphans still wrote."""
    rows = manifest_rows(40)
    manifest = put_manifest(s3_server, "s3://daguerre/faults/driver/manifest.parquet", rows)
    out = "s3://daguerre/faults/driver/out"
    exe = Path(sys.executable).with_name("daguerre")
    command = [str(exe), "generate", manifest, "--out", out, "--batch-size", "2", "--no-progress"]
    env = {**os.environ, **s3_server.env()}
    fs = s3_server.fs()
    meta = f"{out.removeprefix('s3://')}/metadata"

    driver = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if fs.exists(meta) and len(fs.ls(meta)) >= 2:
            break
        time.sleep(0.3)
    assert driver.poll() is None, "the job ended before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)  # the driver only: no clean-up, no atexit
    driver.wait()

    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=400)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the output lease of a run that is gone" in rerun.stderr
    summary = run_summaries(s3_server, out)[-1]
    assert summary["generated"] + summary["skipped_done"] == 40
    assert 0 < summary["skipped_done"] < 40
    valid = {r["id"] for r in rows if r["id"].startswith("img-")}
    assert_exactly_once(s3_server, out, valid)


def test_a_second_run_into_the_same_output_is_refused(s3_server, tmp_path):
    """Two runs of one manifest into one output at once (other batch sizes): the second
    refuses with one line naming the first, and the first ends with every id once."""
    rows = manifest_rows(16, bad=0)
    manifest = put_manifest(s3_server, "s3://daguerre/faults/twice/manifest.parquet", rows)
    out = "s3://daguerre/faults/twice/out"
    exe = Path(sys.executable).with_name("daguerre")
    env = {**os.environ, **s3_server.env()}
    base = [str(exe), "generate", manifest, "--out", out, "--no-progress"]
    first = subprocess.Popen([*base, "--batch-size", "2"], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    fs = s3_server.fs()
    lease = f"{out.removeprefix('s3://')}/_lease.json"
    deadline = time.time() + 120
    while not fs.exists(lease) and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    holder = json.loads(fs.cat_file(lease))
    second = subprocess.run([*base, "--batch-size", "4"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert second.returncode == 2
    line = second.stderr.strip().splitlines()
    assert len(line) == 1, second.stderr
    assert f"is being written by run {holder['run_id']} (host {holder['host']}, pid " in line[0]
    assert line[0].endswith("wait for it to finish or use another --out")
    _, err = first.communicate(timeout=400)
    assert first.returncode == 0, err[-3000:]
    assert_exactly_once(s3_server, out, {r["id"] for r in rows})
    assert json.loads(fs.cat_file(lease))["released"] is True
