"""The 8-bit UNet (kernels/quantize.py, torchao): int8 on the CPU stays close to the
unquantized images and batch-independent; fp8 and exported backends are refused clearly."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from daguerre.pipeline.config import ConfigError, EngineConfig, validate_config
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.schema import ImageRequest

# Not importorskip: importing torchao at collection would set Triton up before the kernel
# tests' interpreter (tests/cpu/test_attention.py) is on.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed"
)


def req(i: int) -> ImageRequest:
    return ImageRequest(id=f"q{i}", prompt=f"a blue vase {i}", seed=i, steps=4)


def test_int8_is_close_to_the_unquantized_images_and_batch_independent():
    requests = [req(i) for i in range(3)]
    default = DiffusionEngine(EngineConfig(model="tiny")).generate(requests)
    engine = DiffusionEngine(EngineConfig(model="tiny", quantize="int8"))
    quantized = engine.generate(requests)
    assert engine.backend["quantize"] == "int8"
    assert any("Int8" in type(m.weight).__name__ or "Affine" in type(m.weight).__name__
               for m in engine.model.unet.modules() if isinstance(m, torch.nn.Linear))  # fmt: skip
    diffs = [np.abs(a.image.astype(float) - b.image.astype(float)).mean()
             for a, b in zip(default, quantized, strict=True)]  # fmt: skip
    assert 0 < max(diffs) < 4.0, diffs  # moved, but little (mean levels of 255)
    alone = engine.generate([requests[1]])[0].image
    assert np.abs(alone.astype(int) - quantized[1].image.astype(int)).max() <= 1


def test_fp8_without_a_recent_cuda_gpu_is_one_clear_error():
    with pytest.raises(RuntimeError, match="fp8 needs a CUDA GPU"):
        DiffusionEngine(EngineConfig(model="tiny", quantize="fp8"))


def test_quantize_with_an_exported_backend_is_refused_naming_both():
    with pytest.raises(ConfigError, match="quantize: int8 runs with the eager"):
        validate_config(EngineConfig, {"quantize": "int8", "unet_backend": "onnxruntime"})


def test_engines_sharing_one_model_quantize_it_once():
    """`daguerre bench` builds one model and an engine per batch size: the second engine
    finds the UNet quantized already (quantizing quantized weights used to crash)."""
    from daguerre.pipeline.models import load_model

    components = load_model("tiny", device=torch.device("cpu"), dtype=torch.float32)
    for batch in (1, 2):
        engine = DiffusionEngine(EngineConfig(model="tiny", quantize="int8", max_batch_size=batch),
                                 components)  # fmt: skip
        assert engine.generate([req(batch)])[0].image.std() > 0
