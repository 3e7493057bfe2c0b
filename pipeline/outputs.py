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

from .marks import NO_MARKS, MarksConfig, text_chunks, watermarked
from .schema import ErrorRecord, GeneratedImage, ImageRecord, error_schema, record_schema
from .storage import ERRORS, METADATA, SHARDS, Storage, fragment_key, image_key


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


def encode_png(pixels: Any, text: Any = None) -> bytes:
    """PNG bytes of a [H, W, 3] uint8 array (fast compression: encode time matters more),
    with `text` (a PIL PngInfo) as its text chunks."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1, pnginfo=text)
    return buf.getvalue()


def encode_marked(generated: GeneratedImage, provenance: Provenance, marks: MarksConfig,
                  run_id: str, version: str) -> tuple[bytes, str | None]:  # fmt: skip
    """The image's PNG with the marks `marks` asks for, and the watermark payload in it."""
    pixels, payload = watermarked(generated.image, marks)
    text = None
    if marks.png_text:
        request = generated.request
        fields = {"id": request.id, "prompt": request.prompt, "seed": generated.seed,
                  "negative_prompt": request.negative_prompt, "steps": request.steps,
                  "guidance_scale": request.guidance_scale, "width": generated.width,
                  "height": generated.height, "scheduler": request.scheduler.value,
                  "model": provenance.model, "weights_hash": provenance.weights_hash,
                  "run_id": run_id, "daguerre_version": version, "ai_generated": True,
                  "watermark": payload}  # fmt: skip
        text = text_chunks(fields, version)
    return encode_png(pixels, text), payload


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
    watermark: str | None = None,
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
        watermark=watermark,
    )


@dataclass(frozen=True)
class OutputLayout:
    """How images are stored: one object per image (`images`) or WebDataset tar shards
    (`webdataset`, one shard per write batch); keys flat or spread over hashed prefixes."""

    output_format: str = "images"  # images | webdataset
    key_prefix: str = "flat"  # flat | hashed


FLAT_IMAGES = OutputLayout()


def write_outputs(
    images: list[tuple[GeneratedImage, Provenance]],
    storage: Storage | None,
    *,
    run_id: str,
    version: str,
    client_ids: dict[str, str] | None = None,
    layout: OutputLayout | None = None,
    marks: MarksConfig = NO_MARKS,
) -> list[StoredImage]:
    """Encode every image as PNG (with its `marks`) and build its record; with `storage`,
    write the images (or their shard) and then their metadata fragment. Without it (inline
    online answers) nothing is written."""
    import pyarrow as pa

    layout = layout or FLAT_IMAGES
    created_at = dt.datetime.now(dt.timezone.utc)
    encoded, payloads = [], []
    for generated, provenance in images:
        t0 = time.perf_counter()
        png, payload = encode_marked(generated, provenance, marks, run_id, version)
        encoded.append((generated, provenance, png, time.perf_counter() - t0))
        payloads.append(payload)
    if storage is not None and encoded and layout.output_format == "webdataset":
        uris, write_s = _write_shard(encoded, storage, layout, run_id)
    else:
        uris, write_s = _write_images(encoded, storage, layout)
    out = []
    for (generated, provenance, png, encode_s), uri, seconds, payload in zip(
        encoded, uris, write_s, payloads, strict=True
    ):
        timings = generated.timings.model_copy(update={"encode_png_s": encode_s,
                                                       "write_s": seconds})  # fmt: skip
        generated = dataclasses.replace(generated, timings=timings)
        record = image_record(
            generated, png=png, uri=uri, provenance=provenance, run_id=run_id, version=version,
            created_at=created_at, client_id=(client_ids or {}).get(generated.request.id),
            watermark=payload,
        )  # fmt: skip
        out.append(StoredImage(png=png, record=record))
    if storage is not None and out:
        table = pa.Table.from_pylist([s.record.model_dump() for s in out], schema=record_schema())
        storage.write_table(fragment_key(METADATA, run_id, [s.record.id for s in out]), table)
    return out


def _write_images(encoded: list, storage: Storage | None,
                  layout: OutputLayout) -> tuple[list[str], list[float]]:  # fmt: skip
    """One object per image: (uris, seconds per write)."""
    uris, seconds = [], []
    for generated, _, png, _ in encoded:
        t0 = time.perf_counter()
        key = image_key(generated.request.id, hashed=layout.key_prefix == "hashed")
        uris.append(storage.write_bytes(key, png) if storage is not None else "")
        seconds.append(time.perf_counter() - t0)
    return uris, seconds


def shard_member(image_id: str) -> str:
    """An image's name inside a shard, without the extension: WebDataset groups a sample's
    files by the name before the first dot, so an id's dots are written %2E."""
    return image_id.replace("%", "%25").replace(".", "%2E")


def _write_shard(encoded: list, storage: Storage, layout: OutputLayout,
                 run_id: str) -> tuple[list[str], list[float]]:  # fmt: skip
    """One WebDataset tar of the batch (`<member>.png` and `<member>.json` per image, the
    json holding the request and provenance), written whole and named by its content, so a
    retried batch rewrites the same object; uris `<shard>#<member>.png`."""
    import json
    import tarfile

    t0 = time.perf_counter()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for generated, provenance, png, _ in encoded:
            member = shard_member(generated.request.id)
            sample = {"id": generated.request.id, "request": generated.request.model_dump(mode="json"),
                      "seed": generated.seed, "width": generated.width, "height": generated.height,
                      "model": provenance.model, "weights_hash": provenance.weights_hash,
                      "run_id": run_id, "sha256": hashlib.sha256(png).hexdigest()}  # fmt: skip
            for name, data in ((f"{member}.png", png),
                               (f"{member}.json", json.dumps(sample, sort_keys=True).encode())):  # fmt: skip
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:32]
    prefix = f"{SHARDS}/{digest[:2]}/" if layout.key_prefix == "hashed" else f"{SHARDS}/"
    uri = storage.write_bytes(f"{prefix}{digest}.tar", data)
    each = (time.perf_counter() - t0) / max(len(encoded), 1)
    return [f"{uri}#{shard_member(g.request.id)}.png" for g, *_ in encoded], [each] * len(encoded)


def write_errors(errors: list[ErrorRecord], storage: Storage, run_id: str) -> None:
    """Write one errors fragment for a batch's rejected rows."""
    import pyarrow as pa

    if not errors:
        return
    names = [f"{e.id}\t{e.stage}\t{e.field}\t{e.reason}" for e in errors]
    table = pa.Table.from_pylist([e.model_dump() for e in errors], schema=error_schema())
    storage.write_table(fragment_key(ERRORS, run_id, names), table)
