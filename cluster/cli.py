"""The `daguerre` command: generate, manifest, serve, inspect, compile, bench, demo.

Heavy imports (torch, ray, diffusers) happen inside the commands that need them, so
`daguerre --help` and input errors answer at once. Every error a user can cause ends
with one line on stderr and exit code 2; failures inside Ray are unwrapped to their
original cause in the same one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import daguerre

from ..pipeline.config import ConfigError, JobConfig, load_yaml, validate_config
from ..pipeline.schema import SCHEDULERS

DEFAULT_DEMO_OUT = "output/demo"


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit code 2, like every other daguerre error
    (the usage block is what --help is for)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("daguerre").strip()
        where = f"{command}: " if command else ""
        hint = f"daguerre {command} --help" if command else "daguerre --help"
        print(f"daguerre: error: {where}{message} (see {hint})", file=sys.stderr)
        raise SystemExit(2)


class _Help(argparse.RawDescriptionHelpFormatter):
    """A flag's default after its help (where it has one); descriptions and examples kept
    as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default in (None, False, argparse.SUPPRESS)
            or "default" in text
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _actors(value: str) -> tuple[int, int]:
    try:
        low, _, high = value.partition(":")
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not MIN:MAX (for example 1:4)") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"{value!r}: need 1 <= MIN <= MAX")
    return pair


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: must be at least 1")
    return number


def _backend_args(p: argparse.ArgumentParser) -> None:
    from ..kernels.attention import ATTENTION_BACKENDS
    from ..kernels.compile import UNET_BACKENDS

    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                   help="attention inside the UNet (config default: sdpa)")  # fmt: skip
    p.add_argument("--unet-backend", choices=UNET_BACKENDS,
                   help="how the UNet runs (config default: eager)")  # fmt: skip


def _sub(sub: Any, name: str, help: str, description: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description,
                          epilog=f"example:\n  {example}", formatter_class=_Help)  # fmt: skip


def _presets() -> list[str]:
    from ..pipeline.models import preset_names

    return preset_names()


