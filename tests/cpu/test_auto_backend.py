"""`unet_backend: auto` (the default): the fastest backend this very GPU measured in its last
`daguerre bench` of the model; eager without one, and always eager on a CPU."""

from __future__ import annotations

import json
import types

import torch
from daguerre.pipeline.bench import bench_cache, fastest_unet_backend

CUDA = types.SimpleNamespace(type="cuda")


def _bench(model: str, device: str, rows: list[dict], **conditions) -> None:
    path = bench_cache(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"conditions": {"device": device, **conditions}, "results": rows}))


def test_on_a_cpu_auto_is_eager(tiny_engine):
    assert fastest_unet_backend("tiny", torch.device("cpu"))[0] == "eager"
    assert tiny_engine.config.unet_backend.value == "auto"
    assert tiny_engine.backend["unet"] == "eager"  # what ran is what is recorded


def test_on_a_gpu_auto_takes_the_fastest_this_gpu_measured(monkeypatch, tmp_path):
    monkeypatch.setenv("DAGUERRE_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    backend, why = fastest_unet_backend("sd15", CUDA)
    assert backend == "eager" and "no daguerre bench result" in why
    rows = [{"unet_backend": "eager", "batch_size": 8, "images_per_s": 10.0},
            {"unet_backend": "compile", "batch_size": 8, "images_per_s": 14.0},
            {"unet_backend": "tensorrt", "batch_size": 8, "skipped": "not installed"}]  # fmt: skip
    _bench("sd15", "cuda: NVIDIA H100", rows)
    assert fastest_unet_backend("sd15", CUDA)[0] == "eager"  # another GPU's numbers
    _bench("sd15", "cuda: NVIDIA H200", rows)
    backend, why = fastest_unet_backend("sd15", CUDA)
    assert backend == "compile" and "14.00 images/s" in why
    _bench("sd15", "cuda: NVIDIA H200", rows, quantize="int8")
    assert fastest_unet_backend("sd15", CUDA)[0] == "eager"  # not the default engine's numbers
