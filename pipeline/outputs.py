"""The one write path: generated images -> PNG bytes, stored objects and `ImageRecord` rows.

Used by the batch job's write stage and by the online API alike, so an image made
online carries exactly the provenance a batch image does, and both write the same way:
the images first, then one metadata fragment naming them (metadata is the proof that
an image is finished).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import time
from dataclasses import dataclass
from typing import Any

from .schema import ErrorRecord, GeneratedImage, ImageRecord, error_schema, record_schema
from .storage import ERRORS, METADATA, Storage, fragment_key, image_key


@dataclass(frozen=True)
class Provenance:
    """Where and with what an image was made (one per engine actor or replica)."""

    model: str
    weights_hash: str
    backend: dict[str, str]
    node_id: str
    actor_id: str


@dataclass
class StoredImage:
    """One written (or encoded) image: its PNG bytes and its metadata row."""

    png: bytes
    record: ImageRecord


def new_run_id(started: dt.datetime | None = None, kind: str = "") -> str:
    """A run id that sorts by start time: rows of later runs supersede earlier ones'."""
    import secrets

    started = started or dt.datetime.now(dt.timezone.utc)
    stamp = f"{started:%Y%m%dT%H%M%S}{started.microsecond // 1000:03d}Z"
    return f"{stamp}-{kind + '-' if kind else ''}{secrets.token_hex(3)}"


def encode_png(pixels: Any) -> bytes:
    """PNG bytes of a [H, W, 3] uint8 array (fast compression: encode time matters more)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_record(
    generated: GeneratedImage,
    *,
    png: bytes,
    uri: str,
    provenance: Provenance,
    run_id: str,
    version: str,
    created_at: dt.datetime,
    client_id: str | None = None,
) -> ImageRecord:
    """The metadata row of one image: the request with defaults resolved, and its provenance."""
    request = generated.request
    fields = request.model_dump(exclude={"seed", "width", "height", "scheduler", "model",
                                         "speed"})  # fmt: skip
    return ImageRecord(
        **fields,
        speed=request.speed.value,
        seed=generated.seed,
        width=generated.width,
        height=generated.height,
        scheduler=request.scheduler.value,
        model=provenance.model,
        uri=uri,
        sha256=hashlib.sha256(png).hexdigest(),
        request_fingerprint=request.fingerprint(generated.width, generated.height),
        weights_hash=provenance.weights_hash,
        scheduler_config=generated.scheduler_config,
        backend=provenance.backend,
        batch_size=generated.batch_size,
        daguerre_version=version,
        timings=generated.timings,
        node_id=provenance.node_id,
        actor_id=provenance.actor_id,
        run_id=run_id,
        created_at=created_at,
        client_id=client_id,
    )


def write_outputs(
    images: list[tuple[GeneratedImage, Provenance]],
    storage: Storage | None,
    *,
    run_id: str,
    version: str,
    client_ids: dict[str, str] | None = None,
) -> list[StoredImage]:
    """Encode every image as PNG and build its record; with `storage`, write the images and
    then their metadata fragment. Without it (inline online answers) nothing is written."""
    import pyarrow as pa

    created_at = dt.datetime.now(dt.timezone.utc)
    out = []
    for generated, provenance in images:
        t0 = time.perf_counter()
        png = encode_png(generated.image)
        t1 = time.perf_counter()
        key = image_key(generated.request.id)
        uri = storage.write_bytes(key, png) if storage is not None else ""
        timings = generated.timings.model_copy(
            update={"encode_png_s": t1 - t0, "write_s": time.perf_counter() - t1}
        )
        generated = dataclasses.replace(generated, timings=timings)
        record = image_record(
            generated, png=png, uri=uri, provenance=provenance, run_id=run_id, version=version,
            created_at=created_at, client_id=(client_ids or {}).get(generated.request.id),
        )  # fmt: skip
        out.append(StoredImage(png=png, record=record))
    if storage is not None and out:
        table = pa.Table.from_pylist([s.record.model_dump() for s in out], schema=record_schema())
        storage.write_table(fragment_key(METADATA, run_id, [s.record.id for s in out]), table)
    return out


def write_errors(errors: list[ErrorRecord], storage: Storage, run_id: str) -> None:
    """Write one errors fragment for a batch's rejected rows."""
    import pyarrow as pa

    if not errors:
        return
    names = [f"{e.id}\t{e.stage}\t{e.field}\t{e.reason}" for e in errors]
    table = pa.Table.from_pylist([e.model_dump() for e in errors], schema=error_schema())
    storage.write_table(fragment_key(ERRORS, run_id, names), table)
