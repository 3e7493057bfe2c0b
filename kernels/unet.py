"""What every UNet backend shares: the backend names, the signature a compiled graph is
specialised to, the engine batch sizes it must take, cache keys, and the runner interface.

Every runner is called like the engine calls the UNet and returns the noise prediction:
`runner(sample, timestep, encoder_hidden_states, added_cond_kwargs) -> Tensor`. The batch
sizes a runner must take follow from the engine's `max_batch_size` alone (`batch_buckets`,
`batch_profile`), so a graph built ahead of time is the one the engine asks for.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

ONNX_OPSET = 18  # opset 17 from the dynamo exporter gives graphs onnxruntime rejects


class BackendUnavailable(RuntimeError):
    """A UNet backend that cannot run in this process; the message says why."""


class UNetBackend(str, Enum):
    auto = "auto"  # the engine picks (pipeline/bench.py: fastest_unet_backend)
    eager = "eager"
    compile = "compile"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


UNET_BACKENDS = tuple(b.value for b in UNetBackend)


def runnable_backend(backend: str) -> UNetBackend:
    """`backend` as a concrete backend a runner can be made for (UNet or transformer);
    errors name the backend and the reason."""
    import importlib.util

    try:
        kind = UNetBackend(backend)
    except ValueError:
        raise ValueError(
            f"unet_backend: {backend!r} is not valid; use one of {', '.join(UNET_BACKENDS)}"
        ) from None
    if kind is UNetBackend.auto:
        raise ValueError("unet_backend auto is resolved by the engine before a runner is made")
    if kind is UNetBackend.onnxruntime and importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeError(
            "unet_backend onnxruntime: install the onnx extra (pip install 'daguerre[onnx]')"
        )
    return kind


@dataclass(frozen=True)
class UNetSignature:
    """What an exported graph is specialised to (batch stays dynamic)."""

    in_channels: int
    latent_height: int
    latent_width: int
    text_len: int
    text_dim: int
    pooled_dim: int | None  # SDXL: pooled text embedding width
    time_ids: int | None  # SDXL: micro-conditioning values
    dtype: str

    @property
    def input_names(self) -> list[str]:
        names = ["sample", "timestep", "encoder_hidden_states"]
        return names + (["text_embeds", "time_ids"] if self.pooled_dim else [])


def signature_for(
    unet: Any, latent_height: int, latent_width: int, dtype: Any, text_len: int,
    time_ids: int | None = None,
) -> UNetSignature:  # fmt: skip
    """The signature of `unet` at one latent size, for `text_len` tokens (and, for SDXL-style
    text+time conditioning, `time_ids` micro-conditioning values)."""
    config = unet.config
    pooled = None
    if config.get("addition_embed_type") == "text_time":
        pooled = (
            config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        )
    return UNetSignature(
        in_channels=config.in_channels,
        latent_height=latent_height,
        latent_width=latent_width,
        text_len=text_len,
        text_dim=config.cross_attention_dim,
        pooled_dim=pooled,
        time_ids=time_ids if pooled is not None else None,
        dtype=str(dtype).removeprefix("torch."),
    )


def call_signature(unet: Any, sample: Any, encoder_hidden_states: Any, added: dict | None,
                   dtype: Any) -> UNetSignature:  # fmt: skip
    """The signature of one call, read off its tensors."""
    time_ids = added["time_ids"].shape[1] if added else None
    return signature_for(unet, sample.shape[2], sample.shape[3], dtype,
                         encoder_hidden_states.shape[1], time_ids)  # fmt: skip


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Engine batch sizes a fixed-shape backend is built for: powers of two, then the max.
    A batch runs padded to the next bucket (x2 in the UNet for classifier-free guidance)."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def batch_profile(max_batch_size: int) -> tuple[int, int]:
    """(smallest, largest) engine batch a dynamic-shape engine (TensorRT profile) must take."""
    return 1, max_batch_size


def cache_key(weights_hash: str, signature: UNetSignature, **extra: Any) -> str:
    """A digest naming one compiled artefact: the same inputs always give the same key."""
    import torch

    fields = {"weights": weights_hash, "signature": asdict(signature), "torch": torch.__version__,
              "opset": ONNX_OPSET, **extra}  # fmt: skip
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def cache_root() -> Path:
    """$DAGUERRE_CACHE (default ~/.cache/daguerre): compiled artefacts live under it."""
    return Path(os.environ.get("DAGUERRE_CACHE") or Path.home() / ".cache" / "daguerre")


class UNetRunner:
    """Runs one UNet; subclasses change how."""

    backend = UNetBackend.eager

    def __init__(self, unet: Any, weights_hash: str = "", max_batch_size: int = 1):
        self.unet = unet
        self.weights_hash = weights_hash
        self.max_batch_size = max_batch_size

    def __call__(self, sample: Any, timestep: Any, encoder_hidden_states: Any,
                 added_cond_kwargs: dict | None = None) -> Any:  # fmt: skip
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
        ).sample  # fmt: skip

    def prepare(self, latent_height: int, latent_width: int, text_len: int,
                time_ids: int | None = None) -> list[Path]:  # fmt: skip
        """Build (or find in the cache) what this latent size needs; return the files."""
        return []
