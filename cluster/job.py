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

import collections
import contextlib
import datetime as dt
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..pipeline.catalog import prune_superseded
from ..pipeline.config import JobConfig
from ..pipeline.environment import git_commit, host, software_versions
from ..pipeline.files import OutputLayout, WriteOptions
from ..pipeline.formats import EXTENSIONS
from ..pipeline.image_reads import FAMILY_MULTIPLE
from ..pipeline.lease import OutputLease
from ..pipeline.outputs import cache_view, new_run_id
from ..pipeline.report import mean_engine_batch_counts, speed_figures_s
from ..pipeline.schema import StageTimings
from ..pipeline.semantic_cache import semantic_index
from ..pipeline.storage import METADATA, RUNS, Storage, StorageError, transient_errors
from .image_stage import manifest_base, read_images
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
    generated: int = 0  # images written, result-cache hits included
    cache_hits: int = 0  # of those, read from the result cache (cache:) instead of made
    image_extension: str = "png"  # of the master files (encoding.format)
    skipped_done: int = 0
    regenerated: int = 0  # finished ids made again (--overwrite)
    errors: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    started_at: str = ""
    ended_at: str = ""
    wall_s: float = 0.0
    planning_s: float | None = None  # duplicates, finished ids, resume checks
    driver_peak_rss_mib: float | None = None  # this driver process's peak memory
    startup_s: float | None = None
    steady_images_per_s: float | None = None
    end_to_end_images_per_s: float | None = None
    mean_engine_batch: float | None = None
    stage_s: dict[str, float] = field(default_factory=dict)
    engine_actors: int = 0  # distinct engine actors (or replicas) that made this run's images
    # [seconds since start, engine actors that delivered images in the 10 s before]
    engine_actors_over_time: list[list[float]] = field(default_factory=list)
    superseded_rows_pruned: dict[str, int] = field(default_factory=dict)
    compacted: dict[str, Any] = field(default_factory=dict)  # fragments merged at the end
    status: str = "running"  # until the run ends (runs/<id>.json is rewritten as it goes)
    progress: dict[str, Any] = field(default_factory=dict)  # rows done/total, images/s, ETA
    engine_busy_fraction: dict[str, float] = field(default_factory=dict)  # per engine actor
    engine_busy_fraction_mean: float | None = None  # all actors' busy time over their spans
    gpu_seconds_per_image: float | None = None  # engine actors' time per image x their GPUs
    cost_per_1000_images: float | None = None  # at cost.gpu_hour_usd (None without a price)
    cost: dict[str, Any] = field(default_factory=dict)  # the price it used
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
        image_extension=EXTENSIONS[config.encoding.format],
    )  # fmt: skip
    lease = OutputLease(storage, summary.run_id)
    lease.acquire()
    try:
        # 2. Resume: what is finished, and was it made as this run asks?
        t_plan = time.perf_counter()
        plan_resume(plan, storage, overwrite, address=address, verbose=verbose)
        summary.planning_s = round(time.perf_counter() - t_plan, 3)
        if lease.took_over and lease.took_over != "released":
            plan.notices.append(
                f"took over the output lease of a run that is gone ({lease.took_over})"
            )
        for line in plan.notices:
            say(line)
        summary.notices = plan.notices
        summary.skipped_done = plan.ids.skipped
        summary.regenerated = plan.ids.redone
        todo = plan.manifest.rows - summary.skipped_done
        if limit is not None:
            todo = min(todo, limit)
        tally: Tally | None = None
        rejects = rejects_only(plan) if todo > 0 and limit is None else None
        if rejects is not None:  # nothing to generate: record the bad rows, no Ray
            _record_rejects(rejects, storage, summary)
            todo = 0
        if todo > 0:
            # 3. The Ray Data pipeline, driven with progress.
            batches = _run_pipeline(plan, storage, summary, address, verbose, limit)

            def record() -> None:  # the live record: best effort, the run goes on without it
                with contextlib.suppress(OSError, TimeoutError, StorageError, *transient_errors()):
                    write_run_record(storage, summary, plan, command)

            tally = _tally(summary, batches, todo, progress, lease, t_start, record)
        # 4. Few large fragments, one row per id in them; the run's record.
        done = finish_output(storage, int(plan.config.compact_target_mb * 2**20),
                             summary.run_id, on_ray=todo > 0)  # fmt: skip
        summary.compacted, summary.superseded_rows_pruned = done["compacted"], done["pruned"]
    finally:
        lease.release()
    ended = dt.datetime.now(dt.timezone.utc)
    summary.ended_at = ended.isoformat()
    summary.wall_s = time.perf_counter() - t_start
    summary.status = "finished"
    summary.driver_peak_rss_mib = _peak_rss_mib()
    _finish_figures(summary, tally, started, ended, plan)
    write_run_record(storage, summary, plan, command)
    return summary


