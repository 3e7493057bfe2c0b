"""Serve load: latency and images/s of the online API under N concurrent clients.

One run measures, on the same model, image size, steps, batch size and torch threads:
  1. the engine offline (in this process, no Ray): images/s in full batches, and the time
     of one lone request;
  2. the Serve overhead: lone requests through the native API, each one's latency minus
     the engine time its replica reports for it (p50);
  3. for each client count, a closed loop of OpenAI-client requests for --seconds:
     p50/p95/p99 latency and images/s, and images/s as a ratio to the offline engine.
Writes JSON (every condition and number) and a PNG plot of latency and images/s vs clients.

    python benchmarks/serve_load.py --clients 1,4,16 --seconds 30 --json benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

OVERHEAD_GOAL_MS = 15.0
THROUGHPUT_GOAL = 0.9  # issue 14: 16 closed-loop clients >= 0.9x the offline engine


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def engine_offline(args: argparse.Namespace) -> dict:
    """Offline images/s at the batch size, and the engine time of one lone request."""
    from daguerre.pipeline.engine import DiffusionEngine
    from daguerre.pipeline.schema import ImageRequest

    engine = DiffusionEngine(engine_config(args))
    batch = [
        ImageRequest(
            id=f"b{i}",
            prompt=f"a product photo {i}",
            seed=i,
            steps=args.steps,
            width=args.size,
            height=args.size,
        )  # fmt: skip
        for i in range(args.batch_size)
    ]
    engine.generate(batch)  # warm-up
    t0 = time.perf_counter()
    rounds = max(3, int(args.offline_seconds / max(1e-3, _timed(engine.generate, batch))))
    for _ in range(rounds):
        engine.generate(batch)
    batched_s = time.perf_counter() - t0
    lone = [_timed(engine.generate, batch[:1]) for _ in range(args.lone_requests)]
    del engine
    return {
        "images_per_s": rounds * args.batch_size / batched_s,
        "batch_size": args.batch_size,
        "lone_request_s_p50": statistics.median(lone),
    }


def _timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def engine_config(args: argparse.Namespace):
    from daguerre.pipeline.config import EngineConfig

    return EngineConfig(
        model=args.model, device=args.device, torch_threads=args.threads,
        max_batch_size=args.batch_size,
    )  # fmt: skip


def serve_overhead(url: str, args: argparse.Namespace) -> dict:
    """Lone requests through the native API: latency minus the replica's engine time."""
    import httpx2 as httpx

    body = {"requests": [{"prompt": "a lone request", "seed": 1, "steps": args.steps,
                          "width": args.size, "height": args.size}]}  # fmt: skip
    latencies, overheads, engine_s = [], [], []
    with httpx.Client(timeout=600) as client:
        for i in range(args.lone_requests + 2):
            t0 = time.perf_counter()
            resp = client.post(f"{url}/v1/generate", json=body)
            latency = time.perf_counter() - t0
            resp.raise_for_status()
            if i < 2:  # warm-up
                continue
            t = resp.json()["data"][0]["record"]["timings"]
            engine = t["text_encode_s"] + t["denoise_s"] + t["vae_decode_s"]
            latencies.append(latency)
            engine_s.append(engine)
            overheads.append(latency - engine)
        # The floor of any request: HTTP -> proxy -> ingress and back, no engine call.
        health = []
        for _ in range(args.lone_requests):
            t0 = time.perf_counter()
            client.get(f"{url}/healthz").raise_for_status()
            health.append(time.perf_counter() - t0)
    return {
        "requests": len(latencies),
        "healthz_ms_p50": statistics.median(health) * 1000,
        "latency_s_p50": statistics.median(latencies),
        "engine_s_p50": statistics.median(engine_s),
        "overhead_ms_p50": statistics.median(overheads) * 1000,
        "overhead_ms_p95": percentile(overheads, 0.95) * 1000,
    }


