"""The real architectures (sd15, sdxl presets, random weights) in fp16 on a CUDA GPU: sane
images, the same image alone and in a batch of 8, the UNet backends agreeing.

Skipped without a GPU; benchmarks/gpu_check.sh runs these on a GPU machine."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from daguerre.pipeline.config import EngineConfig
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.schema import ImageRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
STEPS = 4  # enough to run every part of the loop; the speed is benchmarks' business


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def preset_engine(request):
    engine = DiffusionEngine(EngineConfig(model=request.param, device="cuda", max_batch_size=8,
                                          attention_backend="sdpa", unet_backend="eager"))  # fmt: skip
    yield engine
    del engine
    torch.cuda.empty_cache()


def _requests(n: int) -> list[ImageRequest]:
    return [ImageRequest(id=f"b{i}", prompt=f"a harbour at dusk, boat {i}", seed=100 + i,
                         steps=STEPS) for i in range(n)]  # fmt: skip


def test_fp16_images_are_sane_and_do_not_depend_on_batch_mates(preset_engine):
    engine = preset_engine
    assert engine.backend["dtype"] == "float16"
    target = ImageRequest(id="t", prompt="a lighthouse on a cliff", seed=7, steps=STEPS)
    alone = engine.generate([target])[0].image
    together = engine.generate([*_requests(3), target, *_requests(7)[3:]])[3].image
    side = engine.model.default_size
    assert alone.shape == (side, side, 3) and alone.dtype == np.uint8
    assert alone.std() > 1.0, "a constant image (NaN or overflow in fp16?)"
    assert len(np.unique(alone.reshape(-1, 3), axis=0)) > 16
    assert np.abs(alone.astype(int) - together.astype(int)).max() <= 1


@pytest.mark.parametrize("backend", ["compile", "onnxruntime", "tensorrt"])
def test_unet_backends_agree_with_eager(backend):
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not installed on this machine")
    if backend == "onnxruntime" and "CUDAExecutionProvider" not in _ort_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    requests = _requests(2)
    config = dict(model="small", device="cuda", max_batch_size=2, attention_backend="sdpa")
    eager = DiffusionEngine(EngineConfig(**config)).generate(requests)
    other = DiffusionEngine(EngineConfig(**config, unet_backend=backend,
                                         compile_mode="reduce-overhead")).generate(requests)  # fmt: skip
    for a, b in zip(eager, other, strict=True):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 2


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return onnxruntime.get_available_providers()


def test_hot_path_keeps_the_images_and_noise_on_device_stays_per_request():
    """fuse_qkv + channels_last give eager's images (fp16: within 2/255); noise_on_device
    gives other images for a seed, but the same alone and in a batch (within 1/255)."""
    requests = _requests(4)
    config = dict(model="small", device="cuda", max_batch_size=4, attention_backend="sdpa",
                  unet_backend="eager")  # fmt: skip
    default = DiffusionEngine(EngineConfig(**config)).generate(requests)
    fast = DiffusionEngine(EngineConfig(**config, fuse_qkv=True, channels_last=True))
    for a, b in zip(default, fast.generate(requests), strict=True):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 2
    on_device = DiffusionEngine(EngineConfig(**config, noise_on_device=True))
    target = ImageRequest(id="t", prompt="a red kite", seed=5, steps=STEPS, scheduler="euler_a")
    alone = on_device.generate([target])[0].image
    together = on_device.generate([*requests[:3], target])[3].image
    assert np.abs(alone.astype(int) - together.astype(int)).max() <= 1
    assert on_device.backend["hot_path"] == "noise_on_device"
