"""Formats and sizes (encoding:) and the visible mark (marks.visible_*): WebP and JPEG
masters with resized variants under their own keys, listed in the metadata row, in a job
(flat files and WebDataset shards); online in tests/cpu/test_catalog.py."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from daguerre.pipeline.config import (
    ConfigError,
    EngineConfig,
    JobConfig,
    ServeConfig,
    validate_config,
)
from daguerre.pipeline.files import Provenance, WriteOptions
from daguerre.pipeline.formats import EncodingConfig, Variant
from daguerre.pipeline.marks import MarksConfig, visibly_marked
from daguerre.pipeline.outputs import write_outputs
from daguerre.pipeline.schema import GeneratedImage, ImageRequest, StageTimings, manifest_schema
from daguerre.pipeline.storage import Storage
from PIL import Image

pytestmark = pytest.mark.timeout(300)
CATALOGUE = EncodingConfig(
    format="webp", quality=80,
    variants=[Variant(name="thumb", width=64), Variant(name="square", width=48, height=48,
                                                       fit="cover", format="jpeg")],
)  # fmt: skip
PROVENANCE = Provenance(model="tiny", weights_hash="w" * 16, backend={}, node_id="n", actor_id="a")


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def generated(image_id: str, width: int = 128, height: int = 96) -> GeneratedImage:
    rng = np.random.default_rng(len(image_id))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return GeneratedImage(request=ImageRequest(id=image_id, prompt="a vase"), image=pixels, seed=1,
                          width=width, height=height, batch_size=1, scheduler_config="{}",
                          timings=StageTimings())  # fmt: skip


def test_a_master_and_its_variants_each_have_a_key_listed_in_the_row(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    [stored] = write_outputs([(generated("shop/vase"), PROVENANCE)], storage, run_id="r",
                             version="t", options=WriteOptions(encoding=CATALOGUE))  # fmt: skip
    record = stored.record
    assert record.format == "webp" and record.uri.endswith("images/shop/vase.webp")
    master = decoded((tmp_path / "out/images/shop/vase.webp").read_bytes())
    assert master.format == "WEBP" and master.size == (128, 96)
    assert set(record.variants) == {"thumb", "square"}
    thumb = decoded((tmp_path / "out/variants/thumb/shop/vase.webp").read_bytes())
    assert thumb.format == "WEBP" and thumb.size == (64, 48)  # aspect kept
    square = decoded((tmp_path / "out/variants/square/shop/vase.jpg").read_bytes())
    assert square.format == "JPEG" and square.size == (48, 48)  # cropped to the box
    assert record.variants["square"].endswith("variants/square/shop/vase.jpg")


def test_jpeg_quality_trades_bytes_for_fidelity():
    image = generated("q")
    sizes = {}
    for quality in (30, 95):
        options = WriteOptions(encoding=EncodingConfig(format="jpeg", quality=quality))
        [stored] = write_outputs([(image, PROVENANCE)], None, run_id="r", version="t",
                                 options=options)  # fmt: skip
        assert decoded(stored.data).format == "JPEG" and stored.media_type == "image/jpeg"
        sizes[quality] = len(stored.data)
    assert sizes[30] < sizes[95]


def test_a_watermark_a_lossy_master_erased_is_not_claimed():
    from daguerre.pipeline.marks import read_watermark

    smooth = np.add.outer(np.arange(256), np.arange(256))[:, :, None] // 2 + np.zeros(3, int)
    image = generated("w", 256, 256)
    image.image = smooth.astype(np.uint8)
    marks = MarksConfig(watermark="shop-2026")
    for encoding, kept in ((EncodingConfig(format="webp", lossless=True), True),
                           (EncodingConfig(format="webp", quality=95), False)):  # fmt: skip
        [stored] = write_outputs([(image, PROVENANCE)], None, run_id="r", version="t",
                                 options=WriteOptions(marks=marks, encoding=encoding))  # fmt: skip
        found = read_watermark(np.asarray(decoded(stored.data).convert("RGB")), 9) == b"shop-2026"
        assert found is kept and stored.record.watermark == ("shop-2026" if kept else None)


def test_the_visible_mark_is_drawn_in_its_corner_only():
    pixels = np.full((256, 256, 3), 128, dtype=np.uint8)
    marked = visibly_marked(pixels, MarksConfig(visible_text="AI-generated", visible_opacity=1))
    changed = np.abs(marked.astype(int) - pixels).sum(axis=2) > 0
    rows, cols = np.nonzero(changed)
    assert changed.sum() > 50  # the text is there
    assert rows.min() > 128 and cols.min() > 64  # bottom right, nowhere else
    assert visibly_marked(pixels, MarksConfig()) is pixels


def test_a_visible_logo_keeps_its_alpha(tmp_path):
    logo = np.zeros((20, 40, 4), dtype=np.uint8)
    logo[:, :20] = (255, 0, 0, 255)  # left half opaque red, right half transparent
    Image.fromarray(logo, "RGBA").save(tmp_path / "logo.png")
    pixels = np.full((200, 200, 3), 30, dtype=np.uint8)
    marks = MarksConfig(visible_logo=str(tmp_path / "logo.png"), visible_position="top-left",
                        visible_opacity=1.0, visible_size=0.05)  # fmt: skip
    marked = visibly_marked(pixels, marks)
    assert tuple(marked[10, 10]) == (255, 0, 0)  # inside the opaque half (margin 5, height 40)
    assert tuple(marked[10, 70]) == (30, 30, 30)  # the transparent half left the image alone
    assert tuple(marked[150, 150]) == (30, 30, 30)


def test_a_job_writes_webp_masters_and_variants_in_files_and_shards(ray_session, tmp_path):
    from daguerre.cluster.job import run_job
    from daguerre.pipeline.catalog import read_metadata

    rows = [{"id": f"p-{i}", "prompt": "a lamp", "seed": i, "steps": 2} for i in range(3)]
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "m.parquet")
    engine = EngineConfig(model="tiny", device="cpu")
    for layout in ("images", "webdataset"):
        config = JobConfig(engine=engine, encoding=CATALOGUE, output_format=layout,
                           marks=MarksConfig(visible_text="AI"))  # fmt: skip
        out = tmp_path / layout
        summary = run_job(str(tmp_path / "m.parquet"), str(out), config, progress=False)
        assert summary.generated == 3
        records = read_metadata(Storage(str(out))).to_pylist()
        assert sorted(r["id"] for r in records) == ["p-0", "p-1", "p-2"]
        for record in records:
            record["variants"] = dict(record["variants"])  # an Arrow map reads as pairs
            assert record["format"] == "webp" and set(record["variants"]) == {"thumb", "square"}
            if layout == "images":
                assert decoded((out / f"images/{record['id']}.webp").read_bytes()).size == (64, 64)
                assert decoded((out / f"variants/square/{record['id']}.jpg").read_bytes()).size == (
                    48,
                    48,
                )
            else:
                shard, _, member = record["variants"]["square"].partition("#")
                with tarfile.open(shard.removeprefix("file://")) as tar:
                    assert member in tar.getnames() and f"{record['id']}.webp" in tar.getnames()
                    assert decoded(tar.extractfile(member).read()).size == (48, 48)


def test_bad_encoding_is_one_line_naming_the_field():
    with pytest.raises(
        ConfigError, match=r"encoding\.format: 'gif' is not valid; use one of 'png', 'webp', 'jpeg'"
    ):
        validate_config(JobConfig, {"encoding": {"format": "gif"}})
    with pytest.raises(ConfigError, match=r"encoding\.variants\.0: .*width, height or both"):
        validate_config(ServeConfig, {"encoding": {"variants": [{"name": "t"}]}})
    with pytest.raises(ConfigError, match=r"marks\.visible_logo: cannot read"):
        from daguerre.pipeline.marks import check_marks

        check_marks(MarksConfig(visible_logo="/nonexistent/logo.png"))