def load_level(url: str, clients: int, args: argparse.Namespace) -> dict:
    """A closed loop: `clients` threads, each sending its next request when the last returns."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + args.seconds
    done_at: list[float] = []

    def loop(worker: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                resp = client.images.generate(
                    prompt=f"a product photo {worker}-{i}", size=f"{args.size}x{args.size}",
                    extra_body={"steps": args.steps, "seed": worker * 100_000 + i},
                )  # fmt: skip
                base64.b64decode(resp.data[0].b64_json)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    done_at.append(time.perf_counter())
            except Exception as exc:  # counted, never fatal to the run
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
            i += 1

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = (max(done_at) if done_at else time.perf_counter()) - start
    return {
        "clients": clients,
        "images": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": elapsed,
        "images_per_s": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "latency_s_p50": percentile(latencies, 0.50),
        "latency_s_p95": percentile(latencies, 0.95),
        "latency_s_p99": percentile(latencies, 0.99),
    }


def replica_images(url: str, replicas: int, tries: int = 80) -> dict[str, int]:
    """Images made by each engine replica, from /v1/stats (each call reaches one replica)."""
    import httpx2 as httpx

    seen: dict[str, int] = {}
    for _ in range(tries):
        stats = httpx.get(f"{url}/v1/stats", timeout=60).json()
        for model in stats.values():
            seen[model["replica"]] = model["images"]
        if len(seen) >= replicas:
            break
    return seen


def conditions(args: argparse.Namespace) -> dict:
    from _common import environment

    return {
        **environment(),
        "model": args.model,
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "batch_wait_timeout_s": 0.0,
        "torch_threads": args.threads,
        "seconds_per_level": args.seconds,
        "replicas": f"1..{args.max_replicas}, target_ongoing_requests {args.target}"
        if args.max_replicas > 1
        else "1",
        "client": "openai python client, closed loop, one thread per client, same machine",
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    clients = [lv["clients"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        left.plot(clients, [lv[f"latency_s_{q}"] for lv in levels], style, label=q)
    left.axhline(result["engine"]["lone_request_s_p50"], color="#999", lw=1,
                 label="engine alone, 1 image")  # fmt: skip
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("latency (s)")
    left.set_title(f"latency; Serve overhead {result['overhead']['overhead_ms_p50']:.1f} ms (p50)")
    left.legend()
    right.plot(clients, [lv["images_per_s"] for lv in levels], "o-", color="#2a7", label="Serve")
    right.axhline(result["engine"]["images_per_s"], color="#555", ls="--",
                  label=f"engine offline, batch {result['engine']['batch_size']}")  # fmt: skip
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("images/s")
    right.set_ylim(bottom=0)
    ratio = result.get("ratio_at_max_clients")
    right.set_title(f"throughput; {ratio:.2f}x offline at {clients[-1]} clients" if ratio else "")
    right.legend()
    c = result["conditions"]
    fig.suptitle(
        f"{c['model']} {c['size']} x{c['steps']} steps, max batch {c['batch_size']}, {c['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16", help="client counts, e.g. 1,2,4,8,16")
    parser.add_argument("--seconds", type=float, default=30, help="seconds per client count")
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4, help="engine max_batch_size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--lone-requests", type=int, default=20)
    parser.add_argument("--offline-seconds", type=float, default=20)
    parser.add_argument("--max-replicas", type=int, default=1,
                        help="autoscale 1..N replicas (measures each one's share of the images)")  # fmt: skip
    parser.add_argument("--target", type=float, default=2, help="target_ongoing_requests (N > 1)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="PNG plot (default: next to --json)")
    args = parser.parse_args()
    client_counts = [int(c) for c in str(args.clients).split(",")]

    # 1. The engine alone, in this process (freed before Serve starts).
    engine = engine_offline(args)
    print(f"engine offline: {engine['images_per_s']:.3f} images/s at batch {args.batch_size}; "
          f"lone request {engine['lone_request_s_p50'] * 1000:.1f} ms")  # fmt: skip

    # 2. Serve on a local Ray, the same engine settings.
    import ray
    from daguerre.cluster.serve import start
    from daguerre.pipeline.config import ModelDeploymentConfig, ServeConfig
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="daguerre-serve-bench-") as tmp:
        config = ServeConfig(
            port=port,
            output=tmp,
            models=[
                ModelDeploymentConfig(
                    engine=engine_config(args),
                    num_cpus=1 / args.max_replicas,  # every replica fits the local Ray
                    max_queued_requests=-1,
                    max_replicas=args.max_replicas,
                    upscale_delay_s=1,
                    target_ongoing_requests=args.target if args.max_replicas > 1 else None,
                )  # fmt: skip
            ],  # fmt: skip
        )
        url = start(config)
        try:
            overhead = serve_overhead(url, args)
            print(f"lone request: {overhead['latency_s_p50'] * 1000:.1f} ms, engine "
                  f"{overhead['engine_s_p50'] * 1000:.1f} ms, Serve overhead "
                  f"{overhead['overhead_ms_p50']:.1f} ms (p50); GET /healthz "
                  f"{overhead['healthz_ms_p50']:.1f} ms")  # fmt: skip
            levels = []
            for n in client_counts:
                level = load_level(url, n, args)
                level["ratio_to_offline"] = level["images_per_s"] / engine["images_per_s"]
                levels.append(level)
                print(f"{n:3d} clients: {level['images_per_s']:.3f} images/s "
                      f"({level['ratio_to_offline']:.2f}x offline), p50 "
                      f"{level['latency_s_p50']:.2f} s, p99 {level['latency_s_p99']:.2f} s, "
                      f"{level['errors']} errors")  # fmt: skip
            shares = replica_images(url, args.max_replicas) if args.max_replicas > 1 else {}
            if shares:
                print(f"images per replica: {sorted(shares.values(), reverse=True)}")
        finally:
            serve.shutdown()
            ray.shutdown()

    top = max(levels, key=lambda lv: lv["clients"])
    result = {
        "goals": {
            "overhead_ms_p50_max": OVERHEAD_GOAL_MS,
            "ratio_at_16_clients_min": THROUGHPUT_GOAL,
        },  # fmt: skip
        "overhead_goal_met": overhead["overhead_ms_p50"] <= OVERHEAD_GOAL_MS,
        "ratio_at_max_clients": top["ratio_to_offline"],
        "throughput_goal_met": top["clients"] >= 16 and top["ratio_to_offline"] >= THROUGHPUT_GOAL,
        "engine": engine,
        "overhead": overhead,
        "levels": levels,
        "replica_images": shares,
        "conditions": conditions(args),
    }
    from _common import write_result

    write_result(result, args.json, plot, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
