"""Jobs at scale: planning without the manifest in the driver, compaction that readers and
resumes never see half-done, and the figures an operator watches (progress, busy fraction,
cost)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.cluster.job import finish_output, run_job
from daguerre.cluster.planning import ParquetSource, plan_id_sets
from daguerre.pipeline.catalog import metadata_files, read_metadata
from daguerre.pipeline.compaction import JOURNAL, compact_table
from daguerre.pipeline.config import EngineConfig, JobConfig
from daguerre.pipeline.id_index import IdIndex, from_arrow, id_digests, to_arrow
from daguerre.pipeline.report import inspect_output
from daguerre.pipeline.schema import StageTimings, manifest_schema, record_schema
from daguerre.pipeline.storage import METADATA, Storage, fragment_key

pytestmark = pytest.mark.timeout(600)


def test_digests_survive_arrow_byte_for_byte():
    """A digest with a NUL byte inside (r-6's) must not be cut on its way through Arrow."""
    ids = [f"r-{i}" for i in range(2000)]
    digests = id_digests(ids)
    assert any(b"\x00" in d for d in digests.tolist())
    back = from_arrow(pa.chunked_array([to_arrow(digests[:700]), to_arrow(digests[700:])]))
    assert (back == digests).all()
    index = IdIndex.build(digests[::2])
    assert index.contains(digests).tolist() == [i % 2 == 0 for i in range(2000)]


ROWS = [{"id": f"s-{i:03d}", "prompt": f"a scaled painting {i}", "seed": i, "steps": 2,
         "width": 64, "height": 64} for i in range(12)]  # fmt: skip


def write_manifest(rows: list[dict], path: Path) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), path)
    return str(path)


def config(**extra) -> JobConfig:
    return JobConfig(batch_size=3, engine=EngineConfig(model="tiny", device="cpu"), **extra)


@pytest.fixture(scope="module")
def planned_job(ray_session, tmp_path_factory):
    """A job planned through Ray Data (plan_in_driver_rows 0), with a duplicated id and a
    price per GPU-hour; then its output and manifest."""
    root = tmp_path_factory.mktemp("scale")
    rows = [*ROWS, {"id": "s-001", "prompt": "a second s-001", "steps": 2}]
    manifest = write_manifest(rows, root / "m.parquet")
    cfg = config(plan_in_driver_rows=0, cost={"gpu_hour_usd": 3.0})
    summary = run_job(manifest, str(root / "out"), cfg, progress=False)
    return root, manifest, summary, cfg


def test_a_job_planned_through_ray_data(planned_job):
    root, manifest, summary, cfg = planned_job
    assert (summary.generated, summary.errors) == (11, 2)  # both s-001 rows are rejected
    again = run_job(manifest, str(root / "out"), cfg, progress=False)
    assert (again.generated, again.skipped_done, again.errors) == (0, 11, 2)


def test_planning_in_the_driver_and_through_ray_data_agree(planned_job, monkeypatch):
    import ray
    from daguerre.cluster import planning

    # The output's few fragments read as "many" by Ray tasks in chunks of 2 files, as an
    # uncompacted output of 100,000 fragments is.
    monkeypatch.setattr(planning, "MANY_FILES", 0)
    monkeypatch.setattr(planning, "FILES_PER_TASK", 2)

    root, manifest, _, cfg = planned_job
    changed = [dict(r) for r in ROWS]
    changed[3]["prompt"] = "another painting"
    changed.append(dict(ROWS[0]))  # s-000 twice now
    path = write_manifest(changed, root / "changed.parquet")
    out = Storage(str(root / "out"))
    from daguerre.pipeline.models import describe_model

    asked = describe_model("tiny").weights_hash()
    found = {}
    for distributed in (False, True):
        source = ParquetSource(Storage(path), [path], distributed=distributed)
        sets = plan_id_sets(source, out, asked, cfg.limits.model_dump(), 64, distributed)
        skip = ray.get(sets.skip) if distributed else sets.skip
        found[distributed] = (sets.duplicate_ids, sets.findings, skip.digests.tolist())
    assert found[False] == found[True]
    duplicates, findings, skip = found[True]
    assert duplicates == 1 and findings.changed == 1 and findings.examples == ["s-003"]
    # s-000 (duplicated now, still finished), s-001 (rejected before) and s-003 (changed) aside
    assert len(skip) == 10 and findings.finished == 12  # rows: s-000 counts twice