def finish_output(storage: Storage, target_bytes: int, run_id: str,
                  on_ray: bool = False) -> dict[str, Any]:  # fmt: skip
    """Compact the output's fragments, then prune superseded rows from what is left (few
    files by then), while `run_id` holds the output's lease. With `on_ray`, in a Ray task:
    the driver's memory stays the same whatever the output's size."""
    from ..pipeline.compaction import compact_output
    from ..pipeline.lease import check_lease

    def finish() -> dict[str, Any]:
        compacted = compact_output(storage, target_bytes, lambda: check_lease(storage, run_id))
        pruned = prune_superseded(storage)  # superseded rows removed, by either
        pruned[METADATA] += compacted[METADATA]["rows_in"] - compacted[METADATA]["rows_out"]
        return {"compacted": compacted, "pruned": pruned}

    if not on_ray:
        return finish()
    import ray

    return ray.get(ray.remote(num_cpus=0.25)(finish).remote())


def _run_pipeline(
    plan: JobPlan, storage: Storage, summary: JobSummary, address: str | None, verbose: bool,
    limit: int | None,
) -> Any:  # fmt: skip
    """Build and start the Ray Data pipeline; return its iterator of summary batches."""
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
    layout = OutputLayout(config.output_format, config.key_prefix)
    options = WriteOptions.of(config, storage.url(""), layout)
    uri = _manifest_uri(plan, storage, summary.run_id)
    manifest_storage = Storage(uri, config.storage)
    ds = ray.data.read_parquet(uri, filesystem=None if manifest_storage.is_local else
                               manifest_storage.fs)  # fmt: skip
    as_ref = lambda index: index if isinstance(index, ray.ObjectRef) else ray.put(index)  # noqa: E731
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={
            "skip": as_ref(plan.ids.skip),
            "duplicates": as_ref(plan.ids.duplicates),
            "limits": config.limits.model_dump(),
            "model_names": [config.engine.model, plan.model.name, plan.model.spec],
            "default_side": plan.model.default_size,
            "rules": config.rules.model_dump(),
            "cache": cache_view(options, plan.model.weights_hash(), config.engine),
            "composite": config.composite.model_dump() if config.composite.enabled else None,
        },  # fmt: skip
        batch_format="pyarrow",
        num_cpus=config.writer_num_cpus,
    )
    if limit is not None:  # --limit counts rows still to do, not finished ones
        ds = ds.limit(limit)
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(  # init images read ahead of the engine, a batch per task
        read_images,
        fn_kwargs={
            "base": manifest_base(plan.manifest.uri, config.storage),
            "storage_config": config.storage,
            "limits": config.limits.model_dump(),
            "default_side": plan.model.default_size,
            "multiple": FAMILY_MULTIPLE[plan.model.family],
        },  # fmt: skip
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_cpus=config.writer_num_cpus,
    )
    ds = _engine_stage(ds, plan, address, options)
    shards = {}
    if config.output_format == "webdataset":  # one shard per write batch of shard_images
        ds = ds.repartition(target_num_rows_per_block=config.shard_images)
        shards = {"batch_size": config.shard_images}
    ds = ds.map_batches(
        write_batch,
        fn_kwargs={
            "output": storage,
            "run_id": summary.run_id,
            "version": daguerre.__version__,
            "options": options,
        },  # fmt: skip
        batch_format="pyarrow",
        num_cpus=config.writer_num_cpus,
        **shards,
    )
    return ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _record_rejects(rejects: list, storage: Storage, summary: JobSummary) -> None:
    from ..pipeline.outputs import write_errors
    from ..pipeline.schema import ErrorRecord
    from .stages import error_columns, row_json

    now = dt.datetime.now(dt.timezone.utc)
    from ..pipeline.rules import error_stage

    records = []
    for row, errors in rejects:
        field_name, reason = error_columns(errors)
        records.append(ErrorRecord(
            id="" if row.get("id") is None else str(row["id"]), stage=error_stage(errors),
            field=field_name, reason=reason, row=row_json(row), run_id=summary.run_id,
            created_at=now,
        ))  # fmt: skip
    write_errors(records, storage, summary.run_id)
    summary.errors = len(records)
    summary.errors_by_stage = dict(collections.Counter(r.stage for r in records))


