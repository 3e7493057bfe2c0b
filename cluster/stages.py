"""The batch job's Ray Data stages, one `map_batches` each:

prepare_batch   CPU tasks: drop finished rows, validate the rest, order rows by bucket
EngineWorker    the engine actor pool: request rows -> raw images (EngineRow)
write_batch     CPU tasks: check the lease, then write images, metadata and errors
                through the one write path (pipeline/outputs.py)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Any

from ..pipeline.composite import CompositeConfig, layer_values, missing_value
from ..pipeline.config import EngineConfig, RequestRefused, StorageConfig, first_line
from ..pipeline.files import PLAIN, Provenance, WriteOptions
from ..pipeline.lease import check_lease
from ..pipeline.outputs import keep_rejected, write_errors, write_outputs
from ..pipeline.quality import QualityConfig, Rejected
from ..pipeline.result_cache import CacheView
from ..pipeline.rules import NO_RULES, LayersRefused, PromptRules, apply_rules, error_stage
from ..pipeline.schema import (
    UPLOAD_PREFIX,
    EngineRow,
    ErrorRecord,
    FieldError,
    GeneratedImage,
    ImageRequest,
    RequestLimits,
    StageTimings,
    bucket_key,
    engine_row_schema,
    request_from_json,
    validate_request,
)
from ..pipeline.semantic_cache import SemanticIndex
from ..pipeline.storage import Storage

MAX_ERROR_ROW_CHARS = 2000
PREPARED_COLUMNS = (
    "id",
    "request",
    "cache_key",
    "error_stage",
    "error_field",
    "error_reason",
    "row",
)

# -- stage 1: validate (CPU tasks, pure) ------------------------------------------------


def prepare_batch(
    batch: Any, skip: Any, duplicates: Any, limits: dict[str, Any], model_names: list[str],
    default_side: int, rules: dict[str, Any] | None = None, cache: CacheView | None = None,
    composite: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """Drop finished rows; validate the rest. Valid rows carry their request as JSON, sorted
    by bucket (size, steps, scheduler, speed) so engine batches share one denoising loop; invalid
    ones carry their first error (the errors table gets one row per invalid request).

    `skip` and `duplicates` are object refs to IdIndexes (cluster/planning.py): mapped from
    the object store without a copy, one searchsorted per block."""
    import ray

    from . import metrics

    started = time.perf_counter()
    # Ray Data does not resolve refs in fn_kwargs.
    skip, duplicates = ray.get([skip, duplicates])
    prepared = prepare_rows(batch, skip, duplicates, limits, model_names, default_side, rules,
                            cache, composite)  # fmt: skip
    metrics.observe_stage("prepare", "job", time.perf_counter() - started)
    return prepared


def prepare_rows(
    batch: Any, skip: Any, duplicates: Any, limits: dict[str, Any], model_names: list[str],
    default_side: int, rules: dict[str, Any] | None = None, cache: CacheView | None = None,
    composite: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """prepare_batch with the indexes at hand (IdIndex each). Rows the result cache holds
    come after the others (their own engine batches, which never call the engine)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..pipeline.id_index import id_digests

    if batch.schema.field("id").type != pa.string():
        batch = batch.set_column(
            batch.schema.get_field_index("id"), "id", pc.cast(batch.column("id"), pa.string())
        )
    digests = id_digests(batch.column("id"))
    if len(skip):
        keep = ~skip.contains(digests)
        batch, digests = batch.filter(pa.array(keep)), digests[keep]
    duplicated = duplicates.contains(digests) if len(duplicates) else np.zeros(len(digests), bool)
    limits_model, rules_model = RequestLimits(**limits), PromptRules(**(rules or {}))
    layers = CompositeConfig(**composite) if composite else None
    valid, invalid = [], []
    for row, duplicate in zip(batch.to_pylist(), duplicated, strict=True):
        result = check_row(row, limits_model, model_names, duplicate=bool(duplicate),
                           rules=rules_model, composite=layers)  # fmt: skip
        if isinstance(result, ImageRequest):
            valid.append((bucket_key(result, default_side), result))
        else:
            invalid.append((row, result))
    hits = cache.hits([r for _, r in valid], default_side) if cache is not None else {}
    out: dict[str, list[Any]] = {c: [] for c in PREPARED_COLUMNS}
    for _, request in sorted(valid, key=lambda item: (item[1].id in hits, item[0])):
        _append(out, id=request.id, request=request.model_dump_json(),
                cache_key=hits.get(request.id))  # fmt: skip
    for row, errors in invalid:
        field, reason = error_columns(errors)
        _append(out, id="" if row.get("id") is None else str(row["id"]),
                error_stage=error_stage(errors), error_field=field, error_reason=reason,
                row=row_json(row))  # fmt: skip
    return pa.table({c: pa.array(v, type=pa.string()) for c, v in out.items()})


