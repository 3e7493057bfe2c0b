"""A throttled, flaky object store: the real S3 server behind a fault-injecting proxy.

Every 5th PUT is answered 503 SlowDown, every 7th PUT has its connection cut mid-body,
every 6th read is a 503 and every 11th is held past the client's read timeout. The job
must finish with every id exactly once, each image's sha256 matching its metadata row; a
write that keeps failing becomes a `write` error that the next run makes good."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.pipeline.config import EngineConfig, JobConfig
from daguerre.pipeline.schema import manifest_schema
from daguerre.pipeline.storage import Storage
from s3_faults import FaultProxy, FaultRules  # tests/cpu/s3_faults.py

pytestmark = pytest.mark.timeout(600)

ROWS = [{"id": f"t-{i:02d}", "prompt": f"a throttled painting {i}", "seed": i, "steps": 2}
        for i in range(16)]  # fmt: skip


def job_config(s3_server, endpoint: str, max_attempts: int = 8) -> JobConfig:
    storage = s3_server.storage_config(endpoint_url=endpoint, read_timeout_s=2.0,
                                       max_attempts=max_attempts)  # fmt: skip
    return JobConfig(engine=EngineConfig(model="tiny", device="cpu"), storage=storage,
                     batch_size=4, actor_num_cpus=0.5)  # fmt: skip


def put_manifest(s3_server, uri: str) -> str:
    with s3_server.fs().open(uri, "wb") as fh:
        pq.write_table(pa.Table.from_pylist(ROWS, schema=manifest_schema()), fh)
    return uri


def assert_exactly_once(s3_server, out: str) -> None:
    fs = s3_server.fs()
    table = pads.dataset(out.removeprefix("s3://") + "/metadata", format="parquet",
                         filesystem=fs).to_table()  # fmt: skip
    assert sorted(table["id"].to_pylist()) == [r["id"] for r in ROWS]
    for row in table.to_pylist():
        assert hashlib.sha256(fs.cat_file(row["uri"])).hexdigest() == row["sha256"], row["id"]


def test_storage_calls_are_retried_through_throttling_and_cut_connections(s3_server):
    rules = FaultRules(slow_down_every_put=3, cut_every_put=4, slow_down_every_get=3)
    with FaultProxy(s3_server.endpoint, rules) as proxy:
        storage = Storage(
            "s3://daguerre/faults/unit", job_config(s3_server, proxy.endpoint).storage
        )
        for i in range(12):
            storage.write_bytes(f"images/{i}.png", bytes([i]) * 5000)
        assert [s3_server.fs().cat_file(f"daguerre/faults/unit/images/{i}.png")
                for i in range(12)] == [bytes([i]) * 5000 for i in range(12)]  # fmt: skip
        assert [storage.fs.cat_file(f"daguerre/faults/unit/images/{i}.png")
                for i in range(12)] == [bytes([i]) * 5000 for i in range(12)]  # fmt: skip
    assert rules.counts["slow_down_put"] >= 3 and rules.counts["cut"] >= 2
    assert rules.counts["slow_down_get"] >= 1


def test_a_job_through_a_throttling_store_writes_every_id_once(s3_server, ray_session):
    from daguerre.cluster.job import run_job

    manifest = put_manifest(s3_server, "s3://daguerre/faults/m.parquet")
    out = "s3://daguerre/faults/out"
    rules = FaultRules(slow_down_every_put=5, cut_every_put=7, slow_down_every_get=6,
                       delay_every_get=11, delay_s=3.0)  # fmt: skip
    with FaultProxy(s3_server.endpoint, rules) as proxy:
        summary = run_job(manifest, out, job_config(s3_server, proxy.endpoint), progress=False)
    assert (summary.generated, summary.errors) == (16, 0)
    assert rules.counts["slow_down_put"] and rules.counts["cut"] and rules.counts["delayed"]
    assert_exactly_once(s3_server, out)


def test_a_write_that_keeps_failing_is_an_error_the_next_run_makes_good(s3_server, ray_session):
    from daguerre.cluster.job import run_job
    from daguerre.pipeline.catalog import read_errors

    manifest = put_manifest(s3_server, "s3://daguerre/faults2/m.parquet")
    out = "s3://daguerre/faults2/out"
    rules = FaultRules(always_fail_key=r"/images/t-0[37]\.png$")
    with FaultProxy(s3_server.endpoint, rules) as proxy:
        config = job_config(s3_server, proxy.endpoint, max_attempts=2)  # fail fast
        first = run_job(manifest, out, config, progress=False)
    assert first.errors_by_stage.get("write", 0) >= 2 and first.generated == 16 - first.errors
    direct = job_config(s3_server, s3_server.endpoint)
    errors = read_errors(Storage(out, direct.storage)).to_pylist()
    failed = {e["id"] for e in errors if e["stage"] == "write"}
    assert {"t-03", "t-07"} <= failed
    assert all("the write failed after retries" in e["reason"] for e in errors)
    healed = run_job(manifest, out, direct, progress=False)
    assert healed.generated == len(failed) and healed.skipped_done == 16 - len(failed)
    assert healed.errors == 0
    assert_exactly_once(s3_server, out)
    from daguerre.pipeline.report import inspect_output

    assert inspect_output(out, direct.storage).errors == 0  # the write errors are superseded