def _engine_stage(ds: Any, plan: JobPlan, address: str | None, options: WriteOptions) -> Any:
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
                               "storage_config": config.storage, "quality": config.quality,
                               "semantic": semantic_index(options.cache, config.cache)},  # fmt: skip
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


class Tally:
    """What the driver keeps of a running job: counts and per-actor figures, never a row
    per image (a 10M-row job's tally is a few arrays of floats)."""

    def __init__(self) -> None:
        import array
        import collections

        self.written = array.array("d")  # when each image was written (Unix seconds)
        self.first_written, self.last_written, self.at_first = float("inf"), 0.0, 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.last_seen: dict[str, float] = {}  # engine actor -> when it last delivered
        self.busy: dict[str, list[float]] = {}  # engine actor -> [busy_s, since, until]

    def add_written(self, at: float) -> None:
        self.written.append(at)
        if at < self.first_written:
            self.first_written, self.at_first = at, 1
        elif at == self.first_written:
            self.at_first += 1
        self.last_written = max(self.last_written, at)

    def rate(self) -> float | None:
        """Images/s since the first image was written (start-up left out), as
        speed_figures_s's steady figure, kept as the images come."""
        span = self.last_written - self.first_written
        return (len(self.written) - self.at_first) / span if span > 0 else None

    def add_busy(self, actor: str | None, busy_s: float | None, since: float | None,
                 until: float | None) -> None:  # fmt: skip
        if not actor or busy_s is None or since is None or until is None:
            return
        seen = self.busy.setdefault(actor, [0.0, since, until])
        seen[0], seen[1], seen[2] = max(seen[0], busy_s), min(seen[1], since), max(seen[2], until)

    def busy_fractions(self) -> dict[str, float]:
        """Per engine actor: the fraction of its wall time (first call to last) inside generate."""
        return {a: round(b / (u - s), 4) for a, (b, s, u) in self.busy.items() if u > s}

    def engine_seconds(self) -> float:
        return sum(u - s for _, s, u in self.busy.values())


def _tally(summary: JobSummary, batches: Any, todo: int, progress: bool,
           lease: OutputLease, t_start: float, on_progress: Any = None) -> Tally:  # fmt: skip
    """Drive the pipeline, counting images and errors, sampling the engine actors at work
    and printing a progress line every few seconds (and calling `on_progress`)."""
    from ..pipeline.lease import LeaseLost

    stage_s = dict.fromkeys(StageTimings.model_fields, 0.0)
    tally = Tally()
    shown = float("-inf")  # the first batch gets a line at once: start-up is over
    for batch in batches:
        if lease.lost.is_set():
            raise LeaseLost(f"{summary.output}: {lease.lost_reason}; this run stops")
        for row in batch.to_pylist():
            if row["status"] == "cached":  # read from the result cache: no engine involved
                summary.generated += 1
                summary.cache_hits += 1
                tally.add_written(row["written_at"])
            elif row["status"] == "ok":
                summary.generated += 1
                tally.add_written(row["written_at"])
                tally.batch_sizes[row["batch_size"]] += 1
                tally.last_seen[row["actor_id"]] = time.time()
                tally.add_busy(row["actor_id"], row["engine_busy_s"], row["engine_since"],
                               row["engine_until"])  # fmt: skip
            else:
                summary.errors += 1
                stage = row["stage"]
                summary.errors_by_stage[stage] = summary.errors_by_stage.get(stage, 0) + 1
            for name in stage_s:
                stage_s[name] += row[name]
        if time.perf_counter() - shown >= PROGRESS_EVERY_S:
            shown = time.perf_counter()
            now = time.time()
            busy = sum(1 for t in tally.last_seen.values() if now - t <= 2 * PROGRESS_EVERY_S)
            summary.engine_actors_over_time.append([round(shown - t_start, 1), busy])
            _update_progress(summary, todo, tally.rate())
            if progress:
                print(progress_line(summary, todo, tally.rate(), busy), file=sys.stderr,
                      flush=True)  # fmt: skip
            if on_progress is not None:
                on_progress()
    summary.stage_s = stage_s
    summary.engine_actors = len(tally.last_seen)
    summary.mean_engine_batch = mean_engine_batch_counts(tally.batch_sizes)
    _update_progress(summary, todo, tally.rate())
    return tally


