"""The Ray Data batch job end to end: images, metadata, errors, resume."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.cluster.job import run_job
from daguerre.pipeline.config import EngineConfig, JobConfig
from daguerre.pipeline.manifest import ManifestError, inspect_manifest
from daguerre.pipeline.schema import ImageRequest, manifest_schema
from PIL import Image

pytestmark = pytest.mark.timeout(300)

VALID = [
    {"id": "ok-0", "prompt": "a lighthouse", "seed": 1, "steps": 3, "metadata": {"sku": "A-1"}},
    {"id": "ok-1", "prompt": "a teapot", "seed": 2, "steps": 3, "scheduler": "euler_a"},
    {"id": "ok-2", "prompt": "a fox", "seed": 3, "steps": 2, "width": 96, "height": 64},
    {"id": "nested/ok-3", "prompt": "a leaf", "steps": 3},
    {"id": "ok-4", "prompt": "a map", "seed": 5, "steps": 3, "guidance_scale": 1.0},
    {
        "id": "ok-5",
        "prompt": "a cat",
        "seed": 6,
        "steps": 3,
        "scheduler": "dpmpp_2m",
        "model": "tiny",
    },
    {"id": "ok-6", "prompt": "a greenhouse", "seed": 7, "steps": 3},
]
BAD = {  # id -> (row, field the error must name)
    "no-prompt": ({"id": "no-prompt"}, "prompt"),
    "empty-prompt": ({"id": "empty-prompt", "prompt": "  "}, "prompt"),
    "zero-steps": ({"id": "zero-steps", "prompt": "x", "steps": 0}, "steps"),
    "many-steps": ({"id": "many-steps", "prompt": "x", "steps": 999}, "steps"),
    "odd-width": ({"id": "odd-width", "prompt": "x", "width": 100}, "width"),
    "huge-height": ({"id": "huge-height", "prompt": "x", "height": 8192}, "height"),
    "neg-seed": ({"id": "neg-seed", "prompt": "x", "seed": -5}, "seed"),
    "bad-scheduler": ({"id": "bad-scheduler", "prompt": "x", "scheduler": "plms"}, "scheduler"),
    "": ({"id": "", "prompt": "x"}, "id"),
    "dup": ({"id": "dup", "prompt": "x"}, "id"),
    "../escape": ({"id": "../escape", "prompt": "x"}, "id"),
    "/abs": ({"id": "/abs", "prompt": "x"}, "id"),
    "back\\slash": ({"id": "back\\slash", "prompt": "x"}, "id"),
    "ctrl\x01": ({"id": "ctrl\x01", "prompt": "x"}, "id"),
    "other-model": ({"id": "other-model", "prompt": "x", "model": "sdxl"}, "model"),
}


def write(rows, path: Path) -> str:
    # Nullable everywhere: a real manifest can hold the nulls the job must reject.
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory):
    """One job over a manifest with every kind of bad row, run once for the module."""
    root = tmp_path_factory.mktemp("job")
    rows = [*VALID, *(row for row, _ in BAD.values()), {"id": "dup", "prompt": "y"}]
    manifest = write(rows, root / "manifest.parquet")
    out = root / "out"
    config = JobConfig(batch_size=3, engine=EngineConfig(model="tiny", device="cpu"))
    summary = run_job(manifest, str(out), config, progress=False)
    return {
        "manifest": manifest,
        "out": out,
        "config": config,
        "summary": summary,
        "rows": len(rows),
    }


def metadata(out: Path):
    return pads.dataset(out / "metadata", format="parquet").to_table()


def test_counts(job):
    s = job["summary"]
    assert s.manifest_rows == job["rows"]
    assert s.generated == len(VALID)
    assert s.errors == len(BAD) + 1  # both "dup" rows
    assert s.errors_by_stage == {"validate": len(BAD) + 1}
    assert s.skipped_done == 0
    assert s.end_to_end_images_per_s > 0 and s.startup_s > 0 and s.stage_s["denoise_s"] > 0


def test_images_decode_and_match_metadata(job):
    table = metadata(job["out"]).to_pylist()
    assert sorted(r["id"] for r in table) == sorted(r["id"] for r in VALID)
    for record in table:
        path = job["out"] / "images" / f"{record['id']}.png"
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        assert record["uri"] == path.as_uri()
        image = Image.open(io.BytesIO(data))
        assert image.size == (record["width"], record["height"]) and image.mode == "RGB"
        assert record["model"] == "tiny" and record["weights_hash"].startswith("sha256:")
        assert dict(record["backend"])["device"] == "cpu"
        assert record["status"] == "ok" and record["daguerre_version"]
        assert record["timings"]["denoise_s"] > 0 and record["timings"]["encode_png_s"] > 0
    by_id = {r["id"]: r for r in table}
    assert dict(by_id["ok-0"]["metadata"]) == {"sku": "A-1"}
    assert (by_id["ok-2"]["width"], by_id["ok-2"]["height"]) == (96, 64)
    assert by_id["nested/ok-3"]["seed"] == ImageRequest(id="nested/ok-3", prompt="x").resolved_seed


def test_every_bad_row_is_recorded_with_field_and_reason(job):
    errors = pads.dataset(job["out"] / "errors", format="parquet").to_table().to_pylist()
    fields = {}
    for e in errors:
        fields.setdefault(e["id"], set()).add(e["field"])
        assert e["reason"] and e["stage"] == "validate" and e["row"]
    for bad_id, (_, field) in BAD.items():
        assert field in fields.get(bad_id, set()), (bad_id, fields.get(bad_id))
    assert len([e for e in errors if e["id"] == "dup"]) == 2
    assert not (job["out"] / "escape.png").exists() and not Path("/abs.png").exists()


def test_job_image_equals_engine_image(job, tiny_engine):
    request = ImageRequest(**VALID[1])
    alone = tiny_engine.generate([request])[0].image
    from_job = np.asarray(Image.open(job["out"] / "images" / "ok-1.png"))
    assert np.abs(alone.astype(int) - from_job.astype(int)).max() <= 1


def test_rerun_generates_nothing(job):
    summary = run_job(job["manifest"], str(job["out"]), job["config"], progress=False)
    assert summary.generated == 0 and summary.skipped_done == len(VALID)
    assert metadata(job["out"]).num_rows == len(VALID)


def test_deleted_metadata_rows_are_regenerated_exactly(job, tmp_path):
    import shutil

    out = tmp_path / "out"  # a copy: the module's output stays as other tests expect it
    shutil.copytree(job["out"], out)
    gone = {"ok-0", "ok-4", "nested/ok-3"}
    for fragment in (out / "metadata").glob("*.parquet"):
        table = pq.read_table(fragment)
        keep = table.filter(
            pa.compute.invert(pa.compute.is_in(table["id"], pa.array(sorted(gone))))
        )
        if keep.num_rows < table.num_rows:
            pq.write_table(keep, fragment) if keep.num_rows else fragment.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    summary = run_job(job["manifest"], str(out), job["config"], progress=False)
    assert summary.generated == 3 and summary.skipped_done == len(VALID) - 3
    ids = metadata(out).column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in VALID)  # each exactly once
    after = {p.name: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    rewritten = {name for name in after if after[name] != before[name]}
    assert rewritten == {"ok-0.png", "ok-4.png", "ok-3.png"}


def test_not_parquet_is_refused_before_ray(tmp_path):
    bad = tmp_path / "rows.bin"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ManifestError, match=r"rows.bin: not a Parquet manifest"):
        inspect_manifest(str(bad))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(ManifestError, match=r"a prompt list, not a manifest.*daguerre manifest"):
        inspect_manifest(str(prompts))


def test_csv_and_jsonl_manifests_are_read_directly(tmp_path):
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("id,prompt,steps,width\na,a cat,3,64\nb,a dog,,\n")
    info = inspect_manifest(str(csv_file))
    assert (
        info.rows == 2
        and info.table["id"].to_pylist() == ["a", "b"]
        and info.table["steps"].to_pylist() == [3, None]
    )
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"id": "a", "prompt": "a cat", "metadata": {"sku": "A-1"}}\n'
                     '{"id": "b", "prompt": "a dog", "seed": 4}\n')  # fmt: skip
    info = inspect_manifest(str(jsonl))
    assert info.rows == 2 and info.table["metadata"].to_pylist()[0] == [("sku", "A-1")]
    templated = tmp_path / "products.csv"
    templated.write_text("product,style\na teapot,soft light\n")
    with pytest.raises(ManifestError, match="missing required columns id, prompt.*--template"):
        inspect_manifest(str(templated))


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), path)
    with pytest.raises(
        ManifestError, match=r"m.parquet: missing required column prompt \(has: id, text\)"
    ):
        inspect_manifest(str(path))


def test_unknown_columns_are_named(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"], "neg_prompt": ["y"]}), path)
    with pytest.raises(ManifestError, match=r"unknown column neg_prompt"):
        inspect_manifest(str(path))


def test_manifest_folder_is_read(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write(VALID[:2], folder / "a.parquet")
    write(VALID[2:4], folder / "b.parquet")
    info = inspect_manifest(str(folder))
    assert info.rows == 4 and len(info.files) == 2


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("daguerre")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=240)


def test_cli_bad_manifest_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_text("a cat\n")
    result = cli("generate", str(bad), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "prompts.txt: a prompt list, not a manifest" in lines[0]
    assert "daguerre manifest" in lines[0]
    assert not (tmp_path / "o").exists()


def test_cli_generate_twice(tmp_path):
    manifest = str(tmp_path / "m.csv")  # a CSV with the manifest's columns runs as it is
    Path(manifest).write_text("id,prompt,seed,steps\nok-0,a lighthouse,1,3\nok-1,a teapot,2,3\n")
    first = cli("generate", manifest, "--out", str(tmp_path / "o"), "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(list((tmp_path / "o" / "images").glob("*.png"))) == 2
    second = cli("generate", manifest, "--out", str(tmp_path / "o"), "--no-progress", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing generated: 2 rows already finished" in second.stdout


def test_cli_demo(tmp_path):
    result = cli("demo", "--out", str(tmp_path / "demo"), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted((tmp_path / "demo" / "images").glob("*.png"))
    assert len(images) == 8
    for path in images:
        assert Image.open(path).convert("RGB").size[1] == 64
    assert metadata(tmp_path / "demo").num_rows == 8
    errors = pads.dataset(tmp_path / "demo" / "errors", format="parquet").to_table()
    assert sorted(errors.column("id").to_pylist()) == ["demo-bad-prompt", "demo-bad-size"]
    assert (tmp_path / "demo-manifest.parquet").is_file()
    assert "generated" in result.stdout and "images:" in result.stdout


def test_reruns_do_not_grow_the_errors_table(job):
    """Bad rows are recorded again by every run that meets them; the older rows are
    superseded, so errors/ holds one row per bad manifest row, not one per run."""
    errors_dir = job["out"] / "errors"
    for _ in range(2):
        summary = run_job(job["manifest"], str(job["out"]), job["config"], progress=False)
        assert summary.generated == 0 and summary.errors == len(BAD) + 1
        rows = pads.dataset(errors_dir, format="parquet").to_table().to_pylist()
        assert len(rows) == len(BAD) + 1  # both "dup" rows, every other bad row once
        assert {r["run_id"] for r in rows} == {summary.run_id}


def test_cli_inspect_reads_the_metadata(job, tmp_path):
    result = cli("inspect", str(job["out"]), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == len(VALID) and report["metadata_rows"] == len(VALID)
    assert report["errors"] == len(BAD) + 1
    assert report["errors_by_stage"] == {"validate": len(BAD) + 1}
    assert len(report["models"]) == 1 and next(iter(report["models"])).startswith("tiny (sha256:")
    # the last run's figures are the ones its record (and its printed summary) states
    records = sorted((job["out"] / "runs").glob("*.json"))
    last = json.loads(records[-1].read_text())
    assert report["runs"] == len(records)
    for key in (
        "run_id",
        "generated",
        "startup_s",
        "steady_images_per_s",
        "end_to_end_images_per_s",
    ):
        assert report["last_run"][key] == last[key]
    table = cli("inspect", str(job["out"]), cwd=tmp_path)
    assert "images" in table.stdout and "errors by reason" in table.stdout
    missing = cli("inspect", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and "no such file or prefix" in missing.stderr
    (tmp_path / "not-an-output").mkdir()
    other = cli("inspect", str(tmp_path / "not-an-output"), cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip() == (
        f"daguerre: error: {tmp_path / 'not-an-output'}: not a daguerre output "
        "(no _daguerre marker, metadata/ or runs/ in it)"
    )


def test_run_record_holds_config_command_versions_and_host(job):
    record = json.loads(sorted((job["out"] / "runs").glob("*.json"))[0].read_text())
    assert record["config"]["engine"]["model"] == "tiny" and record["config"]["batch_size"] == 3
    assert record["command"] and {"daguerre", "torch", "ray", "diffusers"} <= set(
        record["versions"]
    )
    assert record["host"]["name"] and record["started_at"] < record["ended_at"]
    assert "git_commit" in record
    assert record["generated"] == len(VALID) and record["errors"] == len(BAD) + 1


def test_mixed_manifest_is_batched_by_bucket(ray_session, tmp_path):
    """Rows of 4 shapes interleaved in the manifest still reach the engine in full batches:
    the validate stage orders each block by bucket before the engine stage."""
    shapes = [(64, 64, 2, "ddim"), (96, 64, 2, "ddim"), (64, 64, 3, "euler"), (64, 96, 2, "ddim")]
    rows = [{"id": f"mix-{i:03d}", "prompt": f"a mixed row {i}", "seed": i, "width": w,
             "height": h, "steps": s, "scheduler": k}
            for i, (w, h, s, k) in ((i, shapes[i % 4]) for i in range(32))]  # fmt: skip
    manifest = write(rows, tmp_path / "mixed.parquet")
    config = JobConfig(batch_size=4, engine=EngineConfig(model="tiny", device="cpu"))
    summary = run_job(manifest, str(tmp_path / "out"), config, progress=False)
    assert summary.generated == 32
    assert summary.mean_engine_batch >= 0.9 * 4, summary.mean_engine_batch
    sizes = metadata(tmp_path / "out").column("batch_size").to_pylist()
    assert sorted(set(sizes)) == [4]
