"""`daguerre inspect OUT`: what an output prefix holds, read from its metadata, errors and runs.

Only the columns needed are read, so a prefix with millions of rows is summarised
without loading images or prompts. The speed figures of a run are computed by
`speed_figures` from the same inputs wherever they are shown (the job's summary, its
run record, inspect), so they agree:

    startup_s                 run start -> first image written
    steady_images_per_s       images after the first write / (last write - first write)
    end_to_end_images_per_s   images / (run end - run start)
    mean_engine_batch         images / engine calls (each image knows its call's size)
"""

from __future__ import annotations

import collections
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .catalog import read_errors, read_metadata
from .config import StorageConfig
from .storage import METADATA, RUNS, Storage, StorageError

_COLUMNS = ["id", "model", "weights_hash", "backend", "node_id", "created_at", "timings",
            "width", "height", "steps", "scheduler", "batch_size", "run_id", "cache_hit",
            "init_image", "mask_image", "strength", "steps_run"]  # fmt: skip


def speed_figures(
    written_at: list[dt.datetime], started_at: dt.datetime, ended_at: dt.datetime | None
) -> dict[str, float | None]:
    """startup_s, steady_images_per_s and end_to_end_images_per_s of one run's images."""
    return speed_figures_s(
        [t.timestamp() for t in written_at], started_at.timestamp(),
        None if ended_at is None else ended_at.timestamp(),
    )  # fmt: skip


def speed_figures_s(
    written_at: Sequence[float], started_at: float, ended_at: float | None
) -> dict[str, float | None]:
    """speed_figures over Unix seconds (a job's tally keeps its write times so, compactly)."""
    figures: dict[str, float | None] = dict.fromkeys(
        ("startup_s", "steady_images_per_s", "end_to_end_images_per_s")
    )
    if ended_at is not None:
        wall = ended_at - started_at
        figures["end_to_end_images_per_s"] = len(written_at) / wall if wall > 0 else None
    if not written_at:
        return figures
    first, last = min(written_at), max(written_at)
    figures["startup_s"] = first - started_at
    span = last - first
    after_first = sum(1 for t in written_at if t > first)
    figures["steady_images_per_s"] = after_first / span if span > 0 else None
    return figures


def mean_engine_batch(batch_sizes: list[int]) -> float | None:
    """Images per engine call: each image of a call of size b is 1/b of that call."""
    return mean_engine_batch_counts(collections.Counter(batch_sizes))


def mean_engine_batch_counts(images_per_batch_size: dict[int, int]) -> float | None:
    """mean_engine_batch from {batch size: images made in calls of that size}."""
    images = sum(n for b, n in images_per_batch_size.items() if b)
    calls = sum(n / b for b, n in images_per_batch_size.items() if b)
    return images / calls if calls else None


@dataclass
class OutputReport:
    """Counts, errors, speed and provenance of one output prefix."""

    output: str
    images: int = 0  # ids with an image (one row each, as every reader sees them)
    cache_hits: int = 0  # of those, read from the result cache instead of made
    metadata_rows: int = 0  # rows in the fragments, superseded ones included
    errors: int = 0  # standing errors: latest run's, of ids that have no image
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    errors_by_reason: dict[str, int] = field(default_factory=dict)  # "stage field: reason"
    first_image_at: str | None = None
    last_image_at: str | None = None
    stage_s: dict[str, float] = field(default_factory=dict)  # summed over images
    mean_engine_batch: float | None = None
    models: dict[str, int] = field(default_factory=dict)  # "model (weights hash)" -> images
    backends: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    shapes: dict[str, int] = field(default_factory=dict)  # "WxH, N steps, scheduler" -> images
    inputs: dict[str, int] = field(default_factory=dict)  # made from a prompt or an init image
    runs: int = 0
    last_run: dict[str, Any] | None = None  # the latest run record's figures

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def inspect_output(
    uri: str, storage_config: StorageConfig | None = None, top: int = 10
) -> OutputReport:
    """The report of the output prefix `uri` (StorageError when it is not a readable output)."""
    storage = Storage(uri, storage_config)
    storage.check_readable()
    if not storage.is_output():
        raise StorageError(
            f"{uri}: not a daguerre output (no _daguerre marker, metadata/ or runs/ in it)"
        )
    report = OutputReport(output=storage.url(""))
    table = read_metadata(storage, _COLUMNS)
    raw = storage.read_table(METADATA, columns=["id"])
    report.metadata_rows = 0 if raw is None else raw.num_rows
    if table is not None:
        _describe_images(report, table.to_pylist())
    errors = read_errors(
        storage, None if table is None else table["id"], ["id", "stage", "field", "reason"]
    )
    if errors is not None and errors.num_rows:
        rows = errors.to_pylist()
        report.errors = len(rows)
        report.errors_by_stage = _count(r["stage"] for r in rows)
        reasons = _count(f"{r['stage']} {r['field']}: {r['reason']}" for r in rows)
        report.errors_by_reason = dict(list(reasons.items())[:top])
    records = read_run_records(storage)
    report.runs = len(records)
    if records:
        report.last_run = _last_run(records[-1], [] if table is None else table.to_pylist())
    return report


