"""LoRA per request: adapters change images, mix in one engine batch, fail alone, stay
bounded in the engine's cache, and travel through a batch job and the online API.

The adapters are made here with peft for the tiny preset's UNet (random lora_A and lora_B
on every attention projection, so they visibly change images): A in diffusers' format
(a folder written by `save_lora_weights`, its LoraConfig in the header), B as a bare peft
state dict in one .safetensors file, with another rank.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from daguerre.pipeline.config import EngineConfig
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.engine_thread import generate_each
from daguerre.pipeline.lora import BASE, LoraError, under_roots
from daguerre.pipeline.schema import (
    GeneratedImage,
    ImageRecord,
    ImageRequest,
    manifest_schema,
    validate_request,
)

STEPS = 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(seed: int, rank: int) -> tuple[dict, object]:
    """A LoRA state dict (peft keys, no prefix) for the tiny UNet, and its LoraConfig."""
    from daguerre.pipeline.models import get_preset
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel(**get_preset("tiny").unet)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                        init_lora_weights="gaussian")  # fmt: skip
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:  # lora_B too: peft starts it at zero (no effect)
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return get_peft_model_state_dict(unet), config


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    """Paths: a (folder, diffusers format), b (one file, bare peft keys), corrupt, missing;
    `allowed` holds a and corrupt (the online tests' lora_roots), b lies outside it."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("adapters")
    allowed, other = root / "allowed", root / "other"
    other.mkdir(parents=True)
    weights, config = make_lora(seed=1, rank=4)
    StableDiffusionPipeline.save_lora_weights(allowed / "style-a", unet_lora_layers=weights,
                                              unet_lora_adapter_metadata=config.to_dict())  # fmt: skip
    weights_b, _ = make_lora(seed=2, rank=2)
    save_file({k: v.contiguous() for k, v in weights_b.items()}, other / "b.safetensors")
    (allowed / "corrupt.safetensors").write_bytes(os.urandom(4096))
    return {"a": str(allowed / "style-a"), "b": str(other / "b.safetensors"),
            "corrupt": str(allowed / "corrupt.safetensors"), "allowed": str(allowed),
            "missing": str(root / "no-such-adapter.safetensors")}  # fmt: skip


@pytest.fixture(scope="module")
def engine() -> DiffusionEngine:
    """An engine of its own: adapters loaded here never reach the session's tiny_engine."""
    return DiffusionEngine(EngineConfig(model="tiny", device="cpu", max_batch_size=8))


def req(i: int, **kw) -> ImageRequest:
    base = {"id": f"r{i}", "prompt": f"a photo of object number {i}", "seed": 100 + i,
            "steps": STEPS}  # fmt: skip
    return ImageRequest(**{**base, **kw})


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def alone(engine: DiffusionEngine, request: ImageRequest) -> np.ndarray:
    return engine.generate([request])[0].image


# -- the request contract ------------------------------------------------------------------


def test_lora_fields_validate_and_reach_manifest_and_record():
    assert {"lora", "lora_scale"} <= set(manifest_schema().names)
    assert {"lora", "lora_scale"} <= set(ImageRecord.model_fields)
    for row, field in (({"lora": ""}, "lora"), ({"lora": "a\x00b"}, "lora"),
                       ({"lora": "x", "lora_scale": 11.0}, "lora_scale"),
                       ({"lora": "x", "lora_scale": float("nan")}, "lora_scale")):  # fmt: skip
        errors = validate_request({"id": "x", "prompt": "x", **row})
        assert isinstance(errors, list) and errors[0].field == field, errors
    ok = validate_request({"id": "x", "prompt": "x", "lora": "s3://b/a.safetensors",
                           "lora_scale": None})  # fmt: skip
    assert isinstance(ok, ImageRequest) and ok.lora_scale == 1.0


def test_fingerprints_without_lora_do_not_change_and_lora_counts():
    fields = {"id": "fp", "prompt": "a lighthouse", "seed": 7, "steps": 4}
    # the digests these requests had before LoRA existed (exact and cached tiers)
    plain = ImageRequest(**fields)
    assert plain.fingerprint(64, 64) == "33c4b5780bd6950871dedf1c93e82e00"
    cached = ImageRequest(**fields, speed="cached")
    assert cached.fingerprint(64, 64) == "02a475cdc6b985b63f10f5646f94784f"
    assert ImageRequest(**fields, lora_scale=0.3).fingerprint(64, 64) == plain.fingerprint(64, 64)
    with_lora = ImageRequest(**fields, lora="/x/a.safetensors")
    other_scale = ImageRequest(**fields, lora="/x/a.safetensors", lora_scale=0.5)
    prints = {r.fingerprint(64, 64) for r in (plain, with_lora, other_scale)}
    assert len(prints) == 3


def test_lora_roots_admit_only_paths_inside(tmp_path):
    inside = tmp_path / "loras"
    (inside / "x").mkdir(parents=True)
    (tmp_path / "escape").symlink_to(tmp_path)  # a link out of the root
    (inside / "link").symlink_to(tmp_path)
    roots = [str(inside), "s3://bucket/loras"]
    assert under_roots(str(inside / "x" / "a.safetensors"), roots)
    assert under_roots("s3://bucket/loras/a.safetensors", roots)
    for spec in (str(tmp_path / "a.safetensors"), f"{inside}/../a.safetensors",
                 str(inside / "link" / "a.safetensors"), "loras/x/a.safetensors",
                 "s3://bucket/loras-evil/a.safetensors", "s3://bucket/loras/../x.safetensors",
                 "s3://other/loras/a.safetensors", "gs://bucket/loras/a.safetensors"):  # fmt: skip
        assert not under_roots(spec, roots), spec
    assert not under_roots(str(inside / "x"), [])


# -- the engine ----------------------------------------------------------------------------


def test_an_adapter_changes_the_image_and_scale_zero_does_not(engine, adapters):
    base = alone(engine, req(0))
    styled = alone(engine, req(0, lora=adapters["a"]))
    assert diff(base, styled).mean() > 8, diff(base, styled).mean()
    assert diff(base, alone(engine, req(0, lora=adapters["a"], lora_scale=0.0))).max() <= 1
    half = alone(engine, req(0, lora=adapters["a"], lora_scale=0.5))
    assert diff(half, base).mean() > 2 and diff(half, styled).mean() > 2
    assert diff(base, alone(engine, req(0))).max() == 0  # adapters are off outside their rows


def test_one_batch_mixes_adapters_and_each_image_equals_its_own_alone(engine, adapters):
    batch = [req(1), req(2, lora=adapters["a"]), req(3, lora=adapters["b"], lora_scale=0.7),
             req(4, lora=adapters["a"], lora_scale=0.5), req(5, lora=adapters["b"])]  # fmt: skip
    together = engine.generate(batch)
    assert {g.batch_size for g in together} == {len(batch)}  # one engine batch
    for request, made in zip(batch, together, strict=True):
        assert diff(alone(engine, request), made.image).max() <= 1, request.id
    names = engine.lora.names(batch)
    assert names[0] == BASE and len(set(names)) == 5  # (file, scale) pairs are adapters


def test_a_missing_or_corrupt_adapter_fails_alone_naming_lora(engine, adapters):
    requests = [req(6), req(7, lora=adapters["missing"]), req(8, lora=adapters["corrupt"]),
                req(9, lora=adapters["a"])]  # fmt: skip
    results = generate_each(engine, requests)
    assert isinstance(results[0], GeneratedImage) and isinstance(results[3], GeneratedImage)
    assert results[0].batch_size == results[3].batch_size == 2  # the good ones stay batched
    assert diff(results[0].image, alone(engine, req(6))).max() <= 1
    for failed, why in ((results[1], "no such file"), (results[2], "not a readable safetensors")):
        assert isinstance(failed, LoraError) and failed.field == "lora"
        text = str(failed)
        assert text.startswith("lora '") and why in text and "\n" not in text, text


def test_an_adapter_for_another_model_or_an_unused_folder_is_refused(engine, adapters, tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
               torch.zeros(4, 320)}, str(wrong))  # fmt: skip
    text_only = tmp_path / "te.safetensors"
    save_file({"text_encoder.text_model.layer.q_proj.lora_A.weight": torch.zeros(4, 32)},
              str(text_only))  # fmt: skip
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_lora_weights.bin").write_bytes(b"x")
    for spec, why in ((wrong, "does not fit"), (text_only, "no UNet LoRA"),
                      (pickled, "no .safetensors"), (tmp_path / "a.bin", "no such file")):  # fmt: skip
        (result,) = generate_each(engine, [req(10, lora=str(spec))])
        assert isinstance(result, LoraError) and why in str(result), (spec, result)


