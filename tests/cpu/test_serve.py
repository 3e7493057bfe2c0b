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


URL_SECRET = "url-secret-for-tests"


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    import os

    from daguerre.cluster.serve import start
    from ray import serve

    os.environ["DAGUERRE_URL_SECRET"] = URL_SECRET  # read when the app is built

    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    engine = EngineConfig(model="tiny", device="cpu", max_batch_size=8, torch_threads=2)
    main = ServeConfig(
        port=port,
        # 1 busy + 16 waiting requests must all fit on the one replica
        models=[ModelDeploymentConfig(engine=engine, num_cpus=1, max_ongoing_requests=32)],
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


def engine_stats(base: str, headers: dict | None = None, engines: bool = True) -> dict:
    params = {} if engines else {"engines": "false"}
    return httpx.get(f"{base}/v1/stats", headers=headers, params=params).json()["tiny"]


def wait_for(condition, what: str, timeout: float = 120.0):
    """Poll `condition()` until it is truthy (an event seen through the API), or fail."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def slow_request(base: str, headers: dict | None = None, **extra) -> concurrent.futures.Future:
    """A request that keeps the one engine busy for a while (150 steps), sent in a thread."""
    body = {"prompt": "a slow painting", "size": "64x64", "steps": 150, "seed": 99, **extra}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    return pool.submit(httpx.post, f"{base}/v1/images/generations", json=body, headers=headers,
                       timeout=300)  # fmt: skip


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
    assert url.startswith(server["url"] + "/v1/files/images/online/") and "signature=" in url
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    image_id = resp.data[0].model_extra["id"]
    table = pads.dataset(server["out"] / "metadata", format="parquet").to_table()
    rows = [r for r in table.to_pylist() if r["id"] == image_id]
    assert len(rows) == 1
    row = rows[0]
    assert row["sha256"] == hashlib.sha256(fetched.content).hexdigest()
    assert row["uri"] == (server["out"] / "images" / f"{image_id}.png").as_uri()
    assert dict(row["metadata"]) == {"user": "user-42"} and row["model"] == "tiny"
    assert row["timings"]["denoise_s"] > 0 and row["timings"]["encode_png_s"] > 0
    assert row["speed"] == "exact"


def test_the_cached_speed_tier_is_asked_for_and_recorded(server):
    resp = client(server["url"]).images.generate(
        prompt="a lighthouse", response_format="url", size="64x64",
        extra_body={"steps": 4, "speed": "cached"},
    )  # fmt: skip
    image_id = resp.data[0].model_extra["id"]
    table = pads.dataset(server["out"] / "metadata", format="parquet").to_table()
    [row] = [r for r in table.to_pylist() if r["id"] == image_id]
    assert row["speed"] == "cached"


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


def test_requests_waiting_together_share_engine_batches(server):
    """While the engine is busy, 16 requests of one bucket wait; then they run as 2 batches
    of 8 (engine.max_batch_size), not 16 batches of 1."""
    before = engine_stats(server["url"])
    busy = slow_request(server["url"])
    wait_for(lambda: engine_stats(server["url"])["running"] == 1, "the slow request to start")
    c = client(server["url"], timeout=240)

    def one(i: int) -> np.ndarray:
        resp = c.images.generate(prompt=f"a tree, variant {i}", size="64x64",
                                 extra_body={"steps": 6, "seed": i})  # fmt: skip
        return decode(resp.data[0].b64_json)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        wait_for(lambda: engine_stats(server["url"])["pending"] == 16, "16 waiting requests")
        images = [f.result() for f in futures]
    assert busy.result().status_code == 200
    assert len(images) == 16 and all(i.shape == (64, 64, 3) for i in images)
    after = engine_stats(server["url"])
    assert after["images"] - before["images"] == 17
    grew = {
        int(size): count - before["batch_sizes"].get(size, 0)
        for size, count in after["batch_sizes"].items()
    }
    assert grew.get(8) == 2 and grew.get(1) == 1, grew


def test_serve_metrics_are_scraped_from_rays_metrics_endpoint(server):
    from conftest import scrape_metrics

    client(server["url"]).images.generate(prompt="a metered lamp", extra_body={"steps": 2})
    found = scrape_metrics({
        'ray_daguerre_images_total{pool="serve"}': 1,
        'ray_daguerre_stage_seconds_count{pool="serve"}': 1,
        'ray_daguerre_queue_depth{priority="online"}': 0,
        'ray_daguerre_engine_busy_fraction{pool="serve"}': 0.01,
    })  # fmt: skip
    assert found['ray_daguerre_images_total{pool="serve"}'] >= 1, found
    assert found['ray_daguerre_stage_seconds_count{pool="serve"}'] >= 1, found
    assert 0 < found['ray_daguerre_engine_busy_fraction{pool="serve"}'] <= 1, found


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
    assert data[0]["client_id"] == "native-a" and data[0]["id"].endswith("/0")
    assert data[0]["id"].startswith("online/") and data[1]["id"].startswith("online/")
    assert "client_id" not in data[1]
    for item in data:
        png = base64.b64decode(item["b64_json"])
        record = item["record"]
        assert record["sha256"] == hashlib.sha256(png).hexdigest()
        assert record["model"] == "tiny" and record["backend"]["device"] == "cpu"
        assert record["batch_size"] == 1 and record["seed"] == 3  # two buckets: ddim, euler
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
    "bad speed": ({"prompt": "a cat", "speed": "turbo"}, 400, "speed", "exact"),
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


def test_unknown_routes_and_non_json_bodies_answer_in_the_error_shape(server):
    missing = httpx.get(f"{server['url']}/v1/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "GET /v1/nope" in missing.json()["error"]["message"]
    wrong_method = httpx.get(f"{server['url']}/v1/images/generations")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]
    form = httpx.post(f"{server['url']}/v1/images/generations", content=b'{"prompt": "x"}',
                      headers={"content-type": "text/plain"})  # fmt: skip
    assert form.status_code == 400
    assert "Content-Type: application/json (got text/plain)" in form.json()["error"]["message"]


def test_server_keeps_serving_after_bad_input(server):
    c = client(server["url"])
    with pytest.raises(openai.BadRequestError, match="steps"):
        c.images.generate(prompt="a cat", size="64x64", extra_body={"steps": 10_000})
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.images.generate(prompt="a cat", model="nope", size="64x64")
    resp = c.images.generate(prompt="a cat", **SMALL)
    assert decode(resp.data[0].b64_json).shape == (64, 64, 3)


def test_a_client_that_disconnects_gets_no_images_made(server):
    """A request waiting behind a busy engine whose client goes away is dropped before it
    starts: the engine never makes its image, and the server keeps serving."""
    import json
    import socket
    from urllib.parse import urlsplit

    before = engine_stats(server["url"])
    busy = slow_request(server["url"])
    wait_for(lambda: engine_stats(server["url"])["running"] == 1, "the slow request to start")
    address = urlsplit(server["url"])
    body = json.dumps({"prompt": "never made", "size": "64x64", "steps": 4}).encode()
    impatient = socket.create_connection((address.hostname, address.port))
    impatient.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
    wait_for(lambda: engine_stats(server["url"])["pending"] == 1, "the second request to wait")
    impatient.close()  # the client goes away while its request waits
    wait_for(lambda: engine_stats(server["url"])["pending"] == 0, "the request to be cancelled")
    assert busy.result().status_code == 200
    after = wait_for(
        lambda: (s := engine_stats(server["url"]))["dropped_cancelled"]
        > before["dropped_cancelled"] and s, "the cancelled request to be dropped",
    )  # fmt: skip
    assert after["images"] - before["images"] == 1  # the slow one only
    assert after["dropped_cancelled"] - before["dropped_cancelled"] == 1
    ok = client(server["url"]).images.generate(prompt="after", **SMALL)
    assert len(ok.data) == 1


def test_online_ids_never_collide(server):
    """Two clients sending the same id with response_format=url get two stored images and
    one metadata row each, whose sha256 matches its bytes."""
    body = {"requests": [{"id": "sku-1", "prompt": "a red cup", "seed": 1, "steps": 2}],
            "response_format": "url"}  # fmt: skip
    first = httpx.post(f"{server['url']}/v1/generate", json=body, timeout=120).json()["data"][0]
    body["requests"][0].update(prompt="a blue cup", seed=2)
    second = httpx.post(f"{server['url']}/v1/generate", json=body, timeout=120).json()["data"][0]
    assert first["client_id"] == second["client_id"] == "sku-1"
    assert first["id"] != second["id"]
    table = pads.dataset(server["out"] / "metadata", format="parquet").to_table().to_pylist()
    for item in (first, second):
        rows = [r for r in table if r["id"] == item["id"]]
        assert len(rows) == 1 and rows[0]["client_id"] == "sku-1"
        png = httpx.get(item["url"]).content
        assert hashlib.sha256(png).hexdigest() == rows[0]["sha256"] == item["record"]["sha256"]


def test_file_links_are_signed_and_expire(server):
    import time
    from urllib.parse import parse_qs, urlsplit

    from daguerre.cluster.ingress import sign_key

    resp = client(server["strict"], api_key=TOKEN).images.generate(
        prompt="a link", response_format="url", **SMALL
    )
    url = resp.data[0].url
    assert httpx.get(url).status_code == 200  # no token needed: the link is signed
    parts = urlsplit(url)
    key = parts.path.split("/v1/files/", 1)[1]
    query = parse_qs(parts.query)
    tampered = url.replace(query["signature"][0], "0" * 64)
    denied = httpx.get(tampered)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "bad_signature"
    other_key = url.replace(key, key.replace(".png", "x.png"))
    assert httpx.get(other_key).status_code == 403
    past = int(time.time()) - 10
    expired = f"{server['strict']}/v1/files/{key}?expires={past}&signature={sign_key(URL_SECRET.encode(), key, past)}"
    gone = httpx.get(expired)
    assert gone.status_code == 403 and gone.json()["error"]["code"] == "link_expired"
    assert httpx.get(f"{server['strict']}/v1/files/{key}").status_code == 401  # unsigned: token
    nul = httpx.get(f"{server['url']}/v1/files/images/a%00b.png")
    assert nul.status_code == 404 and nul.json()["error"]["code"] == "not_found"


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
    """The strict model's replica holds one request and its queue one more: with one
    running and one queued, the next is refused at once with 503 and Retry-After."""
    url = f"{server['strict']}/v1/images/generations"
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def in_flight() -> int:
        return engine_stats(server["strict"], headers, engines=False)["ingress_in_flight"]

    running = slow_request(server["strict"], headers)
    wait_for(lambda: in_flight() == 1, "the first request to reach the replica")
    queued = slow_request(server["strict"], headers, steps=2)
    wait_for(lambda: in_flight() == 2, "the second request to queue")
    rejected = httpx.post(url, json={"prompt": "one too many", "size": "64x64", "steps": 2},
                          headers=headers, timeout=120)  # fmt: skip
    assert rejected.status_code == 503, rejected.text
    assert rejected.headers["retry-after"] == "2"
    assert rejected.json()["error"]["code"] == "overloaded"
    assert running.result().status_code == 200 and queued.result().status_code == 200
    # and it serves again once the load is gone
    ok = httpx.post(url, json={"prompt": "a calm", "size": "64x64", "steps": 2}, headers=headers,
                    timeout=120)  # fmt: skip
    assert ok.status_code == 200
