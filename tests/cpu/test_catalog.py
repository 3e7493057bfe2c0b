"""configs/jobs/catalog.yaml, every content feature on, through both fronts: a catalogue
job from a CSV of products (gate, rules, watermark, visible mark, content credentials, WebP
masters with thumbnails, the result cache, the review sheet), and the online API on the
same settings (formats, credentials, rules as 400s, cache hits)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
from daguerre.pipeline.config import (
    EngineConfig,
    JobConfig,
    ModelDeploymentConfig,
    ServeConfig,
    load_yaml,
)
from daguerre.pipeline.credentials import PROVENANCE_LABEL, read_credentials
from daguerre.pipeline.formats import decode
from daguerre.pipeline.marks import read_watermark
from daguerre.pipeline.storage import Storage

pytest.importorskip("c2pa", reason="needs c2pa-python: pip install 'daguerre[credentials]'")
pytest.importorskip("imwatermark", reason="needs invisible-watermark (make install-dev)")
pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]
PAYLOAD = b"shop-2026-q4"
SECTIONS = ("marks", "quality", "credentials", "encoding", "cache", "rules")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[JobConfig, Path]:
    """catalog.yaml as shipped, with a throwaway signing chain and the cache in a temp folder."""
    from daguerre.pipeline.trial_chain import make_trial_chain

    folder = tmp_path_factory.mktemp("catalog")
    chain = make_trial_chain(folder / "certs")
    overrides = {
        "credentials": {"cert_file": chain["cert_file"], "key_file": chain["key_file"]},
        "cache": {"prefix": str(folder / "cache")},
        "quality": {"classifier": f"{REPO}/examples/catalog_checks.py:verdict"},
    }
    return load_yaml(REPO / "configs/jobs/catalog.yaml", JobConfig, overrides), folder


def check_file(data: bytes, mime: str, image_id: str, watermark: bool) -> None:
    report = read_credentials(data, mime)
    assert report["failures"] == ["signingCredential.untrusted"]  # valid; a trial root
    assert report["assertions"][PROVENANCE_LABEL]["id"] == image_id
    if watermark:
        assert read_watermark(decode(data), len(PAYLOAD)) == PAYLOAD


def test_a_catalogue_job_applies_every_feature(ray_session, catalog):
    from daguerre.cluster.job import run_job
    from daguerre.pipeline.catalog import read_metadata
    from daguerre.pipeline.manifest import build_manifest, write_manifest
    from daguerre.pipeline.review import write_review

    config, folder = catalog
    table = build_manifest(REPO / "examples/catalog.csv", "a product photo of {product}, {style}",
                           seeds=1, defaults={"steps": 2, "width": 256, "height": 256})  # fmt: skip
    manifest = str(write_manifest(table, folder / "catalog.parquet"))
    summary = run_job(manifest, str(folder / "out"), config, progress=False)
    assert summary.generated == 3 and summary.errors_by_stage == {"rules": 1}  # the knife row
    records = read_metadata(Storage(str(folder / "out"))).to_pylist()
    for record in records:
        assert record["format"] == "webp" and record["content_credentials"]
        assert record["watermark"] == PAYLOAD.decode() and record["prompt"].endswith(
            "clean e-commerce style, neutral background")  # fmt: skip
        assert dict(record["metadata"])["sku"] in ("TEA-001", "SHO-002", "BAG-003")
        out = folder / "out"
        check_file(
            (out / f"images/{record['id']}.webp").read_bytes(), "image/webp", record["id"], True
        )
        check_file((out / f"variants/thumb/{record['id']}.webp").read_bytes(), "image/webp",
                   record["id"], False)  # fmt: skip
        assert decode((out / f"variants/square/{record['id']}.jpg").read_bytes()).shape == (
            96,
            96,
            3,
        )
    again = run_job(manifest, str(folder / "out-2"), config, progress=False)
    assert again.generated == 3 and again.cache_hits == 3  # nothing paid for twice
    sheet = folder / "review.html"
    write_review(str(folder / "out"), sheet)
    html = sheet.read_text()
    assert html.count("data:image/jpeg;base64,") == 3 and "rules.forbidden_terms" in html


@pytest.fixture(scope="module")
def catalog_app(ray_session, catalog):
    """The online API with the catalogue's settings (each section of catalog.yaml)."""
    from daguerre.cluster.serve import start
    from ray import serve
    from test_api_contract import _free_port

    config, folder = catalog
    engine = EngineConfig(model="tiny", device="cpu", torch_threads=1)
    sections = {name: getattr(config, name) for name in SECTIONS}
    serve_config = ServeConfig(port=_free_port(), output=str(folder / "serve"),
                               models=[ModelDeploymentConfig(engine=engine, num_cpus=1)],
                               **sections)  # fmt: skip
    yield start(serve_config)
    serve.shutdown()


