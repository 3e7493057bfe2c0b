"""A Triton flash-attention forward (online softmax) for the UNet's attention shapes.

q, k, v: [B, H, S, D] (any strides) -> out [B, H, Sq, D]; one program per (query block,
batch x head); fp16 (and bf16 on GPU) with fp32 accumulation; fp32 works too.

Head dims. FlashAttention-style kernels tile the head dim as one power of two, so SD1.5's
40 runs as 64 and 80 as 96/128: up to 60% of the tensor-core work on padding in its
largest attention (sequence 4096, head dim 40). Here the head dim is split into a
power-of-two part and a remainder part, each its own `tl.dot` operand:

    D = DA + DB:   40 = 32 + 16 (8 used)   64 = 64   80 = 64 + 16   160 = 128 + 32

so 80 and 160 carry no padding and 40 carries 8 columns (17%) instead of 24. Tiles stay
GPU-legal (every `tl.dot` dimension >= 16), also under TRITON_INTERPRET=1, which would
accept smaller ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


def split_head_dim(d: int) -> tuple[int, int]:
    """(DA, DB): DA the largest power of two <= d, DB a power of two >= 16 covering the rest."""
    da = 1 << (d.bit_length() - 1)
    rest = d - da
    db = 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())
    return da, db


def block_sizes(d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a head dim: smaller key blocks for wide heads (registers)."""
    return (64, 64) if d <= 64 else (64, 32)


def unsupported(q: Any, k: Any, v: Any) -> str | None:
    """Why this kernel cannot run these tensors (None when it can)."""
    d = q.shape[-1]
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "expects [B, H, S, D] tensors"
    if k.shape[-1] != d or v.shape[-1] != d:
        return "q, k and v must share the head dim"
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        return f"head dim {d} outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    allowed = (torch.float16, torch.float32) + ((torch.bfloat16,) if q.is_cuda else ())
    if q.dtype not in allowed or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (supported: {', '.join(str(a) for a in allowed)})"
    return None


@triton.jit
def _attention_fwd(
    Q, K, V, Out, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, SQ, SK,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions [BM]
    cols = tl.arange(0, BLOCK_N)  # key positions within a block [BN]
    da = tl.arange(0, DA)
    row_ok = rows[:, None] < SQ

    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    o_ptr = Out + b * stride_ob + h * stride_oh

    # The query block stays in registers: [BM, DA] (+ [BM, DB]).
    q_a = tl.load(
        q_ptr + rows[:, None] * stride_qm + da[None, :] * stride_qd, mask=row_ok, other=0.0
    )
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        db = DA + tl.arange(0, DB)
        db_ok = db < D
        q_b = tl.load(
            q_ptr + rows[:, None] * stride_qm + db[None, :] * stride_qd,
            mask=row_ok & db_ok[None, :], other=0.0,
        )  # fmt: skip
        acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))

    for start in range(0, SK, BLOCK_N):
        keys = start + cols
        key_ok = keys < SK
        # s = q k^T over both head-dim parts: [BM, BN]
        k_a = tl.load(k_ptr + keys[None, :] * stride_kn + da[:, None] * stride_kd,
                      mask=key_ok[None, :], other=0.0)  # fmt: skip
        s = tl.dot(q_a, k_a)
        if DB > 0:
            k_b = tl.load(k_ptr + keys[None, :] * stride_kn + db[:, None] * stride_kd,
                          mask=key_ok[None, :] & db_ok[:, None], other=0.0)  # fmt: skip
            s += tl.dot(q_b, k_b)
        s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
        # online softmax: rescale what was accumulated to the new running max
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q_a.dtype)
        v_a = tl.load(v_ptr + keys[:, None] * stride_vn + da[None, :] * stride_vd,
                      mask=key_ok[:, None], other=0.0)  # fmt: skip
        acc_a = acc_a * alpha[:, None] + tl.dot(p, v_a)
        if DB > 0:
            v_b = tl.load(v_ptr + keys[:, None] * stride_vn + db[None, :] * stride_vd,
                          mask=key_ok[:, None] & db_ok[None, :], other=0.0)  # fmt: skip
            acc_b = acc_b * alpha[:, None] + tl.dot(p, v_b)
        m_i = m_new

    out_a = acc_a / l_i[:, None]
    tl.store(o_ptr + rows[:, None] * stride_om + da[None, :] * stride_od,
             out_a.to(Out.dtype.element_ty), mask=row_ok)  # fmt: skip
    if DB > 0:
        out_b = acc_b / l_i[:, None]
        tl.store(o_ptr + rows[:, None] * stride_om + db[None, :] * stride_od,
                 out_b.to(Out.dtype.element_ty), mask=row_ok & db_ok[None, :])  # fmt: skip


def flash_attention(q: Any, k: Any, v: Any, sm_scale: float | None = None) -> Any:
    """softmax(q k^T * scale) v for [B, H, S, D] tensors (scale defaults to 1/sqrt(D))."""
    reason = unsupported(q, k, v)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    batch, heads, sq, d = q.shape
    sk = k.shape[2]
    out = torch.empty((batch, heads, sq, d), device=q.device, dtype=q.dtype)
    da, db = split_head_dim(d)
    block_m, block_n = block_sizes(d)
    grid = (triton.cdiv(sq, block_m), batch * heads)
    _attention_fwd[grid](
        q, k, v, out, sm_scale if sm_scale is not None else 1.0 / math.sqrt(d),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, sq, sk,
        D=d, DA=da, DB=db, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out
