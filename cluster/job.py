"""The batch job: a manifest streamed through Ray Data into images and metadata.

    read manifest -> validate + skip finished ids + order by bucket (CPU tasks)
      -> repartition to batch-sized blocks, so every actor has work
      -> DiffusionEngine in an autoscaled actor pool (one GPU each, or a CPU share)
      -> PNG encode + write images, metadata and errors (CPU tasks, under the lease)
      -> the driver tallies progress and the summary

Before any actor starts the driver checks the inputs and fits the pool (cluster/plan.py),
takes the output's lease (one run at a time), and compares what is already finished with
what it asks. A rerun regenerates exactly the ids without a row; every reader keeps one
row per id (pipeline/catalog.py), and at its end the run prunes superseded rows, so the
fragments hold one row per id too.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..pipeline.catalog import prune_superseded
from ..pipeline.config import JobConfig
from ..pipeline.environment import git_commit, host, software_versions
from ..pipeline.lease import OutputLease
from ..pipeline.outputs import new_run_id
from ..pipeline.report import mean_engine_batch, speed_figures
from ..pipeline.schema import StageTimings
from ..pipeline.storage import RUNS, Storage
from .plan import JobPlan, check_inputs, plan_resume, rejects_only, served_engine
from .runtime import ResourceError, engine_resources, init_ray
from .stages import EngineWorker, ServeEngineClient, prepare_batch, write_batch

PROGRESS_EVERY_S = 5.0


@dataclass
class JobSummary:
    """What one run of a job did (also its record under runs/)."""

    run_id: str
    manifest: str
    output: str
    model: str
    manifest_rows: int = 0
    generated: int = 0
    skipped_done: int = 0
    regenerated: int = 0  # finished ids made again (--overwrite)
    errors: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    started_at: str = ""
    ended_at: str = ""
    wall_s: float = 0.0
    startup_s: float | None = None
    steady_images_per_s: float | None = None
    end_to_end_images_per_s: float | None = None
    mean_engine_batch: float | None = None
    stage_s: dict[str, float] = field(default_factory=dict)
    engine_actors: int = 0  # distinct engine actors (or replicas) that made this run's images
    # [seconds since start, engine actors that delivered images in the 10 s before]
    engine_actors_over_time: list[list[float]] = field(default_factory=list)
    superseded_rows_pruned: dict[str, int] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def run_job(
    manifest: str,
    output: str,
    config: JobConfig | None = None,
    *,
    address: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    overwrite: bool = False,
    limit: int | None = None,
    command: list[str] | None = None,
    on_notice: Any = None,
) -> JobSummary:
    """Run a job to the end and return its summary (also written to `<output>/runs/`)."""
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.perf_counter()
    say = on_notice or (lambda line: print(f"daguerre: {line}", file=sys.stderr, flush=True))

    # 1. Check the inputs before anything starts: manifest, model, backend, pool, output.
    #    (--via-serve: first the cluster and its Serve app, before any row is read.)
    config = config or JobConfig()
    served = served_engine(config, address, verbose)
    plan = check_inputs(manifest, config, local=address is None, served=served)
    storage = Storage(output, plan.config.storage)
    storage.check_writable()
    summary = JobSummary(
        run_id=new_run_id(started), manifest=manifest, output=storage.url(""),
        model=plan.model.name, manifest_rows=plan.manifest.rows, started_at=started.isoformat(),
    )  # fmt: skip
    lease = OutputLease(storage, summary.run_id)
    lease.acquire()
    try:
        # 2. Resume: what is finished, and was it made as this run asks?
        plan_resume(plan, storage, overwrite)
        if lease.took_over and lease.took_over != "released":
            plan.notices.append(
                f"took over the output lease of a run that is gone ({lease.took_over})"
            )
        for line in plan.notices:
            say(line)
        summary.notices = plan.notices
        summary.skipped_done = len(plan.skip_ids)
        summary.regenerated = len(plan.redo_ids)
        todo = plan.manifest.rows - summary.skipped_done
        if limit is not None:
            todo = min(todo, limit)
        written: list[float] = []
        rejects = rejects_only(plan) if todo > 0 and limit is None else None
        if rejects is not None:  # nothing to generate: record the bad rows, no Ray
            _record_rejects(rejects, storage, summary)
            todo = 0
        if todo > 0:
            # 3. The Ray Data pipeline, driven with progress.
            batches = _run_pipeline(plan, storage, summary, address, verbose, limit)
            written = _tally(summary, batches, todo, progress, lease, t_start)
        # 4. One row per id in the fragments too; the run's record.
        summary.superseded_rows_pruned = prune_superseded(storage)
    finally:
        lease.release()
    ended = dt.datetime.now(dt.timezone.utc)
    summary.ended_at = ended.isoformat()
    summary.wall_s = time.perf_counter() - t_start
    _finish_figures(summary, written, started, ended)
    write_run_record(storage, summary, plan, command)
    return summary


def _run_pipeline(
    plan: JobPlan, storage: Storage, summary: JobSummary, address: str | None, verbose: bool,
    limit: int | None,
) -> Any:  # fmt: skip
    """Build and start the Ray Data pipeline; return its iterator of summary batches."""
    import pyarrow as pa
    import ray
    from ray.data import DataContext

    import daguerre

    config = plan.config
    init_ray(address, verbose=verbose)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.wait_for_min_actors_s = config.wait_for_min_actors_s
    if not verbose:  # daguerre's own progress lines say how the job goes
        ctx.issue_detectors_config.detectors = []
    uri = _manifest_uri(plan, storage, summary.run_id)
    manifest_storage = Storage(uri, config.storage)
    ds = ray.data.read_parquet(uri, filesystem=None if manifest_storage.is_local else
                               manifest_storage.fs)  # fmt: skip
    if limit is not None:
        ds = ds.limit(limit)
    strings = lambda ids: ray.put(pa.array(sorted(ids), type=pa.string()))  # noqa: E731
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={
            "skip_ids": strings(plan.skip_ids),
            "duplicate_ids": strings(plan.manifest.duplicate_ids),
            "limits": config.limits.model_dump(),
            "model_names": [config.engine.model, plan.model.name, plan.model.spec],
            "default_side": plan.model.default_size,
        },
        batch_format="pyarrow",
        num_cpus=config.writer_num_cpus,
    )
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = _engine_stage(ds, plan, address)
    ds = ds.map_batches(
        write_batch,
        fn_kwargs={"output": storage, "run_id": summary.run_id, "version": daguerre.__version__},
        batch_format="pyarrow",
        num_cpus=config.writer_num_cpus,
    )
    return ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _record_rejects(rejects: list, storage: Storage, summary: JobSummary) -> None:
    from ..pipeline.outputs import write_errors
    from ..pipeline.schema import ErrorRecord
    from .stages import error_columns, row_json

    now = dt.datetime.now(dt.timezone.utc)
    records = []
    for row, errors in rejects:
        field_name, reason = error_columns(errors)
        records.append(ErrorRecord(
            id="" if row.get("id") is None else str(row["id"]), stage="validate",
            field=field_name, reason=reason, row=row_json(row), run_id=summary.run_id,
            created_at=now,
        ))  # fmt: skip
    write_errors(records, storage, summary.run_id)
    summary.errors = len(records)
    summary.errors_by_stage = {"validate": len(records)} if records else {}


def _engine_stage(ds: Any, plan: JobPlan, address: str | None) -> Any:
    """The engine stage: a dedicated, autoscaled actor pool, or (--via-serve) light actors
    sending batches to the Serve app's replicas, a few calls in flight per replica."""
    import ray
    from ray.data import ActorPoolStrategy

    config = plan.config
    common = {"batch_size": config.batch_size, "batch_format": "pyarrow"}
    if plan.served is not None:
        # A fixed set of callers, each with one call in flight: the load the app's
        # autoscaler sees (and scales on) is the job's, up to this many calls.
        calls = config.serve_calls_per_replica * plan.served.description["max_replicas"]
        return ds.map_batches(
            ServeEngineClient,
            fn_constructor_kwargs={"app": plan.served.app, "deployment": plan.served.deployment},
            compute=ActorPoolStrategy(size=calls), num_cpus=0.05, **common,
        )  # fmt: skip
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if address is not None:
        _check_cluster(config, cluster_gpus)
    resources = engine_resources(config.engine, cluster_gpus, num_gpus=config.actor_num_gpus,
                                 num_cpus=config.actor_num_cpus)  # fmt: skip
    if resources["num_gpus"] == 0:
        resources.pop("num_gpus")
    return ds.map_batches(
        EngineWorker,
        fn_constructor_kwargs={"engine_config": config.engine.model_dump(mode="json"),
                               "storage_config": config.storage},  # fmt: skip
        compute=ActorPoolStrategy(min_size=config.min_actors, max_size=config.max_actors),
        **resources, **common,
    )  # fmt: skip