def _append(out: dict[str, list[Any]], **values: Any) -> None:
    for column in PREPARED_COLUMNS:
        out[column].append(values.get(column))


def error_columns(errors: list[FieldError]) -> tuple[str, str]:
    """(field, reason) of an errors-table row: the first field; every reason when several."""
    reason = "; ".join(f"{e.field}: {e.reason}" for e in errors)
    return errors[0].field, reason if len(errors) > 1 else errors[0].reason


def row_json(row: dict[str, Any]) -> str:
    """A manifest row as the errors table keeps it (JSON, truncated)."""
    return json.dumps(row, default=str)[:MAX_ERROR_ROW_CHARS]


def check_row(
    row: dict[str, Any],
    limits: RequestLimits,
    model_names: list[str],
    *,
    duplicate: bool,
    rules: PromptRules = NO_RULES,
    composite: CompositeConfig | None = None,
) -> ImageRequest | list[FieldError]:
    """A manifest row's request (the rules' style applied), or every reason it is rejected
    (the field first); `duplicate`: its id appears more than once in the manifest;
    `composite`: the job's layers, whose templates the row must fill."""
    result = validate_request(row, limits)
    if isinstance(result, list):
        return result
    if duplicate:
        return [FieldError(field="id", reason=f"{result.id!r} appears more than once in the "
                           "manifest; ids must be unique")]  # fmt: skip
    for name in ("init_image", "mask_image"):  # content names are the ingress's to give
        if (getattr(result, name) or "").startswith(UPLOAD_PREFIX):
            return [FieldError(field=name, reason=f"{UPLOAD_PREFIX}... names an online upload; "
                               "a manifest names a file: a path, file:// or s3://")]  # fmt: skip
    if result.model is not None and result.model not in model_names:
        return [FieldError(field="model", reason=f"{result.model!r} is not served by this job "
                           f"(it runs {model_names[0]!r})")]  # fmt: skip
    ruled = apply_rules(result, rules)
    if not isinstance(ruled, ImageRequest):
        return [ruled]
    missing = None if composite is None else missing_value(composite, layer_values(ruled))
    if missing is not None:  # found before its image is made
        return [LayersRefused(field=missing.field, reason=missing.reason)]
    return ruled


# -- stage 2: the engine (actor pool) -----------------------------------------------------


class EngineWorker:
    """A Ray Data actor holding one DiffusionEngine; turns request rows into raw images."""

    def __init__(self, engine_config: dict[str, Any], storage_config: StorageConfig | None = None,
                 quality: QualityConfig | None = None, semantic: SemanticIndex | None = None):  # fmt: skip
        import ray

        from ..pipeline.engine_thread import EngineThread

        # The engine runs on a thread of its own (see EngineThread), where it also sets its
        # thread count (Ray caps OMP_NUM_THREADS at the actor's CPU share) and its gate.
        self._engine_thread = EngineThread(EngineConfig(**engine_config), storage_config, quality,
                                           semantic)  # fmt: skip
        engine = self._engine_thread.engine
        context = ray.get_runtime_context()
        self.busy = {"engine_busy_s": 0.0, "engine_since": None, "engine_until": None}
        self.provenance = {
            "model": engine.model.name,
            "weights_hash": engine.model.weights_hash,
            "backend": engine.backend,
            "node_id": context.get_node_id(),
            "actor_id": context.get_actor_id() or "",
        }

    def __call__(self, batch: Any) -> Any:
        from .image_stage import image_inputs

        rows = batch.to_pylist()
        requests = _requests(rows)
        started = time.time()
        results = self._engine_thread.generate_each(requests, image_inputs(rows, requests))
        ended = time.time()
        if requests:  # a batch of rejected rows never reaches the engine
            from . import metrics

            self.busy["engine_busy_s"] += ended - started
            self.busy["engine_since"] = self.busy["engine_since"] or started
            self.busy["engine_until"] = ended
            metrics.observe_stage("generate", "job", ended - started)
            span = max(ended - self.busy["engine_since"], 1e-9)
            metrics.set_busy_fraction("job", self.provenance["actor_id"],
                                      self.busy["engine_busy_s"] / span)  # fmt: skip
        provenance = [made_by(r, self.provenance) for r in results]
        return engine_rows(rows, requests, results, provenance, self.provenance, self.busy)