def _describe_images(report: OutputReport, rows: list[dict]) -> None:
    report.images = len(rows)
    stamps = sorted(r["created_at"] for r in rows)
    report.first_image_at, report.last_image_at = stamps[0].isoformat(), stamps[-1].isoformat()
    stage_s: collections.Counter[str] = collections.Counter()
    for r in rows:
        stage_s.update(r["timings"])
    report.stage_s = dict(stage_s)  # unrounded: the table rounds once, as the summary does
    report.cache_hits = sum(1 for r in rows if r["cache_hit"])
    report.mean_engine_batch = mean_engine_batch([r["batch_size"] for r in rows
                                                  if not r["cache_hit"]])  # fmt: skip
    report.models = _count(f"{r['model']} ({r['weights_hash'][:19]})" for r in rows)
    report.backends = _count(
        ", ".join(f"{k}={v}" for k, v in sorted(dict(r["backend"]).items())) for r in rows
    )
    report.nodes = len({r["node_id"] for r in rows})
    report.shapes = _count(
        f"{r['width']}x{r['height']}, {r['steps']} steps, {r['scheduler']}" for r in rows
    )
    if any(r["init_image"] for r in rows):
        report.inputs = _count(_input_kind(r) for r in rows)


def _input_kind(row: dict) -> str:
    """What an image was made from: a prompt, or an init image (and how far from it)."""
    if not row["init_image"]:
        return "prompt only"
    kind = "inpainted (init image and mask)" if row["mask_image"] else "img2img (init image)"
    return f"{kind}, strength {row['strength']:g}: {row['steps_run']} of {row['steps']} steps"


def read_run_records(storage: Storage) -> list[dict[str, Any]]:
    """Every run record under runs/, oldest first (run ids sort by start time)."""
    path = storage.path(RUNS)
    if not storage.fs.exists(path):
        return []
    names = sorted(p for p in storage.fs.ls(path, detail=False) if p.endswith(".json"))
    return [json.loads(storage.fs.cat_file(p)) for p in names]


def _last_run(record: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
    """The figures of the latest run as its record states them (the summary it printed)."""
    keys = ("run_id", "started_at", "ended_at", "generated", "skipped_done", "errors",
            "startup_s", "steady_images_per_s", "end_to_end_images_per_s", "mean_engine_batch",
            "engine_busy_fraction_mean", "gpu_seconds_per_image", "cost_per_1000_images",
            "planning_s", "driver_peak_rss_mib", "cost")  # fmt: skip
    out = {k: record.get(k) for k in keys}
    out["images_now"] = sum(1 for r in rows if r["run_id"] == record.get("run_id"))
    return out


def _count(values: Any) -> dict[str, int]:
    return dict(collections.Counter(values).most_common())


def fmt(value: float | None, unit: str = "") -> str:
    """A figure for a table: two decimals and its unit, or n/a."""
    return "n/a" if value is None else f"{value:.2f}{unit}"


FIGURES = (  # (label, key, unit, what it measures): the same words wherever figures show
    ("startup", "startup_s", " s", "run start to first image written"),
    ("steady images/s", "steady_images_per_s", "", "first to last image written"),
    ("end-to-end images/s", "end_to_end_images_per_s", "", "whole run"),
    ("mean engine batch", "mean_engine_batch", "", "images per engine call"),
    ("engine busy", "engine_busy_fraction_mean", "", "engine actors' time inside generate"),
    ("GPU-seconds/image", "gpu_seconds_per_image", " s", "engine actors' time per image"),
    ("cost per 1,000 images", "cost_per_1000_images", "", "at cost.gpu_hour_usd"),
    ("planning", "planning_s", " s", "duplicates, finished ids, resume check"),
    ("driver peak memory", "driver_peak_rss_mib", " MiB", "the job's driver process"),
)


def figure_rows(values: dict[str, Any], indent: str = "") -> list[tuple[str, str]]:
    """Table rows of a run's speed figures (the job summary, inspect's last run); the cost
    in the run's currency at its price, or how to get one."""
    cost = values.get("cost") or {}
    rows = []
    for label, key, unit, what in FIGURES:
        if key == "cost_per_1000_images":
            price = cost.get("gpu_hour_price")
            currency = cost.get("currency", "USD")
            unit = f" {currency}" if price is not None else ""
            what = (
                f"at {price} {currency} per GPU-hour"
                if price is not None
                else "set cost.gpu_hour_usd"
            )
        rows.append((f"{indent}{label}", f"{fmt(values.get(key), unit)} ({what})"))
    return rows


def stage_rows(stage_s: dict[str, float]) -> list[tuple[str, str]]:
    """Table rows of time per stage, summed over images."""
    return [(f"  {name.removesuffix('_s')}", f"{seconds:.2f} s (summed over images)")
            for name, seconds in stage_s.items() if seconds]  # fmt: skip


def print_report(report: OutputReport) -> None:
    """The report as tables in the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"daguerre output: {report.output}", show_header=False)
    superseded = report.metadata_rows - report.images
    rows = [
        ("images", f"{report.images} ({superseded} superseded rows in the fragments)"),
        ("cache hits", f"{report.cache_hits} (answered from the result cache)"),
        ("errors", f"{report.errors} {report.errors_by_stage or ''}".strip()),
        ("written", f"{report.first_image_at} .. {report.last_image_at}"),
        ("mean engine batch", fmt(report.mean_engine_batch) + " (all images)"),
        ("nodes", str(report.nodes)),
        *stage_rows(report.stage_s),
        ("runs", str(report.runs)),
    ]
    run = report.last_run
    if run:
        rows.append(("last run", f"{run['run_id']}: {run['generated']} generated, "
                     f"{run['skipped_done']} skipped, {run['errors']} errors"))  # fmt: skip
        rows += figure_rows(run, indent="  ")
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)
    for title, counts in (
        ("models", report.models),
        ("backends", report.backends),
        ("sizes", report.shapes),
        ("inputs", report.inputs),
        ("errors by reason", report.errors_by_reason),
    ):
        if counts:
            table = Table(title=title)
            table.add_column(title.split()[0].rstrip("s"))
            table.add_column("count", justify="right")
            for key, count in counts.items():
                table.add_row(key, str(count))
            console.print(table)
