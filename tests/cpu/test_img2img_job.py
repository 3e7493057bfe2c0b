"""Images in through the batch job: init images and masks named in the manifest (paths
relative to it, or s3:// on the real S3 server), read ahead of the engine, recorded in the
metadata row; bad images are per-row errors naming the field, and the job goes on."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.cluster.job import run_job
from daguerre.pipeline.config import EngineConfig, JobConfig
from daguerre.pipeline.image_reads import StorageReader, load_image_input
from daguerre.pipeline.schema import DEFAULT_LIMITS, ImageRequest, manifest_schema
from PIL import Image

pytestmark = pytest.mark.timeout(300)


def photo_bytes(width: int, height: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "L":
        pixels = np.zeros((height, width), np.uint8)
        pixels[:, width // 2 :] = 255  # repaint the right half
    else:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


FILES = {  # relative path -> bytes
    "photos/mug.png": photo_bytes(70, 52, 1),  # sized by the image: 64x48
    "photos/lamp.png": photo_bytes(64, 64, 2),
    "photos/lamp-mask.png": photo_bytes(64, 64, 0, "L"),
    "photos/small-mask.png": photo_bytes(32, 32, 0, "L"),
    "photos/notes.png": b"a text file, not a photo",
}
ROWS = [
    {"id": "mug", "prompt": "a mug on a beach", "seed": 1, "steps": 4,
     "init_image": "photos/mug.png", "strength": 0.5},
    {"id": "lamp", "prompt": "a lamp in a loft", "seed": 2, "steps": 4,
     "init_image": "photos/lamp.png", "mask_image": "photos/lamp-mask.png", "strength": 1.0},
    {"id": "lamp-wide", "prompt": "a lamp", "seed": 3, "steps": 4, "width": 96, "height": 64,
     "init_image": "photos/lamp.png", "resize": "fit"},
    {"id": "text", "prompt": "a plain text row", "seed": 4, "steps": 3},
    {"id": "gone", "prompt": "x", "steps": 3, "init_image": "photos/gone.png"},
    {"id": "notes", "prompt": "x", "steps": 3, "init_image": "photos/notes.png"},
    {"id": "mismatch", "prompt": "x", "steps": 3, "init_image": "photos/lamp.png",
     "mask_image": "photos/small-mask.png"},
]  # fmt: skip
BAD = {"gone": "init_image", "notes": "init_image", "mismatch": "mask_image"}


def manifest_table() -> pa.Table:
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    return pa.Table.from_pylist(ROWS, schema=schema)


@pytest.fixture(scope="module")
def local_job(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("img2img-job")
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    pq.write_table(manifest_table(), root / "manifest.parquet")
    config = JobConfig(batch_size=4, engine=EngineConfig(model="tiny", device="cpu"))
    summary = run_job(str(root / "manifest.parquet"), str(root / "out"), config, progress=False)
    return root, config, summary


def _tables(out: Path) -> tuple[dict, dict]:
    meta = pads.dataset(out / "metadata", format="parquet").to_table().to_pylist()
    errors = pads.dataset(out / "errors", format="parquet").to_table().to_pylist()
    return {r["id"]: r for r in meta}, {r["id"]: r for r in errors}


def test_the_job_makes_image_rows_and_records_bad_images(local_job):
    root, _, summary = local_job
    assert (summary.generated, summary.errors) == (4, 3)
    meta, errors = _tables(root / "out")
    assert {i: e["field"] for i, e in errors.items()} == BAD
    assert "photos/gone.png" in errors["gone"]["reason"]
    assert "32x32" in errors["mismatch"]["reason"]
    sizes = {i: Image.open(r["uri"].removeprefix("file://")).size for i, r in meta.items()}
    assert sizes == {"mug": (64, 48), "lamp": (64, 64), "lamp-wide": (96, 64), "text": (64, 64)}


def test_metadata_traces_each_image_to_its_source_photo(local_job):
    root, _, _ = local_job
    meta, _ = _tables(root / "out")
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
    mug, lamp, text = meta["mug"], meta["lamp"], meta["text"]
    assert (mug["init_image"], mug["init_sha256"]) == ("photos/mug.png", sha["photos/mug.png"])
    assert (mug["strength"], mug["steps_run"], mug["mask_image"]) == (0.5, 2, None)
    assert mug["resize"] is None  # sized by the image
    assert lamp["mask_sha256"] == sha["photos/lamp-mask.png"] and lamp["steps_run"] == 4
    assert meta["lamp-wide"]["resize"] == "fit"
    assert text["init_image"] is None and text["strength"] is None and text["steps_run"] is None


def test_job_image_equals_the_engine_image(local_job, tiny_engine):
    root, _, _ = local_job
    meta, _ = _tables(root / "out")
    row = next(r for r in ROWS if r["id"] == "lamp")
    request = ImageRequest(**row)
    image = load_image_input(request, StorageReader(), str(root), DEFAULT_LIMITS,
                             tiny_engine.model.default_size)  # fmt: skip
    direct = tiny_engine.generate([request], [image])[0].image
    written = np.asarray(Image.open(meta["lamp"]["uri"].removeprefix("file://")))
    assert np.abs(direct.astype(int) - written.astype(int)).mean() <= 1.0
    # Outside the mask (the left half, kept) the image stays the photo, within the VAE's
    # round trip; inside it (the right half) the loop painted something else.
    photo = np.asarray(Image.open(io.BytesIO(FILES["photos/lamp.png"]))).astype(int)
    kept = np.abs(written[:, :24].astype(int) - photo[:, :24]).mean()
    painted = np.abs(written[:, 40:].astype(int) - photo[:, 40:]).mean()
    assert painted > kept


def test_a_rerun_skips_finished_image_rows(local_job):
    root, config, _ = local_job
    again = run_job(str(root / "manifest.parquet"), str(root / "out"), config, progress=False)
    assert again.generated == 0 and again.skipped_done == 4


def test_init_images_on_s3_relative_to_the_manifest(s3_server, ray_session):
    fs = s3_server.fs()
    for name, data in FILES.items():
        with fs.open(f"daguerre/img2img/{name}", "wb") as fh:
            fh.write(data)
    rows = [r for r in ROWS if r["id"] in ("mug", "lamp", "gone")]
    rows.append({**ROWS[0], "id": "absolute", "init_image": "s3://daguerre/img2img/photos/mug.png"})
    buf = io.BytesIO()
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    with fs.open("daguerre/img2img/manifest.parquet", "wb") as fh:
        fh.write(buf.getvalue())
    out = "s3://daguerre/img2img/out"
    config = JobConfig(engine=EngineConfig(model="tiny", device="cpu"), batch_size=4,
                       storage=s3_server.storage_config(), actor_num_cpus=0.5)  # fmt: skip
    summary = run_job("s3://daguerre/img2img/manifest.parquet", out, config, progress=False)
    assert (summary.generated, summary.errors) == (3, 1)
    meta = pads.dataset("daguerre/img2img/out/metadata", format="parquet", filesystem=fs)
    records = {r["id"]: r for r in meta.to_table().to_pylist()}
    mug_sha = hashlib.sha256(FILES["photos/mug.png"]).hexdigest()
    assert records["mug"]["init_sha256"] == records["absolute"]["init_sha256"] == mug_sha
    assert records["absolute"]["init_image"] == "s3://daguerre/img2img/photos/mug.png"
    # The same photo, prompt and seed from two URIs: the same pixels.
    a, b = (np.asarray(Image.open(io.BytesIO(fs.cat_file(records[i]["uri"]))))
            for i in ("mug", "absolute"))  # fmt: skip
    assert np.array_equal(a, b)
    errors = pads.dataset("daguerre/img2img/out/errors", format="parquet", filesystem=fs)
    error = errors.to_table().to_pylist()[0]
    assert (error["id"], error["field"]) == ("gone", "init_image")
    assert json.loads(error["row"])["init_image"] == "photos/gone.png"


def _cutout(path: Path) -> str:
    """A product cut-out: an opaque green square in a transparent margin."""
    pixels = np.zeros((40, 40, 4), np.uint8)
    pixels[8:32, 8:32] = (0, 200, 0, 255)
    Image.fromarray(pixels, "RGBA").save(path)
    return str(path)


COMPOSITE = {
    "layers": [
        {"kind": "image", "source": "{product}", "box": {"x": 0, "y": 0, "width": 32,
                                                           "height": 32}},
        {"kind": "text", "text": "{headline}", "size": 12, "color": "#ff0000",
         "box": {"x": 0.0, "y": 0.5, "width": 1.0, "height": 0.5}},
    ]
}  # fmt: skip


def test_composited_ad_creatives(ray_session, tmp_path):
    product = _cutout(tmp_path / "shoe.png")
    rows = [
        {"id": "ad-1", "prompt": "a beach", "seed": 1, "steps": 2,
         "metadata": {"product": product, "headline": "SALE 20%"}},
        {"id": "ad-no-headline", "prompt": "a beach", "seed": 1, "steps": 2,
         "metadata": {"product": product}},
    ]  # fmt: skip
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "ads.parquet")
    config = JobConfig(batch_size=2, engine=EngineConfig(model="tiny", device="cpu"),
                       composite=COMPOSITE)  # fmt: skip
    summary = run_job(str(tmp_path / "ads.parquet"), str(tmp_path / "out"), config,
                      progress=False)  # fmt: skip
    assert (summary.generated, summary.errors) == (1, 1)
    meta, errors = _tables(tmp_path / "out")
    error = errors["ad-no-headline"]
    assert (error["stage"], error["field"]) == ("composite", "composite.layers[1].text")
    assert "headline" in error["reason"]
    placed = json.loads(meta["ad-1"]["composite"])
    assert [p["kind"] for p in placed] == ["image", "text"] and placed[1]["text"] == "SALE 20%"
    pixels = np.asarray(Image.open(meta["ad-1"]["uri"].removeprefix("file://")))
    x, y, w, h = placed[0]["placed"]
    centre = pixels[y + h // 2, x + w // 2]
    assert tuple(centre) == (0, 200, 0)  # the product, opaque, on top
    assert (pixels[32:, :, 0] > 200).any()  # red headline ink in the lower half

    # A rerun skips the creative; a changed headline is a changed request, made again
    # with --overwrite (the fingerprint counts the layers and the values they read).
    from daguerre.cluster.plan import ResumeConflict

    again = run_job(str(tmp_path / "ads.parquet"), str(tmp_path / "out"), config, progress=False)
    assert again.generated == 0 and again.skipped_done == 1
    rows[0]["metadata"]["headline"] = "SALE 30%"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "ads.parquet")
    with pytest.raises(ResumeConflict, match="composite layers"):
        run_job(str(tmp_path / "ads.parquet"), str(tmp_path / "out"), config, progress=False)
    redo = run_job(str(tmp_path / "ads.parquet"), str(tmp_path / "out"), config, progress=False,
                   overwrite=True)  # fmt: skip
    assert redo.generated == 1


def test_a_bad_layer_config_fails_before_any_actor(ray_session, tmp_path):
    from daguerre.pipeline.config import ConfigError

    pq.write_table(manifest_table().slice(3, 1), tmp_path / "m.parquet")
    bad = {"layers": [{"kind": "image", "source": str(tmp_path / "no-logo.png"),
                       "box": {"x": 0, "y": 0, "width": 8, "height": 8}}]}  # fmt: skip
    config = JobConfig(engine=EngineConfig(model="tiny", device="cpu"), composite=bad)
    with pytest.raises(ConfigError, match=r"^composite\.layers\[0\]\.source: "):
        run_job(str(tmp_path / "m.parquet"), str(tmp_path / "out"), config, progress=False)
    assert not (tmp_path / "out" / "metadata").exists()
