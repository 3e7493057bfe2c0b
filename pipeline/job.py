"""The batch job: a Parquet manifest streamed through Ray Data into images and metadata.

    read manifest -> validate + skip finished ids (CPU tasks)
      -> repartition to batch-sized blocks, so every actor has work
      -> DiffusionEngine in an autoscaled actor pool (one GPU each, or a CPU share)
      -> PNG encode + write images, metadata and errors (CPU tasks)
      -> the driver tallies a summary

The driver checks the manifest (format, required columns, duplicate ids) and reads the
ids already finished under the output prefix before any actor starts. Every write is
idempotent (deterministic keys, one metadata fragment per batch named by its ids) and
metadata is written after its images, so a retried batch, a lost node or a rerun never
duplicates or loses a row: a rerun regenerates exactly the ids without metadata.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daguerre.pipeline.config import EngineConfig, JobConfig, StorageConfig
from daguerre.pipeline.records import Provenance, encode_png, image_record
from daguerre.pipeline.schema import (
    ErrorRecord,
    FieldError,
    ImageRequest,
    RequestLimits,
    StageTimings,
    error_schema,
    manifest_schema,
    record_schema,
    validate_request,
)
from daguerre.pipeline.storage import ERRORS, METADATA, RUNS, Storage, fragment_key, image_key

MAX_ERROR_ROW_CHARS = 2000


class ManifestError(ValueError):
    """A manifest the job cannot read at all (not Parquet, required columns missing, ...)."""


@dataclass
class ManifestInfo:
    """What the driver learns of a manifest before starting any actor."""

    uri: str
    rows: int
    columns: list[str]
    ids: list[str]
    duplicate_ids: set[str]


@dataclass
class JobSummary:
    """What one run of a job did."""

    manifest: str
    output: str
    model: str
    manifest_rows: int = 0
    generated: int = 0
    skipped_done: int = 0
    errors: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    images_per_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    started_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# -- driver-side checks --------------------------------------------------------------


def inspect_manifest(uri: str, storage_config: StorageConfig | None = None) -> ManifestInfo:
    """Check that `uri` is a readable Parquet manifest with the required columns; read its ids."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    storage = Storage(uri, storage_config)
    if storage.is_local and not storage.fs.exists(storage.root):
        raise ManifestError(f"{uri}: no such file or folder")
    storage.check_readable()  # credentials, bucket, endpoint: one line naming the cause
    try:
        dataset = pads.dataset(
            storage.root, format="parquet", filesystem=storage.fs, ignore_prefixes=[".", "_"]
        )
        if not dataset.files:
            raise ManifestError(f"{uri}: no Parquet files in this folder")
        schema = dataset.schema
    except ManifestError:
        raise
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{uri}: not a Parquet manifest ({first_line(exc)})") from None
    columns = list(schema.names)
    known = manifest_schema().names
    missing = [c for c in ("id", "prompt") if c not in columns]
    if missing:
        raise ManifestError(
            f"{uri}: missing required column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (has: {', '.join(columns) or 'no columns'})"
        )
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise ManifestError(
            f"{uri}: unknown column{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(known: {', '.join(known)}; put free fields in the 'metadata' map column)"
        )
    ids = [
        str(i) if i is not None else ""
        for i in dataset.to_table(columns=["id"]).column("id").to_pylist()
    ]
    seen: set[str] = set()
    duplicates = {i for i in ids if i in seen or seen.add(i)}
    return ManifestInfo(uri=uri, rows=len(ids), columns=columns, ids=ids, duplicate_ids=duplicates)


def check_resources(config: JobConfig, use_gpu: bool) -> None:
    """Refuse an actor pool that would leave no CPU for reads and writes (Ray Data would hang)."""
    import ray

    if use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < config.actor_num_gpus:
            raise RuntimeError(
                f"the cluster has {gpus:g} GPUs; one engine actor needs {config.actor_num_gpus:g}"
            )
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    taken = config.max_actors * config.actor_num_cpus
    if cpus - taken < config.writer_num_cpus:
        raise RuntimeError(
            f"max_actors x actor_num_cpus = {taken:g} of the cluster's {cpus:g} CPUs leaves none for "
            f"reading and writing (needs {config.writer_num_cpus:g}); lower --actors or actor_num_cpus"
        )


