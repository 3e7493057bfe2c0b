"""`daguerre bench`: images/s, seconds per image, UNet steps/s, peak memory and model FLOP
utilisation of the engine alone, per backend and batch size; optionally the same workload
through the batch job or Serve as a ratio to the engine alone.

MFU = FLOPs done / time / peak. FLOPs are counted once per model and shape with
torch.utils.flop_counter on the actual UNet (CFG-doubled batch, every step) and VAE
decoder; the peak is measured in the same run by a large matmul in the same dtype, and
reported beside the result (on a CPU both are CPU figures). benchmarks/throughput.py is
this same code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size: {text!r} is not WIDTHxHEIGHT such as 512x512") from None
    if width % 8 or height % 8 or min(width, height) < 8:
        raise ValueError(f"--size: {text!r}: width and height must be multiples of 8")
    return width, height


def _unet_flops(
    model: Any, latent_h: int, latent_w: int, batch: int, device: Any, dtype: Any
) -> float:
    """FLOPs of one UNet forward of `model` at a latent size and batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = model.unet
    sample = torch.zeros(
        batch, unet.config.in_channels, latent_h, latent_w, device=device, dtype=dtype
    )
    text = torch.zeros(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    added = None
    if model.is_sdxl:
        pooled = model.text_encoder_2.config.projection_dim
        added = {"text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
                 "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)}  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(10, device=device), encoder_hidden_states=text,
             added_cond_kwargs=added)  # fmt: skip
    return float(counter.get_total_flops())


def count_flops(spec: str, model: Any, width: int, height: int, steps: int) -> dict[str, float]:
    """FLOPs of one image: `steps` CFG-doubled UNet forwards plus one VAE decode.

    Presets are counted on the meta device (shapes only: instant, no memory); a folder
    model on its own weights, once."""
    import torch
    from daguerre.pipeline.models import build_preset, get_preset, preset_names
    from torch.utils.flop_counter import FlopCounterMode

    if spec in preset_names():
        model = build_preset(get_preset(spec), meta=True)
        device, dtype = torch.device("meta"), torch.float32
    else:
        param = next(model.unet.parameters())
        device, dtype = param.device, param.dtype
    h, w = height // model.vae_scale_factor, width // model.vae_scale_factor
    unet_flops = _unet_flops(model, h, w, 2, device, dtype)  # one CFG-doubled forward
    latents = torch.zeros(1, model.vae.config.latent_channels, h, w, device=device,
                          dtype=next(model.vae.parameters()).dtype)  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False) as vae_counter:
        model.vae.decode(latents)
    vae_flops = float(vae_counter.get_total_flops())
    return {
        "unet_forward_cfg": unet_flops,
        "vae_decode": vae_flops,
        "per_image": steps * unet_flops + vae_flops,
    }


def unet_forward_flops(spec: str, latent: int, batch: int = 1) -> float:
    """FLOPs of one UNet forward of a preset at a square latent size (meta device)."""
    import torch
    from daguerre.pipeline.models import build_preset, get_preset

    model = build_preset(get_preset(spec), meta=True)
    return _unet_flops(model, latent, latent, batch, torch.device("meta"), torch.float32)


