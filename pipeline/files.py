"""What goes into an image's files: the write options a job or deployment sets (layout,
layers, marks, formats, content credentials), and the encoding of one image's master and
variants with them (pipeline/outputs.py writes what this makes)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .composite import CompositeConfig, LayersStamp, check_composite, compose, layer_values
from .credentials import NO_CREDENTIALS, CredentialsConfig, check_credentials, sign
from .formats import (
    MEDIA_TYPES,
    PNG_ONLY,
    EncodingConfig,
    decode,
    encode,
    master_format,
    resized,
    variant_format,
)
from .image_reads import StorageReader
from .marks import (
    NO_MARKS,
    MarksConfig,
    check_marks,
    read_watermark,
    text_chunks,
    visibly_marked,
    watermarked,
)
from .schema import GeneratedImage
from .storage import Storage


@dataclass(frozen=True)
class Provenance:
    """Where and with what an image was made (one per engine actor or replica)."""

    model: str
    weights_hash: str
    backend: dict[str, str]
    node_id: str
    actor_id: str


@dataclass(frozen=True)
class OutputLayout:
    """How images are stored: one object per image (`images`) or WebDataset tar shards
    (`webdataset`, one shard per write batch); keys flat or spread over hashed prefixes."""

    output_format: str = "images"  # images | webdataset
    key_prefix: str = "flat"  # flat | hashed


FLAT_IMAGES = OutputLayout()


@dataclass(frozen=True)
class WriteOptions:
    """Everything that decides the files of an image beyond its pixels: where they go, the
    marks in them, their formats and sizes. A job and a deployment build it from their
    config (`of`), so both fronts write alike."""

    layout: OutputLayout = FLAT_IMAGES
    marks: MarksConfig = field(default_factory=lambda: NO_MARKS)
    encoding: EncodingConfig = field(default_factory=lambda: PNG_ONLY)
    keep_rejected: bool = False  # the quality gate's rejected images go to rejected/
    credentials: CredentialsConfig = field(default_factory=lambda: NO_CREDENTIALS)
    cache: Storage | None = None  # the result cache's entries, when it is on
    quality: Any = None  # the gate the images passed (QualityConfig), salting cache keys
    composite: CompositeConfig = field(default_factory=CompositeConfig)  # layers placed on top
    read: Any = None  # reads the layers' files (a StorageReader of the config's storage)

    @classmethod
    def of(cls, config: Any, output: str, layout: OutputLayout = FLAT_IMAGES) -> WriteOptions:
        """The options of a JobConfig or ServeConfig writing to `output`."""
        from .result_cache import cache_storage

        cache = (
            cache_storage(config.cache, output, config.storage) if config.cache.enabled else None
        )
        return cls(layout=layout, marks=config.marks, encoding=config.encoding,
                   keep_rejected=config.quality.enabled and config.quality.keep_rejected,
                   credentials=config.credentials, cache=cache,
                   quality=config.quality if config.quality.enabled else None,
                   composite=config.composite, read=StorageReader(config.storage))  # fmt: skip


def check_outputs(config: Any) -> None:
    """What a JobConfig or ServeConfig asks of the write path, checked before any actor
    starts (a logo to read, a watermark library, a key that signs): ConfigError naming
    the field."""
    check_marks(config.marks)
    check_credentials(config.credentials)
    check_composite(config.composite, StorageReader(config.storage))


PLAIN = WriteOptions()


@dataclass
class EncodedImage:
    """One image's files before they are written: the master and its variants."""

    generated: GeneratedImage
    provenance: Provenance
    format: str  # the master's: png, webp or jpeg
    master: bytes
    variants: list[tuple[str, str, bytes]]  # (name, format, bytes)
    watermark: str | None  # the invisible watermark's payload, or None
    seconds: float  # time spent encoding
    credentials: bool = False  # every file carries a signed C2PA manifest
    composite: list[dict[str, Any]] | None = None  # the layers placed (composite:)
    layers: str | None = None  # their stamp, which the image's fingerprint counts