def test_a_cache_of_one_stays_bounded_and_images_stay_right(engine, adapters):
    small = DiffusionEngine(EngineConfig(model="tiny", device="cpu", lora_cache_size=1))
    a, b = req(11, lora=adapters["a"]), req(12, lora=adapters["b"], lora_scale=0.7)
    expected = {r.id: alone(engine, r) for r in (a, b)}
    for request in (a, b, a, b):
        assert diff(alone(small, request), expected[request.id]).max() <= 1
        assert len(small.lora.loaded) == 1 and len(small.model.unet.peft_config) == 1
    mixed = small.generate([a, req(13), b])  # more adapters than the cache: split in two
    assert [g.batch_size for g in mixed] == [2, 2, 1]
    assert diff(mixed[0].image, expected[a.id]).max() <= 1
    assert diff(mixed[2].image, expected[b.id]).max() <= 1
    assert small.lora.evictions >= 4 and len(small.lora.loaded) == 1


def test_a_compiled_unet_refuses_lora_requests_alone(adapters):
    compiled = DiffusionEngine(EngineConfig(model="tiny", device="cpu", unet_backend="compile"))
    (result,) = generate_each(compiled, [req(14, lora=adapters["a"])])
    assert isinstance(result, LoraError) and "needs unet_backend eager" in str(result)


