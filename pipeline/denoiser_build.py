"""How an engine's denoiser is put together: the family's denoiser (pipeline/denoisers.py,
pipeline/dit.py) over its model, behind the engine config's hot-path options, attention
backend (kernels/attention.py, kernels/dit_attention.py) and denoiser backend runner
(kernels/compile.py for UNets, kernels/transformer.py for SD3 and FLUX)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import ConfigError, EngineConfig
from .models import ModelComponents

logger = logging.getLogger(__name__)


def build_denoiser(model: ModelComponents, config: EngineConfig, device: torch.device,
                   dtype: torch.dtype) -> tuple[Any, Any]:  # fmt: skip
    """(the denoiser, the attention dispatch whose describe() the metadata records)."""
    if model.family == "unet":
        return _unet_denoiser(model, config, device, dtype)
    return _dit_denoiser(model, config, device, dtype)


def _unet_denoiser(model: ModelComponents, config: EngineConfig, device: torch.device,
                   dtype: torch.dtype) -> tuple[Any, Any]:  # fmt: skip
    """The UNet behind its hot-path options, attention backend and runner."""
    from ..kernels.attention import fuse_qkv, install
    from ..kernels.compile import make_runner
    from .denoisers import UnetDenoiser

    unet = model.unet
    if config.fuse_qkv:
        fuse_qkv(unet)
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    attention = install(unet, config.attention_backend, device.type)
    runner = make_runner(
        unet, denoiser_backend(config, device), model.weights_hash,
        max_batch_size=config.max_batch_size, compile_mode=config.compile_mode,
    )  # fmt: skip
    return UnetDenoiser(model, device, dtype, runner, config.cache_interval), attention


def _dit_denoiser(model: ModelComponents, config: EngineConfig, device: torch.device,
                  dtype: torch.dtype) -> tuple[Any, Any]:  # fmt: skip
    """A transformer family's denoiser through its backend runner; the UNet-only options
    refused in one line."""
    from ..kernels.attention import AttentionBackend, resolve
    from ..kernels.dit_attention import install_dit_attention
    from ..kernels.transformer import make_transformer_runner
    from .dit import dit_denoiser

    family = model.family
    if config.channels_last:
        raise ConfigError(
            f"channels_last: True is for UNet models; {model.name} is a {family} "
            "transformer (its activations are token sequences, not images)"
        )
    if config.fuse_qkv:
        model.transformer.fuse_qkv_projections()
    # sdpa: diffusers' own processors stay, but for fused projections (diffusers' fused
    # SD3 processor skips the q/k norms SD3.5 has); any other backend runs through ours
    requested = config.attention_backend.value
    if resolve(requested, device.type) is AttentionBackend.sdpa and not config.fuse_qkv:
        attention: Any = _SdpaOnly()
    else:
        attention = install_dit_attention(model.transformer, family, requested, device.type)
    runner = make_transformer_runner(
        model.transformer, denoiser_backend(config, device), model.weights_hash,
        max_batch_size=config.max_batch_size, rows_per_image=2 if family == "sd3" else 1,
        compile_mode=config.compile_mode,
    )  # fmt: skip
    return dit_denoiser(model, device, dtype, runner, config.cache_interval), attention


def denoiser_backend(config: EngineConfig, device: torch.device) -> str:
    """`unet_backend`, with auto resolved from the last `daguerre bench` (eager on a CPU)."""
    from ..kernels.quantize import QUANTIZABLE_UNET_BACKENDS, Quantization

    backend = config.unet_backend.value
    if backend != "auto":
        return backend
    from .bench import fastest_unet_backend

    quantized = config.quantize is not Quantization.none
    backend, why = fastest_unet_backend(
        config.model, device, QUANTIZABLE_UNET_BACKENDS if quantized else None
    )
    logger.info("unet_backend auto -> %s (%s)", backend, why)
    return backend


class _SdpaOnly:
    """The transformer families' attention when sdpa is asked for: diffusers' own processors."""

    def describe(self) -> str:
        return "sdpa"