class ServeEngineClient:
    """A light Ray Data actor that sends each batch of rows to a Serve app's engine
    deployment as one batch-class call (online requests go first in the replicas), waits,
    and turns the answer into EngineRows with the replica's provenance.

    Never fails the job for load: Serve's BackPressureError waits and retries (the job
    slows down instead); a replica that dies mid-batch is retried on another replica
    (writes are idempotent and readers keep one row per id, so nothing is duplicated)."""

    def __init__(self, app: str, deployment: str, max_replica_losses: int = 20):
        from ray import serve

        self.handle = serve.get_deployment_handle(deployment, app_name=app)
        self.max_replica_losses = max_replica_losses
        self.provenance = {"model": "", "weights_hash": "", "backend": {}, "node_id": "",
                           "actor_id": ""}  # fmt: skip

    def __call__(self, batch: Any) -> Any:

        from .image_stage import image_inputs

        rows = batch.to_pylist()
        requests = _requests(rows)
        answers = self._call(requests, image_inputs(rows, requests)) if requests else []
        results, provenance = [], []
        for answer in answers:
            if isinstance(answer, (str, Rejected, RequestRefused)):  # one failed, or was rejected
                results.append(answer)
                provenance.append(self.provenance)
            else:
                results.append(answer.image)
                provenance.append(dataclasses.asdict(answer.provenance))
                self.provenance = provenance[-1]
        return engine_rows(rows, requests, results, provenance, self.provenance)

    def _call(self, requests: list[ImageRequest], images: list[Any]) -> list[Any]:
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        losses = 0
        while True:
            try:
                return self.handle.generate_batch.remote(requests, images).result()
            except BackPressureError as exc:  # the replicas' queues are full: wait, not fail
                time.sleep(exc.retry_after_s or 1.0)
            except (RayActorError, ActorUnavailableError, DeploymentUnavailableError):
                losses += 1  # the replica died or restarts: Serve routes the retry elsewhere
                if losses > self.max_replica_losses:
                    raise
                time.sleep(min(0.5 * 2**losses, 10.0))


def made_by(result: Any, engine: dict[str, Any]) -> dict[str, Any]:
    """The provenance of a result: what made a cache hit's image, else this `engine`."""
    return result.made_by if isinstance(result, GeneratedImage) and result.made_by else engine


def _requests(rows: list[dict[str, Any]]) -> list[ImageRequest]:
    """The requests of rows the engine makes (not invalid ones, not result-cache hits)."""
    return [request_from_json(r["request"]) for r in rows
            if r["request"] and not r.get("cache_key")]  # fmt: skip


