"""UNet backends: one denoising step (a CFG-doubled UNet forward) per backend, vs eager.

For each backend and batch size: milliseconds per UNet call and the ratio to eager at the
same batch; compile/export time is reported apart (it is paid once per shape and cached).
On a GPU: fp16 on `sd15` at 512x512 by default; on a CPU: fp32 on `small` at 128x128.

    python benchmarks/unet_backends.py --json benchmarks/results/unet_backends_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, time_call, write_result


def measure(args: argparse.Namespace) -> list[dict]:
    import torch
    from daguerre.kernels.compile import make_runner
    from daguerre.kernels.unet import BackendUnavailable
    from daguerre.pipeline.models import load_model

    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    model = load_model(args.model, device=device, dtype=dtype)
    unet = model.unet.eval()
    latent = args.size // model.vae_scale_factor
    rows = []
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        try:
            runner = make_runner(
                unet, backend, model.weights_hash, batch_sizes=(1, max(args.batch_sizes))
            )
            runner.prepare(latent, latent)
        except BackendUnavailable as exc:
            print(f"{backend}: skipped ({exc})")
            rows.append({"backend": backend, "skipped": str(exc)})
            continue
        prepare_s = time.perf_counter() - t0
        row = {"backend": backend, "prepare_s": prepare_s, "ms": {}, "first_call_s": {}}
        for batch in args.batch_sizes:
            gen = torch.Generator().manual_seed(batch)
            sample = torch.randn(2 * batch, unet.config.in_channels, latent, latent, generator=gen)
            text = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=gen)
            sample, text = sample.to(device, dtype), text.to(device, dtype)
            t = torch.tensor(500, device=device)
            added = None
            if model.is_sdxl:
                pooled = model.text_encoder_2.config.projection_dim
                added = {"text_embeds": torch.randn(2 * batch, pooled, device=device, dtype=dtype),
                         "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]]
                                                  * (2 * batch), device=device, dtype=dtype)}  # fmt: skip

            def step(runner=runner, sample=sample, t=t, text=text, added=added):
                with torch.inference_mode():
                    runner(sample, t, text, added)

            t1 = time.perf_counter()
            step()  # compiles / records graphs for this batch where the backend does
            row["first_call_s"][batch] = time.perf_counter() - t1
            row["ms"][batch] = 1000 * time_call(step, args.warmup, args.repeats, cuda)
            print(f"{backend:12s} batch {batch:2d}: {row['ms'][batch]:8.1f} ms per UNet call")
        rows.append(row)
    eager = next((r for r in rows if r["backend"] == "eager" and "ms" in r), None)
    for row in rows:
        if eager and "ms" in row:
            row["speedup_vs_eager"] = {b: eager["ms"][b] / ms for b, ms in row["ms"].items()}
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in result["backends"]:
        if "ms" in row:
            batches = list(row["ms"])
            ax.plot(batches, [row["ms"][b] / int(b) for b in batches], "o-", label=row["backend"])
    ax.set_xlabel("images per step (UNet batch is 2x with CFG)")
    ax.set_ylabel("ms per image per step")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.legend()
    c = result["conditions"]
    ax.set_title(
        f"UNet backends: {c['model']} {c['size']}x{c['size']} {c['dtype']}, {c['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="preset or folder (default: sd15 on GPU, small on CPU)")
    parser.add_argument("--size", type=int, help="image side (default: 512 on GPU, 128 on CPU)")
    parser.add_argument("--backends", default="eager,onnxruntime,compile,tensorrt")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    args.model = args.model or ("sd15" if cuda else "small")
    args.size = args.size or (512 if cuda else 128)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    os.environ.setdefault("DAGUERRE_CACHE", tempfile.mkdtemp(prefix="daguerre-bench-cache-"))
    rows = measure(args)
    result = {
        "backends": rows,
        "conditions": {
            **environment(),
            "model": args.model,
            "size": args.size,
            "dtype": "float16" if cuda else "float32",
            "batch_sizes": args.batch_sizes,
            "repeats": args.repeats,
        },  # fmt: skip
    }
    write_result(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
