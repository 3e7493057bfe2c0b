"""The online service against a real Serve app on 127.0.0.1, through the official OpenAI client.

Two apps share the session's Ray and one HTTP port: `/` (the tiny model, no auth) and
`/strict` (bearer token, a replica that takes one request at a time and queues one more,
so overload is easy to provoke).
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import socket
import threading

import httpx2 as httpx
import numpy as np
import openai
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.pipeline.config import EngineConfig, JobConfig, ModelDeploymentConfig, ServeConfig
from daguerre.pipeline.schema import manifest_schema
from PIL import Image

pytestmark = pytest.mark.timeout(300)

TOKEN = "s3cret-token-for-tests"
SMALL = {"size": "64x64", "extra_body": {"steps": 4}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from daguerre.cluster.serve import start
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    engine = EngineConfig(model="tiny", device="cpu", max_batch_size=8, torch_threads=2)
    main = ServeConfig(
        port=port,
        models=[ModelDeploymentConfig(engine=engine, num_cpus=1)],
        output=str(root / "out"),
    )
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    strict_engine = engine.model_copy(update={"max_batch_size": 1})
    strict = ServeConfig(
        port=port,
        models=[
            ModelDeploymentConfig(
                engine=strict_engine,
                num_cpus=0.5,
                max_ongoing_requests=1,
                max_queued_requests=1,
                retry_after_s=2,
            )
        ],
        output=str(root / "strict-out"),
        auth_token_file=str(token_file),
    )
    url = start(main)
    strict_url = start(strict, name="strict", route_prefix="/strict")
    yield {"url": url, "strict": strict_url, "out": root / "out"}
    serve.shutdown()


def client(base: str, api_key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, **kw)


def decode(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # 1/255


def engine_stats(base: str, headers: dict | None = None) -> dict:
    return httpx.get(f"{base}/v1/stats", headers=headers).json()["tiny"]


# -- the OpenAI-compatible API -----------------------------------------------------------


def test_openai_client_b64_and_seeds(server):
    c = client(server["url"])
    pair = c.images.generate(model="tiny", prompt="a red fox", n=2, response_format="b64_json",
                             size="64x64", extra_body={"steps": 4, "seed": 11})  # fmt: skip
    assert pair.created > 0 and len(pair.data) == 2
    first, second = (decode(d.b64_json) for d in pair.data)
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
    assert [d.model_extra["seed"] for d in pair.data] == [11, 12]
    # image i of n is the image of seed + i on its own: reproducible one by one
    lone = c.images.generate(prompt="a red fox", size="64x64", extra_body={"steps": 4, "seed": 12})
    assert_close(decode(lone.data[0].b64_json), second)


def test_default_size_and_model(server):
    resp = client(server["url"]).images.generate(prompt="a boat", extra_body={"steps": 2})
    assert decode(resp.data[0].b64_json).shape == (64, 64, 3)  # the tiny preset's native size


def test_url_response_writes_image_and_metadata(server):
    resp = client(server["url"]).images.generate(prompt="a lighthouse", response_format="url",
                                                 user="user-42", **SMALL)  # fmt: skip
    url = resp.data[0].url
    assert url.startswith(server["url"] + "/v1/files/images/online/")
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    image_id = resp.data[0].model_extra["id"]
    table = pads.dataset(server["out"] / "metadata", format="parquet").to_table()
    rows = [r for r in table.to_pylist() if r["id"] == image_id]
    assert len(rows) == 1
    row = rows[0]
    assert row["sha256"] == hashlib.sha256(fetched.content).hexdigest()
    assert row["uri"] == str(server["out"] / "images" / f"{image_id}.png")
    assert dict(row["metadata"]) == {"user": "user-42"} and row["model"] == "tiny"
    assert row["timings"]["denoise_s"] > 0 and row["timings"]["encode_png_s"] > 0


def test_online_image_equals_batch_job_image(server, tmp_path):
    from daguerre.cluster.job import run_job

    row = {"id": "same", "prompt": "a green hill", "seed": 7, "steps": 5, "width": 64,
           "height": 64, "scheduler": "euler_a", "negative_prompt": "fog"}  # fmt: skip
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist([row], schema=schema), tmp_path / "m.parquet")
    config = JobConfig(engine=EngineConfig(model="tiny", device="cpu"), actor_num_cpus=0.5)
    summary = run_job(str(tmp_path / "m.parquet"), str(tmp_path / "out"), config, progress=False)
    assert summary.generated == 1
    batch = np.asarray(Image.open(tmp_path / "out" / "images" / "same.png"))
    online = client(server["url"]).images.generate(
        prompt="a green hill", size="64x64",
        extra_body={"seed": 7, "steps": 5, "scheduler": "euler_a", "negative_prompt": "fog"},
    )  # fmt: skip
    assert_close(decode(online.data[0].b64_json), batch)


def test_sixteen_concurrent_clients_are_batched(server):
    before = engine_stats(server["url"])
    c = client(server["url"], timeout=240)

    def one(i: int) -> np.ndarray:
        resp = c.images.generate(prompt=f"a tree, variant {i}", size="64x64",
                                 extra_body={"steps": 6, "seed": i})  # fmt: skip
        return decode(resp.data[0].b64_json)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        images = list(pool.map(one, range(16)))
    assert len(images) == 16 and all(i.shape == (64, 64, 3) for i in images)
    after = engine_stats(server["url"])
    assert after["images"] - before["images"] == 16
    grew = {
        int(size): count - before["batch_sizes"].get(size, 0)
        for size, count in after["batch_sizes"].items()
    }
    assert any(size > 1 and count > 0 for size, count in grew.items()), grew


def test_models_and_health(server):
    models = client(server["url"]).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(f"{server['url']}/healthz").json()
    assert health == {"status": "ok", "models": ["tiny"]}


# -- the native API ------------------------------------------------------------------------


def test_native_generate_returns_images_and_records(server):
    body = {"requests": [
        {"id": "native-a", "prompt": "a cup", "seed": 3, "steps": 3, "width": 64, "height": 64},
        {"prompt": "a cup", "seed": 3, "steps": 3, "width": 64, "height": 64, "scheduler": "euler",
         "metadata": {"sku": "B-2"}},
    ]}  # fmt: skip
    resp = httpx.post(f"{server['url']}/v1/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert data[0]["id"] == "native-a" and data[1]["id"].startswith("online/")
    for item in data:
        png = base64.b64decode(item["b64_json"])
        record = item["record"]
        assert record["sha256"] == hashlib.sha256(png).hexdigest()
        assert record["model"] == "tiny" and record["backend"]["device"] == "cpu"
        assert record["batch_size"] >= 1 and record["seed"] == 3
    assert data[1]["record"]["metadata"] == {"sku": "B-2"}
    assert data[1]["record"]["scheduler"] == "euler"


def test_native_errors_name_the_request_and_field(server):
    body = {
        "requests": [{"prompt": "ok"}, {"prompt": "x", "steps": 999}, {"id": "../x", "prompt": "y"}]
    }
    resp = httpx.post(f"{server['url']}/v1/generate", json=body)
    assert resp.status_code == 400
    fields = [f["field"] for f in resp.json()["error"]["fields"]]
    assert fields == ["requests.1.steps", "requests.2.id"]
    too_many = {"requests": [{"prompt": "x"}] * 11}
    resp = httpx.post(f"{server['url']}/v1/generate", json=too_many)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "requests"


# -- bad input -----------------------------------------------------------------------------

BAD_REQUESTS = {
    "malformed JSON": (b'{"prompt": "a cat", ', 400, "body", "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "body", "must be a JSON object"),
    "missing prompt": ({"n": 1}, 400, "prompt", "is required"),
    "wrong type": ({"prompt": "a cat", "n": "two"}, 400, "n", "valid integer"),
    "unknown field": ({"prompt": "a cat", "quality": "hd"}, 400, "quality", "not a known field"),
    "size not WxH": ({"prompt": "a cat", "size": "large"}, 400, "size", "WIDTHxHEIGHT"),
    "size not a multiple": ({"prompt": "a cat", "size": "100x100"}, 400, "size", "multiple of 8"),
    "size too large": ({"prompt": "a cat", "size": "4096x4096"}, 400, "size", "out of range"),
    "n zero": ({"prompt": "a cat", "n": 0}, 400, "n", "greater than or equal to 1"),
    "n eleven": ({"prompt": "a cat", "n": 11}, 400, "n", "less than or equal to 10"),
    "prompt too long": ({"prompt": "x" * 2001}, 400, "prompt", "at most 2000"),
    "steps too many": ({"prompt": "a cat", "steps": 151}, 400, "steps", "steps <= 150"),
    "bad scheduler": ({"prompt": "a cat", "scheduler": "plms"}, 400, "scheduler", "one of"),
    "bad response_format": ({"prompt": "a cat", "response_format": "jpg"}, 400, "response_format", "b64_json"),
    "unknown model": ({"prompt": "a cat", "model": "dall-e-3"}, 404, "model", "not served here"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_request_gets_json_error_naming_the_field(server, case):
    body, status, field, reason = BAD_REQUESTS[case]
    url = f"{server['url']}/v1/images/generations"
    if isinstance(body, bytes):
        resp = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        resp = httpx.post(url, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == field, error
    assert reason in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_server_keeps_serving_after_bad_input(server):
    c = client(server["url"])
    with pytest.raises(openai.BadRequestError, match="steps"):
        c.images.generate(prompt="a cat", size="64x64", extra_body={"steps": 10_000})
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.images.generate(prompt="a cat", model="nope", size="64x64")
    resp = c.images.generate(prompt="a cat", **SMALL)
    assert decode(resp.data[0].b64_json).shape == (64, 64, 3)


def test_client_disconnect_does_not_break_its_batch(server):
    url = f"{server['url']}/v1/images/generations"
    body = {"prompt": "a slow painting", "size": "64x64", "steps": 40}
    results: dict[str, object] = {}

    def impatient():
        try:
            httpx.post(url, json={**body, "seed": 1}, timeout=0.3)
            results["impatient"] = "answered"
        except httpx.TimeoutException:
            results["impatient"] = "gave up"

    def patient(i: int):
        results[f"patient-{i}"] = httpx.post(url, json={**body, "seed": 10 + i}, timeout=120)

    threads = [threading.Thread(target=impatient)]
    threads += [threading.Thread(target=patient, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["impatient"] == "gave up"
    for i in range(3):
        resp = results[f"patient-{i}"]
        assert resp.status_code == 200, resp.text
        assert decode(resp.json()["data"][0]["b64_json"]).shape == (64, 64, 3)
    after = client(server["url"]).images.generate(prompt="after", **SMALL)
    assert len(after.data) == 1


# -- auth and overload (the /strict app) ---------------------------------------------------


def test_auth_rejects_missing_and_wrong_tokens(server):
    base = server["strict"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        resp = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x"}, headers=headers)
        assert resp.status_code == 401
        error = resp.json()["error"]
        assert error["type"] == "authentication_error" and "bearer token" in error["message"]
        assert TOKEN not in resp.text
    assert httpx.get(f"{base}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(base, api_key="wrong").images.generate(prompt="x", **SMALL)
    assert httpx.get(f"{base}/healthz").status_code == 200  # probes need no token


def test_auth_accepts_the_token(server):
    resp = client(server["strict"], api_key=TOKEN).images.generate(prompt="a key", **SMALL)
    assert decode(resp.data[0].b64_json).shape == (64, 64, 3)


def test_overload_returns_503_with_retry_after(server):
    url = f"{server['strict']}/v1/images/generations"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"prompt": "a crowd", "size": "64x64", "steps": 30}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda i: httpx.post(url, json={**body, "seed": i}, headers=headers, timeout=120),
            range(8),
        ))  # fmt: skip
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    assert set(codes) <= {200, 503}
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "2"
    assert rejected.json()["error"]["code"] == "overloaded"
    # and it serves again once the load is gone
    ok = httpx.post(url, json={**body, "steps": 2}, headers=headers, timeout=120)
    assert ok.status_code == 200
