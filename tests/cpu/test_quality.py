"""The quality gate (quality:): rejected images never reach images/ and are recorded with
their reason, regenerated with a derived seed first when asked; in a job and online."""

from __future__ import annotations

import base64
import textwrap

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
)
from daguerre.pipeline.quality import QualityConfig, QualityGate, check_quality, derived_seed
from daguerre.pipeline.schema import GeneratedImage, ImageRequest, StageTimings, manifest_schema
from PIL import Image

pytestmark = pytest.mark.timeout(300)
CLASSIFIER = '''
def verdict(pixels, request):
    """Rejects prompts asking for it; rejects seed 7 of "retry" prompts (not its regenerations)."""
    if "crash" in request.prompt:
        raise RuntimeError("the check broke")
    if "reject" in request.prompt:
        return "the prompt asks to be rejected"
    if "retry" in request.prompt and request.seed == 7:
        return False
    return None
'''


@pytest.fixture
def classifier(tmp_path) -> str:
    path = tmp_path / "gate.py"
    path.write_text(textwrap.dedent(CLASSIFIER))
    return f"{path}:verdict"


def image(pixels: np.ndarray) -> GeneratedImage:
    request = ImageRequest(id="a", prompt="x")
    return GeneratedImage(request=request, image=pixels, seed=1, width=pixels.shape[1],
                          height=pixels.shape[0], batch_size=1, scheduler_config="{}",
                          timings=StageTimings())  # fmt: skip


def test_the_gate_names_what_is_wrong():
    gate = QualityGate(QualityConfig(enabled=True, min_side=32))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    half = np.zeros((64, 64, 3), np.uint8)
    half[32:] = 255
    assert gate.reason(image(noise)) is None
    assert "near-uniform" in gate.reason(image(np.zeros((64, 64, 3), np.uint8)))
    assert "near-uniform" in gate.reason(image(np.full((64, 64, 3), 128, np.uint8)))
    assert "clipped: 100% of pixels" in gate.reason(image(half))
    assert "under min_side 32" in gate.reason(image(noise[:16]))


def test_a_classifier_that_raises_rejects_that_image_only(classifier):
    gate = QualityGate(QualityConfig(enabled=True, classifier=classifier))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    crash = image(noise)
    crash.request = ImageRequest(id="c", prompt="crash it")
    assert gate.reason(crash) == "classifier failed: RuntimeError: the check broke"
    assert gate.reason(image(noise)) is None


def test_a_rejected_image_is_regenerated_with_a_derived_seed(tiny_engine, classifier):
    gate = QualityGate(QualityConfig(enabled=True, classifier=classifier, regenerate=2))
    requests = [ImageRequest(id="r", prompt="retry me", seed=7, steps=2),
                ImageRequest(id="k", prompt="keep me", seed=7, steps=2),
                ImageRequest(id="x", prompt="reject me", seed=3, steps=2)]  # fmt: skip
    results = gate.run(lambda retries, _: tiny_engine.generate(retries), requests,
                       tiny_engine.generate(requests))  # fmt: skip
    retried, kept, rejected = results
    assert retried.seed == derived_seed(7, 1) and retried.request == requests[0]
    again = tiny_engine.generate([requests[0].model_copy(update={"seed": derived_seed(7, 1)})])
    assert np.abs(retried.image.astype(int) - again[0].image.astype(int)).max() <= 1
    assert kept.seed == 7
    assert str(rejected) == "classifier: the prompt asks to be rejected after 2 regenerations"


