"""`daguerre bench`: the engine alone per backend and batch size (pipeline/bench.py), then
optionally the same workload through the batch job or Serve, as ratios to the engine.

The batch job's ratio is its steady_images_per_s (images after the first, over first to last
image written; ratio_basis in the JSON); Serve's is all requests after one warm-up request.
Skip reasons and notes are in both the table and the JSON.

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

from ..pipeline.bench import bench_cache, bench_engine, environment, parse_size, plot
from ..pipeline.config import COMPILE_MODES, HOT_PATH_OPTIONS, ConfigError

NOTHING_MEASURED = (
    "no engine-alone point was measured (every backend and batch size was "
    "skipped), so there is nothing to run through the cluster or compare with"
)
BATCH_FIGURES = ("startup_s", "steady_images_per_s", "end_to_end_images_per_s", "mean_engine_batch")


def through_reference(results: list[dict]) -> dict | None:
    """The engine-alone row the through runs copy and are compared with: the first backend
    pair that measured anything, at its largest measured batch size; None if none did."""
    measured = [r for r in results if "images_per_s" in r]
    if not measured:
        return None
    pair = (measured[0]["unet_backend"], measured[0]["attention_backend"])
    same = [r for r in measured if (r["unet_backend"], r["attention_backend"]) == pair]
    return max(same, key=lambda r: r["batch_size"])


def run_through(kinds: list[str], args: argparse.Namespace, results: list[dict]) -> dict:
    """`through_<kind>` for each kind asked: its figures, or {"skipped": reason}."""
    reference = through_reference(results)
    if reference is None:
        return {f"through_{kind}": {"skipped": NOTHING_MEASURED} for kind in kinds}
    return {f"through_{kind}": bench_through(kind, args, reference) for kind in kinds}


def through_result(images: int, figures: dict, basis: str, reference: dict) -> dict:
    """One through run: its figures, images/s and the ratio to the engine alone, both taken
    from `figures[basis]` (named in ratio_basis), and the engine point compared with."""
    value = figures.get(basis)
    result = {"images": images, **figures, "images_per_s": value,
              "ratio_to_engine": value / reference["images_per_s"] if value else None,
              "ratio_basis": basis,
              "engine": {k: reference[k] for k in ("unet_backend", "attention_backend",
                                                   "batch_size", "images_per_s")}}  # fmt: skip
    if not value:
        result["note"] = (f"{basis} was not measured ({images} images, too few to time), so "
                          "there is no ratio to the engine")  # fmt: skip
    return result


def bench_through(kind: str, args: argparse.Namespace, reference: dict) -> dict:
    """The same workload through the batch job or Serve, on the engine point `reference`."""
    from ..pipeline.config import EngineConfig

    width, height = args.size
    batch = reference["batch_size"]
    engine = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          unet_backend=reference["unet_backend"],
                          attention_backend=reference["attention_backend"],
                          max_batch_size=batch)  # fmt: skip
    n = max(args.through_images, 2 * batch)
    rows = [{"id": f"t{i}", "prompt": f"a benchmark photo {i % 8}", "seed": i,
             "steps": args.steps, "width": width, "height": height} for i in range(n)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="daguerre-bench-") as tmp:
        if kind == "batch":
            summary = _through_batch(engine, rows, batch, tmp)
            figures = {k: getattr(summary, k) for k in BATCH_FIGURES}
            return through_result(n, figures, "steady_images_per_s", reference)
        figures = {"images_per_s": _through_serve(engine, rows, batch, tmp)}
        return through_result(n, figures, "images_per_s", reference)


def _through_batch(engine: Any, rows: list[dict], batch: int, tmp: str) -> Any:
    """The batch job over `rows`: its JobSummary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..pipeline.config import JobConfig
    from ..pipeline.schema import manifest_schema
    from .job import run_job

    manifest = Path(tmp) / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), manifest)
    return run_job(str(manifest), str(Path(tmp) / "out"),
                   JobConfig(engine=engine, batch_size=batch), progress=False)  # fmt: skip


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