def encode_image(generated: GeneratedImage, provenance: Provenance, options: WriteOptions,
                 run_id: str, version: str) -> EncodedImage:  # fmt: skip
    """The image's master file and variants, with the marks and the content credentials
    `options` asks for (signed last: every byte before is covered by the signature). What
    a file says of its watermark is what was verified in it: the master's survives a lossy
    encoder or is recorded as none; variants (resized) claim none."""
    t0 = time.perf_counter()
    marks, encoding = options.marks, options.encoding
    pixels, placed, stamp = composited(generated, options)
    pixels, payload = watermarked(visibly_marked(pixels, marks), marks)
    master = master_format(encoding)
    if master.lossy:  # no text chunks in WebP or JPEG: encode, then see what survived
        data = encode(pixels, master)
        if payload is not None and not watermark_survives(data, marks):
            payload = None
    fields = provenance_fields(generated, provenance, run_id, version, payload)
    text = text_chunks(fields, version) if marks.png_text else None
    if not master.lossy:
        data = encode(pixels, master, text)
    files = [("", master.format, data, fields)]
    variant_fields = {**fields, "watermark": None}
    variant_text = text_chunks(variant_fields, version) if marks.png_text else None
    for variant in encoding.variants:
        how = variant_format(variant, encoding)
        files.append((variant.name, how.format, encode(resized(pixels, variant), how, variant_text),
                      variant_fields))  # fmt: skip
    if options.credentials.enabled:
        files = [(name, fmt, sign(data, MEDIA_TYPES[fmt], said, options.credentials), said)
                 for name, fmt, data, said in files]  # fmt: skip
    return EncodedImage(generated, provenance, master.format, files[0][2],
                        [(name, fmt, data) for name, fmt, data, _ in files[1:]], payload,
                        time.perf_counter() - t0, options.credentials.enabled, placed, stamp)  # fmt: skip


def composited(generated: GeneratedImage,
               options: WriteOptions) -> tuple[Any, list | None, str | None]:  # fmt: skip
    """(the image's pixels with the layers `options.composite` places, what was placed
    where, their stamp for the fingerprint), or (its pixels, None, None) without layers;
    CompositeError when this row's layers cannot be placed (a template column it lacks, a
    product image that cannot be read). The engine's pixels stay as made (the result cache
    keeps them unplaced)."""
    if not options.composite.enabled:
        return generated.image, None, None
    request, read = generated.request, options.read or StorageReader()
    pixels, placed = compose(generated.image, layer_values(request), options.composite, read)
    return pixels, placed, LayersStamp(options.composite)(request)


def watermark_survives(data: bytes, marks: MarksConfig) -> bool:
    """Whether `marks`' watermark decodes back from the encoded file `data`."""
    payload = marks.watermark.encode()
    return read_watermark(decode(data), len(payload), marks.watermark_method) == payload


def _input_digests(inputs: dict[str, Any] | None) -> dict[str, Any]:
    """What a published file says of its source photo: its digests, strength and steps run,
    not its URI (an internal bucket key or path stays in the metadata row)."""
    return {k: v for k, v in (inputs or {}).items() if k not in ("init_image", "mask_image")}


def provenance_fields(generated: GeneratedImage, provenance: Provenance, run_id: str,
                      version: str, watermark: str | None) -> dict[str, Any]:  # fmt: skip
    """What a file says about itself (PNG text chunks, content credentials): the request
    as made and where it was made."""
    request = generated.request
    return {"id": request.id, "prompt": request.prompt, "seed": generated.seed,
            "negative_prompt": request.negative_prompt, "steps": request.steps,
            "guidance_scale": request.guidance_scale, "width": generated.width,
            "height": generated.height, "scheduler": request.scheduler.value,
            "model": provenance.model, "weights_hash": provenance.weights_hash,
            "speed": request.speed.value, "lora": request.lora,
            "lora_scale": request.lora_scale if request.lora else None,
            "lora_sha256": generated.lora_sha256, **_input_digests(generated.inputs),
            "run_id": run_id, "daguerre_version": version, "ai_generated": True,
            "watermark": watermark}  # fmt: skip
