"""`daguerre inspect OUT`: what an output prefix holds, read from its metadata and errors alone.

Only the columns needed are read, so a prefix with millions of rows is summarised
without loading images or prompts.
"""

from __future__ import annotations

import collections
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from daguerre.pipeline.config import StorageConfig
from daguerre.pipeline.storage import ERRORS, METADATA, Storage

_COLUMNS = ["id", "model", "weights_hash", "backend", "node_id", "created_at", "timings",
            "width", "height", "steps", "scheduler"]  # fmt: skip


@dataclass
class OutputReport:
    """Counts, errors, throughput and provenance of one output prefix."""

    output: str
    images: int = 0
    distinct_ids: int = 0
    duplicate_rows: int = 0
    errors: int = 0  # distinct errors of ids that have no image
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    errors_by_reason: dict[str, int] = field(default_factory=dict)  # "stage field: reason"
    first_image_at: str | None = None
    last_image_at: str | None = None
    images_per_s: float | None = None  # first to last image written
    stage_s: dict[str, float] = field(default_factory=dict)  # summed over images
    models: dict[str, int] = field(default_factory=dict)  # "model (weights hash)" -> images
    backends: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    shapes: dict[str, int] = field(default_factory=dict)  # "WxH, N steps, scheduler" -> images

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def inspect_output(
    uri: str, storage_config: StorageConfig | None = None, top: int = 10
) -> OutputReport:
    """The report of the output prefix `uri` (raises StorageError when it cannot be read)."""
    storage = Storage(uri, storage_config)
    storage.check_readable()
    report = OutputReport(output=storage.url(""))
    table = storage.read_table(METADATA, columns=_COLUMNS)
    if table is not None and table.num_rows:
        rows = table.to_pylist()
        report.images = len(rows)
        report.distinct_ids = len({r["id"] for r in rows})
        report.duplicate_rows = report.images - report.distinct_ids
        stamps = sorted(r["created_at"] for r in rows)
        report.first_image_at, report.last_image_at = stamps[0].isoformat(), stamps[-1].isoformat()
        span = (stamps[-1] - stamps[0]).total_seconds()
        report.images_per_s = report.images / span if span > 0 else None
        stage_s: collections.Counter[str] = collections.Counter()
        for r in rows:
            stage_s.update(r["timings"])
        report.stage_s = {k: round(v, 3) for k, v in stage_s.items()}
        report.models = _count(f"{r['model']} ({r['weights_hash'][:19]})" for r in rows)
        report.backends = _count(
            ", ".join(f"{k}={v}" for k, v in sorted(dict(r["backend"]).items())) for r in rows
        )
        report.nodes = len({r["node_id"] for r in rows})
        report.shapes = _count(
            f"{r['width']}x{r['height']}, {r['steps']} steps, {r['scheduler']}" for r in rows
        )
    errors = storage.read_table(ERRORS, columns=["id", "stage", "field", "reason"])
    if errors is not None and errors.num_rows:
        # A rerun records a still-bad row again, and a row that failed once may have
        # succeeded later: count each distinct error once, and only for ids without an image.
        done = set() if table is None else set(table.column("id").to_pylist())
        unique = {tuple(r.values()): r for r in errors.to_pylist() if r["id"] not in done}
        rows = list(unique.values())
        report.errors = len(rows)
        report.errors_by_stage = _count(r["stage"] for r in rows)
        reasons = _count(f"{r['stage']} {r['field']}: {r['reason']}" for r in rows)
        report.errors_by_reason = dict(list(reasons.items())[:top])
    return report


def _count(values: Any) -> dict[str, int]:
    return dict(collections.Counter(values).most_common())


def print_report(report: OutputReport) -> None:
    """The report as tables in the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"daguerre output: {report.output}", show_header=False)
    rate = f"{report.images_per_s:.2f}" if report.images_per_s else "n/a"
    rows = [
        ("images", f"{report.images} ({report.distinct_ids} ids, {report.duplicate_rows} duplicate rows)"),
        ("errors", f"{report.errors} {report.errors_by_stage or ''}".strip()),
        ("written", f"{report.first_image_at} .. {report.last_image_at}"),
        ("images/s", f"{rate} (first to last image written)"),
        ("nodes", str(report.nodes)),
    ]  # fmt: skip
    for name, seconds in report.stage_s.items():
        if seconds:
            rows.append((f"  {name.removesuffix('_s')}", f"{seconds:.2f} s (summed over images)"))
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)
    for title, counts in (
        ("models", report.models),
        ("backends", report.backends),
        ("sizes", report.shapes),
        ("errors by reason", report.errors_by_reason),
    ):
        if counts:
            table = Table(title=title)
            table.add_column(title.split()[0].rstrip("s"))
            table.add_column("count", justify="right")
            for key, count in counts.items():
                table.add_row(key, str(count))
            console.print(table)
