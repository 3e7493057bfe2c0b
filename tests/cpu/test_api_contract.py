"""The API's contract under hostile input: its OpenAPI document says what the server does,
and each defect the fuzzing found stays fixed (a regression test per defect).

The schema-driven fuzzing itself (schemathesis --checks all against `daguerre serve`) is
test_fuzz_api.py; the property-based tests of validation and the manifest path are in
test_properties.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx2 as httpx
import pytest
from daguerre.pipeline.config import EngineConfig, ModelDeploymentConfig, ServeConfig
from daguerre.pipeline.schema import RequestLimits

REPO = Path(__file__).resolve().parents[2]
TOKEN = "contract-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = RequestLimits(max_steps=4, max_pixels=64 * 48, max_side=64, max_prompt_chars=100)
BUDGET = 64 * 64 * 4 * 2  # two 64x64 images at 4 steps

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def api(ray_session, tmp_path_factory):
    from daguerre.cluster.serve import start
    from ray import serve

    root = tmp_path_factory.mktemp("contract")
    (root / "token").write_text(TOKEN)
    (root / "out" / "images" / "folder.png").mkdir(parents=True)  # a key that is no file
    port = _free_port()
    engine = EngineConfig(model="tiny", device="cpu", max_batch_size=4, torch_threads=1)
    config = ServeConfig(port=port, models=[ModelDeploymentConfig(engine=engine, num_cpus=1)],
                         limits=LIMITS, max_request_pixel_steps=BUDGET, max_body_bytes=64 * 1024,
                         output=str(root / "out"), auth_token_file=str(root / "token"))  # fmt: skip
    url = start(config)
    yield url
    serve.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(api: str, route: str, body=None, **kw) -> httpx.Response:
    return httpx.post(f"{api}{route}", json=body, headers=AUTH, timeout=120, **kw)


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()["error"]


# -- the document ---------------------------------------------------------------------------


def test_the_document_lists_400_and_each_routes_errors_not_fastapis_422(api):
    doc = httpx.get(f"{api}/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(doc)
    statuses = {path: sorted(op["responses"]) for path, item in doc["paths"].items()
                for op in item.values()}  # fmt: skip
    # 422 is the quality gate's (an image refused), never FastAPI's validation error
    assert [path for path, codes in statuses.items() if "422" in codes] == [
        "/v1/images/generations", "/v1/images/edits", "/v1/generate"]  # fmt: skip
    assert statuses["/v1/images/generations"] == ["200", "400", "401", "404", "413", "422", "500",
                                                  "503"]  # fmt: skip
    assert statuses["/v1/files/{key}"] == ["200", "400", "401", "403", "404"]
    error = doc["paths"]["/v1/generate"]["post"]["responses"]["400"]["content"]
    assert error["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
    assert "budget: 32,768 pixel-steps" in doc["paths"]["/v1/generate"]["post"]["description"]
    edits = doc["paths"]["/v1/images/edits"]["post"]
    form = edits["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert (
        form["required"] == ["image", "prompt"]
        and form["properties"]["image"]["format"] == "binary"
    )
    assert form["properties"]["resize"]["enum"] == ["fill", "fit", "stretch"]
    assert form["properties"]["n"]["type"] == "integer"
    assert "budget: 32,768 pixel-steps" in edits["description"]


def test_the_document_states_the_deployments_limits(api):
    schemas = httpx.get(f"{api}/openapi.json").json()["components"]["schemas"]
    images = schemas["ImagesGenerationRequest"]["properties"]
    assert images["prompt"]["minLength"] == 1 and images["prompt"]["maxLength"] == 100
    assert images["steps"]["anyOf"][0]["maximum"] == 4
    # 64x48 pixels at most: 64 wide allows up to 48 high, 48 wide up to 64
    pattern = images["size"]["anyOf"][0]["pattern"]
    import re

    assert re.search(pattern, "64x48") and re.search(pattern, "48x64")
    assert not re.search(pattern, "64x64") and not re.search(pattern, "60x8")
    item = schemas["ImageRequestIn"]
    assert item["required"] == ["prompt"] and item["additionalProperties"] is False
    assert item["properties"]["width"]["anyOf"][0]["multipleOf"] == 8
    assert schemas["GenerateRequest"]["properties"]["requests"]["maxItems"] == 10


# -- a regression test per defect found -------------------------------------------------------


def test_an_empty_or_blank_prompt_is_400_as_documented(api):
    for prompt in ("", " ", "\ufeff", "\x1c\t"):
        error = error_of(post(api, "/v1/images/generations", {"prompt": prompt}), 400)
        assert error["param"] == "prompt" and "must not be empty" in error["message"]


def test_a_native_request_without_a_prompt_is_400_naming_it(api):
    error = error_of(post(api, "/v1/generate", {"requests": [{"steps": 2}]}), 400)
    assert error["param"] == "requests.0.prompt" and "is required" in error["message"]


def test_numbers_are_json_numbers(api):
    """Strict JSON types (the document's): no "2" or true for an integer; 2.0 is one."""
    for n in ("2", True):
        error = error_of(post(api, "/v1/images/generations", {"prompt": "x", "n": n}), 400)
        assert error["param"] == "n"
    ok = post(api, "/v1/images/generations", {"prompt": "x", "size": "16x16", "steps": 2.0})
    assert ok.status_code == 200, ok.text


def test_the_largest_seed_works_for_every_n(api):
    top = 2**63 - 1
    resp = post(api, "/v1/images/generations", {"prompt": "x", "size": "16x16", "steps": 1,
                                                "n": 2, "seed": top})  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert [d["seed"] for d in resp.json()["data"]] == [top, 0]


def test_a_client_id_may_repeat_in_one_call(api):
    body = {"requests": [{"id": "sku", "prompt": "a cup", "width": 16, "height": 16, "steps": 1},
                         {"id": "sku", "prompt": "a mug", "width": 16, "height": 16, "steps": 1}]}  # fmt: skip
    data = post(api, "/v1/generate", body).json()["data"]
    assert [d["client_id"] for d in data] == ["sku", "sku"]
    assert data[0]["id"].endswith("/0") and data[1]["id"].endswith("/1")


def test_an_empty_model_name_is_404_not_the_default(api):
    error = error_of(post(api, "/v1/images/generations", {"prompt": "x", "model": ""}), 404)
    assert error["code"] == "model_not_found"
    body = {"requests": [{"prompt": "x", "model": ""}], "model": "tiny"}
    assert error_of(post(api, "/v1/generate", body), 404)["param"] == "model"


def test_lone_surrogates_are_400_not_500(api):
    for route, raw in (("/v1/images/generations", '{"prompt": "a \\ud800 cat"}'),
                       ("/v1/generate", '{"requests": [{"prompt": "x", "metadata": '
                                        '{"k": "\\udfff"}}], "response_format": "url"}')):  # fmt: skip
        resp = httpx.post(f"{api}{route}", content=raw.encode(), timeout=60,
                          headers={**AUTH, "content-type": "application/json"})  # fmt: skip
        assert "lone surrogate" in error_of(resp, 400)["message"]


def test_sizes_are_exactly_widthxheight(api):
    for size in (" 16x16", "16X16", "016x16", "16x16\n", "16 x 16"):
        error = error_of(post(api, "/v1/images/generations", {"prompt": "x", "size": size}), 400)
        assert error["param"] == "size"


def test_file_keys_with_nul_bytes_or_folders_are_404(api):
    for key in ("images/a%00b.png", "images/%00", "%00", "images/folder.png"):
        error = error_of(httpx.get(f"{api}/v1/files/{key}", headers=AUTH), 404)
        assert error["code"] == "not_found"
    bad_expiry = httpx.get(f"{api}/v1/files/images/a.png?expires=soon&signature=x")
    assert error_of(bad_expiry, 400)["param"] == "query.expires"


def test_a_body_over_the_limit_is_413_before_parsing(api):
    big = b'{"prompt": "' + b"x" * (65 * 1024) + b'"}'
    resp = httpx.post(f"{api}/v1/images/generations", content=big, timeout=60,
                      headers={**AUTH, "content-type": "application/json"})  # fmt: skip
    assert error_of(resp, 413)["code"] == "payload_too_large"

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(80):
            yield b"x" * 1024

    streamed = httpx.post(f"{api}/v1/generate", content=chunks(), timeout=60,
                          headers={**AUTH, "content-type": "application/json"})  # fmt: skip
    assert error_of(streamed, 413)["code"] == "payload_too_large"
    assert httpx.get(f"{api}/healthz").json()["status"] == "ok"


def test_a_request_over_the_compute_budget_is_400_saying_how_to_fit(api):
    body = {"prompt": "x", "size": "64x48", "steps": 4, "n": 3}
    error = error_of(post(api, "/v1/images/generations", body), 400)
    assert error["code"] == "over_budget" and error["param"] == "n"
    assert "36,864 pixel-steps" in error["message"] and "ask for fewer images" in error["message"]
    native = {"requests": [{"prompt": "x", "width": 64, "height": 48, "steps": 4}] * 3}
    assert error_of(post(api, "/v1/generate", native), 400)["code"] == "over_budget"
    body["n"] = 2
    assert post(api, "/v1/images/generations", body).status_code == 200


def test_a_client_without_the_token_gets_401_before_any_validation(api):
    for content, kind in (
        (b'{"prompt": ""}', "application/json"),
        (b"x" * (65 * 1024), "text/plain"),
    ):
        resp = httpx.post(f"{api}/v1/images/generations", content=content, timeout=60,
                          headers={"content-type": kind})  # fmt: skip
        assert error_of(resp, 401)["code"] == "invalid_api_key"


def test_defaults_are_capped_by_the_limits(api):
    """A request without steps makes max_steps (4) steps here, not the default 30."""
    record = post(api, "/v1/generate", {"requests": [{"prompt": "x", "width": 16, "height": 16}]}
                  ).json()["data"][0]["record"]  # fmt: skip
    assert record["steps"] == 4 and record["guidance_scale"] == 7.5
