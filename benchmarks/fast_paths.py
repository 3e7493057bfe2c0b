"""The engine's faster paths against its default: images/s, and how far their images are
from the default's on the same seeds (mean absolute pixel difference, 0-255 levels).

One run, the engine alone (no Ray), one model, size, steps, batch size and thread count:
the default first, then each variant: the `cached` speed tier at each --intervals value
(step caching: the whole UNet every N steps; for SD3/FLUX every block every N steps after
two warm-up steps, diffusers' TaylorSeer extrapolating the output in between), the 8-bit UNet (int8; fp8 on CUDA GPUs of
compute capability 8.9+, skipped with the reason elsewhere) and the hot-path switches.

    python benchmarks/fast_paths.py --json benchmarks/results/fast_paths_cpu.json
    python benchmarks/fast_paths.py --model small-flux --size 256 --batch-size 2 \
        --json benchmarks/results/fast_paths_flux_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
from _common import environment, time_call, write_json, write_result


def requests(args: argparse.Namespace, speed: str) -> list:
    from daguerre.pipeline.schema import ImageRequest

    return [ImageRequest(id=f"s{i}", prompt=f"a product photo of a lamp, style {i}", seed=i,
                         steps=args.steps, width=args.size, height=args.size, speed=speed)
            for i in range(args.batch_size)]  # fmt: skip


def variants(args: argparse.Namespace, family: str) -> list[tuple[str, dict, str]]:
    """(label, engine config changes, speed tier) per variant (a transformer's hot path is
    fuse_qkv alone: channels_last is for UNets)."""
    out = [(f"cached /{n}", {"cache_interval": n}, "cached") for n in args.intervals]
    hot_path = {"fuse_qkv": True} if family != "unet" else {"fuse_qkv": True, "channels_last": True}
    out += [("int8", {"quantize": "int8"}, "exact"), ("fp8", {"quantize": "fp8"}, "exact"),
            ("hot path", hot_path, "exact")]  # fmt: skip
    return out


def measure(args: argparse.Namespace) -> dict:
    from daguerre.kernels.quantize import Quantization, unavailable
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine, resolve_device, resolve_dtype
    from daguerre.pipeline.models import describe_model, load_model

    # pinned, so every variant differs from the baseline in what it names only
    base = {"model": args.model, "device": args.device, "max_batch_size": args.batch_size,
            "torch_threads": args.threads, "unet_backend": "eager", "attention_backend": "sdpa"}  # fmt: skip
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    family = describe_model(args.model).family
    # One model build (minutes for sdxl on a CPU); variants that change it get a copy.
    components = load_model(args.model, device=device, dtype=resolve_dtype("auto", device, family))
    engine = DiffusionEngine(EngineConfig(**base), components)
    default_batch = requests(args, "exact")
    default_images = [g.image for g in engine.generate(default_batch)]
    default_s = time_call(lambda: engine.generate(default_batch), warmup=1,
                          repeats=args.repeats, cuda=cuda)  # fmt: skip
    rows = [{"variant": "default", "images_per_s": args.batch_size / default_s, "speedup": 1.0,
             "mean_abs_pixel_diff": 0.0}]  # fmt: skip
    for label, changes, speed in variants(args, family):
        quantize = Quantization(changes.get("quantize", "none"))
        reason = unavailable(quantize, resolve_device(args.device))
        if reason:
            rows.append({"variant": label, "skipped": reason})
            write_json(args.json, {"results": rows, "partial": True})
            print(f"{label}: skipped ({reason})")
            continue
        changes_model = set(changes) - {"cache_interval"}
        parts = copy.deepcopy(components) if changes_model else components
        engine = DiffusionEngine(EngineConfig(**base, **changes), parts)
        batch = requests(args, speed)
        images = [g.image for g in engine.generate(batch)]
        run = lambda engine=engine, batch=batch: engine.generate(batch)  # noqa: E731
        seconds = time_call(run, warmup=0, repeats=args.repeats, cuda=cuda)
        diff = np.mean([np.abs(a.astype(float) - b.astype(float)).mean()
                        for a, b in zip(default_images, images, strict=True)])  # fmt: skip
        rows.append({"variant": label, "images_per_s": args.batch_size / seconds,
                     "speedup": default_s / seconds, "mean_abs_pixel_diff": float(diff)})  # fmt: skip
        write_json(args.json, {"results": rows, "partial": True})  # kept if cut off later
        print(
            f"{label}: {default_s / seconds:.2f}x the default, mean abs pixel difference "
            f"{diff:.2f} levels"
        )
    return {"results": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if "images_per_s" in r]
    labels = [r["variant"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(labels, [r["images_per_s"] for r in rows], color=["#555"] + ["#2a7"] * (len(rows) - 1))
    left.set_ylabel("images/s (engine alone)")
    right.bar(labels, [r["mean_abs_pixel_diff"] for r in rows], color="#c63")
    right.set_ylabel("mean abs pixel difference to the default (levels)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    c = result["conditions"]
    fig.suptitle(f"{c['model']} {c['size']}px x{c['steps']} steps, batch {c['batch_size']}, "
                 f"{c['device']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--intervals", default="2,3,5", help="full UNet every N steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    args.intervals = [int(i) for i in args.intervals.split(",")]
    result = measure(args)
    result["conditions"] = {**environment(), "model": args.model, "size": args.size,
                            "steps": args.steps, "batch_size": args.batch_size,
                            "repeats": args.repeats}  # fmt: skip
    result["note"] = ("with a random-weight preset the pixel difference measures how far a "
                      "variant moves the images, not a perceptual quality score")  # fmt: skip
    write_result(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
