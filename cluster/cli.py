"""The `daguerre` command: generate, manifest, serve, inspect, compact, compile, bench, demo.

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

from ..pipeline.config import ConfigError, JobConfig, load_yaml, validate_config
from .arguments import build_parser


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
    print(f"  OpenAI-compatible: POST {url}/v1/images/generations, {url}/v1/images/edits",
          flush=True)  # fmt: skip
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
    if args.html:
        from ..pipeline.review import write_review

        sheet = write_review(args.output, args.html, storage, args.html_limit)
        print(f"wrote review sheet {args.html}: {sheet.summary()}")
        return 0
    report = inspect_output(args.output, storage)
    if args.json:
        print(report.to_json())
    else:
        print_report(report)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from ..pipeline.lease import OutputLease
    from ..pipeline.outputs import new_run_id
    from ..pipeline.storage import Storage, StorageError
    from .job import finish_output

    config = load_yaml(args.config, JobConfig) if args.config else JobConfig()
    storage = Storage(args.output, config.storage)
    if not storage.fs.exists(storage.root) or not storage.is_output():
        raise StorageError(f"{args.output}: not a daguerre output (no metadata/ or runs/)")
    target_mb = args.target_mb or config.compact_target_mb
    lease = OutputLease(storage, new_run_id(kind="compact"))
    lease.acquire()  # no job writes while the fragments move
    try:
        done = finish_output(storage, int(target_mb * 2**20), lease.run_id)
    finally:
        lease.release()
    for table, result in done["compacted"].items():
        print(f"{table}: {result['sources']} fragments -> {result['outputs']} files "
              f"({result['rows_out']} rows; {result['files_after']} files now)")  # fmt: skip
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from ..pipeline.manifest import build_manifest, write_manifest

    defaults = {
        "steps": args.steps, "guidance_scale": args.guidance_scale, "width": args.width,
        "height": args.height, "scheduler": args.scheduler, "negative_prompt": args.negative_prompt,
        "strength": args.strength, "resize": args.resize,
    }  # fmt: skip
    defaults = {k: v for k, v in defaults.items() if v is not None}
    images = {"init_image": args.init_image_column, "mask_image": args.mask_image_column}
    images = {k: v for k, v in images.items() if v is not None}
    unused = [f"--{k}" for k in ("strength", "resize") if getattr(args, k) is not None]
    if unused and "init_image" not in images:
        raise ConfigError(f"{' and '.join(unused)} apply to init images: add "
                          "--init-image-column COLUMN (the CSV column naming each row's photo)")  # fmt: skip
    table = build_manifest(args.prompts, args.template, args.seeds, args.seed_base, defaults,
                           images, args.output.parent)  # fmt: skip
    write_manifest(table, args.output)
    print(f"wrote {table.num_rows} rows to {args.output}")
    return 0


def cmd_credentials(args: argparse.Namespace) -> int:
    from ..pipeline.trial_chain import KEY, make_trial_chain

    if (args.folder / KEY).exists():
        raise ConfigError(f"{args.folder / KEY} exists; pick another folder (a key is never "
                          "overwritten)")  # fmt: skip
    files = make_trial_chain(args.folder, args.name, args.days)
    print(f"wrote {files['cert_file']}, {files['key_file']} and {files['root']}; use them as\n"
          f"credentials:\n  enabled: true\n  cert_file: {files['cert_file']}\n"
          f"  key_file: {files['key_file']}")  # fmt: skip
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
         + (f" ({summary.regenerated} made again: --overwrite)" if summary.regenerated else "")
         + (f" ({summary.cache_hits} from the result cache)" if summary.cache_hits else "")),
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
    console.print(f"images:     {out}/images/<id>.{summary.image_extension}", soft_wrap=True)
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
        "compact": cmd_compact, "credentials": cmd_credentials,
    }  # fmt: skip
    if args.command in ("generate", "serve", "demo") and not getattr(args, "verbose", False):
        from .runtime import quiet_native_stderr

        with quiet_native_stderr():
            return _run(lambda: handlers[args.command](args))
    return _run(lambda: handlers[args.command](args))


def _run(command: Any) -> int:
    """Run a command; every failure a user can cause is one line and exit code 2."""
    from ..kernels.unet import BackendUnavailable
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
