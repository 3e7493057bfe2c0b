"""The one write path: generated images -> encoded files, stored objects and `ImageRecord` rows.

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
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from .composite import CompositeError
from .files import PLAIN, EncodedImage, Provenance, WriteOptions, encode_image
from .formats import (
    EXTENSIONS,
    MEDIA_TYPES,
    PNG,
    encode,
    variant_key,
)
from .schema import ErrorRecord, GeneratedImage, ImageRecord, error_schema, record_schema
from .storage import ERRORS, METADATA, REJECTED, SHARDS, Storage, fragment_key, image_key

logger = logging.getLogger(__name__)


@dataclass
class StoredImage:
    """One written (or encoded) image: its master file's bytes and its metadata row."""

    data: bytes
    record: ImageRecord

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.record.format]


def cache_view(options: WriteOptions, weights_hash: str, engine: Any) -> Any:
    """How an engine with EngineConfig `engine` reads the result cache `options` name (a
    CacheView, or None without the cache)."""
    from .result_cache import CacheView

    if options.cache is None:
        return None
    return CacheView(options.cache, weights_hash, engine.quantize.value, engine.noise_on_device,
                     options.quality)  # fmt: skip


def new_run_id(started: dt.datetime | None = None, kind: str = "") -> str:
    """A run id that sorts by start time: rows of later runs supersede earlier ones'."""
    import secrets

    started = started or dt.datetime.now(dt.timezone.utc)
    stamp = f"{started:%Y%m%dT%H%M%S}{started.microsecond // 1000:03d}Z"
    return f"{stamp}-{kind + '-' if kind else ''}{secrets.token_hex(3)}"


IMAGE_INPUT_FIELDS = ("init_image", "mask_image", "strength", "resize")  # from `inputs` instead


def image_record(encoded: EncodedImage, *, uri: str, variants: dict[str, str], run_id: str,
                 version: str, created_at: dt.datetime,
                 client_id: str | None = None) -> ImageRecord:  # fmt: skip
    """The metadata row of one image: the request with defaults resolved, its files and its
    provenance."""
    generated, provenance = encoded.generated, encoded.provenance
    request = generated.request
    fields = request.model_dump(exclude={"seed", "width", "height", "scheduler", "model",
                                         "speed", *IMAGE_INPUT_FIELDS})  # fmt: skip
    fields.update(generated.inputs or {})  # init image, mask, strength, steps run
    return ImageRecord(
        **fields,
        speed=request.speed.value,
        seed=generated.seed,
        width=generated.width,
        height=generated.height,
        scheduler=request.scheduler.value,
        model=provenance.model,
        uri=uri,
        sha256=hashlib.sha256(encoded.master).hexdigest(),
        request_fingerprint=request.fingerprint(generated.width, generated.height, encoded.layers),
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
        watermark=encoded.watermark,
        format=encoded.format,
        variants=variants,
        content_credentials=encoded.credentials,
        cache_hit=generated.cache_source is not None,
        cache_source=generated.cache_source,
        cache_similarity=generated.cache_similarity,
        lora_sha256=generated.lora_sha256,
        composite=None if encoded.composite is None else json.dumps(encoded.composite),
    )


def write_outputs(
    images: list[tuple[GeneratedImage, Provenance]],
    storage: Storage | None,
    *,
    run_id: str,
    version: str,
    client_ids: dict[str, str] | None = None,
    options: WriteOptions = PLAIN,
    failed: list[tuple[GeneratedImage, CompositeError]] | None = None,
) -> list[StoredImage]:
    """Encode every image (its master and variants, with the layers and marks `options`
    asks for) and build its record; with `storage`, write the files (or their shard) and
    then their metadata fragment. Without it (inline online answers) nothing is written.
    An image whose layers cannot be placed raises CompositeError, or with `failed` is
    appended there and left out."""
    import pyarrow as pa

    created_at = dt.datetime.now(dt.timezone.utc)
    encoded = []
    for generated, provenance in images:
        try:
            encoded.append(encode_image(generated, provenance, options, run_id, version))
        except CompositeError as exc:
            if failed is None:
                raise
            failed.append((generated, exc))
    made = {id(item.generated) for item in encoded}
    images = [(g, p) for g, p in images if id(g) in made]
    if storage is not None and encoded and options.layout.output_format == "webdataset":
        written = _write_shard(encoded, storage, options, run_id)
    else:
        written = _write_images(encoded, storage, options)
    out = []
    for item, (uri, variants, seconds) in zip(encoded, written, strict=True):
        timings = item.generated.timings.model_copy(update={"encode_png_s": item.seconds,
                                                            "write_s": seconds})  # fmt: skip
        item.generated = dataclasses.replace(item.generated, timings=timings)
        record = image_record(
            item, uri=uri, variants=variants, run_id=run_id, version=version,
            created_at=created_at, client_id=(client_ids or {}).get(item.generated.request.id),
        )  # fmt: skip
        out.append(StoredImage(data=item.master, record=record))
    if options.cache is not None:
        _store_in_cache(images, options, run_id)
    if storage is not None and out:
        table = pa.Table.from_pylist([s.record.model_dump() for s in out], schema=record_schema())
        storage.write_table(fragment_key(METADATA, run_id, [s.record.id for s in out]), table)
    return out