def _manifest_uri(plan: JobPlan, storage: Storage, run_id: str) -> str:
    """Where Ray Data reads the manifest: where it lies, or (a parsed CSV / JSON Lines file)
    as Parquet under the output's `_manifest/`, which every node can reach."""
    if plan.manifest.table is None:
        return plan.manifest.uri
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(plan.manifest.table, buf)
    key = f"_manifest/{run_id}.parquet"
    return storage.write_bytes(key, buf.getvalue())


def _check_cluster(config: JobConfig, cluster_gpus: float) -> None:
    """On an existing CPU cluster, refuse a pool that would leave no CPU for reads and writes."""
    import ray

    from .runtime import uses_gpu

    if uses_gpu(config.engine, cluster_gpus):
        return  # GPU pools may wait for the cluster's autoscaler to add GPU nodes
    cpus = ray.cluster_resources().get("CPU", 0)
    taken = config.max_actors * config.actor_num_cpus
    if cpus - taken < config.writer_num_cpus:
        raise ResourceError(
            f"max_actors x actor_num_cpus = {taken:g} of the cluster's {cpus:g} CPUs leaves none "
            f"for reading and writing (needs {config.writer_num_cpus:g}); lower --actors or "
            "actor_num_cpus"
        )


def _tally(summary: JobSummary, batches: Any, todo: int, progress: bool,
           lease: OutputLease, t_start: float) -> list[float]:  # fmt: skip
    """Drive the pipeline, counting images and errors, sampling the engine actors at work
    and printing a progress line every few seconds; return when each image was written."""
    from ..pipeline.lease import LeaseLost

    stage_s = dict.fromkeys(StageTimings.model_fields, 0.0)
    written, sizes, last_seen = [], [], {}
    shown = float("-inf")  # the first batch gets a line at once: start-up is over
    for batch in batches:
        if lease.lost.is_set():
            raise LeaseLost(f"{summary.output}: {lease.lost_reason}; this run stops")
        for row in batch.to_pylist():
            if row["status"] == "ok":
                summary.generated += 1
                written.append(row["written_at"])
                sizes.append(row["batch_size"])
                last_seen[row["actor_id"]] = time.time()
            else:
                summary.errors += 1
                stage = row["stage"]
                summary.errors_by_stage[stage] = summary.errors_by_stage.get(stage, 0) + 1
            for name in stage_s:
                stage_s[name] += row[name]
        if time.perf_counter() - shown >= PROGRESS_EVERY_S:
            shown = time.perf_counter()
            busy = sum(1 for t in last_seen.values() if time.time() - t <= 2 * PROGRESS_EVERY_S)
            summary.engine_actors_over_time.append([round(shown - t_start, 1), busy])
            if progress:
                print(progress_line(summary, todo, written, busy), file=sys.stderr, flush=True)
    summary.stage_s = stage_s
    summary.engine_actors = len(last_seen)
    summary.mean_engine_batch = mean_engine_batch(sizes)
    return written