def test_progress_busy_fraction_and_cost_are_reported(planned_job):
    root, _, summary, _ = planned_job
    assert summary.status == "finished"
    assert summary.progress["rows_done"] == summary.progress["rows_total"] == 13
    assert summary.progress["images"] == 11 and summary.progress["errors"] == 2
    assert summary.engine_busy_fraction and summary.engine_actors == len(
        summary.engine_busy_fraction
    )
    assert all(0 < f <= 1 for f in summary.engine_busy_fraction.values())
    assert 0 < summary.engine_busy_fraction_mean <= 1
    per_image = summary.gpu_seconds_per_image
    assert per_image > 0
    assert summary.cost_per_1000_images == pytest.approx(per_image * 1000 / 3600 * 3.0, rel=1e-2)
    record = json.loads((root / "out" / "runs" / f"{summary.run_id}.json").read_text())
    assert record["status"] == "finished" and record["progress"] == summary.progress
    assert record["cost_per_1000_images"] == summary.cost_per_1000_images
    assert record["gpu_seconds_per_image"] == per_image
    assert record["engine_busy_fraction_mean"] == summary.engine_busy_fraction_mean


# -- compaction ------------------------------------------------------------------------


def synthetic_output(root: Path, fragments: int, per_fragment: int) -> tuple[Storage, set[str]]:
    """An output whose metadata is `fragments` small fragments (one row per id), and a few
    superseded rows (an id written again by a later run)."""
    storage = Storage(str(root))
    storage.check_writable()
    now = dt.datetime.now(dt.timezone.utc)
    ids: set[str] = set()
    for f in range(fragments):
        rows = []
        for r in range(per_fragment):
            image_id = f"c-{f:04d}-{r}"
            ids.add(image_id)
            rows.append(record_row(image_id, "run-a", now))
        storage.write_table(fragment_key(METADATA, "run-a", [r["id"] for r in rows]),
                            pa.Table.from_pylist(rows, schema=record_schema()))  # fmt: skip
    again = [record_row(f"c-{f:04d}-0", "run-b", now) for f in range(0, fragments, 7)]
    storage.write_table(fragment_key(METADATA, "run-b", [r["id"] for r in again]),
                        pa.Table.from_pylist(again, schema=record_schema()))  # fmt: skip
    return storage, ids


def record_row(image_id: str, run_id: str, created: dt.datetime) -> dict:
    return {"id": image_id, "prompt": "p", "negative_prompt": "", "seed": 1, "steps": 2,
            "guidance_scale": 7.5, "width": 64, "height": 64, "scheduler": "ddim",
            "model": "tiny", "metadata": {}, "speed": "exact", "uri": f"file:///{image_id}.png",
            "sha256": "0" * 64, "request_fingerprint": "f", "weights_hash": "sha256:w",
            "scheduler_config": "{}", "backend": {}, "batch_size": 1, "daguerre_version": "t",
            "timings": StageTimings().model_dump(), "node_id": "n", "actor_id": "a", "run_id": run_id,
            "created_at": created, "status": "ok"}  # fmt: skip