def peak_flops(device: Any, dtype: Any, seconds: float = 1.0) -> float:
    """Measured matmul FLOP/s on `device` in `dtype` (the MFU denominator)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        runs += 1
    sync()
    return 2 * n**3 * runs / (time.perf_counter() - t0)


def bench_engine(args: argparse.Namespace) -> dict[str, Any]:
    """Every (unet backend, attention backend, batch size): the engine alone."""
    import torch
    from daguerre.kernels.compile import BackendUnavailable
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine, resolve_device, resolve_dtype
    from daguerre.pipeline.models import load_model
    from daguerre.pipeline.schema import ImageRequest

    width, height = args.size
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    components = load_model(args.model, device=device, dtype=dtype)
    flops = count_flops(args.model, components, width, height, args.steps)
    peak = peak_flops(device, dtype)
    results = []
    for unet_backend in args.backends:
        for attention in args.attention_backends:
            for batch in args.batch_sizes:
                config = EngineConfig(model=args.model, device=str(device), dtype=args.dtype,
                                      unet_backend=unet_backend, attention_backend=attention,
                                      max_batch_size=batch)  # fmt: skip
                row: dict[str, Any] = {"unet_backend": unet_backend, "attention_backend": attention,
                                       "batch_size": batch}  # fmt: skip
                try:
                    engine = DiffusionEngine(config, components)
                except BackendUnavailable as exc:
                    row["skipped"] = str(exc)
                    results.append(row)
                    print(f"{unet_backend}/{attention} batch {batch}: skipped ({exc})")
                    continue
                requests = [
                    ImageRequest(
                        id=f"b{i}",
                        prompt=f"a benchmark photo {i}",
                        seed=i,
                        steps=args.steps,
                        width=width,
                        height=height,
                    )  # fmt: skip
                    for i in range(batch)
                ]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                engine.generate(requests)  # warm-up: compiles, exports, autotunes
                warmup_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    engine.generate(requests)
                seconds = time.perf_counter() - t0
                images = batch * args.repeats
                images_per_s = images / seconds
                row.update(
                    attention_ran=engine.backend["attention"],
                    warmup_s=warmup_s,
                    images_per_s=images_per_s,
                    s_per_image=seconds / images,
                    unet_steps_per_s=args.steps * args.repeats / seconds,
                    mfu=flops["per_image"] * images_per_s / peak,
                    peak_memory_mb=(torch.cuda.max_memory_allocated(device) / 2**20
                                    if device.type == "cuda"
                                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                    memory_kind="device" if device.type == "cuda" else "host RSS (process peak)",
                )  # fmt: skip
                results.append(row)
                print(f"{unet_backend}/{engine.backend['attention']} batch {batch}: "
                      f"{images_per_s:.3f} images/s, MFU {row['mfu']:.1%}")  # fmt: skip
    return {"results": results, "flops": flops, "peak_flops": peak,
            "device": str(device), "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip


def bench_through(kind: str, args: argparse.Namespace, engine_images_per_s: float) -> dict:
    """The same workload through the batch job or Serve: images/s and ratio to the engine."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.schema import manifest_schema

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
            from daguerre.pipeline.config import JobConfig
            from daguerre.pipeline.job import run_job

            manifest = Path(tmp) / "m.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), manifest)
            summary = run_job(str(manifest), str(Path(tmp) / "out"),
                              JobConfig(engine=engine, batch_size=batch), progress=False)  # fmt: skip
            images_per_s = summary.images_per_s
        else:
            images_per_s = _through_serve(engine, rows, batch, tmp)
    return {"images": n, "images_per_s": images_per_s,
            "ratio_to_engine": images_per_s / engine_images_per_s}  # fmt: skip


def _through_serve(engine: Any, rows: list[dict], batch: int, output: str) -> float:
    import concurrent.futures
    import socket

    import httpx2 as httpx
    from daguerre.cluster.serve import start
    from daguerre.pipeline.config import ModelDeploymentConfig, ServeConfig

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


def environment() -> dict[str, Any]:
    """Date, device, driver, library versions and git commit of this run (every benchmark's)."""
    import datetime as dt
    import platform
    import subprocess

    import torch

    import daguerre

    if torch.cuda.is_available():
        device, cuda = f"cuda: {torch.cuda.get_device_name()}", torch.version.cuda
    else:
        device, cuda = (
            f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            None,
        )
    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "daguerre": daguerre.__version__}  # fmt: skip
    for name in ("diffusers", "ray", "onnxruntime", "triton", "xformers", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed here
            pass
    # The checkout daguerre runs from (empty for an installed wheel).
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cuda": cuda,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "git_commit": commit,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lines: dict[str, list] = {}
    for row in report["results"]:
        if "images_per_s" in row:
            lines.setdefault(f"{row['unet_backend']}/{row['attention_ran']}", []).append(row)
    for name, rows in lines.items():
        batches = [r["batch_size"] for r in rows]
        left.plot(batches, [r["images_per_s"] for r in rows], "o-", label=name)
        right.plot(batches, [100 * r["mfu"] for r in rows], "o-", label=name)
    for ax, label in ((left, "images/s"), (right, "MFU (%)")):
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    c = report["conditions"]
    fig.suptitle(f"{c['model']} {c['size']} x{c['steps']} steps, {c['dtype']}, {c['device']} "
                 f"(peak {report['peak_tflops']:.2f} TFLOP/s measured)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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
    from daguerre.pipeline.models import describe_model, get_preset, preset_names

    describe_model(args.model)
    if args.size is None:
        side = get_preset(args.model).default_size if args.model in preset_names() else 512
        args.size = f"{side}x{side}"
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
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
