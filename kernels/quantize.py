"""8-bit UNet: torchao's dynamic quantization of the UNet's linear layers.

    int8   int8 weights, activations quantized per token at run time (any device)
    fp8    float8 (e4m3) weights and activations, scaled per tensor at run time; CUDA GPUs of
           compute capability 8.9 or newer only (Ada, Hopper)

Convolutions stay in the engine's dtype. The image moves a little from the unquantized
one; how far (mean absolute pixel difference on the same seeds) is what the GPU check and
`benchmarks/step_cache.py`-style comparisons report, never assumed.
"""

from __future__ import annotations

import importlib.util
import logging
from enum import Enum
from typing import Any


class Quantization(str, Enum):
    none = "none"
    int8 = "int8"
    fp8 = "fp8"


# The UNet backends a quantized UNet runs on (the exported ones rebuild it from ONNX).
QUANTIZABLE_UNET_BACKENDS = ("eager", "compile")


def unavailable(kind: Quantization, device: Any) -> str | None:
    """Why `kind` cannot run on `device` here (None when it can)."""
    if kind is Quantization.none:
        return None
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'daguerre[quant]')"
    if kind is Quantization.fp8:
        import torch

        if device.type != "cuda":
            return "fp8 needs a CUDA GPU (compute capability 8.9 or newer)"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"fp8 needs compute capability 8.9 or newer; this GPU has {major}.{minor}"
    return None


def quantize_unet(unet: Any, kind: Quantization, device: Any) -> int:
    """Quantize the UNet's linear layers in place; returns how many were quantized. Once per
    UNet: engines sharing one model (`daguerre bench` over batch sizes) find it done."""
    reason = unavailable(kind, device)
    if reason is not None:
        raise RuntimeError(f"quantize {kind.value}: {reason}")
    done = getattr(unet, "_daguerre_quantized", Quantization.none)
    if kind is done:
        return 0
    if done is not Quantization.none:
        raise RuntimeError(f"quantize {kind.value}: this UNet is already quantized to {done.value}")
    import torch

    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only kernels' load lines
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        quantize_,
    )

    config = (Int8DynamicActivationInt8WeightConfig() if kind is Quantization.int8
              else Float8DynamicActivationFloat8WeightConfig())  # fmt: skip
    chosen: list[Any] = []

    def linear(module: Any, _fqn: str) -> bool:
        ok = isinstance(module, torch.nn.Linear) and (
            kind is Quantization.int8 or (module.in_features % 16 == 0
                                          and module.out_features % 16 == 0)
        )  # fmt: skip
        if ok:
            chosen.append(module)
        return ok

    quantize_(unet, config, filter_fn=linear)
    unet._daguerre_quantized = kind
    return len(chosen)