def test_an_adapter_on_s3_is_fetched_once_and_equals_the_local_file(s3_server, engine, adapters):
    fs = s3_server.fs()
    local = f"{adapters['a']}/pytorch_lora_weights.safetensors"
    fs.put_file(local, "daguerre/loras/style-a/pytorch_lora_weights.safetensors")
    remote = DiffusionEngine(EngineConfig(model="tiny", device="cpu"), None,
                             s3_server.storage_config())  # fmt: skip
    expected = alone(engine, req(15, lora=adapters["a"]))
    for spec in ("s3://daguerre/loras/style-a", "s3://daguerre/loras/style-a/"
                 "pytorch_lora_weights.safetensors"):  # fmt: skip
        assert diff(alone(remote, req(15, lora=spec)), expected).max() <= 1
    assert len(remote.lora.loaded) == 1  # one content at one scale: one adapter
    (missing,) = generate_each(remote, [req(16, lora="s3://daguerre/loras/nothing-here")])
    assert isinstance(missing, LoraError) and "no such object" in str(missing), missing


# -- a batch job and the online API ----------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_job_records_lora_and_puts_a_corrupt_adapter_in_errors(ray_session, adapters,
                                                                  engine, tmp_path):  # fmt: skip
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from daguerre.cluster.job import run_job
    from daguerre.pipeline.config import JobConfig
    from PIL import Image

    rows = [req(20).model_dump(mode="json"), req(21, lora=adapters["a"]).model_dump(mode="json"),
            req(22, lora=adapters["b"], lora_scale=0.7).model_dump(mode="json"),
            req(23, lora=adapters["corrupt"]).model_dump(mode="json")]  # fmt: skip
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), manifest)
    config = JobConfig(batch_size=4, engine=EngineConfig(model="tiny", device="cpu"))
    summary = run_job(str(manifest), str(tmp_path / "out"), config, progress=False)
    assert summary.generated == 3 and summary.errors == 1
    records = {
        r["id"]: r for r in pads.dataset(tmp_path / "out" / "metadata").to_table().to_pylist()
    }
    assert records["r20"]["lora"] is None and records["r20"]["lora_scale"] == 1.0
    assert (records["r21"]["lora"], records["r21"]["lora_scale"]) == (adapters["a"], 1.0)
    assert (records["r22"]["lora"], records["r22"]["lora_scale"]) == (adapters["b"], 0.7)
    assert (
        records["r22"]["lora_sha256"]
        == hashlib.sha256(Path(adapters["b"]).read_bytes()).hexdigest()
    )
    assert records["r20"]["lora_sha256"] is None and len(records["r21"]["lora_sha256"]) == 64
    assert {r["batch_size"] for r in records.values()} == {3}  # mixed in one engine batch
    for i in (21, 22):
        image = np.asarray(Image.open(tmp_path / "out" / "images" / f"r{i}.png"))
        assert diff(image, alone(engine, ImageRequest(**rows[i - 20]))).max() <= 1
    (error,) = pads.dataset(tmp_path / "out" / "errors").to_table().to_pylist()
    assert (error["id"], error["stage"], error["field"]) == ("r23", "generate", "lora")
    assert "not a readable safetensors file" in error["reason"]


