"""The result cache (cache:): an identical request is answered from the stored image, in a
job (another job's output sharing the cache prefix; online: test_catalog.py), with its marks and
formats; the metadata row says so; hits are counted in the summary and inspect; anything
that changes the pixels misses."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from daguerre.pipeline.config import EngineConfig, JobConfig
from daguerre.pipeline.formats import EncodingConfig
from daguerre.pipeline.result_cache import CacheConfig, cache_key
from daguerre.pipeline.schema import ImageRequest, manifest_schema
from PIL import Image

pytestmark = pytest.mark.timeout(300)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_everything_that_decides_the_pixels_changes_the_key():
    base = ImageRequest(id="a", prompt="a vase", seed=1, steps=4)
    key = cache_key(base, "w1", 64, 64)
    assert (
        cache_key(base.model_copy(update={"id": "b", "metadata": {"sku": "1"}}), "w1", 64, 64)
        == key
    )
    for changed in ({"prompt": "a lamp"}, {"seed": 2}, {"steps": 5}, {"guidance_scale": 3.0},
                    {"negative_prompt": "x"}, {"scheduler": "euler"}):  # fmt: skip
        assert cache_key(ImageRequest(**{**base.model_dump(), **changed}), "w1", 64, 64) != key
    assert cache_key(base, "w2", 64, 64) != key and cache_key(base, "w1", 64, 96) != key


def test_the_engine_the_gate_and_the_adapter_file_salt_the_key(tmp_path):
    import os

    from daguerre.pipeline.quality import QualityConfig
    from daguerre.pipeline.result_cache import CacheView
    from daguerre.pipeline.storage import Storage

    storage = Storage(str(tmp_path))
    request = ImageRequest(id="a", prompt="a vase", seed=1)
    plain = CacheView(storage, "w1").key(request, 64, 64)
    assert plain == cache_key(request, "w1", 64, 64)  # defaults keep the unsalted key
    gate = QualityConfig(enabled=True, min_std=5.0)
    salted = {
        CacheView(storage, "w1", quantize="int8").key(request, 64, 64),
        CacheView(storage, "w1", noise_on_device=True).key(request, 64, 64),
        CacheView(storage, "w1", quality=gate).key(request, 64, 64),
    }
    assert plain not in salted and len(salted) == 3
    adapter = tmp_path / "brand.safetensors"
    adapter.write_bytes(b"v1")
    with_lora = request.model_copy(update={"lora": str(adapter)})
    before = CacheView(storage, "w1").key(with_lora, 64, 64)
    os.utime(adapter, ns=(1, 1))  # retrained in place: same path, another file
    assert CacheView(storage, "w1").key(with_lora, 64, 64) not in (before, plain)
    gone = request.model_copy(update={"lora": str(tmp_path / "missing.safetensors")})
    assert CacheView(storage, "w1").key(gone, 64, 64) is None  # the engine reports it


def test_a_second_job_sharing_the_cache_makes_nothing_new(ray_session, tmp_path):
    from daguerre.cluster.job import run_job
    from daguerre.pipeline.catalog import read_metadata
    from daguerre.pipeline.storage import Storage

    rows = [{"id": f"p-{i}", "prompt": "a lamp", "seed": i, "steps": 2} for i in range(4)]
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "first.parquet")
    renamed = [{**r, "id": f"sku-{i}"} for i, r in enumerate(rows[:3])]
    renamed.append({"id": "new", "prompt": "a lamp", "seed": 99, "steps": 2})
    pq.write_table(pa.Table.from_pylist(renamed, schema=schema), tmp_path / "second.parquet")
    cache = CacheConfig(enabled=True, prefix=str(tmp_path / "shared-cache"))
    engine = EngineConfig(model="tiny", device="cpu")
    first = run_job(str(tmp_path / "first.parquet"), str(tmp_path / "a"),
                    JobConfig(engine=engine, cache=cache), progress=False)  # fmt: skip
    assert first.generated == 4 and first.cache_hits == 0
    assert len(list((tmp_path / "shared-cache").rglob("*.png"))) == 4
    webp = JobConfig(engine=engine, cache=cache, encoding=EncodingConfig(format="webp"))
    second = run_job(str(tmp_path / "second.parquet"), str(tmp_path / "b"), webp, progress=False)
    assert second.generated == 4 and second.cache_hits == 3
    records = {r["id"]: r for r in read_metadata(Storage(str(tmp_path / "b"))).to_pylist()}
    assert {i for i, r in records.items() if r["cache_hit"]} == {"sku-0", "sku-1", "sku-2"}
    assert records["new"]["cache_source"] is None and records["sku-1"]["format"] == "webp"
    for i in range(3):  # the same pixels as the first job's (within WebP's loss)
        made = pixels((tmp_path / f"a/images/p-{i}.png").read_bytes()).astype(int)
        hit = pixels((tmp_path / f"b/images/sku-{i}.webp").read_bytes()).astype(int)
        assert np.abs(made - hit).mean() < 12
        assert records[f"sku-{i}"]["seed"] == i and records[f"sku-{i}"]["cache_source"]
    from daguerre.pipeline.report import inspect_output

    assert inspect_output(str(tmp_path / "b")).cache_hits == 3  # what `daguerre inspect` shows
