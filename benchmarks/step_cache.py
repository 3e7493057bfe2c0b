"""The `cached` speed tier (step caching) against `exact`: images/s, and how far its images
are from exact's on the same seeds (mean absolute pixel difference, 0-255 levels).

One run, the engine alone (no Ray), one model, size, steps, batch size and thread count;
exact first, then cached at each --intervals value (the whole UNet every N steps).

    python benchmarks/step_cache.py --json benchmarks/results/step_cache_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from _common import environment, time_call, write_result


def requests(args: argparse.Namespace, speed: str) -> list:
    from daguerre.pipeline.schema import ImageRequest

    return [ImageRequest(id=f"s{i}", prompt=f"a product photo of a lamp, style {i}", seed=i,
                         steps=args.steps, width=args.size, height=args.size, speed=speed)
            for i in range(args.batch_size)]  # fmt: skip


def measure(args: argparse.Namespace) -> dict:
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine

    base = {"model": args.model, "device": args.device, "max_batch_size": args.batch_size,
            "torch_threads": args.threads}  # fmt: skip
    engine = DiffusionEngine(EngineConfig(**base))
    exact_batch = requests(args, "exact")
    exact_images = [g.image for g in engine.generate(exact_batch)]
    exact_s = time_call(lambda: engine.generate(exact_batch), warmup=1, repeats=args.repeats)
    rows = [{"speed": "exact", "interval": None, "images_per_s": args.batch_size / exact_s,
             "speedup": 1.0, "mean_abs_pixel_diff": 0.0}]  # fmt: skip
    for interval in args.intervals:
        engine = DiffusionEngine(EngineConfig(**base, cache_interval=interval))
        batch = requests(args, "cached")
        images = [g.image for g in engine.generate(batch)]
        run = lambda engine=engine, batch=batch: engine.generate(batch)  # noqa: E731
        seconds = time_call(run, warmup=0, repeats=args.repeats)
        diff = np.mean([np.abs(a.astype(float) - b.astype(float)).mean()
                        for a, b in zip(exact_images, images, strict=True)])  # fmt: skip
        rows.append({"speed": "cached", "interval": interval,
                     "images_per_s": args.batch_size / seconds, "speedup": exact_s / seconds,
                     "mean_abs_pixel_diff": float(diff)})  # fmt: skip
        print(
            f"cached every {interval}: {exact_s / seconds:.2f}x exact, "
            f"mean abs pixel difference {diff:.2f} levels"
        )
    return {"results": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    labels = ["exact"] + [f"cached /{r['interval']}" for r in rows[1:]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [r["images_per_s"] for r in rows], color=["#555"] + ["#2a7"] * (len(rows) - 1))
    left.set_ylabel("images/s (engine alone)")
    right.bar(labels, [r["mean_abs_pixel_diff"] for r in rows], color="#c63")
    right.set_ylabel("mean abs pixel difference to exact (levels)")
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
    result["note"] = ("random-weight preset: the pixel difference measures how far caching "
                      "moves the images, not a perceptual quality score")  # fmt: skip
    write_result(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
