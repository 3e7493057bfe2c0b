"""`daguerre generate --dry-run`: what a job would do, before spending GPU hours on it.

Everything the job checks before Ray starts, plus every row validated here: rows valid
and invalid (by reason), what is already finished, the engine batches by bucket (size,
steps, scheduler), and an estimate of time and GPU-hours from the last `daguerre bench`
result for the model on this machine (scaled by steps and pixels), or a note that there
is none. Nothing is written and no Ray starts.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..pipeline.bench import last_bench
from ..pipeline.config import JobConfig
from ..pipeline.id_index import id_digests
from ..pipeline.schema import ImageRequest, bucket_key
from ..pipeline.storage import Storage
from .plan import check_inputs, manifest_rows, plan_resume, served_engine
from .stages import check_row


@dataclass
class DryRun:
    """The counts and estimate of a job that was not run."""

    manifest_rows: int
    valid: int
    invalid: int
    invalid_by_field: dict[str, int]
    finished: int
    to_generate: int
    buckets: dict[str, int]  # "WxH, N steps, scheduler" -> images to generate
    engine_batches: int
    batch_size: int
    actors: str
    notices: list[str] = field(default_factory=list)
    estimate: dict[str, Any] | None = None
    no_estimate: str | None = None


def dry_run(manifest: str, output: str, config: JobConfig, *, address: str | None = None,
            overwrite: bool = False, limit: int | None = None) -> DryRun:  # fmt: skip
    """Check and count what `run_job` would do with these arguments."""
    import numpy as np

    served = served_engine(config, address)
    plan = check_inputs(manifest, config, local=address is None, served=served)
    storage = Storage(output, plan.config.storage)
    plan_resume(plan, storage, overwrite, distributed=False)  # no Ray in a dry run
    table = manifest_rows(plan)
    digests = id_digests(table.column("id"))
    duplicated = plan.ids.duplicates.contains(digests)
    finished_mask = plan.ids.skip.contains(digests)
    if limit is not None:  # as the job: --limit counts rows not yet finished
        keep = np.flatnonzero(~finished_mask)[:limit]
        table, duplicated, finished_mask = table.take(keep), duplicated[keep], finished_mask[keep]
    names = [plan.config.engine.model, plan.model.name]
    invalid: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[tuple] = collections.Counter()
    valid = finished = photos = 0
    for row, duplicate, done in zip(table.to_pylist(), duplicated, finished_mask, strict=True):
        result = check_row(row, plan.config.limits, names, duplicate=bool(duplicate),
                           rules=plan.config.rules, composite=plan.config.composite)  # fmt: skip
        if not isinstance(result, ImageRequest):
            invalid[result[0].field] += 1
            continue
        valid += 1
        if done:
            finished += 1
            continue
        buckets[bucket_key(result, plan.model.default_size)] += 1
        photos += result.init_image is not None
    size = min(plan.config.batch_size, plan.config.engine.max_batch_size)
    report = DryRun(
        manifest_rows=table.num_rows, valid=valid, invalid=sum(invalid.values()),
        invalid_by_field=dict(invalid), finished=finished, to_generate=sum(buckets.values()),
        buckets={_label(key): n for key, n in sorted(buckets.items())},
        engine_batches=sum(math.ceil(n / size) for n in buckets.values()), batch_size=size,
        actors=f"{plan.config.min_actors}:{plan.config.max_actors}",
        notices=plan.notices + ([f"{photos} rows start from an init image: read and checked "
                                 "when the job runs (a bad one is then an errors row); sized "
                                 "by their image, they are counted at the model's size here"]
                                if photos else []),
    )  # fmt: skip
    _estimate(report, plan.model.name, buckets, size, plan.config.max_actors)
    return report


def _label(key: tuple) -> str:
    """A bucket as the report names it: WxH, N steps, scheduler (and the cached speed tier,
    whose requests get batches of their own)."""
    width, height, steps, scheduler, speed = key
    tier = ", cached" if speed == "cached" else ""
    return f"{width}x{height}, {steps} steps, {scheduler}{tier}"


def _estimate(report: DryRun, model: str, buckets: collections.Counter, batch: int,
              actors: int) -> None:  # fmt: skip
    bench = last_bench(model)
    if bench is None:
        report.no_estimate = (f"no daguerre bench result for {model} on this machine: run "
                              f"`daguerre bench --model {model}` for an estimate")  # fmt: skip
        return
    rows = [r for r in bench["results"] if "s_per_image" in r]
    if not rows:
        report.no_estimate = f"the last daguerre bench of {model} measured nothing"
        return
    near = min(rows, key=lambda r: (abs(r["batch_size"] - batch), -r["batch_size"]))
    width, height = (int(x) for x in bench["conditions"]["size"].split("x"))
    steps = bench["conditions"]["steps"]
    seconds = sum(
        n * near["s_per_image"] * (s / steps) * (w * h) / (width * height)
        for (w, h, s, *_), n in buckets.items()
    )
    report.estimate = {
        "engine_seconds": seconds, "gpu_hours": seconds / 3600,
        "wall_seconds_at_max_actors": seconds / max(actors, 1),
        "from": f"daguerre bench {bench['conditions']['date']}: {model} {width}x{height}, "
        f"{steps} steps, batch {near['batch_size']}, {near['unet_backend']}, "
        f"{bench['conditions']['device']}; scaled linearly by steps and pixels",
    }  # fmt: skip


def print_dry_run(report: DryRun) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for line in report.notices:
        console.print(f"daguerre: {line}", soft_wrap=True)
    table = Table(title="daguerre generate --dry-run (nothing generated)", show_header=False)
    invalid = f"{report.invalid}" + (f" {report.invalid_by_field}" if report.invalid else "")
    rows = [
        ("manifest rows", str(report.manifest_rows)),
        ("valid", str(report.valid)),
        ("invalid", invalid + " (would go to errors/)"),
        ("finished before", f"{report.finished} (would be skipped)"),
        ("to generate", str(report.to_generate)),
        ("engine batches", f"{report.engine_batches} of up to {report.batch_size} images"),
        ("engine actors", report.actors),
    ]
    for bucket, count in report.buckets.items():
        rows.append((f"  {bucket}", f"{count} image{'s' if count != 1 else ''}"))
    if report.estimate:
        e = report.estimate
        rows += [("estimated engine time", f"{e['engine_seconds']:.0f} s = {e['gpu_hours']:.3f} "
                  f"GPU-hours; ~{e['wall_seconds_at_max_actors']:.0f} s on the max actors"),
                 ("  estimate from", e["from"])]  # fmt: skip
    else:
        rows.append(("estimate", report.no_estimate or "n/a"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def to_json(report: DryRun) -> str:
    import dataclasses

    return json.dumps(dataclasses.asdict(report), indent=2)