def _generate_parser(sub: Any) -> None:
    gen = _sub(
        sub, "generate", "run a batch job over a manifest",
        "Generate one image per manifest row into an output prefix (a folder or s3://...):\n"
        "images/<id>.png, one metadata row per image, errors/ for rejected rows, runs/ for\n"
        "the run record. A rerun resumes: finished ids are skipped.",
        "daguerre generate manifest.parquet --out output/run-1 --model tiny --actors 1:2",
    )  # fmt: skip
    gen.add_argument("manifest", help="Parquet file or folder, or a .csv / .jsonl with the "
                     "manifest's columns (a .txt of prompts: see daguerre manifest)")  # fmt: skip
    gen.add_argument("--out", required=True, help="output prefix (a folder or s3://bucket/prefix)")
    gen.add_argument("--model", help=f"preset ({', '.join(_presets())}) or a diffusers model "
                     "folder, local or s3:// (config default: tiny)")  # fmt: skip
    gen.add_argument("--config", type=Path, help="job YAML (see configs/jobs/); flags override it")
    gen.add_argument(
        "--batch-size", type=_positive, help="images per engine call (config default: 4)"
    )
    gen.add_argument("--actors", type=_actors, metavar="MIN:MAX",
                     help="engine actor pool, scaled under backlog (config default: 1:1)")  # fmt: skip
    gen.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    gen.add_argument("--via-serve", nargs="?", const="daguerre", metavar="APP",
                     help="run the engine stage on the replicas of a running `daguerre serve` "
                     "app (default app: daguerre) on the cluster at --address, behind its "
                     "online traffic, instead of a dedicated actor pool")  # fmt: skip
    _backend_args(gen)
    gen.add_argument("--overwrite", action="store_true",
                     help="make again the finished ids that were made with another model or "
                     "other request fields (otherwise such a rerun is refused)")  # fmt: skip
    gen.add_argument("--dry-run", action="store_true", help="check and count, generate nothing: "
                     "valid and invalid rows, batches, estimated time")  # fmt: skip
    gen.add_argument("--limit", type=_positive, metavar="N", help="only the first N manifest rows")
    gen.add_argument("--verbose", action="store_true", help="Ray's own logs and progress bars")
    gen.add_argument("--no-progress", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="daguerre", formatter_class=_Help,
        description="Distributed diffusion image generation on Ray: batch jobs over manifests "
        "and an online images API on one engine.",
        epilog="Start with: daguerre demo    (see README.md)",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"daguerre {daguerre.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=OneLineParser)  # fmt: skip
    _generate_parser(sub)

    man = _sub(
        sub, "manifest", "build a Parquet manifest from prompts (.txt lines or .csv rows)",
        "One row per prompt and seed. A .txt holds one prompt per line; a .csv's columns fill\n"
        "--template and are kept in each image's metadata.",
        'daguerre manifest examples/products.csv -o m.parquet --template "a photo of {product}" --seeds 4',
    )  # fmt: skip
    man.add_argument("prompts", type=Path, help=".txt (one prompt per line) or .csv")
    man.add_argument("-o", "--output", type=Path, required=True, help="manifest .parquet to write")
    man.add_argument("--template", help='prompt template filled from CSV columns, e.g. '
                     '"a studio photo of {product}, {style}"')  # fmt: skip
    man.add_argument("--seeds", type=_positive, default=1, help="images per prompt")
    man.add_argument("--seed-base", type=int, default=0, help="first seed (then +1, +2, ...)")
    man.add_argument("--steps", type=int, help="denoising steps (row default: 30)")
    man.add_argument("--guidance-scale", type=float, help="guidance scale (row default: 7.5)")
    man.add_argument("--width", type=int, help="width (row default: the model's)")
    man.add_argument("--height", type=int, help="height (row default: the model's)")
    man.add_argument("--scheduler", choices=SCHEDULERS, help="sampler (row default: ddim)")
    man.add_argument("--negative-prompt", help="negative prompt for every row")

    ins = _sub(
        sub, "inspect", "summarise an output prefix: counts, errors, speed, provenance",
        "Read an output's metadata, errors and run records (nothing else): images, standing\n"
        "errors by stage and reason, the last run's speed figures, models and backends.",
        "daguerre inspect output/demo --json",
    )  # fmt: skip
    ins.add_argument("output", help="output prefix (folder or s3://...)")
    ins.add_argument("--config", type=Path, help="job YAML whose storage: settings to use")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")

    comp = _sub(
        sub, "compile", "prebuild and cache a compiled UNet (ONNX / TensorRT)",
        "Export and build the UNet graphs a job or replica will ask for, ahead of time, into\n"
        "$DAGUERRE_CACHE: one per image size, covering engine batches 1..--max-batch-size.",
        "daguerre compile --model sd15 --backend onnxruntime --max-batch-size 8 --sizes 512x512",
    )  # fmt: skip
    comp.add_argument("--model", default="tiny", help="preset or diffusers folder (or s3://)")
    comp.add_argument("--backend", required=True, choices=("onnxruntime", "tensorrt"),
                      help="the cached backends")  # fmt: skip
    comp.add_argument("--max-batch-size", type=_positive, default=8,
                      help="engine.max_batch_size of the jobs and replicas that will use it")  # fmt: skip
    comp.add_argument("--sizes", help="image sizes WxH,... (default: the model's native size)")
    comp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    comp.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))

    sub.add_parser("bench", add_help=False,
                   help="images/s, MFU and memory per backend and batch size (--help for more)")  # fmt: skip

    srv = _sub(
        sub, "serve", "serve the OpenAI-compatible images API and the native API over HTTP",
        "Start Serve with one engine deployment per model behind a FastAPI ingress; prints the\n"
        "URL when healthy, stops on Ctrl-C. Auth is on when $DAGUERRE_API_TOKEN is set.",
        "daguerre serve --model tiny --port 8000",
    )  # fmt: skip
    srv.add_argument(
        "--config", type=Path, help="serve YAML (see configs/serve/); flags override it"
    )
    srv.add_argument(
        "--model", help="preset or diffusers folder for the (first) model (default tiny)"
    )
    srv.add_argument("--port", type=int, help="HTTP port (config default: 8000)")
    srv.add_argument("--host", help="address to bind (config default: 127.0.0.1)")
    srv.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    srv.add_argument("--verbose", action="store_true", help="Ray's own logs")
    _backend_args(srv)

    demo = _sub(
        sub, "demo", "generate the demo manifest with the tiny model on a local Ray",
        "Write a 10-row demo manifest (8 valid rows, 2 invalid on purpose) and generate it.",
        "daguerre demo --out output/demo",
    )  # fmt: skip
    demo.add_argument("--out", default=DEFAULT_DEMO_OUT, help="output prefix")
    demo.add_argument("--no-progress", action="store_true", help="no progress lines")
    return parser


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job config from --config plus the flags given."""
    overrides: dict[str, Any] = {}
    engine = {k: getattr(args, a) for k, a in
              (("model", "model"), ("attention_backend", "attention_backend"),
               ("unet_backend", "unet_backend")) if getattr(args, a)}  # fmt: skip
    if engine:
        overrides["engine"] = engine
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.actors:
        overrides["min_actors"], overrides["max_actors"] = args.actors
    if getattr(args, "via_serve", None):
        overrides.update(engine_pool="serve", serve_app=args.via_serve)
    if args.config:
        return load_yaml(args.config, JobConfig, overrides)
    return validate_config(JobConfig, overrides, source="flags")


def cmd_generate(args: argparse.Namespace) -> int:
    config = job_config(args)
    if args.dry_run:
        from .dryrun import dry_run, print_dry_run

        print_dry_run(dry_run(args.manifest, args.out, config, address=args.address,
                              overwrite=args.overwrite, limit=args.limit))  # fmt: skip
        return 0
    from .job import run_job

    summary = run_job(
        args.manifest, args.out, config, address=args.address, progress=not args.no_progress,
        verbose=args.verbose, overwrite=args.overwrite, limit=args.limit,
        command=["daguerre", *sys.argv[1:]],
    )  # fmt: skip
    print_summary(summary)
    return 0


def serve_config(args: argparse.Namespace) -> Any:
    """The serve config from --config plus the flags given."""
    from ..pipeline.config import ServeConfig

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
    data = config.model_dump()
    for model in data["models"]:
        model["engine"].update(backends)
    if args.model:  # replaces the first model's weights, keeping its serving settings
        data["models"][0]["engine"]["model"] = args.model
        data["models"][0]["name"] = None
    if backends or args.model:
        config = validate_config(ServeConfig, data, source="flags")
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..pipeline.models import describe_model
    from .serve import check_port, start, stop

    config = serve_config(args)
    if args.address is None:
        check_port(config.host, config.port)  # before Ray: a busy port is one line
    for model in config.models:  # an unknown preset or bad folder is one line, before Ray
        info = describe_model(model.engine.model, config.storage)
        if info.random_weights:
            print(f"daguerre: {info.describe()}", file=sys.stderr, flush=True)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    url = start(config, address=args.address, verbose=args.verbose)
    names = ", ".join(m.served_name for m in config.models)
    print(f"daguerre serving {names} at {url}", flush=True)
    print(f"  try it:            {url}/   (a page to generate from a browser)", flush=True)
    print(f"  OpenAI-compatible: POST {url}/v1/images/generations", flush=True)
    print(f"  native:            POST {url}/v1/generate   API: {url}/openapi.json", flush=True)
    print(f"  url images and their metadata go to {config.output}", flush=True)
    print("Ctrl-C to stop", flush=True)
    stopping.wait()
    print("daguerre: stopping", flush=True)
    stop(shared_cluster=args.address is not None)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from ..pipeline.config import EngineConfig

    try:
        sizes = [tuple(int(x) for x in size.lower().split("x"))
                 for size in (args.sizes or "").split(",") if size]  # fmt: skip
    except ValueError:
        raise ConfigError("--sizes takes WxH,WxH,... such as 512x512,768x512") from None
    if any(len(s) != 2 or min(s) < 8 or s[0] % 8 or s[1] % 8 for s in sizes):
        raise ConfigError("--sizes: width and height must be multiples of 8, such as 512x512")
    config = validate_config(EngineConfig, {
        "model": args.model, "device": args.device, "dtype": args.dtype,
        "unet_backend": args.backend, "max_batch_size": args.max_batch_size,
    }, source="flags")  # fmt: skip
    from ..pipeline.engine import DiffusionEngine

    engine = DiffusionEngine(config)
    for width, height in sizes or [(engine.model.default_size,) * 2]:
        for path in engine.prepare(width, height):
            print(f"{width}x{height} engine batches 1..{args.max_batch_size}: {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..pipeline.report import inspect_output, print_report

    storage = load_yaml(args.config, JobConfig).storage if args.config else None
    report = inspect_output(args.output, storage)
    if args.json:
        print(report.to_json())
    else:
        print_report(report)
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from ..pipeline.manifest import build_manifest, write_manifest

    defaults = {
        "steps": args.steps, "guidance_scale": args.guidance_scale, "width": args.width,
        "height": args.height, "scheduler": args.scheduler, "negative_prompt": args.negative_prompt,
    }  # fmt: skip
    defaults = {k: v for k, v in defaults.items() if v is not None}
    table = build_manifest(args.prompts, args.template, args.seeds, args.seed_base, defaults)
    write_manifest(table, args.output)
    print(f"wrote {table.num_rows} rows to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..pipeline.manifest import demo_manifest, write_manifest
    from .job import run_job

    out = Path(args.out)
    manifest = write_manifest(demo_manifest(), out.parent / f"{out.name}-manifest.parquet")
    print(f"demo manifest: {manifest} (8 valid rows, 2 invalid on purpose)")
    summary = run_job(str(manifest), str(out), JobConfig(), progress=not args.no_progress,
                      command=["daguerre", *sys.argv[1:]])  # fmt: skip
    print_summary(summary)
    return 0


def print_summary(summary: Any) -> None:
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from ..pipeline.report import figure_rows, stage_rows

    table = Table(title=f"daguerre job {summary.run_id}", show_header=False)
    errors = f"{summary.errors}" + (
        f" {summary.errors_by_stage}" if summary.errors_by_stage else ""
    )
    rows = [
        ("manifest rows", str(summary.manifest_rows)),
        ("generated", str(summary.generated)
         + (f" ({summary.regenerated} made again: --overwrite)" if summary.regenerated else "")),
        ("skipped as done", f"{summary.skipped_done} (finished before)"),
        ("errors", errors),
        ("wall time", f"{summary.wall_s:.1f} s"),
        *figure_rows(dataclasses.asdict(summary)),
        *stage_rows(summary.stage_s),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    out = summary.output.rstrip("/")
    console.print(f"images:     {out}/images/<id>.png", soft_wrap=True)
    console.print(f"metadata:   {out}/metadata/ (one row per image)", soft_wrap=True)
    console.print(f"errors:     {out}/errors/ (one row per rejected row)", soft_wrap=True)
    console.print(f"run record: {out}/runs/{summary.run_id}.json", soft_wrap=True)
    if summary.generated == 0:
        reasons = [f"{summary.skipped_done} rows already finished under the output"]
        if summary.errors:
            reasons.append(f"{summary.errors} rows rejected (see errors/)")
        console.print(f"nothing generated: {', '.join(reasons)}", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: cluster/bench.py (also benchmarks/throughput.py)
        from .bench import main as bench_main

        return _run(lambda: bench_main(argv[1:]))
    args = build_parser().parse_args(argv)
    handlers = {
        "generate": cmd_generate, "manifest": cmd_manifest, "serve": cmd_serve,
        "inspect": cmd_inspect, "compile": cmd_compile, "demo": cmd_demo,
    }  # fmt: skip
    if args.command in ("generate", "serve", "demo") and not getattr(args, "verbose", False):
        from .runtime import quiet_native_stderr

        with quiet_native_stderr():
            return _run(lambda: handlers[args.command](args))
    return _run(lambda: handlers[args.command](args))


def _run(command: Any) -> int:
    """Run a command; every failure a user can cause is one line and exit code 2."""
    from ..kernels.compile import BackendUnavailable
    from ..pipeline.manifest import ManifestBuildError, ManifestError
    from ..pipeline.storage import StorageError

    try:
        return command()
    except (ConfigError, ManifestError, ManifestBuildError, StorageError,
            BackendUnavailable) as exc:  # fmt: skip
        print(f"daguerre: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daguerre: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # failures inside Ray: the original cause, in one line
        if not type(exc).__module__.startswith("ray"):
            raise
        from .runtime import describe_error

        print(f"daguerre: error: {describe_error(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    return " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
