"""Images in online: `POST /v1/images/edits` through the official OpenAI client, the native
API's base64 init images, and the deployment's compositing, on a real Serve app on
127.0.0.1. Bad uploads are 400s naming the field, and the server keeps serving."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket

import httpx2 as httpx
import numpy as np
import openai
import pytest
from daguerre.pipeline.config import EngineConfig, ModelDeploymentConfig, ServeConfig
from PIL import Image

pytestmark = pytest.mark.timeout(300)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


PHOTO = png(np.random.default_rng(0).integers(0, 256, (52, 70, 3), dtype=np.uint8))
MASK_PIXELS = np.zeros((52, 70), np.uint8)
MASK_PIXELS[:, 40:] = 255  # repaint the right part
MASK = png(MASK_PIXELS)
LOGO_BOX = {"x": 0, "y": 0, "width": 8, "height": 8}


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from daguerre.cluster.serve import start
    from ray import serve

    root = tmp_path_factory.mktemp("edits")
    logo = np.zeros((8, 8, 3), np.uint8)
    logo[:] = (0, 0, 255)
    Image.fromarray(logo).save(root / "logo.png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = EngineConfig(model="tiny", device="cpu", max_batch_size=4, torch_threads=2)
    composite = {"layers": [
        {"kind": "image", "source": str(root / "logo.png"), "box": LOGO_BOX},
        {"kind": "text", "text": "{user}", "size": 10, "box": {"x": 0, "y": 0.6, "width": 1.0,
                                                                "height": 0.4}},
    ]}  # fmt: skip
    config = ServeConfig(port=port, output=str(root / "out"), composite=composite,
                         models=[ModelDeploymentConfig(engine=engine, num_cpus=1)])  # fmt: skip
    url = start(config)
    yield url
    serve.shutdown()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def native(url: str, **item) -> dict:
    body = {"requests": [{"prompt": "a mug on a beach", "steps": 4, "seed": 7,
                          "metadata": {"user": "shop"}, **item}]}  # fmt: skip
    return httpx.post(f"{url}/v1/generate", json=body, timeout=120).json()


def test_openai_client_edits_an_image(server):
    answer = client(server).images.edit(
        image=("mug.png", PHOTO, "image/png"), prompt="a mug on a beach", n=2, user="shop",
        extra_body={"steps": 4, "seed": 7, "strength": 0.5},
    )  # fmt: skip
    images = [decode(d.b64_json) for d in answer.data]
    assert [i.shape for i in images] == [(48, 64, 3)] * 2  # 70x52 rounded down to 8s
    assert not np.array_equal(images[0], images[1])  # seeds 7 and 8
    assert (images[0][:8, :8] == (0, 0, 255)).all()  # the deployment's logo layer

    # The native API with the same photo in base64: the same image, and its record.
    made = native(server, init_image=base64.b64encode(PHOTO).decode(), strength=0.5)
    record = made["data"][0]["record"]
    sha = hashlib.sha256(PHOTO).hexdigest()
    assert record["init_image"] == f"upload:sha256:{sha}" and record["init_sha256"] == sha
    assert (record["strength"], record["steps_run"], record.get("resize")) == (0.5, 2, None)
    assert [p["kind"] for p in json.loads(record["composite"])] == ["image", "text"]
    assert np.abs(decode(made["data"][0]["b64_json"]).astype(int) - images[0]).mean() <= 1.0


def test_a_mask_inpaints_and_size_resizes(server):
    answer = client(server).images.edit(
        image=("mug.png", PHOTO, "image/png"), mask=("mask.png", MASK, "image/png"),
        prompt="a lamp", size="64x64", user="shop",
        extra_body={"steps": 4, "seed": 3, "strength": 1.0, "resize": "stretch"},
    )  # fmt: skip
    assert decode(answer.data[0].b64_json).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "files, data, field, words",
    [
        ({"image": ("a.png", b"not an image", "image/png")}, {}, "image", "not a PNG, JPEG"),
        ({"image": ("a.png", PHOTO, "image/png"),
          "mask": ("m.png", png(np.zeros((8, 8), np.uint8)), "image/png")}, {}, "mask", "8x8"),
        ({}, {}, "image", "is required"),
        ({"image": ("a.png", PHOTO, "image/png")}, {"strength": "2"}, "strength", "out of range"),
        ({"image": ("a.png", PHOTO, "image/png")}, {"n": "two"}, "n", ""),
        ({"image": ("a.png", PHOTO, "image/png")}, {"colour": "red"}, "colour", "not a known"),
    ],
)  # fmt: skip
def test_bad_edits_are_400_naming_the_field(server, files, data, field, words):
    form = {"prompt": "x", "user": "shop", "steps": "2", **data}
    resp = httpx.post(f"{server}/v1/images/edits", files=files or None, data=form, timeout=60)
    assert resp.status_code == 400, resp.text
    fields = {f["field"]: f["reason"] for f in resp.json()["error"]["fields"]}
    assert field in fields and words in fields[field]


def test_bad_native_uploads_and_bodies_are_400(server):
    bad = native(server, init_image="upload:sha256:abc")
    assert bad["error"]["fields"][0]["field"] == "requests.0.init_image"
    garbage = native(server, init_image=base64.b64encode(b"garbage").decode())
    assert garbage["error"]["fields"][0]["field"] == "requests.0.init_image"
    resp = httpx.post(f"{server}/v1/images/edits", json={"prompt": "x"}, timeout=60)
    assert resp.status_code == 400
    ok = native(server, steps=2)
    assert "data" in ok  # still serving


def test_a_row_the_layers_cannot_take_is_a_400(server):
    # The text layer fills {user}: a request without it cannot be composited.
    made = native(server, metadata={}, steps=2)
    assert made["error"]["fields"][0]["field"] == "composite.layers[1].text"
    assert "user" in made["error"]["fields"][0]["reason"]


def test_online_layers_cannot_read_files_a_request_names(tmp_path):
    """A per-row image source ({column}) would let a client's metadata choose which of the
    server's files is read: a deployment refuses it in one line, before Ray starts."""
    from daguerre.cluster.serve import start
    from daguerre.pipeline.config import ConfigError

    composite = {"layers": [{"kind": "image", "source": "{product}",
                             "box": {"x": 0, "y": 0, "width": 8, "height": 8}}]}  # fmt: skip
    config = ServeConfig(output=str(tmp_path / "out"), composite=composite)
    with pytest.raises(ConfigError, match=r"^composite\.layers\[0\]\.source: '\{product\}' names"):
        start(config)
