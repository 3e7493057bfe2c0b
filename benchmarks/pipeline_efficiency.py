"""Pipeline efficiency: the end-to-end Ray Data job's images/s over a bare engine loop's.

Both halves run in one process, on the same preset, batch size, image size, steps,
torch threads and image count, so the ratio is what Ray Data, validation, PNG
encoding and storage cost. Writes JSON (every condition and number) and a PNG plot.

    python benchmarks/pipeline_efficiency.py --images 256 --json benchmarks/results/pipeline_efficiency.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def manifest_rows(n: int, size: int, steps: int) -> list[dict]:
    # 32 distinct prompts, as templates repeat: both halves see the same prompt-cache hits.
    return [
        {
            "id": f"bench-{i:05d}",
            "prompt": f"a studio photo of product {i % 32}",
            "seed": i,
            "steps": steps,
            "width": size,
            "height": size,
        }
        for i in range(n)
    ]


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
    requests = [ImageRequest(**r) for r in rows]
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
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import ray
    from daguerre.cluster.job import run_job
    from daguerre.pipeline.config import EngineConfig, JobConfig
    from daguerre.pipeline.schema import manifest_schema

    manifest = workdir / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), manifest)
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    ray_init_s = time.perf_counter() - t0
    config = JobConfig(
        batch_size=batch,
        min_actors=1,
        max_actors=1,
        engine=EngineConfig(model=model, device="cpu", torch_threads=threads, max_batch_size=batch),
    )
    summary = run_job(str(manifest), str(workdir / "out"), config, progress=False)
    ray.shutdown()
    # Steady state: from the first written batch to the last (actor start-up excluded).
    created = (
        pads.dataset(workdir / "out" / "metadata")
        .to_table(columns=["created_at"])
        .column("created_at")
    )
    stamps = sorted({c.timestamp() for c in created.to_pylist()})
    first_batch = sum(1 for c in created.to_pylist() if c.timestamp() == stamps[0])
    steady = (
        (summary.generated - first_batch) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    )
    return {
        "images": summary.generated,
        "errors": summary.errors,
        "seconds": summary.wall_s,
        "images_per_s": summary.images_per_s,
        "steady_images_per_s": steady,
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
    left.set_title(f"ratio {result['ratio']:.3f} (steady {result['ratio_steady'] or 0:.3f})")
    stages = {k.removesuffix("_s"): v for k, v in result["job"]["stage_s"].items()}
    stages["start-up + other"] = max(
        result["job"]["seconds"] - sum(result["job"]["stage_s"].values()), 0
    )
    right.barh(list(stages), list(stages.values()), color="#38a")
    right.set_xlabel("seconds (stage times summed over images)")
    right.set_title("where the job's time goes")
    c = result["conditions"]
    fig.suptitle(
        f"{c['model']} {c['size']} x{c['steps']} steps, batch {c['batch_size']}, {c['images']} images, {c['device']}",
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
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="PNG plot (default: next to --json)")
    args = parser.parse_args()

    rows = manifest_rows(args.images, args.size, args.steps)
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
        "bare": bare,
        "job": job,
        "conditions": conditions(args),
    }
    print(
        f"ratio:       {result['ratio']:.3f} (steady state {result['ratio_steady'] or 0:.3f}; goal >= 0.90)"
    )
    from _common import write_result

    write_result(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
