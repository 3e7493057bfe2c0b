"""Attention backends against a float64 reference, the Triton kernel, and backend selection
with the platform patched.

Where there is no GPU the Triton kernel runs through its interpreter: TRITON_INTERPRET=1 is
set for this module only (the kernel is defined at its first use, inside these tests), so
on a GPU machine the same tests compile and run the kernel for real on CUDA tensors."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from daguerre.kernels import attention as attn
from daguerre.kernels.attention import AttentionBackend, AttentionDispatch, resolve

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
CONCRETE = [AttentionBackend.sdpa, AttentionBackend.xformers, AttentionBackend.triton]
TOLERANCE = {torch.float16: 3e-3, torch.float32: 2e-5}


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter_without_a_gpu():
    if DEVICE == "cuda":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def needs(backend: AttentionBackend) -> None:
    """Skip, with the backend's own reason, where it cannot run on this device."""
    reason = attn.REGISTRY[backend].unavailable(DEVICE)
    if reason:
        pytest.skip(f"{backend.value}: {reason}")


SHAPES = [  # (head dim, query length, key length): SD1.5 40/80/160, SDXL 64; cross 77, self
    (40, 256, 77), (40, 1024, 1024), (64, 256, 77), (64, 256, 256),
    (80, 256, 256), (80, 128, 77), (160, 64, 64), (160, 64, 77),
]  # fmt: skip


def reference(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def test_cpu_has_sdpa_and_triton_under_the_interpreter():
    backends = attn.available_backends("cpu")
    assert AttentionBackend.sdpa in backends
    assert AttentionBackend.xformers not in backends  # no CPU kernels
    if HAS_TRITON and DEVICE == "cpu":
        assert AttentionBackend.triton in backends


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"d{d}-q{m}-k{n}" for d, m, n in SHAPES])
@pytest.mark.parametrize("backend", CONCRETE, ids=lambda b: b.value)
def test_backend_matches_float64_reference(backend, shape, dtype):
    needs(backend)
    d, sq, sk = shape
    gen = torch.Generator().manual_seed(d * 7 + sq + sk)
    q = torch.randn(2, 2, sq, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(2, 2, sk, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(2, 2, sk, d, generator=gen).to(DEVICE, dtype)
    dispatch = AttentionDispatch(backend, DEVICE)
    out = dispatch(q, k, v)
    assert dispatch.calls == {backend.value: 1}  # it ran on the backend asked for
    assert out.shape == (2, 2, sq, d) and out.dtype == dtype
    err = (out.double() - reference(q, k, v)).abs().max().item()
    assert err < TOLERANCE[dtype], err


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_takes_strided_inputs_and_splits_the_head_dim():
    from daguerre.kernels.flash_attention import flash_attention, split_head_dim

    assert [split_head_dim(d) for d in (40, 64, 80, 160)] == [
        (32, 16),
        (64, 0),
        (64, 16),
        (128, 32),
    ]
    # [B, S, H, D] memory viewed as [B, H, S, D]: what the UNet's processor passes.
    base = torch.randn(3, 96, 4, 80, dtype=torch.float16).to(DEVICE)
    q = base.transpose(1, 2)
    out = flash_attention(q, q, q)
    assert (out.double() - reference(q, q, q)).abs().max().item() < 3e-3


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_unsupported_shapes_fall_back_to_sdpa():
    dispatch = AttentionDispatch(AttentionBackend.triton, DEVICE)
    q = torch.randn(1, 2, 16, 8).to(DEVICE)  # head dim 8 is below the kernel's GPU-legal minimum
    out = dispatch(q, q, q)
    assert dispatch.calls == {"sdpa": 1}
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))


# -- selection and fallback ---------------------------------------------------------------------


def test_unavailable_backend_falls_back_with_one_warning(caplog, monkeypatch):
    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger="daguerre.kernels"):
        assert resolve("xformers", "cpu") is AttentionBackend.sdpa
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "xformers unavailable" in lines[0] and "using sdpa" in lines[0]


def test_triton_without_cuda_or_interpreter_falls_back(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger="daguerre.kernels"):
        assert resolve("triton", "cpu") is AttentionBackend.sdpa
    assert "needs CUDA" in caplog.text or "not installed" in caplog.text


def test_env_var_overrides_the_config(monkeypatch):
    monkeypatch.setenv(attn.ENV_VAR, "sdpa")
    assert resolve("triton", "cpu") is AttentionBackend.sdpa
    monkeypatch.setenv(attn.ENV_VAR, "flash3")
    with pytest.raises(ValueError, match="attention_backend: 'flash3' is not valid"):
        resolve(None, "cpu")


