"""The engine on a CUDA GPU: fp16 images are sane and do not depend on their batch-mates.

Skipped without a GPU (CI has none); run on a GPU machine with `pytest tests/gpu`. The
kernels' numerics tests (tests/cpu/test_attention.py) also run on CUDA tensors there."""

from __future__ import annotations

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


@pytest.fixture(scope="module", params=["tiny", "tiny-xl"])
def engine(request):
    return DiffusionEngine(EngineConfig(model=request.param, device="cuda", max_batch_size=8))


def test_fp16_on_cuda_and_batch_independent(engine):
    assert engine.backend["device"].startswith("cuda") and engine.backend["dtype"] == "float16"
    target = ImageRequest(id="g", prompt="a lighthouse", seed=3, steps=8)
    others = [ImageRequest(id=f"o{i}", prompt=f"a boat {i}", seed=i, steps=8) for i in range(5)]
    alone = engine.generate([target])[0].image
    together = engine.generate([*others[:3], target, *others[3:]])[3].image
    assert alone.shape == (64, 64, 3) and alone.dtype == np.uint8 and alone.std() > 0
    assert np.abs(alone.astype(int) - together.astype(int)).max() <= 2  # fp16 rounding


def test_triton_attention_runs_in_the_unet_on_cuda():
    engine = DiffusionEngine(EngineConfig(model="tiny", device="cuda", attention_backend="triton"))
    image = engine.generate([ImageRequest(id="t", prompt="a fox", seed=1, steps=4)])[0].image
    assert engine.backend["attention"] == "triton" and image.std() > 0