# -- stage 1: validate (CPU tasks, pure) ------------------------------------------------

PREPARED_COLUMNS = ("id", "request", "error_field", "error_reason", "row")


def prepare_batch(
    batch: Any, skip_ids: Any, duplicate_ids: Any, limits: dict[str, Any], model_names: list[str]
) -> Any:
    """Drop finished rows; validate the rest. Valid rows carry their request as JSON,
    invalid ones their first error (the errors table gets one row per invalid request)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    # Big id sets travel once through the object store; Ray Data does not resolve refs in fn_kwargs.
    skip_ids, duplicate_ids = ray.get([skip_ids, duplicate_ids])
    if batch.schema.field("id").type != pa.string():
        batch = batch.set_column(
            batch.schema.get_field_index("id"), "id", pc.cast(batch.column("id"), pa.string())
        )
    if len(skip_ids):
        batch = batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=skip_ids)))
    limits_model = RequestLimits(**limits)
    duplicates = set(duplicate_ids.to_pylist()) if len(duplicate_ids) else set()
    out: dict[str, list[Any]] = {c: [] for c in PREPARED_COLUMNS}
    for row in batch.to_pylist():
        result = validate_request(row, limits_model)
        errors = result if isinstance(result, list) else []
        if not errors and result.id in duplicates:
            errors = [
                FieldError(
                    field="id",
                    reason=f"{result.id!r} appears more than once in the manifest; ids must be unique",
                )
            ]
        if not errors and result.model is not None and result.model not in model_names:
            errors = [
                FieldError(
                    field="model",
                    reason=f"{result.model!r} is not served by this job (it runs {model_names[0]!r})",
                )
            ]
        out["id"].append("" if row.get("id") is None else str(row["id"]))
        if errors:
            out["request"].append(None)
            out["error_field"].append(errors[0].field)
            out["error_reason"].append(
                "; ".join(f"{e.field}: {e.reason}" for e in errors)
                if len(errors) > 1
                else errors[0].reason
            )
            out["row"].append(json.dumps(row, default=str)[:MAX_ERROR_ROW_CHARS])
        else:
            out["request"].append(result.model_dump_json())
            out["error_field"].append(None)
            out["error_reason"].append(None)
            out["row"].append(None)
    return pa.table({c: pa.array(v, type=pa.string()) for c, v in out.items()})


# -- stage 2: the engine (actor pool) -----------------------------------------------------


class EngineWorker:
    """A Ray Data actor holding one DiffusionEngine; turns request rows into raw images."""

    def __init__(self, engine_config: dict[str, Any], storage_config: StorageConfig | None = None):
        import ray
        from daguerre.pipeline.engine import EngineThread

        # The engine runs on a thread of its own (see EngineThread), where it also sets its
        # thread count (Ray caps OMP_NUM_THREADS at the actor's CPU share).
        self._engine_thread = EngineThread(EngineConfig(**engine_config), storage_config)
        self.engine = self._engine_thread.engine
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.actor_id = context.get_actor_id() or ""

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        requests = [
            ImageRequest.model_validate_json(r["request"]) for r in rows if r["request"] is not None
        ]
        images, failures = {}, {}
        for request, result in zip(
            requests, self._engine_thread.generate_each(requests), strict=True
        ):
            if isinstance(result, Exception):  # recorded in the errors table; the job goes on
                failures[request.id] = f"{type(result).__name__}: {first_line(result)}"
            else:
                images[request.id] = result
        out: dict[str, list[Any]] = {c: [] for c in ENGINE_COLUMNS}
        for r in rows:
            generated = images.get(r["id"]) if r["request"] is not None else None
            out["id"].append(r["id"])
            out["request"].append(r["request"])
            out["row"].append(r["row"])
            if generated is None:
                failed = r["request"] is not None
                out["error_stage"].append("generate" if failed else "validate")
                out["error_field"].append("engine" if failed else r["error_field"])
                out["error_reason"].append(
                    failures.get(r["id"], "not generated") if failed else r["error_reason"]
                )
                for c in (
                    "image",
                    "width",
                    "height",
                    "seed",
                    "batch_size",
                    "scheduler_config",
                    "timings",
                ):
                    out[c].append(None)
            else:
                out["error_stage"].append(None)
                out["error_field"].append(None)
                out["error_reason"].append(None)
                out["image"].append(generated.image.tobytes())
                out["width"].append(generated.width)
                out["height"].append(generated.height)
                out["seed"].append(generated.seed)
                out["batch_size"].append(generated.batch_size)
                out["scheduler_config"].append(generated.scheduler_config)
                out["timings"].append(generated.timings.model_dump_json())
        table = pa.table(
            {
                c: pa.array(v, type=t)
                for (c, t), v in zip(_engine_types().items(), out.values(), strict=True)
            }
        )
        provenance = {
            "model": self.engine.model.name,
            "weights_hash": self.engine.model.weights_hash,
            "backend": json.dumps(self.engine.backend),
            "node_id": self.node_id,
            "actor_id": self.actor_id,
        }
        for name, value in provenance.items():
            table = table.append_column(name, pa.array([value] * len(table), type=pa.string()))
        return table


ENGINE_COLUMNS = (
    "id", "request", "row", "error_stage", "error_field", "error_reason",
    "image", "width", "height", "seed", "batch_size", "scheduler_config", "timings",
)  # fmt: skip


def _engine_types() -> dict[str, Any]:
    import pyarrow as pa

    types = {c: pa.string() for c in ENGINE_COLUMNS}
    types.update(
        image=pa.binary(),
        width=pa.int64(),
        height=pa.int64(),
        seed=pa.int64(),
        batch_size=pa.int64(),
    )
    return types


# -- stage 3: encode and write (CPU tasks) ------------------------------------------------

SUMMARY_COLUMNS = ("id", "status", "stage", *StageTimings.model_fields)


def write_batch(batch: Any, output: Storage, version: str) -> Any:
    """Encode PNGs and write images, then their metadata fragment, then errors; return one
    summary row per input row. Images go first: metadata is the proof an image is finished."""
    import numpy as np
    import pyarrow as pa

    now = dt.datetime.now(dt.timezone.utc)
    records, errors, summary = [], [], {c: [] for c in SUMMARY_COLUMNS}
    for row in batch.to_pylist():
        timings = StageTimings()
        if row["error_stage"] is None:
            request = ImageRequest.model_validate_json(row["request"])
            t0 = time.perf_counter()
            pixels = np.frombuffer(row["image"], dtype=np.uint8).reshape(
                row["height"], row["width"], 3
            )
            data = encode_png(pixels)
            t1 = time.perf_counter()
            uri = output.write_bytes(image_key(request.id), data)
            t2 = time.perf_counter()
            timings = StageTimings.model_validate_json(row["timings"])
            timings.encode_png_s, timings.write_s = t1 - t0, t2 - t1
            provenance = Provenance(
                model=row["model"],
                weights_hash=row["weights_hash"],
                backend=json.loads(row["backend"]),
                node_id=row["node_id"],
                actor_id=row["actor_id"],
            )
            records.append(
                image_record(
                    request,
                    png=data,
                    uri=uri,
                    seed=row["seed"],
                    width=row["width"],
                    height=row["height"],
                    batch_size=row["batch_size"],
                    scheduler_config=row["scheduler_config"],
                    timings=timings,
                    provenance=provenance,
                    version=version,
                    created_at=now,
                ).model_dump()
            )
        else:
            errors.append(
                ErrorRecord(
                    id=row["id"],
                    stage=row["error_stage"],
                    field=row["error_field"],
                    reason=row["error_reason"],
                    row=row["row"] or (row["request"] or "")[:MAX_ERROR_ROW_CHARS],
                    created_at=now,
                ).model_dump()
            )
        summary["id"].append(row["id"])
        summary["status"].append("ok" if row["error_stage"] is None else "error")
        summary["stage"].append(row["error_stage"])
        for name, value in timings.model_dump().items():
            summary[name].append(value)
    if records:
        output.write_table(
            fragment_key(METADATA, [r["id"] for r in records]),
            pa.Table.from_pylist(records, schema=record_schema()),
        )
    if errors:
        names = [f"{e['id']}\t{e['stage']}\t{e['field']}\t{e['reason']}" for e in errors]
        output.write_table(
            fragment_key(ERRORS, names), pa.Table.from_pylist(errors, schema=error_schema())
        )
    return pa.table(summary)


# -- the job ------------------------------------------------------------------------------


def run_job(
    manifest: str,
    output: str,
    config: JobConfig | None = None,
    address: str | None = None,
    progress: bool = True,
) -> JobSummary:
    """Run a job to the end and return its summary (also written to `<output>/runs/`)."""
    import pyarrow as pa
    from daguerre.pipeline.models import describe_model

    import daguerre

    config = config or JobConfig()
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.perf_counter()

    # 1. Check the inputs before anything starts: manifest, model, output prefix.
    info = inspect_manifest(manifest, config.storage)
    engine_config = config.engine.model_copy()
    if Path(engine_config.model).is_dir():  # actors resolve paths on their own nodes
        engine_config.model = str(Path(engine_config.model).resolve())
    describe_model(engine_config.model, config.storage)
    storage = Storage(output, config.storage)
    storage.check_writable()
    summary = JobSummary(
        manifest=manifest,
        output=storage.url(""),
        model=engine_config.model,
        manifest_rows=info.rows,
        started_at=started.isoformat(),
    )

    # 2. Resume: ids with metadata are finished.
    finished = storage.read_ids(METADATA) & set(info.ids)
    summary.skipped_done = sum(1 for i in info.ids if i in finished)
    if summary.skipped_done == info.rows:
        summary.wall_s = time.perf_counter() - t_start
        _write_run(storage, summary, started)
        return summary

    # 3. The Ray Data pipeline.
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if not ray.is_initialized():
        local = {"_node_ip_address": "127.0.0.1"} if address is None else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.wait_for_min_actors_s = config.wait_for_min_actors_s
    device = engine_config.device
    use_gpu = device.startswith("cuda") or (
        device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
    )
    check_resources(config, use_gpu)
    actor_resources = (
        {"num_gpus": config.actor_num_gpus} if use_gpu else {"num_cpus": config.actor_num_cpus}
    )
    model_names = [engine_config.model, Path(engine_config.model).name]

    ds = ray.data.read_parquet(manifest, filesystem=storage_fs_for(manifest, config.storage))
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={
            "skip_ids": ray.put(pa.array(sorted(finished), type=pa.string())),
            "duplicate_ids": ray.put(pa.array(sorted(info.duplicate_ids), type=pa.string())),
            "limits": config.limits.model_dump(),
            "model_names": model_names,
        },
        batch_format="pyarrow",
        num_cpus=config.writer_num_cpus,
    )
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(
        EngineWorker,
        fn_constructor_kwargs={
            "engine_config": engine_config.model_dump(),
            "storage_config": config.storage,
        },
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=config.min_actors, max_size=config.max_actors),
        **actor_resources,
    )
    ds = ds.map_batches(
        write_batch,
        fn_kwargs={"output": storage, "version": daguerre.__version__},
        batch_format="pyarrow",
        num_cpus=config.writer_num_cpus,
    )

    # 4. Drive it, tallying the summary.
    stage_s = dict.fromkeys(StageTimings.model_fields, 0.0)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            if row["status"] == "ok":
                summary.generated += 1
            else:
                summary.errors += 1
                summary.errors_by_stage[row["stage"]] = (
                    summary.errors_by_stage.get(row["stage"], 0) + 1
                )
            for name in stage_s:
                stage_s[name] += row[name]
    summary.wall_s = time.perf_counter() - t_start
    summary.images_per_s = summary.generated / summary.wall_s if summary.wall_s else 0.0
    summary.stage_s = stage_s
    _write_run(storage, summary, started)
    return summary


def storage_fs_for(uri: str, storage_config: StorageConfig | None = None) -> Any:
    """The filesystem for a URI, for Ray Data (None lets Ray infer local paths)."""
    storage = Storage(uri, storage_config)
    return None if storage.is_local else storage.fs


def _write_run(storage: Storage, summary: JobSummary, started: dt.datetime) -> None:
    key = f"{RUNS}/{started.strftime('%Y%m%dT%H%M%S.%fZ')}.json"
    storage.write_bytes(key, summary.to_json().encode())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
