"""Pipeline efficiency: the end-to-end Ray Data job's images/s over a bare engine loop's.

Both halves run in one process, on the same preset, batch size, image size, steps,
torch threads and image count, so the ratio is what Ray Data, validation, PNG
encoding and storage cost. Writes JSON (every condition and number) and a PNG plot.
With `--shapes N` the manifest interleaves N shapes (sizes, steps, schedulers), and the
mean engine batch the job reaches is measured against the configured batch size (goal
>= 0.9x: rows are ordered by bucket before the engine stage).

    python benchmarks/pipeline_efficiency.py --images 256 --json benchmarks/results/pipeline_efficiency.json
    python benchmarks/pipeline_efficiency.py --model tiny --size 64 --shapes 4 --images 256 --json OUT.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


SHAPES = [(1, 1, 0, "ddim"), (1.5, 1, 0, "ddim"), (1, 1, 2, "euler"), (1, 1.5, 0, "ddim")]


def manifest_rows(n: int, size: int, steps: int, shapes: int = 1) -> list[dict]:
    # 32 distinct prompts, as templates repeat: both halves see the same prompt-cache hits.
    # With shapes > 1, row i takes shape i % shapes: the worst order for batching.
    rows = []
    for i in range(n):
        wide, tall, more_steps, scheduler = SHAPES[i % shapes]
        rows.append({
            "id": f"bench-{i:05d}", "prompt": f"a studio photo of product {i % 32}", "seed": i,
            "steps": steps + more_steps, "width": int(size * wide) // 8 * 8,
            "height": int(size * tall) // 8 * 8, "scheduler": scheduler,
        })  # fmt: skip
    return rows


def bare_loop(rows: list[dict], model: str, batch: int, threads: int) -> dict:
    """images/s of DiffusionEngine.generate alone, after one warm-up batch."""
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine
    from daguerre.pipeline.schema import ImageRequest

    t0 = time.perf_counter()
    engine = DiffusionEngine(
        EngineConfig(model=model, device="cpu", torch_threads=threads, max_batch_size=batch)
    )
    load_s = time.perf_counter() - t0
    # The engine alone at its best: rows grouped by bucket, so every call is a full batch.
    requests = sorted((ImageRequest(**r) for r in rows), key=engine.bucket_key)
    engine.generate(requests[:batch])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch):
        engine.generate(requests[start : start + batch])
    seconds = time.perf_counter() - t0
    return {
        "images": len(rows),
        "seconds": seconds,
        "images_per_s": len(rows) / seconds,
        "model_load_s": load_s,
    }


def job_run(rows: list[dict], model: str, batch: int, threads: int, workdir: Path) -> dict:
    """images/s of the whole `run_job` (validation, actors, PNG, storage, metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from daguerre.cluster.job import run_job
    from daguerre.pipeline.config import EngineConfig, JobConfig
    from daguerre.pipeline.schema import manifest_schema

    manifest = workdir / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), manifest)
    from daguerre.cluster.runtime import init_ray

    t0 = time.perf_counter()
    init_ray()  # the job's own local Ray (quiet, 127.0.0.1)
    ray_init_s = time.perf_counter() - t0
    config = JobConfig(
        batch_size=batch,
        min_actors=1,
        max_actors=1,
        engine=EngineConfig(model=model, device="cpu", torch_threads=threads, max_batch_size=batch),
    )
    summary = run_job(str(manifest), str(workdir / "out"), config, progress=False)
    ray.shutdown()
    # The job's own figures (the same the summary, run record and inspect show).
    return {
        "images": summary.generated,
        "errors": summary.errors,
        "seconds": summary.wall_s,
        "images_per_s": summary.end_to_end_images_per_s,
        "steady_images_per_s": summary.steady_images_per_s,
        "startup_s": summary.startup_s,
        "mean_engine_batch": summary.mean_engine_batch,
        "engine_busy_fraction": summary.engine_busy_fraction_mean,
        "engine_busy_fraction_per_actor": summary.engine_busy_fraction,
        "ray_init_s": ray_init_s,
        "stage_s": summary.stage_s,
    }


def conditions(args: argparse.Namespace) -> dict:
    from _common import environment

    return {
        **environment(),
        "model": args.model,
        "images": args.images,
        "batch_size": args.batch_size,
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "shapes": args.shapes,
        "torch_threads": args.threads,
        "dtype": "float32",
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["bare engine", "job (end to end)", "job (steady state)"]
    values = [
        result["bare"]["images_per_s"],
        result["job"]["images_per_s"],
        result["job"]["steady_images_per_s"] or 0,
    ]
    left.bar(names, values, color=["#555", "#2a7", "#7c5"])
    left.set_ylabel("images/s")
    left.set_title(f"ratio {result['ratio']:.3f} (steady {result['ratio_steady'] or 0:.3f}), "
                   f"mean engine batch {result['mean_engine_batch']:.2f}, engine busy "
                   f"{result.get('engine_busy_fraction') or 0:.3f}", fontsize=9)  # fmt: skip
    stages = {k.removesuffix("_s"): v for k, v in result["job"]["stage_s"].items()}
    stages["start-up + other"] = max(
        result["job"]["seconds"] - sum(result["job"]["stage_s"].values()), 0
    )
    right.barh(list(stages), list(stages.values()), color="#38a")
    right.set_xlabel("seconds (stage times summed over images)")
    right.set_title("where the job's time goes")
    c = result["conditions"]
    fig.suptitle(
        f"{c['model']} {c['size']} x{c['steps']} steps, {c['shapes']} shape(s), batch "
        f"{c['batch_size']}, {c['images']} images, {c['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shapes", type=int, default=1, choices=range(1, len(SHAPES) + 1),
                        help="interleave this many shapes (sizes, steps, schedulers) in the manifest")  # fmt: skip
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="PNG plot (default: next to --json)")
    args = parser.parse_args()

    rows = manifest_rows(args.images, args.size, args.steps, args.shapes)
    bare = bare_loop(rows, args.model, args.batch_size, args.threads)
    print(f"bare engine: {bare['images_per_s']:.3f} images/s")
    with tempfile.TemporaryDirectory(prefix="daguerre-bench-") as tmp:
        job = job_run(rows, args.model, args.batch_size, args.threads, Path(tmp))
    print(
        f"job:         {job['images_per_s']:.3f} images/s (steady state {job['steady_images_per_s'] or 0:.3f})"
    )
    result = {
        "ratio": job["images_per_s"] / bare["images_per_s"],
        "ratio_steady": job["steady_images_per_s"] / bare["images_per_s"]
        if job["steady_images_per_s"]
        else None,
        "goal": 0.90,
        "mean_engine_batch": job["mean_engine_batch"],
        "mean_engine_batch_goal": 0.9 * args.batch_size,
        "engine_busy_fraction": job["engine_busy_fraction"],
        "engine_busy_fraction_goal": 0.95,
        "bare": bare,
        "job": job,
        "conditions": conditions(args),
    }
    print(
        f"ratio:       {result['ratio']:.3f} (steady state {result['ratio_steady'] or 0:.3f}; goal >= 0.90)"
    )
    print(f"engine busy fraction: {job['engine_busy_fraction']} (goal >= 0.95: time inside "
          "generate from the engine's first call to its last)")  # fmt: skip
    print(
        f"mean engine batch: {job['mean_engine_batch']:.2f} of {args.batch_size} "
        f"(goal >= {0.9 * args.batch_size:.1f}; {args.shapes} shapes interleaved)"
    )
    from _common import write_result

    write_result(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
