"""The `daguerre` command: generate, manifest, serve, inspect, compile, bench, demo.

Heavy imports (torch, ray, diffusers) happen inside the commands that need them, so
`daguerre --help` and input errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from daguerre.pipeline.config import ConfigError, JobConfig, load_yaml, validate_config
from daguerre.pipeline.schema import SCHEDULERS

DEFAULT_DEMO_OUT = "output/demo"


def _actors(value: str) -> tuple[int, int]:
    try:
        low, _, high = value.partition(":")
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not MIN:MAX (for example 1:4)") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"{value!r}: need 1 <= MIN <= MAX")
    return pair


def _backend_args(p: argparse.ArgumentParser) -> None:
    from daguerre.kernels.attention import ATTENTION_BACKENDS
    from daguerre.kernels.compile import UNET_BACKENDS

    p.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        help="attention inside the UNet (default sdpa)",
    )
    p.add_argument(
        "--unet-backend", choices=UNET_BACKENDS, help="how the UNet runs (default eager)"
    )


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="preset (tiny, small, sd15, sdxl) or a diffusers model folder")
    p.add_argument("--config", type=Path, help="job YAML (see configs/jobs/); flags override it")
    p.add_argument("--batch-size", type=int, help="images per engine call")
    p.add_argument(
        "--actors", type=_actors, metavar="MIN:MAX", help="engine actor pool size, e.g. 1:4"
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    _backend_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daguerre", description="Distributed diffusion image generation on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run a batch job over a Parquet manifest")
    gen.add_argument("manifest", help="Parquet file or folder of Parquet files, one row per image")
    gen.add_argument("--out", required=True, help="output prefix (a folder)")
    _job_args(gen)

    man = sub.add_parser(
        "manifest", help="build a Parquet manifest from prompts (.txt lines or .csv rows)"
    )
    man.add_argument(
        "prompts", type=Path, help=".txt (one prompt per line) or .csv (columns for --template)"
    )
    man.add_argument("-o", "--output", type=Path, required=True, help="manifest .parquet to write")
    man.add_argument(
        "--template",
        help='prompt template filled from CSV columns, e.g. "a studio photo of {product}, {style}"',
    )
    man.add_argument(
        "--seeds", type=int, default=1, help="images per prompt (seeds seed-base, seed-base+1, ...)"
    )
    man.add_argument("--seed-base", type=int, default=0)
    man.add_argument("--steps", type=int)
    man.add_argument("--guidance-scale", type=float)
    man.add_argument("--width", type=int)
    man.add_argument("--height", type=int)
    man.add_argument("--scheduler", choices=SCHEDULERS)
    man.add_argument("--negative-prompt")

    ins = sub.add_parser(
        "inspect", help="summarise an output prefix from its metadata: counts, errors, speed"
    )
    ins.add_argument("output", help="output prefix (folder or s3://...)")
    ins.add_argument("--config", type=Path, help="job YAML whose storage: settings to use")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")

    comp = sub.add_parser(
        "compile", help="prebuild and cache a compiled UNet (ONNX / TensorRT) for sizes and batches"
    )
    comp.add_argument("--model", default="tiny", help="preset or diffusers folder (or s3://)")
    comp.add_argument(
        "--backend", required=True, choices=("onnxruntime", "tensorrt")
    )  # the cached ones
    comp.add_argument(
        "--batch-sizes", default="1,2,4,8", help="engine batch sizes to cover, e.g. 1,2,4,8"
    )
    comp.add_argument("--sizes", help="image sizes WxH,... (default: the model's native size)")
    comp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    comp.add_argument("--dtype", default="auto", choices=("auto", "float16", "float32"))

    sub.add_parser(
        "bench",
        add_help=False,
        help="images/s, MFU and memory of the engine per backend and batch size (--help for more)",
    )

    srv = sub.add_parser(
        "serve", help="serve the OpenAI-compatible images API and the native API over HTTP"
    )
    srv.add_argument(
        "--config", type=Path, help="serve YAML (see configs/serve/); flags override it"
    )
    srv.add_argument(
        "--model", help="preset or diffusers folder for the (first) model; default tiny"
    )
    srv.add_argument("--port", type=int, help="HTTP port (default 8000)")
    srv.add_argument("--host", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    _backend_args(srv)

    demo = sub.add_parser(
        "demo", help="generate the demo manifest with the tiny model on a local Ray"
    )
    demo.add_argument(
        "--out", default=DEFAULT_DEMO_OUT, help=f"output prefix (default {DEFAULT_DEMO_OUT})"
    )
    demo.add_argument("--no-progress", action="store_true")
    return parser


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job config from --config plus the flags given."""
    overrides: dict[str, Any] = {}
    if args.model:
        overrides.setdefault("engine", {})["model"] = args.model
    if args.attention_backend:
        overrides.setdefault("engine", {})["attention_backend"] = args.attention_backend
    if args.unet_backend:
        overrides.setdefault("engine", {})["unet_backend"] = args.unet_backend
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.actors:
        overrides["min_actors"], overrides["max_actors"] = args.actors
    if args.config:
        return load_yaml(args.config, JobConfig, overrides)
    return validate_config(JobConfig, overrides, source="flags")


