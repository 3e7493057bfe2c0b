"""The Triton attention kernel on CUDA: against SDPA and float64 on the UNets' real shapes.

Skipped without a GPU (the interpreter runs the kernel on small shapes in
tests/cpu/test_attention.py); benchmarks/gpu_check.sh runs this on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from daguerre.kernels.attention import (
    UNET_ATTENTION_SHAPES,
    AttentionBackend,
    AttentionDispatch,
    available_backends,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DTYPES = [torch.float16, torch.bfloat16]
# The kernel may be at most this much less exact than SDPA against float64 (plus a floor
# of the dtype's own rounding of outputs ~0.05 in size).
SLACK, FLOOR = 2.0, {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape", UNET_ATTENTION_SHAPES, ids=[f"{m}-{layer.replace(' ', '-')}" for m, layer, *_ in
                                         UNET_ATTENTION_SHAPES],
)  # fmt: skip
def test_triton_is_as_exact_as_sdpa_on_the_real_shapes(shape, dtype):
    if AttentionBackend.triton not in available_backends("cuda"):
        pytest.skip("triton is not available on this CUDA machine")
    _, _, heads, sq, sk, d = shape
    gen = torch.Generator(device="cuda").manual_seed(sq + sk + d)
    q, k, v = (torch.randn(2, heads, s, d, device="cuda", generator=gen).to(dtype)
               for s in (sq, sk, sk))  # fmt: skip
    expected = reference(q, k, v)
    errors = {}
    for backend in (AttentionBackend.sdpa, AttentionBackend.triton):
        dispatch = AttentionDispatch(backend, "cuda")
        out = dispatch(q, k, v)
        assert dispatch.calls == {backend.value: 1}, dispatch.calls  # no silent fallback
        assert out.dtype == dtype and torch.isfinite(out).all()
        errors[backend.value] = (out.double() - expected).abs().max().item()
    assert errors["triton"] <= SLACK * errors["sdpa"] + FLOOR[dtype], errors
