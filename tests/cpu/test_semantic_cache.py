"""The semantic cache (cache.semantic_threshold): a near-duplicate prompt, all else equal,
is answered from the stored image, marked with the source entry and the similarity; a
prompt below the threshold, or another seed, is made. On the engine, in a job and online."""

from __future__ import annotations

import base64

import httpx2 as httpx
import numpy as np
import pyarrow as pa
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
from daguerre.pipeline.formats import decode
from daguerre.pipeline.result_cache import CacheConfig
from daguerre.pipeline.schema import ImageRequest, manifest_schema
from daguerre.pipeline.semantic_cache import SemanticIndex
from daguerre.pipeline.storage import Storage

pytestmark = pytest.mark.timeout(300)
TEAPOT = "a red ceramic teapot on a table"
NEAR = "a red ceramic teapot on a wooden table"  # 0.977 on the tiny model's text encoder
OTHER = "a pair of running shoes"  # 0.788


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return (v / np.linalg.norm(v)).astype(np.float16)


def test_the_nearest_prompt_at_or_above_the_threshold_wins(tmp_path):
    index = SemanticIndex(Storage(str(tmp_path)), 0.9)
    index.add("g" * 40, "k1", "a teapot", unit(1, 0, 0))
    index.add("g" * 40, "k2", "a red teapot", unit(1, 0.3, 0))
    match = index.nearest("g" * 40, unit(1, 0.25, 0))
    assert match.key == "k2" and match.prompt == "a red teapot" and match.similarity > 0.99
    assert index.nearest("g" * 40, unit(0, 1, 0)) is None  # below the threshold
    assert index.nearest("h" * 40, unit(1, 0, 0)) is None  # another group: no entries
    assert index.nearest("g" * 40, unit(1, 0, 0, 0)) is None  # another encoder's width


@pytest.fixture(scope="module")
def engine_thread(tmp_path_factory):
    from daguerre.pipeline.engine_thread import EngineThread

    cache = Storage(str(tmp_path_factory.mktemp("cache")))
    engine = EngineConfig(model="tiny", device="cpu", torch_threads=1)
    return EngineThread(engine, semantic=SemanticIndex(cache, 0.95)), cache


def made(thread, cache, request: ImageRequest):
    """One request through the engine and the write path (which indexes what it made)."""
    from daguerre.pipeline.files import Provenance, WriteOptions
    from daguerre.pipeline.outputs import write_outputs

    [result] = thread.generate_each([request])
    provenance = Provenance(**result.made_by) if result.made_by else Provenance(
        model="tiny", weights_hash=thread.engine.model.weights_hash, backend={}, node_id="n",
        actor_id="engine")  # fmt: skip
    [stored] = write_outputs([(result, provenance)], None, run_id="r", version="t",
                             options=WriteOptions(cache=cache))  # fmt: skip
    return result, stored.record


def test_a_near_duplicate_prompt_is_served_and_others_are_made(engine_thread):
    thread, cache = engine_thread
    first, record = made(thread, cache, ImageRequest(id="a", prompt=TEAPOT, seed=1, steps=2))
    assert not record.cache_hit and first.prompt_vector is not None
    near, record = made(thread, cache, ImageRequest(id="b", prompt=NEAR, seed=1, steps=2))
    assert record.cache_hit and record.cache_source and 0.95 <= record.cache_similarity < 1
    assert record.prompt == NEAR and np.array_equal(near.image, first.image)
    assert record.actor_id == "engine"  # the provenance of what made the pixels
    for other in (ImageRequest(id="c", prompt=OTHER, seed=1, steps=2),
                  ImageRequest(id="d", prompt=NEAR, seed=2, steps=2),
                  ImageRequest(id="e", prompt=NEAR, seed=1, steps=3)):  # fmt: skip
        _, record = made(thread, cache, other)
        assert not record.cache_hit, other


def test_a_job_serves_variations_of_a_scene_from_the_cache(ray_session, tmp_path):
    from daguerre.cluster.job import run_job
    from daguerre.pipeline.catalog import read_metadata

    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    first = [{"id": "scene", "prompt": TEAPOT, "seed": 1, "steps": 2}]
    second = [{"id": "near", "prompt": NEAR, "seed": 1, "steps": 2},
              {"id": "other", "prompt": OTHER, "seed": 1, "steps": 2}]  # fmt: skip
    for name, rows in (("first", first), ("second", second)):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / f"{name}.parquet")
    cache = CacheConfig(enabled=True, prefix=str(tmp_path / "cache"), semantic_threshold=0.95)
    config = JobConfig(engine=EngineConfig(model="tiny", device="cpu"), cache=cache)
    run_job(str(tmp_path / "first.parquet"), str(tmp_path / "a"), config, progress=False)
    summary = run_job(str(tmp_path / "second.parquet"), str(tmp_path / "b"), config,
                      progress=False)  # fmt: skip
    assert summary.generated == 2 and summary.cache_hits == 1
    records = {r["id"]: r for r in read_metadata(Storage(str(tmp_path / "b"))).to_pylist()}
    assert records["near"]["cache_hit"] and records["near"]["cache_similarity"] >= 0.95
    assert not records["other"]["cache_hit"] and records["other"]["cache_similarity"] is None
    scene = decode((tmp_path / "a/images/scene.png").read_bytes())
    assert np.array_equal(decode((tmp_path / "b/images/near.png").read_bytes()), scene)


def test_online_a_near_duplicate_is_answered_from_the_cache(ray_session, tmp_path):
    from daguerre.cluster.serve import start
    from ray import serve
    from test_api_contract import _free_port

    engine = EngineConfig(model="tiny", device="cpu", torch_threads=1)
    cache = CacheConfig(enabled=True, semantic_threshold=0.95)
    config = ServeConfig(port=_free_port(), models=[ModelDeploymentConfig(engine=engine, num_cpus=1)],
                         output=str(tmp_path / "out"), cache=cache)  # fmt: skip
    url = start(config)
    try:
        ask = lambda prompt: httpx.post(f"{url}/v1/generate", timeout=120, json={  # noqa: E731
            "requests": [{"prompt": prompt, "seed": 3, "steps": 2}]}).json()["data"][0]  # fmt: skip
        first, near, other = ask(TEAPOT), ask(NEAR), ask(OTHER)
        assert not first["record"]["cache_hit"] and not other["record"]["cache_hit"]
        assert near["record"]["cache_hit"] and near["record"]["cache_similarity"] >= 0.95
        assert np.array_equal(decode(base64.b64decode(near["b64_json"])),
                              decode(base64.b64decode(first["b64_json"])))  # fmt: skip
    finally:
        serve.shutdown()


def test_a_semantic_threshold_without_the_cache_is_one_line():
    with pytest.raises(ConfigError, match=r"cache: .*semantic_threshold needs enabled: true"):
        validate_config(JobConfig, {"cache": {"semantic_threshold": 0.95}})
