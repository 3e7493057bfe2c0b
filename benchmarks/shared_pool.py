"""One fleet: online latency with the fleet idle vs while a batch job runs through the same
replicas, and the job's images/s through the shared fleet vs its own dedicated pool.

One run, one local Ray (logical GPUs, so replicas and actors are placed as on GPU nodes;
the engines run on the CPU here), one model, size, steps, batch size and thread count:
  1. the engine alone: seconds per engine batch (the yardstick of the latency goal);
  2. online p50/p95 latency of lone requests with the Serve app idle;
  3. the job on a dedicated engine actor pool (the app idle): steady images/s;
  4. the same job through the app's replicas (--via-serve), no online traffic: images/s,
     as a ratio to 3 (goal >= 0.9);
  5. online p50/p95 while a job runs through the same replicas (goal: p95 <= idle p95 +
     one engine batch).
Writes JSON (every condition and number) and a PNG plot.

    python benchmarks/shared_pool.py --json benchmarks/results/shared_pool_cpu.json
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
THROUGHPUT_GOAL = 0.9


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def engine_config(args: argparse.Namespace) -> dict:
    return {"model": args.model, "device": "cpu", "torch_threads": args.threads,
            "max_batch_size": args.batch_size}  # fmt: skip


def engine_batch_s(args: argparse.Namespace) -> float:
    """Median seconds of one full engine batch, the engine alone in this process."""
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine
    from daguerre.pipeline.schema import ImageRequest

    engine = DiffusionEngine(EngineConfig(**engine_config(args)))
    batch = [ImageRequest(id=f"e{i}", prompt=f"a fleet photo {i}", seed=i, steps=args.steps,
                          width=args.size, height=args.size) for i in range(args.batch_size)]  # fmt: skip
    engine.generate(batch)
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.generate(batch)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def online_latencies(
    url: str, args: argparse.Namespace, stop: threading.Event | None = None
) -> list[float]:
    """Seconds of lone online requests, one after another (until `stop`, at most --online)."""
    import httpx2 as httpx

    body = {"prompt": "an online photo", "size": f"{args.size}x{args.size}", "steps": args.steps}
    out = []
    for i in range(args.online):
        if stop is not None and stop.is_set():
            break
        t0 = time.perf_counter()
        resp = httpx.post(f"{url}/v1/images/generations", json={**body, "seed": i}, timeout=600)
        resp.raise_for_status()
        out.append(time.perf_counter() - t0)
    return out


def run_job(args: argparse.Namespace, workdir: Path, name: str, via_serve: bool) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from daguerre.cluster.job import run_job as job
    from daguerre.pipeline.config import JobConfig
    from daguerre.pipeline.schema import manifest_schema

    rows = [{"id": f"{name}-{i:04d}", "prompt": f"a fleet photo {i % 16}", "seed": i,
             "steps": args.steps, "width": args.size, "height": args.size}
            for i in range(args.images)]  # fmt: skip
    manifest = workdir / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), manifest)
    config = JobConfig(batch_size=args.batch_size, engine=engine_config(args),
                       engine_pool="serve" if via_serve else "actors", actor_num_cpus=1)  # fmt: skip
    address = ray.get_runtime_context().gcs_address if via_serve else None
    summary = job(str(manifest), str(workdir / name), config, address=address, progress=False)
    return {"images": summary.generated, "steady_images_per_s": summary.steady_images_per_s,
            "end_to_end_images_per_s": summary.end_to_end_images_per_s,
            "startup_s": summary.startup_s, "mean_engine_batch": summary.mean_engine_batch}  # fmt: skip


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    import ray
    from daguerre.cluster.serve import start
    from daguerre.pipeline.config import ModelDeploymentConfig, ServeConfig
    from ray import serve

    batch_s = engine_batch_s(args)
    print(f"engine alone: {batch_s:.3f} s per batch of {args.batch_size}")
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start(ServeConfig(port=port, output=str(workdir / "serve"), models=[
        ModelDeploymentConfig(name=args.model, engine=engine_config(args), num_cpus=1)]))  # fmt: skip
    try:
        idle = online_latencies(url, args)
        print(
            f"online, fleet idle: p50 {statistics.median(idle):.3f} s, p95 {percentile(idle, 0.95):.3f} s"
        )
        dedicated = run_job(args, workdir, "dedicated", via_serve=False)
        print(f"job, dedicated pool: {dedicated['steady_images_per_s']:.3f} images/s")
        shared = run_job(args, workdir, "shared", via_serve=True)
        print(f"job, shared fleet:   {shared['steady_images_per_s']:.3f} images/s")
        loaded, job_result = _online_under_load(url, args, workdir)
        replica = _replica_stats(url, args.model)
        print(f"replica engine batches by size: {replica.get('batch_sizes')}")
        print(
            f"online, under batch: p50 {statistics.median(loaded):.3f} s, p95 {percentile(loaded, 0.95):.3f} s"
        )
    finally:
        serve.shutdown()
        ray.shutdown()
    idle_p95, loaded_p95 = percentile(idle, 0.95), percentile(loaded, 0.95)
    ratio = shared["steady_images_per_s"] / dedicated["steady_images_per_s"]
    return {
        "engine_batch_s": batch_s,
        "online_idle": {"n": len(idle), "p50_s": statistics.median(idle), "p95_s": idle_p95},
        "online_under_batch": {
            "n": len(loaded),
            "p50_s": statistics.median(loaded),
            "p95_s": loaded_p95,
            "job": job_result,
        },  # fmt: skip
        "replica_after_all_phases": replica,
        "job_dedicated": dedicated,
        "job_shared": shared,
        "shared_over_dedicated": ratio,
        "goals": {
            "latency": f"online p95 under batch <= idle p95 + one engine batch "
            f"({idle_p95 + batch_s:.3f} s)",
            "latency_met": loaded_p95 <= idle_p95 + batch_s,
            "throughput": f"shared / dedicated >= {THROUGHPUT_GOAL}",
            "throughput_met": ratio >= THROUGHPUT_GOAL,
        },  # fmt: skip
    }


def _replica_stats(url: str, model: str) -> dict:
    """The replica's counters: images online and batch, engine batches by size, fill rule."""
    import httpx2 as httpx

    return httpx.get(f"{url}/v1/stats", timeout=60).json()[model]


