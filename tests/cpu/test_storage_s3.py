"""Object storage against a real S3 server (SeaweedFS on 127.0.0.1, with access keys)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.pipeline.config import EngineConfig, JobConfig
from daguerre.pipeline.schema import manifest_schema
from daguerre.pipeline.storage import Storage, StorageError
from PIL import Image

pytestmark = pytest.mark.timeout(300)

ROWS = [
    {"id": f"s3-{i}", "prompt": f"a bucket of paint {i}", "seed": i, "steps": 3} for i in range(5)
] + [{"id": "s3-bad", "prompt": "x", "steps": 0}]


def put_manifest(fs, uri: str, rows: list[dict]) -> str:
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    with fs.open(uri, "wb") as fh:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), fh)
    return uri


def test_storage_round_trip_and_atomic_names(s3_server):
    storage = Storage("s3://daguerre/roundtrip", s3_server.storage_config())
    uri = storage.write_bytes("images/a/b.png", b"png-bytes")
    assert uri == "s3://daguerre/roundtrip/images/a/b.png"
    assert s3_server.fs().cat_file("daguerre/roundtrip/images/a/b.png") == b"png-bytes"
    table = pa.table({"id": ["x", "y"]})
    storage.write_table("metadata/part-1.parquet", table)
    storage.write_bytes("metadata/_partial.parquet", b"not parquet")  # ignored by readers
    assert sorted(storage.read_table("metadata", columns=["id"])["id"].to_pylist()) == ["x", "y"]
    storage.check_writable()
    assert "secret" not in repr(storage)


def test_job_reads_and_writes_s3(s3_server, ray_session):
    from daguerre.cluster.job import run_job

    fs = s3_server.fs()
    manifest = put_manifest(fs, "s3://daguerre/jobs/manifest.parquet", ROWS)
    out = "s3://daguerre/jobs/out"
    config = JobConfig(
        engine=EngineConfig(model="tiny", device="cpu"),
        storage=s3_server.storage_config(),
        batch_size=2,
        actor_num_cpus=0.5,
    )
    summary = run_job(manifest, out, config, progress=False)
    assert (summary.generated, summary.errors) == (5, 1)

    # Plain pyarrow over s3fs, no daguerre code: one row per image, sha256 matches the object.
    table = pads.dataset("daguerre/jobs/out/metadata", format="parquet", filesystem=fs).to_table()
    assert sorted(table.column("id").to_pylist()) == [f"s3-{i}" for i in range(5)]
    for row in table.to_pylist():
        data = fs.cat_file(row["uri"])
        assert row["uri"] == f"{out}/images/{row['id']}.png"
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    errors = pads.dataset("daguerre/jobs/out/errors", format="parquet", filesystem=fs).to_table()
    assert errors.column("id").to_pylist() == ["s3-bad"]

    # And Ray Data reads it as is.
    import ray

    ds = ray.data.read_parquet(f"{out}/metadata", filesystem=fs)
    assert ds.count() == 5

    again = run_job(manifest, out, config, progress=False)
    assert again.generated == 0 and again.skipped_done == 5

    from daguerre.pipeline.report import inspect_output

    report = inspect_output(out, config.storage)
    assert (report.images, report.metadata_rows, report.errors) == (5, 5, 1)
    assert list(report.models) == [f"tiny ({table.column('weights_hash')[0].as_py()[:19]})"]
    assert report.nodes == 1 and report.stage_s["denoise_s"] > 0


def test_wrong_credentials_fail_before_any_actor_without_the_secret(s3_server, ray_session):
    from daguerre.cluster.job import run_job

    wrong = "wrong-secret-value-987654321"
    config = JobConfig(storage=s3_server.storage_config(secret_access_key=wrong))
    with pytest.raises(StorageError) as info:
        run_job("s3://daguerre/jobs/manifest.parquet", "s3://daguerre/x", config, progress=False)
    message = str(info.value)
    assert message.startswith("s3://daguerre/jobs/manifest.parquet: access denied")
    assert wrong not in message and s3_server.secret not in message
    assert len(message.splitlines()) == 1


def test_missing_bucket_and_unreachable_endpoint_are_named(s3_server):
    good = s3_server.storage_config()
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/out: no such bucket"):
        Storage("s3://no-such-bucket/out", good).check_writable()
    dead = s3_server.storage_config(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(StorageError, match=r"cannot reach the storage endpoint http://127.0.0.1:9"):
        Storage("s3://daguerre/out", dead).check_writable()


def test_cli_wrong_credentials_one_line_exit_2(s3_server, tmp_path):
    wrong = "cli-wrong-secret-123"
    env = {**os.environ, **s3_server.env(), "AWS_SECRET_ACCESS_KEY": wrong}
    exe = Path(sys.executable).with_name("daguerre")
    result = subprocess.run(
        [str(exe), "generate", "s3://daguerre/jobs/manifest.parquet", "--out", "s3://daguerre/y"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "access denied" in lines[0], result.stderr
    assert wrong not in result.stderr + result.stdout


def test_model_weights_from_s3_are_cached_per_node(s3_server, tmp_path, monkeypatch, tiny_engine):
    from daguerre.pipeline.engine import DiffusionEngine
    from daguerre.pipeline.model_build import save_model
    from daguerre.pipeline.model_files import fetch_model, folder_weights_hash
    from daguerre.pipeline.schema import ImageRequest

    local = save_model(tiny_engine.model, tmp_path / "tiny-folder")
    fs = s3_server.fs()
    fs.put(str(local), "daguerre/models/tiny-folder", recursive=True)
    monkeypatch.setenv("DAGUERRE_CACHE", str(tmp_path / "cache"))
    uri = "s3://daguerre/models/tiny-folder"
    config = s3_server.storage_config()
    cached = fetch_model(uri, config)
    assert cached.parent == tmp_path / "cache" / "models"
    assert folder_weights_hash(cached) == folder_weights_hash(local)
    assert fetch_model(uri, config) == cached  # the second actor on this node reuses it

    engine = DiffusionEngine(EngineConfig(model=uri, device="cpu"), storage_config=config)
    assert engine.model.name == "tiny-folder"
    assert engine.model.weights_hash == folder_weights_hash(local)
    request = ImageRequest(id="m", prompt="a model from a bucket", seed=4, steps=3)
    a = engine.generate([request])[0].image
    b = tiny_engine.generate([request])[0].image
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_conditional_writes_on_the_s3_server(s3_server):
    """The lease's compare-and-swap: If-None-Match on create, If-Match on replace."""
    from daguerre.pipeline.storage import PreconditionFailed

    storage = Storage("s3://daguerre/cas", s3_server.storage_config())
    first = storage.swap_bytes("_lease.json", b"one", None)
    with pytest.raises(PreconditionFailed):
        storage.swap_bytes("_lease.json", b"two", None)  # exists already
    second = storage.swap_bytes("_lease.json", b"three", first)
    with pytest.raises(PreconditionFailed):
        storage.swap_bytes("_lease.json", b"four", first)  # stale version
    assert storage.read_versioned("_lease.json") == (b"three", second)
