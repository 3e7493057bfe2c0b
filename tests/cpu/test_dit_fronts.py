"""The transformer families through both fronts: a `daguerre generate` job on tiny-flux
(the family's default scheduler, per-row refusals in errors/, resume) and one Serve app
serving tiny-sd3 and tiny-flux side by side through the official openai client."""

from __future__ import annotations

import base64
import io
import socket

import httpx2 as httpx
import numpy as np
import openai
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.cluster.job import run_job
from daguerre.pipeline.config import EngineConfig, JobConfig, ModelDeploymentConfig, ServeConfig
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.schema import ImageRequest, manifest_schema
from PIL import Image

pytestmark = pytest.mark.timeout(400)

VALID = [
    {"id": "f-0", "prompt": "a lighthouse at dusk", "seed": 1, "steps": 3},  # default: euler
    {"id": "f-1", "prompt": "a teapot", "seed": 2, "steps": 3, "scheduler": "euler_a"},
    {"id": "f-2", "prompt": "a fox", "seed": 3, "steps": 2, "width": 96, "height": 64,
     "scheduler": "dpmpp_2m", "guidance_scale": 2.0},
    {"id": "f-3", "prompt": "a kettle", "seed": 4, "steps": 4, "speed": "cached"},
]  # fmt: skip
REFUSED = {  # id -> (row, field)
    "f-neg": ({"id": "f-neg", "prompt": "a cat", "negative_prompt": "blurry", "steps": 2},
              "negative_prompt"),
    "f-ddim": ({"id": "f-ddim", "prompt": "a cat", "scheduler": "ddim", "steps": 2}, "scheduler"),
    "f-grid": ({"id": "f-grid", "prompt": "a cat", "width": 72, "steps": 2}, "size"),
}  # fmt: skip


def write(rows, path) -> str:
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


@pytest.fixture(scope="module")
def flux_job(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-job")
    manifest = write([*VALID, *(row for row, _ in REFUSED.values())], root / "m.parquet")
    config = JobConfig(batch_size=4, engine=EngineConfig(model="tiny-flux", device="cpu"))
    summary = run_job(manifest, str(root / "out"), config, progress=False)
    return {"manifest": manifest, "out": root / "out", "config": config, "summary": summary}


def test_flux_job_makes_images_and_records_refusals(flux_job):
    out, summary = flux_job["out"], flux_job["summary"]
    assert (summary.generated, summary.errors) == (len(VALID), len(REFUSED))
    records = {r["id"]: r for r in pads.dataset(out / "metadata").to_table().to_pylist()}
    assert sorted(records) == sorted(r["id"] for r in VALID)
    assert records["f-0"]["scheduler"] == "euler"  # the family's default, recorded
    assert records["f-0"]["guidance_scale"] == 3.5  # FLUX's distilled guidance default
    assert records["f-2"]["scheduler"] == "dpmpp_2m"
    assert records["f-3"]["speed"] == "cached"  # TaylorSeer step caching, recorded
    assert dict(records["f-0"]["backend"])["transformer"] == "flux eager"
    image = Image.open(out / "images" / "f-2.png")
    assert image.size == (96, 64) and image.mode == "RGB"
    errors = pads.dataset(out / "errors").to_table().to_pylist()
    assert {e["id"]: e["field"] for e in errors} == {k: f for k, (_, f) in REFUSED.items()}
    assert all(e["stage"] == "generate" and e["reason"] for e in errors)
    assert not [e for e in errors if e["reason"].startswith(("RequestRefused", e["field"]))]


def test_flux_job_image_equals_engine_image(flux_job):
    engine = DiffusionEngine(EngineConfig(model="tiny-flux", device="cpu"))
    request = ImageRequest(**VALID[0], scheduler="euler", guidance_scale=3.5)  # the defaults
    alone = engine.generate([request])[0].image
    from_job = np.asarray(Image.open(flux_job["out"] / "images" / "f-0.png"))
    assert np.abs(alone.astype(int) - from_job.astype(int)).max() <= 1


def test_flux_job_rerun_skips_finished_work(flux_job):
    again = run_job(flux_job["manifest"], str(flux_job["out"]), flux_job["config"],
                    progress=False)  # fmt: skip
    assert again.skipped_done == len(VALID) and again.generated == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from daguerre.cluster.serve import start
    from ray import serve

    models = [ModelDeploymentConfig(name=name, num_cpus=0.5, engine=EngineConfig(
        model=name, device="cpu", max_batch_size=4, torch_threads=1))
        for name in ("tiny-sd3", "tiny-flux")]  # fmt: skip
    config = ServeConfig(port=free_port(), models=models,
                         output=str(tmp_path_factory.mktemp("dit-serve") / "out"))  # fmt: skip
    yield start(config, name="dit", route_prefix="/dit")
    serve.shutdown()  # the proxy too: the next module starts Serve on its own port


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_openai_client_routes_to_each_transformer(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list().data} >= {"tiny-sd3", "tiny-flux"}
    for model in ("tiny-sd3", "tiny-flux"):
        resp = client.images.generate(model=model, prompt="a red fox", size="64x64", n=2,
                                      response_format="b64_json",
                                      extra_body={"steps": 3, "seed": 5})  # fmt: skip
        first, second = (decode(d.b64_json) for d in resp.data)
        assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
    engine = DiffusionEngine(EngineConfig(model="tiny-flux", device="cpu"))
    alone = engine.generate([ImageRequest(id="x", prompt="a red fox", steps=3, seed=5,
                                          scheduler="euler", guidance_scale=3.5, width=64,
                                          height=64)])[0]  # FLUX's defaults  # fmt: skip
    assert np.abs(alone.image.astype(int) - first.astype(int)).max() <= 1


def test_a_refused_request_is_a_400_naming_the_field(server):
    body = {"model": "tiny-flux", "requests": [
        {"prompt": "a cat", "negative_prompt": "blurry", "steps": 2}]}  # fmt: skip
    resp = httpx.post(f"{server}/v1/generate", json=body, timeout=60)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["fields"][0]["field"] == "negative_prompt"
    assert "takes no negative prompt" in error["fields"][0]["reason"]
    assert "negative_prompt: negative_prompt" not in error["message"]  # the field said once
    ok = httpx.post(f"{server}/v1/generate", timeout=60, json={
        "model": "tiny-sd3", "requests": [{"prompt": "a cat", "negative_prompt": "blurry",
                                           "steps": 2}]})  # fmt: skip
    assert ok.status_code == 200