def progress_line(summary: JobSummary, todo: int, written: list[float], actors: int = 0) -> str:
    """`daguerre: 122/1000 rows done (120 images, 2 errors), 3.20 images/s, ETA 4m35s, 2 engine actors`"""
    done = summary.generated + summary.errors
    rate = None
    if len(written) > 1 and max(written) > min(written):
        rate = sum(1 for t in written if t > min(written)) / (max(written) - min(written))
    text = (f"daguerre: {done}/{todo} rows done ({summary.generated} images, "
            f"{summary.errors} errors)")  # fmt: skip
    if rate:
        eta = max(todo - done, 0) / rate
        text += f", {rate:.2f} images/s, ETA {int(eta // 60)}m{int(eta % 60):02d}s"
    if actors:
        text += f", {actors} engine actor{'s' if actors > 1 else ''}"
    return text


def _finish_figures(summary: JobSummary, written: list[float], started: dt.datetime,
                    ended: dt.datetime) -> None:  # fmt: skip
    stamps = [dt.datetime.fromtimestamp(t, dt.timezone.utc) for t in written]
    figures = speed_figures(stamps, started, ended)
    summary.startup_s = figures["startup_s"]
    summary.steady_images_per_s = figures["steady_images_per_s"]
    summary.end_to_end_images_per_s = figures["end_to_end_images_per_s"]


def write_run_record(storage: Storage, summary: JobSummary, plan: JobPlan,
                     command: list[str] | None) -> str:  # fmt: skip
    """runs/<run id>.json: the summary, the resolved config, the command, versions, host."""
    record = json.loads(summary.to_json())
    record.update(
        config=plan.config.model_dump(mode="json"),
        command=command if command is not None else sys.argv,
        versions=software_versions(),
        git_commit=git_commit(),
        host=host(),
    )
    key = f"{RUNS}/{summary.run_id}.json"
    storage.write_bytes(key, json.dumps(record, indent=2, default=str).encode())
    return storage.url(key)
