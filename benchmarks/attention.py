"""Attention backends on the UNets' real attention shapes: milliseconds and ratio to SDPA.

Shapes are SD1.5's (head dims 40/80/160, self-attention over 4096/1024/256 tokens at
512x512, cross-attention over 77) and SDXL's (head dim 64 over 4096/1024 tokens at
1024x1024), one image with classifier-free guidance (batch 2). On a GPU every available
backend runs (daguerre's Triton kernel, xformers, and SDPA with each of its kernels
forced: flash, memory-efficient, math) in fp16; on a CPU only SDPA runs (xformers has no
CPU kernels and the Triton interpreter is a correctness tool, not a fast path), in fp32.

    python benchmarks/attention.py --json benchmarks/results/attention_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from _common import environment, time_call, write_result
from daguerre.kernels.attention import UNET_ATTENTION_SHAPES

GOAL = 1.3  # Triton vs the best SDPA kernel, head dim 40 at 4096 tokens (GPU)

SHAPES = UNET_ATTENTION_SHAPES


def candidates(cuda: bool) -> dict[str, tuple]:
    """name -> (attention backend, SDPA kernel to force or None)."""
    from daguerre.kernels.attention import AttentionBackend, available_backends

    found = available_backends("cuda" if cuda else "cpu")
    out: dict[str, tuple] = {"sdpa": (AttentionBackend.sdpa, None)}
    if cuda:
        from torch.nn.attention import SDPBackend

        out.update({
            "sdpa[flash]": (AttentionBackend.sdpa, SDPBackend.FLASH_ATTENTION),
            "sdpa[efficient]": (AttentionBackend.sdpa, SDPBackend.EFFICIENT_ATTENTION),
            "sdpa[math]": (AttentionBackend.sdpa, SDPBackend.MATH),
        })  # fmt: skip
        for backend in (AttentionBackend.xformers, AttentionBackend.triton):
            if backend in found:
                out[backend.value] = (backend, None)
    return out


def measure(args: argparse.Namespace) -> list[dict]:
    import torch
    from daguerre.kernels.attention import REGISTRY

    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    rows = []
    for model, layer, heads, sq, sk, d in SHAPES:
        q = torch.randn(args.batch, heads, sq, d, device=device, dtype=dtype)
        k = torch.randn(args.batch, heads, sk, d, device=device, dtype=dtype)
        v = torch.randn_like(k)
        row = {"model": model, "layer": layer, "batch": args.batch, "heads": heads,
               "query_tokens": sq, "key_tokens": sk, "head_dim": d, "ms": {}}  # fmt: skip
        for name, (backend, forced) in candidates(cuda).items():
            spec = REGISTRY[backend]
            if spec.unsupported(q, k, v):
                continue

            def run(spec=spec, forced=forced, q=q, k=k, v=v):
                ctx = contextlib.nullcontext()
                if forced is not None:
                    from torch.nn.attention import sdpa_kernel

                    ctx = sdpa_kernel([forced])
                with ctx:
                    spec.run(q, k, v)

            try:
                row["ms"][name] = 1000 * time_call(run, args.warmup, args.repeats, cuda)
            except RuntimeError as exc:  # a forced SDPA kernel that refuses this shape
                row["ms"][name] = None
                row.setdefault("refused", {})[name] = str(exc).splitlines()[0][:120]
        sdpa_ms = [v for n, v in row["ms"].items() if n.startswith("sdpa") and v]
        row["best_sdpa_ms"] = min(sdpa_ms)
        row["ratio_to_best_sdpa"] = {n: row["best_sdpa_ms"] / v for n, v in row["ms"].items() if v}
        print(f"{model} {layer:12s} d={d:3d} {sq:5d}x{sk:<5d} "
              + "  ".join(f"{n} {v:.2f} ms" for n, v in row["ms"].items() if v))  # fmt: skip
        rows.append(row)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["shapes"]
    names = sorted({n for r in rows for n in r["ratio_to_best_sdpa"]})
    labels = [
        f"{r['model']} {r['layer']}\nd{r['head_dim']} {r['query_tokens']}x{r['key_tokens']}"
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(rows))],
               [r["ratio_to_best_sdpa"].get(name, 0) for r in rows], width, label=name)  # fmt: skip
    ax.axhline(1.0, color="#444", lw=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("speed vs best SDPA kernel (higher is faster)")
    ax.legend(fontsize=8)
    env = result["conditions"]
    ax.set_title(
        f"attention backends, {env['dtype']}, batch {env['batch']}, {env['device']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with CFG")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even with a GPU")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="PNG plot (default: next to --json)")
    args = parser.parse_args()
    import torch

    rows = measure(args)
    cuda = torch.cuda.is_available() and not args.cpu
    goal_row = rows[0]  # sd15 head dim 40 at 4096 tokens
    result = {
        "goal": {"triton_vs_best_sdpa_d40_s4096_min": GOAL},
        "goal_ratio": goal_row["ratio_to_best_sdpa"].get("triton"),
        "goal_met": (goal_row["ratio_to_best_sdpa"].get("triton") or 0) >= GOAL if cuda else None,
        "shapes": rows,
        "conditions": {
            **environment(),
            "dtype": "float16" if cuda else "float32",
            "batch": args.batch,
            "repeats": args.repeats,
        },  # fmt: skip
    }
    write_result(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