def test_online_answers_carry_the_catalogue_files(catalog_app):
    body = {"requests": [{"prompt": "a product photo of a vase", "width": 256, "height": 256,
                          "steps": 2, "seed": 1}], "response_format": "url"}  # fmt: skip
    resp = httpx.post(f"{catalog_app}/v1/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    item = resp.json()["data"][0]
    record = item["record"]
    assert record["format"] == "webp" and set(record["variants"]) == {"thumb", "square"}
    master = httpx.get(item["url"], timeout=30)
    assert master.headers["content-type"] == "image/webp"
    check_file(master.content, "image/webp", item["id"], True)
    square = record["variants"]["square"].split("/serve/", 1)[1]
    variant = httpx.get(f"{catalog_app}/v1/files/{square}", timeout=30)
    assert variant.status_code == 200 and variant.headers["content-type"] == "image/jpeg"
    check_file(variant.content, "image/jpeg", item["id"], False)
    inline = {"prompt": "a product photo of a lamp", "size": "256x256", "steps": 2}
    openai_style = httpx.post(f"{catalog_app}/v1/images/generations", json=inline, timeout=120)
    data = base64.b64decode(openai_style.json()["data"][0]["b64_json"])
    assert read_watermark(decode(data), len(PAYLOAD)) == PAYLOAD
    assert read_credentials(data, "image/webp")["assertions"][PROVENANCE_LABEL]["prompt"].endswith(
        "neutral background")  # fmt: skip


def test_online_a_broken_rule_is_a_400_naming_the_prompt(catalog_app):
    body = {"prompt": "a product photo of a weapon", "size": "64x64", "steps": 2}
    openai_style = httpx.post(f"{catalog_app}/v1/images/generations", json=body, timeout=120)
    assert openai_style.status_code == 400
    error = openai_style.json()["error"]
    assert error["code"] == "rule_broken" and error["param"] == "prompt"
    assert "rules.forbidden_terms: 'weapon' is not allowed" in error["message"]
    native = {"requests": [{"prompt": "a product", "steps": 2}, {"prompt": "a vase", "steps": 2}]}
    refused = httpx.post(f"{catalog_app}/v1/generate", json=native, timeout=120)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "requests.1.prompt"
    assert "must contain 'product'" in refused.json()["error"]["message"]


def test_online_an_identical_request_is_answered_from_the_cache(catalog_app):
    body = {"requests": [{"prompt": "a product photo of a chair", "seed": 5, "steps": 2}]}
    first = httpx.post(f"{catalog_app}/v1/generate", json=body, timeout=120).json()["data"][0]
    assert first["record"]["cache_hit"] is False
    again = httpx.post(f"{catalog_app}/v1/generate", json=body, timeout=120).json()["data"][0]
    assert again["record"]["cache_hit"] is True and again["record"]["cache_source"]
    assert again["id"] != first["id"]  # its own id, the same pixels
    same = [decode(base64.b64decode(x["b64_json"])) for x in (first, again)]
    assert np.array_equal(*same)  # lossless WebP of the same pixels and marks
    other = {"requests": [{"prompt": "a product photo of a chair", "seed": 6, "steps": 2}]}
    missed = httpx.post(f"{catalog_app}/v1/generate", json=other, timeout=120).json()["data"][0]
    assert missed["record"]["cache_hit"] is False
    openai_style = {"prompt": "a product photo of a chair", "seed": 5, "steps": 2, "size": "64x64"}
    hit = httpx.post(f"{catalog_app}/v1/images/generations", json=openai_style, timeout=120)
    assert np.array_equal(decode(base64.b64decode(hit.json()["data"][0]["b64_json"])), same[0])


def test_the_files_route_reads_images_and_variants_only():
    from daguerre.cluster.ingress import _image_media_type

    assert _image_media_type("images/sku-1.webp") == "image/webp"
    assert _image_media_type("variants/square/sku-1.jpg") == "image/jpeg"
    for key in ("variants/../rejected/sku-1.png", "variants/../cache/ab/k.png",
                "variants/thumb/../../metadata/x.png", "rejected/sku-1.png", "images/../x.png",
                "variants/Thumb/sku-1.webp", "images/sku-1.gif"):  # fmt: skip
        assert _image_media_type(key) is None, key
