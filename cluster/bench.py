"""`daguerre bench`: the engine alone per backend and batch size (pipeline/bench.py), then
optionally the same workload through the batch job or Serve, as ratios to the engine.

benchmarks/throughput.py is this same command. The last result per model is also kept
under $DAGUERRE_CACHE/bench/, where `daguerre generate --dry-run` finds it for its estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..pipeline.bench import bench_engine, environment, parse_size, plot


def bench_through(kind: str, args: argparse.Namespace, engine_images_per_s: float) -> dict:
    """The same workload through the batch job or Serve: images/s and ratio to the engine."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..pipeline.config import EngineConfig
    from ..pipeline.schema import manifest_schema

    width, height = args.size
    batch = max(args.batch_sizes)
    engine = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          unet_backend=args.backends[0], attention_backend=args.attention_backends[0],
                          max_batch_size=batch)  # fmt: skip
    n = max(args.through_images, 2 * batch)
    rows = [{"id": f"t{i}", "prompt": f"a benchmark photo {i % 8}", "seed": i,
             "steps": args.steps, "width": width, "height": height} for i in range(n)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="daguerre-bench-") as tmp:
        if kind == "batch":
            from ..pipeline.config import JobConfig
            from .job import run_job

            manifest = Path(tmp) / "m.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), manifest)
            summary = run_job(str(manifest), str(Path(tmp) / "out"),
                              JobConfig(engine=engine, batch_size=batch), progress=False)  # fmt: skip
            images_per_s = summary.steady_images_per_s or 0.0
        else:
            images_per_s = _through_serve(engine, rows, batch, tmp)
    return {"images": n, "images_per_s": images_per_s,
            "ratio_to_engine": images_per_s / engine_images_per_s}  # fmt: skip


def _through_serve(engine: Any, rows: list[dict], batch: int, output: str) -> float:
    import concurrent.futures
    import socket

    import httpx2 as httpx

    from ..pipeline.config import ModelDeploymentConfig, ServeConfig
    from .serve import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start(ServeConfig(port=port, output=output,
                            models=[ModelDeploymentConfig(engine=engine, max_queued_requests=-1)]))  # fmt: skip
    from ray import serve

    try:

        def one(row: dict) -> None:
            body = {"requests": [{k: v for k, v in row.items() if k != "id"}]}
            httpx.post(f"{url}/v1/generate", json=body, timeout=600).raise_for_status()

        one(rows[0])  # warm-up
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(2 * batch) as pool:
            list(pool.map(one, rows))
        return len(rows) / (time.perf_counter() - t0)
    finally:
        serve.shutdown()


def bench_cache(model: str) -> Path:
    """Where the last `daguerre bench` result for `model` is kept on this machine."""
    from ..kernels.compile import cache_root

    return cache_root() / "bench" / f"{Path(model.rstrip('/')).name}.json"


def last_bench(model: str) -> dict[str, Any] | None:
    """The last `daguerre bench` result for `model` on this machine, or None."""
    path = bench_cache(model)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="daguerre bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-sizes", default="1,2,4")
    p.add_argument(
        "--backends", default="eager", help="UNet backends, e.g. eager,compile,onnxruntime,tensorrt"
    )
    p.add_argument("--attention-backends", default="sdpa", help="e.g. sdpa,triton,xformers")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    p.add_argument("--repeats", type=int, default=3, help="timed generations per point")
    p.add_argument("--through", choices=("batch", "serve"), action="append", default=[],
                   help="also run the workload through the batch job or Serve (repeatable)")  # fmt: skip
    p.add_argument("--through-images", type=int, default=32)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args = build_parser().parse_args(argv)
    from ..pipeline.models import describe_model

    model = describe_model(args.model)
    if args.size is None:
        args.size = f"{model.default_size}x{model.default_size}"
    size_text = args.size
    args.size = parse_size(args.size)
    args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    args.backends = args.backends.split(",")
    args.attention_backends = args.attention_backends.split(",")

    engine = bench_engine(args)
    measured = [r for r in engine["results"] if "images_per_s" in r]
    report: dict[str, Any] = {
        "images_per_s": max((r["images_per_s"] for r in measured), default=None),
        "mfu": max((r["mfu"] for r in measured), default=None),
        "device": engine["device"],
        "peak_tflops": engine["peak_flops"] / 1e12,
        "flops_per_image_tflop": engine["flops"]["per_image"] / 1e12,
        "unet_forward_cfg_tflop": engine["flops"]["unet_forward_cfg"] / 1e12,
        "results": engine["results"],
        "conditions": {
            "model": args.model,
            "size": size_text,
            "steps": args.steps,
            "dtype": engine["dtype"],
            "backends": args.backends,
            "attention_backends": args.attention_backends,
            "batch_sizes": args.batch_sizes,
            "repeats": args.repeats,
            **environment(),
        },  # fmt: skip
    }
    report["versions"] = report["conditions"]["versions"]
    top = next((r for r in measured if r["batch_size"] == max(args.batch_sizes)), None)
    for kind in args.through:
        if top is not None:
            report[f"through_{kind}"] = bench_through(kind, args, top["images_per_s"])
            print(
                f"through {kind}: {report[f'through_{kind}']['ratio_to_engine']:.2f}x the engine alone"
            )
    _print_table(report)
    text = json.dumps(report, indent=2, default=str) + "\n"
    cached = bench_cache(args.model)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    if args.plot or args.json:
        plot(report, args.plot or args.json.with_suffix(".png"))
    return 0


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = report["conditions"]
    table = Table(title=f"daguerre bench: {c['model']} {c['size']} x{c['steps']} steps, {c['dtype']}, "
                        f"{c['device']}; peak {report['peak_tflops']:.2f} TFLOP/s (measured), "
                        f"{report['flops_per_image_tflop']:.3f} TFLOP/image")  # fmt: skip
    for col in (
        "unet",
        "attention",
        "batch",
        "images/s",
        "s/image",
        "UNet steps/s",
        "MFU",
        "peak MB",
    ):
        table.add_column(col, justify="right")
    for r in report["results"]:
        if "images_per_s" not in r:
            table.add_row(r["unet_backend"], r["attention_backend"], str(r["batch_size"]),
                          "skipped", "", "", "", "")  # fmt: skip
            continue
        table.add_row(r["unet_backend"], r["attention_ran"], str(r["batch_size"]),
                      f"{r['images_per_s']:.3f}", f"{r['s_per_image']:.3f}",
                      f"{r['unet_steps_per_s']:.2f}", f"{r['mfu']:.2%}", f"{r['peak_memory_mb']:.0f}")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
