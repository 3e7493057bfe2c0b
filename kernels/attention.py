"""Attention backends for the UNet: an enum, a registry with constraint checks, a dispatcher.

    sdpa      torch.nn.functional.scaled_dot_product_attention (default; any device)
    xformers  xformers.ops.memory_efficient_attention (CUDA only; xformers has no CPU kernels)
    triton    daguerre's Triton fp16 flash-attention forward (kernels/flash_attention.py)
    auto      on CUDA, time every available backend once per attention shape and keep the
              fastest; elsewhere sdpa

Chosen by `EngineConfig.attention_backend`, `--attention-backend`, or the environment
variable DAGUERRE_ATTENTION_BACKEND (which wins, for quick experiments). A backend that
cannot run here falls back to sdpa with one warning line; a call whose shape or dtype a
backend does not support (an attention mask, fp32 for triton) runs on sdpa silently.
Installed into a diffusers UNet as its attention processor (`install`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

logger = logging.getLogger("daguerre.kernels")

ENV_VAR = "DAGUERRE_ATTENTION_BACKEND"


# The UNets' real attention shapes (SD1.5 at 512x512, SDXL at 1024x1024), batch 2 = one
# image with CFG: what benchmarks/attention.py times and tests/gpu checks.
# (model, layer, heads, query tokens, key tokens, head dim)
UNET_ATTENTION_SHAPES = [
    ("sd15", "down0 self", 8, 4096, 4096, 40),
    ("sd15", "down0 cross", 8, 4096, 77, 40),
    ("sd15", "down1 self", 8, 1024, 1024, 80),
    ("sd15", "down2 self", 8, 256, 256, 160),
    ("sdxl", "down1 self", 10, 4096, 4096, 64),
    ("sdxl", "down2 self", 20, 1024, 1024, 64),
    ("sdxl", "down2 cross", 20, 1024, 77, 64),
]


class AttentionBackend(str, Enum):
    sdpa = "sdpa"
    xformers = "xformers"
    triton = "triton"
    auto = "auto"


ATTENTION_BACKENDS = tuple(b.value for b in AttentionBackend)


@dataclass(frozen=True)
class BackendSpec:
    """One backend: why it cannot run in this process (None if it can), and per-call limits."""

    name: AttentionBackend
    unavailable: Callable[[str], str | None]  # device type -> reason, or None
    unsupported: Callable[[Any, Any, Any], str | None]  # (q, k, v) -> reason, or None
    run: Callable[[Any, Any, Any], Any]  # q, k, v: [B, H, S, D] -> [B, H, Sq, D]


# -- the backends ---------------------------------------------------------------------------


def _sdpa(q: Any, k: Any, v: Any) -> Any:
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v)


def _xformers_unavailable(device_type: str) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'daguerre[gpu]')"
    if device_type != "cuda":
        return "xformers has no kernels for this device (CUDA only)"
    return None


def _xformers(q: Any, k: Any, v: Any) -> Any:
    import xformers.ops as xops

    # xformers takes [B, S, H, D]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
        v.transpose(1, 2).contiguous(),
    )  # fmt: skip
    return out.transpose(1, 2)


def _triton_unavailable(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernel needs CUDA (or TRITON_INTERPRET=1, for tests)"
    return None


def _triton_unsupported(q: Any, k: Any, v: Any) -> str | None:
    from .flash_attention import unsupported

    return unsupported(q, k, v)


def _triton(q: Any, k: Any, v: Any) -> Any:
    from .flash_attention import flash_attention

    return flash_attention(q, k, v)


def _always(*_: Any) -> None:
    return None


def _xformers_unsupported(q: Any, k: Any, v: Any) -> str | None:
    import torch

    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    return None


REGISTRY: dict[AttentionBackend, BackendSpec] = {
    AttentionBackend.sdpa: BackendSpec(AttentionBackend.sdpa, _always, _always, _sdpa),
    AttentionBackend.xformers: BackendSpec(
        AttentionBackend.xformers, _xformers_unavailable, _xformers_unsupported, _xformers
    ),
    AttentionBackend.triton: BackendSpec(
        AttentionBackend.triton, _triton_unavailable, _triton_unsupported, _triton
    ),
}


# -- selection ------------------------------------------------------------------------------


def available_backends(device_type: str) -> list[AttentionBackend]:
    """The concrete backends that can run on this device type in this process."""
    return [name for name, spec in REGISTRY.items() if spec.unavailable(device_type) is None]


def resolve(requested: str | None, device_type: str) -> AttentionBackend:
    """The backend to use: the env var, else `requested`, else sdpa; an unavailable one
    falls back to sdpa with one warning line naming the reason."""
    name = os.environ.get(ENV_VAR) or requested or AttentionBackend.sdpa.value
    try:
        backend = AttentionBackend(name)
    except ValueError:
        raise ValueError(
            f"attention_backend: {name!r} is not valid; use one of {', '.join(ATTENTION_BACKENDS)}"
        ) from None
    if backend is AttentionBackend.auto:  # timed per shape on CUDA; elsewhere only sdpa runs
        return backend if device_type == "cuda" else AttentionBackend.sdpa
    reason = REGISTRY[backend].unavailable(device_type)
    if reason is not None:
        logger.warning("attention backend %s unavailable (%s); using sdpa", backend.value, reason)
        return AttentionBackend.sdpa
    return backend


class AttentionDispatch:
    """Runs attention on one backend (or, for auto, the fastest per shape, timed once)."""

    def describe(self) -> str:
        """What runs, for the metadata: the backend, or for auto the backends it chose."""
        if self.backend is not AttentionBackend.auto:
            return self.backend.value
        # eager calls, and the choices a traced graph used (no choice made: sdpa there)
        ran = set(self.calls) | {c.value for c in self.choice.values()}
        return f"auto: {'+'.join(sorted(ran)) or 'sdpa'}"

    def __init__(self, backend: AttentionBackend, device_type: str):
        self.backend = backend
        self.device_type = device_type
        self.choice: dict[tuple, AttentionBackend] = {}  # auto: shape -> fastest backend
        self.calls: dict[str, int] = {}  # backend that actually ran -> calls (eager only)

    def __call__(self, q: Any, k: Any, v: Any) -> Any:
        import torch

        tracing = torch.compiler.is_compiling()  # torch.compile, or a dynamo ONNX export
        backend = self.backend
        if backend is AttentionBackend.auto:
            backend = self._auto(q, k, v, tracing)
        spec = REGISTRY[backend]
        if backend is not AttentionBackend.sdpa and spec.unsupported(q, k, v) is not None:
            spec = REGISTRY[AttentionBackend.sdpa]
        if not tracing:  # state changed inside a graph fails its guards: a recompile a call
            self.calls[spec.name.value] = self.calls.get(spec.name.value, 0) + 1
        return spec.run(q, k, v)

    def _auto(self, q: Any, k: Any, v: Any, tracing: bool = False) -> AttentionBackend:
        """The fastest backend for this shape, timed once (eagerly). Keyed without the batch
        size, so an image runs on the same kernels alone and in a batch; inside a graph
        being traced only a choice already made (else sdpa) is used, nothing is timed."""
        if self.device_type != "cuda":
            return AttentionBackend.sdpa
        if tracing:
            try:
                return self.choice.get(self._key(q, k), AttentionBackend.sdpa)
            except TypeError:  # a symbolic dim beyond the batch: nothing to look up
                return AttentionBackend.sdpa
        key = self._key(q, k)
        if key not in self.choice:
            self.choice[key] = fastest(q, k, v, available_backends("cuda"))
            logger.info("attention auto: %s -> %s", key, self.choice[key].value)
        return self.choice[key]

    @staticmethod
    def _key(q: Any, k: Any) -> tuple:
        """(heads, query len, head dim, key len, dtype): the batch (dynamic in exported
        graphs) left out, so an image runs on the same kernels alone and in a batch."""
        return (*(int(d) for d in q.shape[1:]), int(k.shape[2]), str(q.dtype))


def fastest(q: Any, k: Any, v: Any, candidates: list[AttentionBackend], repeats: int = 5):
    """The candidate that runs (q, k, v) fastest on CUDA (each warmed up once, then timed)."""
    import torch

    best, best_s = AttentionBackend.sdpa, float("inf")
    for backend in candidates:
        spec = REGISTRY[backend]
        if spec.unsupported(q, k, v) is not None:
            continue
        spec.run(q, k, v)  # warm-up (and Triton's compilation)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            spec.run(q, k, v)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000 / repeats
        if seconds < best_s:
            best, best_s = backend, seconds
    return best


# -- the diffusers processor ------------------------------------------------------------------


class DaguerreAttnProcessor:
    """diffusers' AttnProcessor2_0, with the attention call itself dispatched to a backend."""

    def __init__(self, dispatch: AttentionDispatch):
        self.dispatch = dispatch

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        temb: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # [B, C, H, W] -> [B, HW, C]
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, seq_len, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # [B, S, H*D] -> [B, H, S, D]
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is not None:  # the SD UNets never pass one; sdpa handles it
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            out = self.dispatch(query, key, value)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _project(attn: Any, hidden_states: Any, encoder_hidden_states: Any) -> tuple[Any, Any, Any]:
    """q, k, v: one matmul each, or where the projections were fused (`fuse_qkv`), one for
    q, k and v in self-attention and one for k and v in cross-attention."""
    if encoder_hidden_states is None and getattr(attn, "to_qkv", None) is not None:
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    if getattr(attn, "to_kv", None) is not None and encoder_hidden_states is not hidden_states:
        key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        return query, key, value
    return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)


def fuse_qkv(unet: Any) -> int:
    """Fuse every attention module's projections (diffusers' `Attention.fuse_projections`),
    keeping this module's processors; returns how many modules were fused."""
    from diffusers.models.attention_processor import Attention

    fused = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            module.fuse_projections()
            fused += 1
    return fused


def install(unet: Any, requested: str | None, device_type: str) -> AttentionDispatch:
    """Make every attention layer of `unet` run through the chosen backend; return the dispatch."""
    dispatch = AttentionDispatch(resolve(requested, device_type), device_type)
    unet.set_attn_processor(DaguerreAttnProcessor(dispatch))
    return dispatch