def _online_under_load(
    url: str, args: argparse.Namespace, workdir: Path
) -> tuple[list[float], dict]:
    """Online latencies while a --via-serve job keeps the replicas busy."""
    result: dict = {}
    started = threading.Event()

    def job() -> None:
        started.set()
        result.update(run_job(args, workdir, "loaded", via_serve=True))

    thread = threading.Thread(target=job)
    thread.start()
    started.wait()
    metadata = workdir / "loaded" / "metadata"
    while thread.is_alive() and not (metadata.exists() and any(metadata.iterdir())):
        time.sleep(0.2)  # the job's first images: its batches are flowing
    stop = threading.Event()
    latencies = online_latencies(url, args, stop)
    thread.join()
    return latencies, result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["idle", "under batch"]
    for q, offset in (("p50_s", -0.2), ("p95_s", 0.2)):
        values = [result["online_idle"][q], result["online_under_batch"][q]]
        left.bar([i + offset for i in range(2)], values, width=0.4, label=q.removesuffix("_s"))
    left.axhline(result["online_idle"]["p95_s"] + result["engine_batch_s"], color="k", ls="--",
                 label="goal: idle p95 + one batch")  # fmt: skip
    left.set_xticks(range(2), names)
    left.set_ylabel("online latency (s)")
    left.legend(fontsize=8)
    jobs = [
        result["job_dedicated"]["steady_images_per_s"],
        result["job_shared"]["steady_images_per_s"],
    ]
    right.bar(["dedicated pool", "shared fleet"], jobs, color=["#555", "#2a7"])
    right.set_ylabel("batch job images/s (steady)")
    right.set_title(
        f"shared / dedicated = {result['shared_over_dedicated']:.2f} (goal >= {THROUGHPUT_GOAL})"
    )
    c = result["conditions"]
    fig.suptitle(f"{c['model']} {c['size']}px x{c['steps']} steps, batch {c['batch_size']}, "
                 f"{c['images']} images/job, {c['device']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=48, help="rows per batch job")
    parser.add_argument("--online", type=int, default=12, help="online requests per phase")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    from _common import environment, write_result

    with tempfile.TemporaryDirectory(prefix="daguerre-fleet-") as tmp:
        result = measure(args, Path(tmp))
    result["conditions"] = {**environment(), "model": args.model, "size": args.size,
                            "steps": args.steps, "batch_size": args.batch_size,
                            "images": args.images, "online_requests": args.online,
                            "torch_threads": args.threads}  # fmt: skip
    print(f"goals: {result['goals']}")
    write_result(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
