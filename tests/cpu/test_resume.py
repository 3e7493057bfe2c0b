"""A rerun compares what was made with what it asks: another model or other request fields
are refused with one line, or made again exactly once with --overwrite."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.cluster.job import run_job
from daguerre.cluster.plan import ResumeConflict
from daguerre.pipeline.config import EngineConfig, JobConfig
from daguerre.pipeline.schema import manifest_schema

pytestmark = pytest.mark.timeout(600)

ROWS = [{"id": f"r-{i}", "prompt": f"a resumed painting {i}", "seed": i, "steps": 2}
        for i in range(6)]  # fmt: skip


def write(rows: list[dict], path: Path) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), path)
    return str(path)


def config(model: str = "tiny") -> JobConfig:
    return JobConfig(batch_size=3, engine=EngineConfig(model=model, device="cpu"))


def metadata_rows(out: Path) -> list[dict]:
    """What a plain Parquet reader sees (no daguerre code)."""
    return pads.dataset(out / "metadata", format="parquet").to_table().to_pylist()


def assert_one_row_per_id_matching_its_image(out: Path, ids: set[str]) -> dict[str, dict]:
    rows = metadata_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for row in rows:
        data = (out / "images" / f"{row['id']}.png").read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"], row["id"]
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    """An output where every row of ROWS was made with tiny."""
    root = tmp_path_factory.mktemp("resume")
    manifest = write(ROWS, root / "m.parquet")
    summary = run_job(manifest, str(root / "out"), config(), progress=False)
    assert summary.generated == len(ROWS)
    return root, manifest


def copy_output(finished, tmp_path: Path) -> Path:
    import shutil

    root, _ = finished
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    return out


def test_another_model_is_refused_naming_both(finished, tmp_path):
    _, manifest = finished
    out = copy_output(finished, tmp_path)
    with pytest.raises(ResumeConflict) as info:
        run_job(manifest, str(out), config("tiny-xl"), progress=False)
    message = str(info.value)
    assert message.startswith("6 finished ids were made with tiny (weights sha256:")
    assert "this run asks for tiny-xl (weights sha256:" in message
    assert message.endswith("use a new --out or pass --overwrite")
    assert len(metadata_rows(out)) == 6  # nothing was touched


def test_overwrite_makes_another_models_rows_again_exactly_once(finished, tmp_path):
    _, manifest = finished
    out = copy_output(finished, tmp_path)
    summary = run_job(manifest, str(out), config("tiny-xl"), progress=False, overwrite=True)
    assert (summary.generated, summary.regenerated, summary.skipped_done) == (6, 6, 0)
    rows = assert_one_row_per_id_matching_its_image(out, {r["id"] for r in ROWS})
    assert {r["model"] for r in rows.values()} == {"tiny-xl"}
    assert summary.superseded_rows_pruned["metadata"] == 6
    again = run_job(manifest, str(out), config("tiny-xl"), progress=False)
    assert again.generated == 0 and again.skipped_done == 6


def test_changed_request_fields_are_refused_then_overwritten(finished, tmp_path):
    out = copy_output(finished, tmp_path)
    changed = [dict(r) for r in ROWS]
    changed[1]["prompt"] = "a different painting"
    changed[4]["steps"] = 3
    manifest = write(changed, tmp_path / "changed.parquet")
    with pytest.raises(ResumeConflict, match=r"^2 finished ids were made from other request "
                       r"fields than the manifest now gives .*'r-1'"):  # fmt: skip
        run_job(manifest, str(out), config(), progress=False)
    summary = run_job(manifest, str(out), config(), progress=False, overwrite=True)
    assert (summary.generated, summary.regenerated, summary.skipped_done) == (2, 2, 4)
    rows = assert_one_row_per_id_matching_its_image(out, {r["id"] for r in ROWS})
    assert rows["r-1"]["prompt"] == "a different painting" and rows["r-4"]["steps"] == 3
    assert rows["r-0"]["run_id"] != rows["r-1"]["run_id"]  # untouched rows kept their run


def test_a_metadata_only_change_is_not_a_conflict(finished, tmp_path):
    out = copy_output(finished, tmp_path)
    tagged = [{**r, "metadata": {"campaign": "spring"}} for r in ROWS]
    summary = run_job(write(tagged, tmp_path / "tagged.parquet"), str(out), config(),
                      progress=False)  # fmt: skip
    assert summary.generated == 0 and summary.skipped_done == 6


def test_cli_refusal_is_one_line(finished, tmp_path):
    _, manifest = finished
    out = copy_output(finished, tmp_path)
    exe = Path(sys.executable).with_name("daguerre")
    result = subprocess.run([str(exe), "generate", manifest, "--out", str(out), "--model", "small"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("daguerre: error: 6 finished ids were made with tiny"), lines
    assert all(line.startswith("daguerre: ") for line in lines), lines  # notices, then the error