def test_platform_patched_to_cuda(monkeypatch):
    """On a (patched) CUDA platform every installed backend is available, and auto times
    them once per shape and keeps the winner."""
    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    monkeypatch.setattr(attn.importlib.util, "find_spec", lambda name: object())
    assert attn.available_backends("cuda") == [
        AttentionBackend.sdpa, AttentionBackend.xformers, AttentionBackend.triton,
    ]  # fmt: skip
    assert resolve("xformers", "cuda") is AttentionBackend.xformers
    timed = []

    def fake_fastest(q, k, v, candidates):
        timed.append((tuple(q.shape), tuple(candidates)))
        return AttentionBackend.sdpa

    monkeypatch.setattr(attn, "fastest", fake_fastest)
    dispatch = AttentionDispatch(AttentionBackend.auto, "cuda")
    a, b = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 32, 16)
    for q in (a, a, b, a):
        dispatch(q, q, q)
    assert [shape for shape, _ in timed] == [(1, 2, 8, 16), (1, 2, 32, 16)]  # once per shape
    assert dispatch.calls == {"sdpa": 4}
    assert dispatch.describe() == "auto: sdpa"  # what the metadata records: what it chose
    assert resolve("auto", "cuda") is AttentionBackend.auto


def test_auto_on_cpu_is_sdpa(monkeypatch):
    dispatch = AttentionDispatch(AttentionBackend.auto, "cpu")
    q = torch.randn(1, 1, 4, 16)
    dispatch(q, q, q)
    assert dispatch.calls == {"sdpa": 1} and not dispatch.choice
    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    assert resolve("auto", "cpu") is AttentionBackend.sdpa  # so the metadata says sdpa


# -- inside the UNet ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CONCRETE, ids=lambda b: b.value)
def test_processor_in_the_small_unet_matches_diffusers(backend, monkeypatch):
    from daguerre.kernels.attention import install
    from daguerre.pipeline.model_build import build_preset
    from daguerre.pipeline.models import get_preset
    from diffusers.models.attention_processor import AttnProcessor2_0

    needs(backend)
    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    unet = build_preset(get_preset("small")).unet.eval()  # head dims 8, 16 and 32 (CPU, fp32)
    if DEVICE == "cuda" and backend is not AttentionBackend.sdpa:
        pytest.skip("fp32 UNet on the CPU; the GPU kernels are covered by the numerics tests")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(
        2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        expected = unet(latents, 10, encoder_hidden_states=text).sample
        dispatch = install(unet, backend.value, "cpu")
        got = unet(latents, 10, encoder_hidden_states=text).sample
    assert dispatch.backend is backend
    if backend is AttentionBackend.triton:
        assert dispatch.calls.get("triton", 0) > 0 and dispatch.calls.get("sdpa", 0) > 0
    assert (got - expected).abs().max().item() < 1e-4


def test_engine_records_the_backend_that_runs(monkeypatch):
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine

    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    engine = DiffusionEngine(EngineConfig(model="tiny", device="cpu", attention_backend="xformers"))
    assert engine.backend["attention"] == "sdpa"  # xformers has no CPU kernels: fell back


def test_the_dispatch_compiles_once_and_auto_ignores_the_batch(monkeypatch):
    """Inside torch.compile the dispatch keeps no per-call counter (it would fail the graph's
    guards and recompile on every call); auto's choice is keyed without the batch size, so
    an image runs on the same kernels alone and in a batch."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dispatch = AttentionDispatch(AttentionBackend.sdpa, "cpu")
    compiled = torch.compile(lambda q: dispatch(q, q, q), backend="eager", dynamic=False)
    q = torch.randn(1, 2, 8, 16)
    compiled(q)
    first = counters["stats"]["unique_graphs"]
    for _ in range(3):
        compiled(q)
    assert counters["stats"]["unique_graphs"] == first  # no recompiles
    assert dispatch.calls == {} and dispatch.describe() == "sdpa"
    timed = []
    monkeypatch.setattr(
        attn, "fastest", lambda q, *_: timed.append(q.shape) or AttentionBackend.sdpa
    )
    auto = AttentionDispatch(AttentionBackend.auto, "cuda")
    for batch in (1, 8, 2):
        x = torch.randn(batch, 2, 8, 16)
        auto(x, x, x)
    assert len(timed) == 1


@pytest.mark.timeout(300)
def test_triton_attention_in_a_transformer():
    """attention_backend triton inside a transformer (kernels/dit_attention.py; through
    Triton's interpreter here): the images of sdpa within 1/255, and the metadata says triton
    ran. small-flux: head dim 64 (tiny-sd3's 8 is below the kernel's 16: sdpa there, silently)."""
    import numpy as np
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine
    from daguerre.pipeline.model_build import build_preset
    from daguerre.pipeline.models import get_preset
    from daguerre.pipeline.schema import ImageRequest

    sdpa = DiffusionEngine(EngineConfig(model="small-flux", device="cpu"))
    config = EngineConfig(model="small-flux", device="cpu", attention_backend="triton")
    triton_engine = DiffusionEngine(config, build_preset(get_preset("small-flux")))
    request = ImageRequest(id="t", prompt="a vase", seed=8, steps=2, width=64, height=64)
    made, reference = triton_engine.generate([request])[0], sdpa.generate([request])[0]
    assert np.abs(made.image.astype(int) - reference.image.astype(int)).max() <= 1
    assert triton_engine.backend["attention"] == "triton"
    assert triton_engine.attention.calls == {"triton": 2 * 6}  # 2 steps x 6 blocks