def test_compaction_is_exactly_once_under_readers_and_resumes(tmp_path):
    storage, ids = synthetic_output(tmp_path / "out", fragments=120, per_fragment=5)
    manifest = write_manifest(
        [{"id": i, "prompt": "p"} for i in sorted(ids)], tmp_path / "m.parquet"
    )
    source = ParquetSource(Storage(manifest), [manifest])
    seen: list[str] = []
    stop = threading.Event()

    def read_loop() -> None:
        try:
            read_until_stopped()
        except Exception as exc:  # an exception ends a thread quietly: record it
            seen.append(f"{type(exc).__name__}: {exc}")

    def read_until_stopped() -> None:  # a reader (inspect, a report) and a resume's finished ids
        while not stop.is_set():
            table = read_metadata(storage, ["id", "run_id"])
            got = table["id"].to_pylist()
            if sorted(got) != sorted(ids) or len(got) != len(set(got)):
                seen.append(f"reader saw {len(got)} rows, {len(set(got))} ids")
            sets = plan_id_sets(source, storage, "sha256:w", {}, 64, distributed=False)
            if sets.findings.finished != len(ids):
                seen.append(f"resume found {sets.findings.finished} finished")

    readers = [threading.Thread(target=read_loop) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        result = compact_table(storage, METADATA, target_bytes=40_000)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not seen, seen[:5]
    assert result.sources == 121 and result.outputs >= 2 and result.rows_in == 600 + 18
    files = metadata_files(storage)
    assert len(files) == result.outputs == result.files_after
    # superseded rows in other output files than their successors: a job's end prunes them
    from daguerre.pipeline.lease import OutputLease

    lease = OutputLease(storage, "run-c")
    lease.acquire()
    try:
        done = finish_output(storage, 40_000, "run-c")
    finally:
        lease.release()
    assert done["pruned"]["metadata"] + result.rows_in - result.rows_out == 18
    plain = pads.dataset(tmp_path / "out" / "metadata", format="parquet").to_table()
    assert sorted(plain["id"].to_pylist()) == sorted(ids)  # plain readers: one row per id
    runs = {r["id"]: r["run_id"] for r in plain.select(["id", "run_id"]).to_pylist()}
    assert runs["c-0007-0"] == "run-b" and runs["c-0001-0"] == "run-a"


@pytest.mark.parametrize("committed", [True, False])
def test_a_compaction_that_died_is_finished_by_the_next(tmp_path, committed):
    """Died after writing its outputs: committed, its sources go; not yet committed (it may
    have lost the output mid-way), its outputs go and the sources are merged again."""
    storage, ids = synthetic_output(tmp_path / "out", fragments=30, per_fragment=2)
    root = storage.root.rstrip("/") + "/"
    sources = [p.removeprefix(root) for p in metadata_files(storage)]
    dead = f"{METADATA}/compact-dead-00000.parquet"
    storage.write_table(dead, read_metadata(storage))
    storage.write_bytes(f"{METADATA}/{JOURNAL}", json.dumps(
        {"sources": sources, "outputs": [dead], "committed": committed}).encode())  # fmt: skip
    assert sorted(read_metadata(storage, ["id"])["id"].to_pylist()) == sorted(ids)
    result = compact_table(storage, METADATA, target_bytes=1 << 20)
    names = [Path(p).name for p in metadata_files(storage)]
    if committed:  # completed: nothing left to merge
        assert result.sources == 0 and names == ["compact-dead-00000.parquet"]
    else:  # rolled back, then merged afresh
        assert result.sources == len(sources) and "compact-dead-00000.parquet" not in names
    assert not storage.fs.exists(storage.path(f"{METADATA}/{JOURNAL}"))
    assert sorted(read_metadata(storage, ["id"])["id"].to_pylist()) == sorted(ids)


def test_a_compaction_that_lost_the_output_commits_nothing(tmp_path):
    storage, ids = synthetic_output(tmp_path / "out", fragments=10, per_fragment=2)
    before = metadata_files(storage)
    calls = []

    def fence() -> None:  # the lease is taken over while the outputs are written
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("no longer holds the output lease")

    with pytest.raises(RuntimeError, match="lease"):
        compact_table(storage, METADATA, target_bytes=1 << 20, fence=fence)
    assert all(Path(p).exists() for p in before)  # every source kept
    journal = json.loads(storage.fs.cat_file(storage.path(f"{METADATA}/{JOURNAL}")))
    assert journal["committed"] is False  # the next holder rolls the outputs back
    compact_table(storage, METADATA, target_bytes=1 << 20)
    assert sorted(read_metadata(storage, ["id"])["id"].to_pylist()) == sorted(ids)
    assert len(metadata_files(storage)) == 1


def test_cli_compact(tmp_path):
    storage, ids = synthetic_output(tmp_path / "out", fragments=40, per_fragment=3)
    exe = Path(sys.executable).with_name("daguerre")
    result = subprocess.run([str(exe), "compact", str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "metadata: 41 fragments -> 1 files (120 rows; 1 files now)" in result.stdout
    assert len(metadata_files(storage)) == 1
    report = inspect_output(str(tmp_path / "out"))
    assert report.images == report.metadata_rows == len(ids)
    missing = subprocess.run([str(exe), "compact", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "not a daguerre output" in missing.stderr


def test_id_index_values_follow_their_digests():
    digests = id_digests(["b", "a", "c", "a"])
    index = IdIndex.build(digests, np.array([1, 2, 3, 4]))
    found, at = index.positions(id_digests(["a", "c", "z"]))
    assert found.tolist() == [True, True, False]
    assert index.values[at[:2]].tolist() == [2, 3]  # the first "a" wins


def test_job_metrics_are_scraped_from_rays_metrics_endpoint(planned_job):
    from conftest import scrape_metrics

    found = scrape_metrics({
        'ray_daguerre_images_total{pool="job"}': 11,
        'ray_daguerre_errors_total{stage="validate"}': 2,
        'ray_daguerre_stage_seconds_count{stage="prepare"}': 1,
        'ray_daguerre_stage_seconds_count{stage="generate"}': 4,
        'ray_daguerre_stage_seconds_count{stage="write"}': 4,
    })  # fmt: skip
    assert found['ray_daguerre_images_total{pool="job"}'] >= 11, found
    assert found['ray_daguerre_errors_total{stage="validate"}'] >= 2, found
    assert found['ray_daguerre_stage_seconds_count{stage="generate"}'] >= 4, found
    assert found['ray_daguerre_stage_seconds_count{stage="write"}'] >= 4, found
    # (the job's engine busy-fraction gauge lives with its actor, gone once the job ends:
    # the Serve test scrapes a live replica's)


# -- outputs training pipelines read directly --------------------------------------------


def test_webdataset_shards_hold_every_id_once_and_resume(ray_session, tmp_path):
    import hashlib
    import io

    import webdataset as wds
    from PIL import Image

    long_id = "catalog-" + "x" * 150 + ".v2"  # past ustar's 100-byte member names
    rows = [*ROWS, {"id": "s.dotted", "prompt": "a dotted id", "steps": 2},
            {"id": long_id, "prompt": "a long id", "steps": 2}]  # fmt: skip
    manifest = write_manifest(rows, tmp_path / "m.parquet")
    out = tmp_path / "out"
    cfg = config(output_format="webdataset", shard_images=5, key_prefix="hashed")
    summary = run_job(manifest, str(out), cfg, progress=False)
    assert summary.generated == 14
    shards = sorted(out.glob("shards/*/*.tar"))
    assert len(shards) >= 3 and not (out / "images").exists()
    for shard in shards:  # named by content, under a prefix of the name's own digest
        assert hashlib.sha256(shard.read_bytes()).hexdigest()[:32] == shard.stem
        assert shard.parent.name == shard.stem[:2]
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    by_id = {}
    for sample in samples:
        meta = json.loads(sample["json"])
        assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)
        assert hashlib.sha256(sample["png"]).hexdigest() == meta["sha256"]
        by_id[meta["id"]] = meta
    assert sorted(by_id) == sorted(r["id"] for r in rows) and len(samples) == 14
    records = read_metadata(Storage(str(out)), ["id", "uri", "sha256"]).to_pylist()
    listed = {r["uri"].split("#")[0].removeprefix("file://") for r in records}
    assert listed == {str(s) for s in shards}  # every shard is listed in the metadata
    assert all(r["sha256"] == by_id[r["id"]]["sha256"] for r in records)
    again = run_job(manifest, str(out), cfg, progress=False)
    assert again.generated == 0 and again.skipped_done == 14
    assert sorted(out.glob("shards/*/*.tar")) == shards


def test_hashed_key_prefixes_spread_images(ray_session, tmp_path):
    from daguerre.pipeline.storage import image_key

    manifest = write_manifest(ROWS[:4], tmp_path / "m.parquet")
    summary = run_job(manifest, str(tmp_path / "out"), config(key_prefix="hashed"), progress=False)
    assert summary.generated == 4
    for row in ROWS[:4]:
        key = image_key(row["id"], hashed=True)
        assert key.count("/") == 2 and (tmp_path / "out" / key).is_file()