def _store_in_cache(images: list[tuple[GeneratedImage, Provenance]], options: WriteOptions,
                    run_id: str) -> None:  # fmt: skip
    """Result-cache entries for the images made (not those read from it), before their
    metadata: a batch retried after a crash rewrites the same entries. Best effort: a cache
    that cannot be written loses no image."""
    from .result_cache import CacheView, backend_settings, store
    from .semantic_cache import SemanticIndex, group_key

    for generated, provenance in images:
        if generated.cache_source is not None:
            continue
        view = CacheView(options.cache, provenance.weights_hash,
                         *backend_settings(provenance.backend), options.quality)  # fmt: skip
        request, size = generated.request, (generated.width, generated.height)
        key = view.key(request, *size)
        if key is None:
            continue
        try:
            store(options.cache, key, generated, dataclasses.asdict(provenance), run_id)
            if generated.prompt_vector is not None:  # the semantic cache is on: index it too
                group = group_key(view, request, *size)
                SemanticIndex(options.cache, 1.0).add(group, key, request.prompt,
                                                      generated.prompt_vector)  # fmt: skip
        except Exception as exc:  # throttled, read-only: the image itself is written
            logger.warning("result cache %s: entry %s not written (%s)", options.cache, key, exc)


Written = tuple[str, dict[str, str], float]  # master uri, variant uris by name, seconds


def _write_images(encoded: list[EncodedImage], storage: Storage | None,
                  options: WriteOptions) -> list[Written]:  # fmt: skip
    """One object per file: per image, its master's uri, its variants' and the seconds."""
    hashed = options.layout.key_prefix == "hashed"
    out = []
    for item in encoded:
        t0 = time.perf_counter()
        image_id = item.generated.request.id
        if storage is None:
            out.append(("", {}, 0.0))
            continue
        key = image_key(image_id, hashed=hashed, ext=EXTENSIONS[item.format])
        uri = storage.write_bytes(key, item.master)
        variants = {
            name: storage.write_bytes(variant_key(name, image_id, EXTENSIONS[fmt], hashed), data)
            for name, fmt, data in item.variants
        }  # fmt: skip
        out.append((uri, variants, time.perf_counter() - t0))
    return out


def shard_member(image_id: str) -> str:
    """An image's name inside a shard, without the extension: WebDataset groups a sample's
    files by the name before the first dot, so an id's dots are written %2E."""
    return image_id.replace("%", "%25").replace(".", "%2E")


def _shard_files(item: EncodedImage, run_id: str) -> list[tuple[str, bytes]]:
    """(member name, bytes) of one image in a shard: `<member>.<ext>`, each variant as
    `<member>.<variant>.<ext>` and `<member>.json` holding the request and provenance."""
    import json

    generated, provenance = item.generated, item.provenance
    member = shard_member(generated.request.id)
    files = [(f"{member}.{EXTENSIONS[item.format]}", item.master)]
    files += [(f"{member}.{name}.{EXTENSIONS[fmt]}", data) for name, fmt, data in item.variants]
    sample = {"id": generated.request.id, "request": generated.request.model_dump(mode="json"),
              "seed": generated.seed, "width": generated.width, "height": generated.height,
              "model": provenance.model, "weights_hash": provenance.weights_hash,
              "run_id": run_id, "sha256": hashlib.sha256(item.master).hexdigest()}  # fmt: skip
    return [*files, (f"{member}.json", json.dumps(sample, sort_keys=True).encode())]


def _write_shard(encoded: list[EncodedImage], storage: Storage, options: WriteOptions,
                 run_id: str) -> list[Written]:  # fmt: skip
    """One WebDataset tar of the batch (_shard_files per image), written whole and named by
    its content, so a retried batch rewrites the same object; uris `<shard>#<member file>`."""
    import tarfile

    t0 = time.perf_counter()
    buf = io.BytesIO()
    names = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in encoded:
            files = _shard_files(item, run_id)
            names.append([name for name, _ in files])
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:32]
    hashed = options.layout.key_prefix == "hashed"
    uri = storage.write_bytes(f"{SHARDS}/{digest[:2] + '/' if hashed else ''}{digest}.tar", data)
    each = (time.perf_counter() - t0) / max(len(encoded), 1)
    out = []
    for item, files in zip(encoded, names, strict=True):
        variant_names = [name for name, _, _ in item.variants]
        variants = {v: f"{uri}#{f}" for v, f in zip(variant_names, files[1:], strict=False)}
        out.append((f"{uri}#{files[0]}", variants, each))
    return out


def keep_rejected(image: GeneratedImage, storage: Storage) -> str | None:
    """Write an image the quality gate refused as rejected/<id>.png (plain PNG, for review:
    never under images/, so it is never taken for a finished image); its URI, or None when
    it could not be written (its errors row is what counts)."""
    try:
        return storage.write_bytes(f"{REJECTED}/{image.request.id}.png", encode(image.image, PNG))
    except Exception as exc:  # throttled, read-only: the rejection is still recorded
        logger.warning("rejected image %s not kept (%s)", image.request.id, exc)
        return None


def write_errors(errors: list[ErrorRecord], storage: Storage, run_id: str) -> None:
    """Write one errors fragment for a batch's rejected rows."""
    import pyarrow as pa

    if not errors:
        return
    names = [f"{e.id}\t{e.stage}\t{e.field}\t{e.reason}" for e in errors]
    table = pa.Table.from_pylist([e.model_dump() for e in errors], schema=error_schema())
    storage.write_table(fragment_key(ERRORS, run_id, names), table)