def build_parser() -> argparse.ArgumentParser:
    from .arguments import OneLineParser, _Help

    p = OneLineParser(
        prog="daguerre bench", formatter_class=_Help,
        description="Images/s, s/image, UNet calls/s, image-steps/s, peak memory and MFU of the\n"
        "engine alone per UNet backend x attention backend x batch size; optionally the same\n"
        "workload through the batch job and Serve, as ratios to the engine alone. The last\n"
        "result per model is kept for `daguerre generate --dry-run`'s estimate.",
        epilog="example:\n  daguerre bench --model sd15 --size 512x512 --steps 30 --batch-sizes 1,4,8 "
        "--backends eager,compile --json sd15.json",
    )  # fmt: skip
    p.add_argument("--model", default="tiny", help="preset or diffusers folder")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps per image")
    p.add_argument("--batch-sizes", default="1,2,4", help="engine batch sizes to time, e.g. 1,4,8")
    p.add_argument("--backends", default="eager",
                   help="UNet backends, e.g. eager,compile,onnxruntime,tensorrt")  # fmt: skip
    p.add_argument("--attention-backends", default="sdpa", help="e.g. sdpa,triton,xformers")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                   help="auto: float16 on CUDA, float32 on CPU")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed generations per point")
    p.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                   help="torch.compile's mode for --backends compile")  # fmt: skip
    p.add_argument("--quantize", default="none", choices=("none", "int8", "fp8"),
                   help="8-bit UNet (torchao): int8, or fp8 on CUDA compute capability 8.9+")  # fmt: skip
    p.add_argument("--hot-path", default="",
                   help="comma-separated engine hot-path switches to turn on: "
                   "fuse_qkv, channels_last, noise_on_device")  # fmt: skip
    p.add_argument("--through", choices=("batch", "serve"), action="append", default=[],
                   help="also run the workload through the batch job or Serve (repeatable)")  # fmt: skip
    p.add_argument("--through-images", type=int, default=32, help="images per --through run")
    p.add_argument("--json", type=Path, help="write the report as JSON (and a PNG plot beside it)")
    p.add_argument("--plot", type=Path, help="the PNG plot's path (default: beside --json)")
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
    args.hot_path = [name for name in args.hot_path.split(",") if name]
    unknown = sorted(set(args.hot_path) - set(HOT_PATH_OPTIONS))
    if unknown:
        raise ConfigError(f"--hot-path: unknown {', '.join(unknown)} "
                          f"(known: {', '.join(HOT_PATH_OPTIONS)})")  # fmt: skip
    args.through = list(dict.fromkeys(args.through))

    engine = bench_engine(args)
    report = build_report(args, engine, size_text)
    report.update(run_through(args.through, args, engine["results"]))
    report["notes"] += [report[f"through_{k}"]["note"] for k in args.through
                        if "note" in report[f"through_{k}"]]  # fmt: skip
    print_report(report)
    text = json.dumps(report, indent=2, default=str) + "\n"
    for path in [bench_cache(args.model), *([args.json] if args.json else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")  # atomic: a reader never sees half a report
        tmp.write_text(text)
        tmp.replace(path)
    if args.plot or args.json:
        plot(report, args.plot or args.json.with_suffix(".png"))
    return 0


def build_report(args: argparse.Namespace, engine: dict, size_text: str) -> dict[str, Any]:
    """The JSON report of the engine-alone half (the through runs are added after)."""
    measured = [r for r in engine["results"] if "images_per_s" in r]
    mfu = max((r["mfu"] for r in measured), default=None)
    report: dict[str, Any] = {
        "images_per_s": max((r["images_per_s"] for r in measured), default=None),
        "mfu": mfu,
        "mfu_reliable": None if mfu is None else mfu <= 1.0,
        "device": engine["device"],
        "peak_tflops": engine["peak_flops"] / 1e12,
        "flops_per_image_tflop": engine["flops"]["per_image"] / 1e12,
        "denoiser_step_tflop": engine["flops"]["denoiser_step"] / 1e12,
        "results": engine["results"],
        "notes": list(engine["notes"]),
        "conditions": {
            "model": args.model,
            "size": size_text,
            "steps": args.steps,
            "dtype": engine["dtype"],
            "backends": args.backends,
            "attention_backends": args.attention_backends,
            "batch_sizes": args.batch_sizes,
            "hot_path": args.hot_path,
            "quantize": args.quantize,
            "compile_mode": args.compile_mode,
            "repeats": args.repeats,
            **environment(),
        },  # fmt: skip
    }
    report["versions"] = report["conditions"]["versions"]
    return report


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def mfu_text(row: dict) -> str:
    return f"{row['mfu']:.1%}" + ("" if row["mfu_reliable"] else " (peak unreliable)")


class _Footnotes:
    """Skip reasons as numbered footnotes under a table (one per distinct reason)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def mark(self, reason: str) -> str:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"skipped [{self.reasons.index(reason) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{i}] skipped: {reason}" for i, reason in enumerate(self.reasons, 1)]


def _caption(lines: list[str]) -> str | None:
    from rich.markup import escape

    return escape("\n".join(lines)) if lines else None  # reasons quote [extras]


def _table(title: str, columns: list[str]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), caption_justify="left")
    for col in columns:
        table.add_column(col, justify="right", overflow="fold")
    return table


def engine_table(report: dict) -> Any:
    """The engine alone: one row per backend pair and batch size; skipped ones with why."""
    c = report["conditions"]
    table = _table(f"daguerre bench: {c['model']} {c['size']} x{c['steps']} steps, {c['dtype']}, "
                   f"{c['device']}; peak {report['peak_tflops']:.2f} TFLOP/s (measured), "
                   f"{report['flops_per_image_tflop']:.3f} TFLOP/image",
                   ["unet", "attention", "batch", "images/s", "s/image", "UNet calls/s",
                    "image-steps/s", "MFU", "peak MB"])  # fmt: skip
    notes = _Footnotes()
    for r in report["results"]:
        if "images_per_s" not in r:
            reason = f"{r['unet_backend']}/{r['attention_backend']}: {r.get('skipped', '?')}"
            table.add_row(r["unet_backend"], r["attention_backend"], str(r["batch_size"]),
                          notes.mark(reason), "", "", "", "", "")  # fmt: skip
            continue
        table.add_row(r["unet_backend"], r["attention_ran"], str(r["batch_size"]),
                      f"{r['images_per_s']:.3f}", f"{r['s_per_image']:.3f}",
                      f"{r['unet_calls_per_s']:.2f}", f"{r['denoise_steps_per_s']:.2f}",
                      mfu_text(r), f"{r['peak_memory_mb']:.0f}")  # fmt: skip
    table.caption = _caption(notes.lines())
    return table


def through_table(report: dict) -> Any | None:
    """batch/serve through the cluster against the engine alone; None if not asked."""
    runs = {k: report[f"through_{k}"] for k in ("batch", "serve") if f"through_{k}" in report}
    if not runs:
        return None
    table = _table("through the cluster", ["through", "images", "images/s", "ratio to engine",
                   "ratio basis", "startup s", "steady images/s", "end-to-end images/s"])  # fmt: skip
    notes = _Footnotes()
    for kind, r in runs.items():
        if "skipped" in r:
            table.add_row(kind, "", notes.mark(r["skipped"]), "", "", "", "", "")
            continue
        ratio = "" if r["ratio_to_engine"] is None else f"{r['ratio_to_engine']:.2f}x"
        table.add_row(kind, str(r["images"]), _fmt(r["images_per_s"], ".3f"), ratio,
                      r["ratio_basis"], _fmt(r.get("startup_s"), ".1f"),
                      _fmt(r.get("steady_images_per_s"), ".3f"),
                      _fmt(r.get("end_to_end_images_per_s"), ".3f"))  # fmt: skip
    ref = next((r["engine"] for r in runs.values() if "engine" in r), None)
    lines = notes.lines()
    if ref is not None:
        lines.insert(0, "ratio to engine = the ratio basis / the engine alone at "
                        f"{ref['unet_backend']}/{ref['attention_backend']} batch "
                        f"{ref['batch_size']} ({ref['images_per_s']:.3f} images/s)")  # fmt: skip
    table.caption = _caption(lines)
    return table


def print_report(report: dict, console: Any = None) -> None:
    """Both tables and the notes. Piped output gets 140 columns unless COLUMNS says."""
    from rich.console import Console
    from rich.markup import escape

    if console is None:
        wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        console = Console(width=140) if wide else Console()
    console.print(engine_table(report))
    through = through_table(report)
    if through is not None:
        console.print(through)
    for note in report.get("notes", []):
        console.print(escape(f"note: {note}"), soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