@pytest.mark.timeout(300)
def test_online_lora_under_lora_roots_works_and_outside_is_400(ray_session, adapters, engine,
                                                               tmp_path):  # fmt: skip
    import base64
    import io
    import socket

    import httpx2 as httpx
    from daguerre.cluster.serve import start
    from daguerre.pipeline.config import ModelDeploymentConfig, ServeConfig
    from PIL import Image
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tiny = EngineConfig(model="tiny", device="cpu", torch_threads=2)
    config = ServeConfig(port=port, models=[ModelDeploymentConfig(engine=tiny, num_cpus=1)],
                         output=str(tmp_path / "out"), lora_roots=[adapters["allowed"]])  # fmt: skip
    url = start(config)
    try:
        body = {"prompt": "a photo of object number 30", "size": "64x64", "steps": STEPS,
                "seed": 130, "lora": adapters["a"]}  # fmt: skip
        resp = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        image = np.asarray(
            Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"])))
        )
        assert diff(image, alone(engine, req(30, lora=adapters["a"]))).max() <= 1
        for lora in (adapters["b"], f"{adapters['allowed']}/../other/b.safetensors"):
            resp = httpx.post(
                f"{url}/v1/images/generations", json={**body, "lora": lora}, timeout=60
            )
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "lora", resp.text
            assert "not under this server's LoRA folders" in resp.json()["error"]["message"]
        native = {"requests": [{"prompt": "x", "steps": 1}, {"prompt": "y", "lora": adapters["b"]}]}
        resp = httpx.post(f"{url}/v1/generate", json=native, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "requests.1.lora"
        resp = httpx.post(f"{url}/v1/images/generations", timeout=60,
                          json={**body, "lora": adapters["corrupt"]})  # fmt: skip
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "lora", resp.text
        assert "not a readable safetensors file" in resp.json()["error"]["message"]
        import jsonschema_rs

        doc = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]
        lora = doc["ImagesGenerationRequest"]["properties"]["lora"]
        assert adapters["allowed"] in lora["description"]
        documented = jsonschema_rs.validator_for(lora)
        assert documented.is_valid(adapters["a"]) and not documented.is_valid(adapters["b"])
    finally:
        serve.shutdown()


def test_an_adapter_failure_crossing_ray_is_an_errors_row_naming_lora():
    """What a Serve replica returns for a request whose adapter failed in a batch-class call
    (the --via-serve job) arrives whole and becomes the actor pool's errors row."""
    import pickle

    from daguerre.cluster.stages import engine_rows
    from daguerre.pipeline.lora import LoraError

    request = ImageRequest(id="a", prompt="x", lora="/nope.safetensors")
    rows = [{"id": "a", "request": request.model_dump_json(), "row": None}]
    provenance = {"model": "tiny", "weights_hash": "h", "backend": {}, "node_id": "n",
                  "actor_id": "r"}  # fmt: skip
    failed = pickle.loads(pickle.dumps(LoraError("/nope.safetensors", "no such file")))
    (row,) = engine_rows(rows, [request], [failed], [provenance], provenance).to_pylist()
    assert (row["error_stage"], row["error_field"]) == ("generate", "lora")
    assert row["error_reason"] == "lora '/nope.safetensors': no such file"