def cmd_generate(args: argparse.Namespace) -> int:
    from daguerre.pipeline.job import run_job

    config = job_config(args)
    summary = run_job(
        args.manifest, args.out, config, address=args.address, progress=not args.no_progress
    )
    print_summary(summary)
    return 0


def serve_config(args: argparse.Namespace) -> Any:
    """The serve config from --config plus the flags given."""
    from daguerre.pipeline.config import ServeConfig

    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["port"] = args.port
    if args.host:
        overrides["host"] = args.host
    if args.config:
        config = load_yaml(args.config, ServeConfig, overrides)
    else:
        config = validate_config(ServeConfig, overrides, source="flags")
    backends = {"attention_backend": args.attention_backend, "unet_backend": args.unet_backend}
    backends = {k: v for k, v in backends.items() if v}
    if backends:
        for i, m in enumerate(config.models):
            engine = m.engine.model_copy(update=backends)
            config.models[i] = m.model_copy(update={"engine": engine})
    if args.model:  # replaces the first model's weights, keeping its serving settings
        first = config.models[0]
        engine = first.engine.model_copy(update={"model": args.model})
        config.models[0] = first.model_copy(update={"engine": engine, "name": None})
        config = validate_config(ServeConfig, config.model_dump(), source="flags")
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    config = serve_config(args)
    from daguerre.cluster.serve import APP_NAME, start
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = start(config, address=args.address)
    names = ", ".join(m.served_name for m in config.models)
    print(f"daguerre serving {names} at {url}", flush=True)
    print(f"  OpenAI-compatible: POST {url}/v1/images/generations", flush=True)
    print(f"  native:            POST {url}/v1/generate   docs: {url}/docs", flush=True)
    print("Ctrl-C to stop", flush=True)
    stop.wait()
    print("daguerre: stopping", flush=True)
    if args.address:  # a shared cluster: remove only this app
        serve.delete(APP_NAME)
    else:
        serve.shutdown()
    import ray

    ray.shutdown()
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from daguerre.pipeline.config import EngineConfig

    try:
        batches = sorted({int(b) for b in args.batch_sizes.split(",")})
        sizes = [
            tuple(int(x) for x in size.lower().split("x"))
            for size in (args.sizes or "").split(",")
            if size
        ]
    except ValueError:
        raise ConfigError("--batch-sizes takes N,N,... and --sizes WxH,WxH,...") from None
    if (
        not batches
        or batches[0] < 1
        or any(len(s) != 2 or min(s) < 8 or s[0] % 8 or s[1] % 8 for s in sizes)
    ):
        raise ConfigError("--batch-sizes must be >= 1; --sizes multiples of 8 such as 512x512")
    config = validate_config(
        EngineConfig,
        {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "unet_backend": args.backend,
            "max_batch_size": batches[-1],
        },  # fmt: skip
        source="flags",
    )
    from daguerre.pipeline.engine import DiffusionEngine

    engine = DiffusionEngine(config)
    engine.unet.batch_sizes = (batches[0], batches[-1])
    factor = engine.model.vae_scale_factor
    for width, height in sizes or [(engine.model.default_size,) * 2]:
        for path in engine.unet.prepare(height // factor, width // factor):
            print(f"{width}x{height} batches {batches[0]}..{batches[-1]}: {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from daguerre.pipeline.report import inspect_output, print_report

    storage = load_yaml(args.config, JobConfig).storage if args.config else None
    report = inspect_output(args.output, storage)
    if args.json:
        print(report.to_json())
    else:
        print_report(report)
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from daguerre.pipeline.manifest import build_manifest, write_manifest

    defaults = {
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "width": args.width,
        "height": args.height,
        "scheduler": args.scheduler,
        "negative_prompt": args.negative_prompt,
    }
    defaults = {k: v for k, v in defaults.items() if v is not None}
    table = build_manifest(args.prompts, args.template, args.seeds, args.seed_base, defaults)
    write_manifest(table, args.output)
    print(f"wrote {table.num_rows} rows to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from daguerre.pipeline.job import run_job
    from daguerre.pipeline.manifest import demo_manifest, write_manifest

    out = Path(args.out)
    manifest = write_manifest(demo_manifest(), out.parent / f"{out.name}-manifest.parquet")
    print(f"demo manifest: {manifest} (8 valid rows, 2 invalid on purpose)")
    summary = run_job(str(manifest), str(out), JobConfig(), progress=not args.no_progress)
    print_summary(summary)
    print(f"images:   {out / 'images'}/*.png")
    print(f"metadata: {out / 'metadata'}/*.parquet (one row per image)")
    print(f"errors:   {out / 'errors'}/*.parquet (one row per rejected manifest row)")
    return 0


def print_summary(summary: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"daguerre job: {summary.output}", show_header=False)
    done_before = f"{summary.skipped_done} (finished before; skipped)"
    rows = [
        ("manifest rows", str(summary.manifest_rows)),
        ("generated", str(summary.generated)),
        ("skipped as done", done_before),
        (
            "errors",
            f"{summary.errors}"
            + (f" {summary.errors_by_stage}" if summary.errors_by_stage else ""),
        ),
        ("wall time", f"{summary.wall_s:.1f} s"),
        ("images/s", f"{summary.images_per_s:.2f}"),
    ]
    for name, seconds in summary.stage_s.items():
        if seconds:
            rows.append((f"  {name.removesuffix('_s')}", f"{seconds:.2f} s (summed over images)"))
    for name, value in rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    if summary.generated == 0:
        reasons = [f"{summary.skipped_done} rows already finished under the output prefix"]
        if summary.errors:
            reasons.append(f"{summary.errors} rows rejected (see {summary.output}/errors/)")
        console.print(f"nothing generated: {', '.join(reasons)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: pipeline/bench.py (also benchmarks/throughput.py)
        from daguerre.pipeline.bench import main as bench_main

        try:
            return bench_main(argv[1:])
        except (ConfigError, ValueError) as exc:
            print(f"daguerre: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    from daguerre.kernels.compile import BackendUnavailable
    from daguerre.pipeline.job import ManifestError
    from daguerre.pipeline.manifest import ManifestBuildError
    from daguerre.pipeline.storage import StorageError

    handlers = {
        "generate": cmd_generate,
        "manifest": cmd_manifest,
        "serve": cmd_serve,
        "inspect": cmd_inspect,
        "compile": cmd_compile,
        "demo": cmd_demo,
    }
    try:
        return handlers[args.command](args)
    except (
        ConfigError,
        ManifestError,
        ManifestBuildError,
        StorageError,
        BackendUnavailable,
    ) as exc:
        print(f"daguerre: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daguerre: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
