"""Marks in the file (marks:): the invisible watermark decodes back and the PNG text chunks
carry the metadata row's provenance, for a job's images and the online API's alike."""

from __future__ import annotations

import base64
import hashlib
import io

import httpx2 as httpx
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.pipeline.config import (
    ConfigError,
    EngineConfig,
    JobConfig,
    ModelDeploymentConfig,
    ServeConfig,
    validate_config,
)
from daguerre.pipeline.marks import MarksConfig, read_text_chunks, read_watermark
from daguerre.pipeline.schema import manifest_schema
from PIL import Image

pytestmark = pytest.mark.timeout(300)
MARKS = MarksConfig(watermark="dg-test-0001", png_text=True)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_a_jobs_images_carry_the_watermark_and_their_provenance(ray_session, tmp_path):
    from daguerre.cluster.job import run_job

    rows = [{"id": "big-1", "prompt": "a vase", "seed": 1, "steps": 2, "width": 256, "height": 256},
            {"id": "big-2", "prompt": "a lamp", "seed": 2, "steps": 2, "width": 256, "height": 256},
            {"id": "small", "prompt": "a cup", "seed": 3, "steps": 2}]  # fmt: skip
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "m.parquet")
    config = JobConfig(engine=EngineConfig(model="tiny", device="cpu"), marks=MARKS)
    summary = run_job(str(tmp_path / "m.parquet"), str(tmp_path / "out"), config, progress=False)
    assert summary.generated == 3
    table = pads.dataset(tmp_path / "out" / "metadata", format="parquet").to_table().to_pylist()
    for row in table:
        png = (tmp_path / "out" / "images" / f"{row['id']}.png").read_bytes()
        assert hashlib.sha256(png).hexdigest() == row["sha256"]  # the marked bytes
        text = read_text_chunks(png)
        assert {k: text[k] for k in ("id", "seed", "model", "weights_hash", "run_id")} == {
            k: row[k] for k in ("id", "seed", "model", "weights_hash", "run_id")}  # fmt: skip
        assert text["ai_generated"] is True
        if row["id"] == "small":  # 64x64: under the library's 256x256
            assert row["watermark"] is None and text["watermark"] is None
        else:
            assert row["watermark"] == MARKS.watermark
            assert read_watermark(pixels(png), len(MARKS.watermark)) == MARKS.watermark.encode()


def test_online_images_carry_the_same_marks(ray_session, tmp_path):
    from daguerre.cluster.serve import start
    from ray import serve
    from test_api_contract import _free_port

    engine = EngineConfig(model="tiny", device="cpu", torch_threads=1)
    config = ServeConfig(port=_free_port(), models=[ModelDeploymentConfig(engine=engine, num_cpus=1)],
                         output=str(tmp_path / "out"), marks=MARKS)  # fmt: skip
    url = start(config)
    try:
        native = {"requests": [{"prompt": "a chair", "width": 256, "height": 256, "steps": 2}]}
        resp = httpx.post(f"{url}/v1/generate", json=native, timeout=120)
        assert resp.status_code == 200, resp.text
        item = resp.json()["data"][0]
        png = base64.b64decode(item["b64_json"])
        assert item["record"]["watermark"] == MARKS.watermark
        assert read_watermark(pixels(png), len(MARKS.watermark)) == MARKS.watermark.encode()
        assert read_text_chunks(png)["id"] == item["id"]
        body = {"prompt": "a chair", "size": "256x256", "steps": 2, "seed": 5}
        openai_style = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
        png = base64.b64decode(openai_style.json()["data"][0]["b64_json"])
        assert read_watermark(pixels(png), len(MARKS.watermark)) == MARKS.watermark.encode()
    finally:
        serve.shutdown()


def test_a_bad_payload_is_one_line_naming_the_field():
    with pytest.raises(ConfigError, match=r"marks\.watermark: .*1 to 16 ASCII characters"):
        validate_config(JobConfig, {"marks": {"watermark": "caf\u00e9"}})
    with pytest.raises(ConfigError, match=r"marks\.watermark_method"):
        validate_config(ServeConfig, {"marks": {"watermark": "x", "watermark_method": "dct"}})