def test_a_job_records_rejections_and_writes_only_what_passed(ray_session, tmp_path, classifier):
    from daguerre.cluster.job import run_job

    rows = [{"id": "ok", "prompt": "a vase", "seed": 1, "steps": 2},
            {"id": "retry", "prompt": "retry a lamp", "seed": 7, "steps": 2},
            {"id": "bad", "prompt": "reject a cup", "seed": 3, "steps": 2}]  # fmt: skip
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "m.parquet")
    quality = QualityConfig(enabled=True, classifier=classifier, regenerate=1, keep_rejected=True)
    config = JobConfig(engine=EngineConfig(model="tiny", device="cpu"), quality=quality)
    out = tmp_path / "out"
    summary = run_job(str(tmp_path / "m.parquet"), str(out), config, progress=False)
    assert summary.generated == 2 and summary.errors_by_stage == {"quality": 1}
    seeds = {r["id"]: r["seed"] for r in pads.dataset(out / "metadata").to_table().to_pylist()}
    assert seeds == {"ok": 1, "retry": derived_seed(7, 1)}
    (error,) = pads.dataset(out / "errors").to_table().to_pylist()
    assert error["id"] == "bad" and error["stage"] == "quality" and error["field"] == "image"
    assert error["reason"] == "classifier: the prompt asks to be rejected after 1 regenerations"
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["ok.png", "retry.png"]
    kept = out / "rejected" / "bad.png"  # keep_rejected: its last attempt, named by its row
    assert error["uri"] == f"file://{kept}" and Image.open(kept).size == (64, 64)


def test_online_a_rejected_image_is_a_422_naming_it(ray_session, tmp_path, classifier):
    from daguerre.cluster.serve import start
    from ray import serve
    from test_api_contract import _free_port

    engine = EngineConfig(model="tiny", device="cpu", torch_threads=1)
    quality = QualityConfig(enabled=True, classifier=classifier, regenerate=1, keep_rejected=True)
    config = ServeConfig(port=_free_port(), models=[ModelDeploymentConfig(engine=engine, num_cpus=1)],
                         output=str(tmp_path / "out"), quality=quality)  # fmt: skip
    url = start(config)
    try:
        small = {"size": "64x64", "steps": 2}
        resp = httpx.post(f"{url}/v1/images/generations", json={"prompt": "reject it", **small},
                          timeout=120)  # fmt: skip
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["code"] == "quality_rejected" and error["param"] == "image"
        assert "the prompt asks to be rejected after 1 regenerations" in error["message"]
        (row,) = pads.dataset(tmp_path / "out" / "errors").to_table().to_pylist()
        assert row["stage"] == "quality" and row["uri"].startswith(
            f"file://{tmp_path}/out/rejected/"
        )
        assert Image.open(row["uri"].removeprefix("file://")).size == (64, 64)
        ok = httpx.post(f"{url}/v1/images/generations", timeout=120,
                        json={"prompt": "retry it", "seed": 7, **small}).json()  # fmt: skip
        assert ok["data"][0]["seed"] == derived_seed(7, 1) and base64.b64decode(
            ok["data"][0]["b64_json"]
        )
    finally:
        serve.shutdown()


def test_an_unloadable_classifier_fails_before_any_actor_starts(tmp_path):
    from daguerre.cluster.serve import build_app

    for spec, words in (("no_such_module:fn", "ModuleNotFoundError"), ("nocolon", "module:function"),
                        (f"{tmp_path}/missing.py:fn", "cannot load")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"quality.classifier: .*{words}"):
            check_quality(QualityConfig(enabled=True, classifier=spec))
    with pytest.raises(ConfigError, match="quality.classifier"):
        build_app(ServeConfig(quality=QualityConfig(enabled=True, classifier="nope:fn")))


def test_a_rejection_crossing_ray_is_an_errors_row_of_stage_quality():
    """What a Serve replica returns for a rejected image of a batch-class call (the
    --via-serve job) arrives whole and becomes the same errors row as the actor pool's."""
    import pickle

    from daguerre.cluster.stages import engine_rows
    from daguerre.pipeline.quality import Rejected

    request = ImageRequest(id="a", prompt="x")
    rows = [{"id": "a", "request": request.model_dump_json(), "row": None,
             "error_field": None, "error_reason": None}]  # fmt: skip
    provenance = {"model": "tiny", "weights_hash": "h", "backend": {}, "node_id": "n",
                  "actor_id": "r"}  # fmt: skip
    rejected = pickle.loads(pickle.dumps(Rejected("near-uniform: grey-level std 0.00 < 2.0")))
    (row,) = engine_rows(rows, [request], [rejected], [provenance], provenance).to_pylist()
    assert (row["error_stage"], row["error_field"]) == ("quality", "image")
    assert row["error_reason"] == "near-uniform: grey-level std 0.00 < 2.0"