def _update_progress(summary: JobSummary, todo: int, rate: float | None) -> None:
    done = summary.generated + summary.errors
    summary.progress = {
        "rows_done": done, "rows_total": todo, "images": summary.generated,
        "errors": summary.errors, "images_per_s": None if rate is None else round(rate, 4),
        "eta_s": None if not rate else round(max(todo - done, 0) / rate, 1),
        "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }  # fmt: skip


def progress_line(summary: JobSummary, todo: int, rate: float | None, actors: int = 0) -> str:
    """`daguerre: 122/1000 rows done (120 images, 2 errors), 3.20 images/s, ETA 4m35s, 2 engine actors`"""
    done = summary.generated + summary.errors
    text = (f"daguerre: {done}/{todo} rows done ({plural(summary.generated, 'image')}, "
            f"{plural(summary.errors, 'error')})")  # fmt: skip
    if rate:
        eta = max(todo - done, 0) / rate
        text += f", {rate:.2f} images/s, ETA {int(eta // 60)}m{int(eta % 60):02d}s"
    if actors:
        text += f", {actors} engine actor{'s' if actors > 1 else ''}"
    return text


def plural(count: int, noun: str) -> str:
    """`1 image`, `2 images`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _finish_figures(summary: JobSummary, tally: Tally | None, started: dt.datetime,
                    ended: dt.datetime, plan: JobPlan) -> None:  # fmt: skip
    written = tally.written if tally is not None else []
    figures = speed_figures_s(written, started.timestamp(), ended.timestamp())
    summary.startup_s = figures["startup_s"]
    summary.steady_images_per_s = figures["steady_images_per_s"]
    summary.end_to_end_images_per_s = figures["end_to_end_images_per_s"]
    if tally is None or not tally.busy:
        return
    fractions = tally.busy_fractions()
    summary.engine_busy_fraction = fractions

    busy_total = sum(b for b, _, _ in tally.busy.values())
    span_total = tally.engine_seconds()
    summary.engine_busy_fraction_mean = round(busy_total / span_total, 4) if span_total else None
    config = plan.config
    summary.cost = {"gpu_hour_price": config.cost.gpu_hour_usd, "currency": config.cost.currency}
    summary.gpu_seconds_per_image, summary.cost_per_1000_images = cost_figures(
        span_total, summary.generated, config
    )


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, which Linux keeps across
    exec, it does not inherit a big parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return None


def cost_figures(engine_seconds: float, images: int,
                 config: JobConfig) -> tuple[float | None, float | None]:  # fmt: skip
    """(GPU-seconds per image, cost per 1,000 images): engine actors' time from their first
    call to their last, times the GPUs each holds (model loading left out); the cost only
    with a price."""
    gpus = config.actor_num_gpus if config.engine.device != "cpu" else 1.0
    if not images:
        return None, None
    per_image = engine_seconds * (gpus or 1.0) / images
    price = config.cost.gpu_hour_usd
    per_1000 = None if price is None else round(per_image * 1000 / 3600 * price, 4)
    return round(per_image, 4), per_1000


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