def engine_rows(rows: list[dict[str, Any]], requests: list[ImageRequest], results: list[Any],
                provenance: list[dict[str, Any]], fallback: dict[str, Any],
                busy: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """The engine stage's output table: per input row, its raw image (with the provenance of
    whatever made it) or why there is none; `busy`, the actor's busy time so far."""
    import pyarrow as pa

    made = {
        r.id: (result, prov) for r, result, prov in zip(requests, results, provenance, strict=True)
    }
    out = [
        {**_engine_row(row, *made.get(row["id"], (None, fallback))).model_dump(), **(busy or {})}
        for row in rows
    ]
    return pa.Table.from_pylist(out, schema=engine_row_schema())


def _engine_row(row: dict[str, Any], result: Any, provenance: dict[str, Any]) -> EngineRow:
    base = {"id": row["id"], "request": row["request"], "row": row["row"], **provenance}
    if row["request"] is None:
        return EngineRow(**base, error_stage=row["error_stage"] or "validate",
                         error_field=row["error_field"], error_reason=row["error_reason"])  # fmt: skip
    if row.get("cache_key"):  # the write stage reads it from the result cache
        return EngineRow(**base, cache_key=row["cache_key"])
    if isinstance(result, GeneratedImage):
        vector = result.prompt_vector
        return EngineRow(
            **base, pixels=result.image.tobytes(), width=result.width, height=result.height,
            seed=result.seed, batch_size=result.batch_size,
            scheduler_config=result.scheduler_config, timings=result.timings,
            cache_source=result.cache_source, cache_similarity=result.cache_similarity,
            prompt_vector=None if vector is None else vector.tobytes(),
            lora_sha256=result.lora_sha256,
            inputs=None if result.inputs is None else json.dumps(result.inputs),
        )  # fmt: skip
    if isinstance(result, Rejected):  # the quality gate's, after its retries
        last = result.image  # its pixels travel on, for quality.keep_rejected
        pixels = {} if last is None else {"pixels": last.image.tobytes(), "width": last.width,
                                          "height": last.height, "seed": last.seed}  # fmt: skip
        return EngineRow(**base, error_stage="quality", error_field="image",
                         error_reason=str(result), **pixels)  # fmt: skip
    if isinstance(result, str):  # a replica's one-line reason
        reason = result
    elif isinstance(result, RequestRefused):  # the field is its own column
        reason = result.detail
    else:
        reason = f"{type(result).__name__}: {first_line(result)}" if result else "not generated"
    field = getattr(result, "field", None) or "engine"  # e.g. RequestRefused: the request's `lora`
    return EngineRow(**base, error_stage="generate", error_field=field, error_reason=reason)


# -- stage 3: encode and write (CPU tasks) ------------------------------------------------

BUSY_COLUMNS = ("engine_busy_s", "engine_since", "engine_until")
SUMMARY_COLUMNS = ("id", "status", "stage", "written_at", "batch_size", "actor_id",
                   *BUSY_COLUMNS, *StageTimings.model_fields)  # fmt: skip


def write_batch(batch: Any, output: Storage, run_id: str, version: str,
                options: WriteOptions = PLAIN) -> Any:  # fmt: skip
    """Write a batch's images, then their metadata fragment, then its errors, if this run
    still holds the output's lease; return one summary row per input row."""
    import pyarrow as pa

    check_lease(output, run_id)  # a killed driver's orphaned workers stop here
    images, errors = [], []
    now = time.time()
    for row in batch.to_pylist():
        if row["error_stage"] is None and row["cache_key"]:
            found = _cached(row, options, run_id)
            (images if isinstance(found, tuple) else errors).append(found)
            continue
        if row["error_stage"] is None:
            provenance = Provenance(
                model=row["model"], weights_hash=row["weights_hash"],
                backend=dict(row["backend"]), node_id=row["node_id"], actor_id=row["actor_id"],
            )  # fmt: skip
            images.append((_generated(row), provenance))
            continue
        kept = None
        if row["error_stage"] == "quality" and row["pixels"] and options.keep_rejected:
            kept = keep_rejected(_generated(row), output)  # None when it could not be kept
        errors.append(ErrorRecord(
            id=row["id"], stage=row["error_stage"], field=row["error_field"],
            reason=row["error_reason"], run_id=run_id, created_at=_utc(now), uri=kept,
            row=row["row"] or (row["request"] or "")[:MAX_ERROR_ROW_CHARS],
        ))  # fmt: skip
    stored, failed = _write_or_record(images, output, run_id, version, now, options)
    errors += failed
    write_errors(errors, output, run_id)
    _record_metrics(stored, errors, time.time() - now)
    busy = {row["id"]: {c: row[c] for c in BUSY_COLUMNS} for row in batch.to_pylist()}
    summary: dict[str, list[Any]] = {c: [] for c in SUMMARY_COLUMNS}
    for item in stored:
        record = item.record
        status = "cached" if record.cache_hit else "ok"
        _summary_row(summary, record.id, status, None, record.created_at.timestamp(),
                     record.batch_size, record.actor_id, record.timings, busy[record.id])  # fmt: skip
    for error in errors:
        _summary_row(summary, error.id, "error", error.stage, now, None, None, StageTimings(),
                     busy.get(error.id, {}))  # fmt: skip
    return pa.table(summary, schema=summary_schema())


def _cached(row: dict[str, Any], options: WriteOptions, run_id: str) -> tuple | ErrorRecord:
    """(image, provenance) of a result-cache hit, read from its entry; an ErrorRecord when
    the entry is gone since the prepare stage found it (the next run makes the image)."""
    from ..pipeline.result_cache import load

    request = request_from_json(row["request"])
    try:
        generated, made = load(options.cache, row["cache_key"], request)
    except (OSError, KeyError, ValueError, TypeError) as exc:  # gone, or not an entry
        return ErrorRecord(id=row["id"], stage="generate", field="cache",
                           reason=f"the result-cache entry {row['cache_key']} cannot be read "
                           f"({type(exc).__name__}); the next run makes this image",
                           row=row["request"][:MAX_ERROR_ROW_CHARS], run_id=run_id,
                           created_at=_utc(time.time()))  # fmt: skip
    return generated, Provenance(**made["provenance"])


def _generated(row: dict[str, Any]) -> GeneratedImage:
    """The engine's image an engine-stage row carries (pixels, size, how it was made)."""
    import numpy as np

    pixels = np.frombuffer(row["pixels"], dtype=np.uint8)
    vector = row.get("prompt_vector")
    return GeneratedImage(
        request=request_from_json(row["request"]),
        image=pixels.reshape(row["height"], row["width"], 3), seed=row["seed"],
        width=row["width"], height=row["height"], batch_size=row["batch_size"] or 0,
        scheduler_config=row["scheduler_config"] or "{}",
        timings=StageTimings(**(row["timings"] or {})),
        cache_source=row.get("cache_source"), cache_similarity=row.get("cache_similarity"),
        prompt_vector=None if vector is None else np.frombuffer(vector, dtype=np.float16),
        lora_sha256=row.get("lora_sha256"),
        inputs=json.loads(row["inputs"]) if row.get("inputs") else None,
    )  # fmt: skip


def _record_metrics(stored: list[Any], errors: list[ErrorRecord], seconds: float) -> None:
    from . import metrics

    metrics.observe_stage("write", "job", seconds)
    for model, count in collections.Counter(s.record.model for s in stored).items():
        metrics.record_images("job", model, count)
    hits = collections.Counter(s.record.model for s in stored if s.record.cache_hit)
    for model, count in hits.items():
        metrics.record_cache_hits("job", model, count)
    for (stage, field), count in collections.Counter((e.stage, e.field) for e in errors).items():
        metrics.record_errors(stage, field, count)


def _write_or_record(images: list, output: Storage, run_id: str, version: str, now: float,
                     options: WriteOptions) -> tuple[list[Any], list[ErrorRecord]]:  # fmt: skip
    """Write a batch's images and metadata fragment: (stored, []), or, when the storage
    still fails after its retries, ([], one `write` error per image): without a metadata
    row the next run makes them again, so nothing is lost and nothing is written twice."""
    from ..pipeline.credentials import CredentialsError
    from ..pipeline.storage import explain, transient_errors

    try:
        failed: list = []  # (image, CompositeError): this row's layers could not be placed
        stored = write_outputs(images, output, run_id=run_id, version=version, options=options,
                               failed=failed)  # fmt: skip
        return stored, [
            ErrorRecord(id=generated.request.id, stage="composite", field=exc.field,
                        reason=exc.reason, run_id=run_id, created_at=_utc(now),
                        row=generated.request.model_dump_json()[:MAX_ERROR_ROW_CHARS])
            for generated, exc in failed
        ]  # fmt: skip
    except (OSError, TimeoutError, CredentialsError, *transient_errors()) as exc:  # recorded
        field = "credentials" if isinstance(exc, CredentialsError) else "storage"
        reason = (f"signing failed: {exc}" if field == "credentials"
                  else f"the write failed after retries: {explain(exc, output)}")  # fmt: skip
        return [], [
            ErrorRecord(id=generated.request.id, stage="write", field=field, reason=reason,
                        run_id=run_id, created_at=_utc(now),
                        row=generated.request.model_dump_json()[:MAX_ERROR_ROW_CHARS])
            for generated, _ in images
        ]  # fmt: skip


def summary_schema() -> Any:
    """Arrow schema of write_batch's summary rows (what the driver tallies)."""
    import pyarrow as pa

    fields = [("id", pa.string()), ("status", pa.string()), ("stage", pa.string()),
              ("written_at", pa.float64()), ("batch_size", pa.int64()),
              ("actor_id", pa.string())]  # fmt: skip
    floats = [*BUSY_COLUMNS, *StageTimings.model_fields]
    return pa.schema(fields + [(name, pa.float64()) for name in floats])


def _summary_row(summary: dict, row_id: str, status: str, stage: str | None, written_at: float,
                 batch_size: int | None, actor_id: str | None, timings: StageTimings,
                 busy: dict[str, Any]) -> None:  # fmt: skip
    values = {"id": row_id, "status": status, "stage": stage, "written_at": written_at,
              "batch_size": batch_size, "actor_id": actor_id,
              **{c: busy.get(c) for c in BUSY_COLUMNS}, **timings.model_dump()}  # fmt: skip
    for name, value in values.items():
        summary[name].append(value)


def _utc(seconds: float) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
