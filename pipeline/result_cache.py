"""The result cache: an identical request is answered from a stored image, not made again.

"Identical" is everything that decides the pixels: the weights (their hash) and the
request's fingerprint (prompt, negative prompt, seed, size, steps, scheduler, guidance,
speed tier, LoRA and its scale: `ImageRequest.fingerprint`). Metadata, ids and marks do
not count: a hit goes through the one write path like a new image, so it gets this job's
or deployment's marks, formats, variants and credentials, and its metadata row says
`cache_hit` with the entry's key as `cache_source`.

An entry is one object, written atomically by the write path after an image passed the
quality gate:

    <prefix>/<hh>/<key>.png     the raw pixels (no marks), with a tEXt chunk `daguerre-cache`
                                holding how they were made (seed, scheduler config, model...)

Jobs and deployments that name the same `cache.prefix` share entries (a folder or s3://);
by default a job's cache lives in its output (`cache/`), a deployment's in its `output`.
In a job, the lookup runs in the CPU prepare stage (rows found there never occupy an
engine) and the entry is read by the write stage; online, the ingress looks up before it
calls a replica. Requests made at the same time are not merged: two identical rows in one
job both miss while neither is written yet.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .schema import UPLOAD_PREFIX, GeneratedImage, ImageRequest, StageTimings
from .storage import Storage

logger = logging.getLogger(__name__)
CACHE = "cache"  # the default prefix, under an output
TEXT_KEY = "daguerre-cache"


class CacheConfig(BaseModel):
    """The result cache (`cache:` in a job or serve config)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Answer identical requests from stored images.")
    prefix: str | None = Field(
        None,
        description="Folder or s3:// prefix of the entries, shared by every job and deployment "
        "naming it; default: cache/ under the job's output (the deployment's `output`).",
    )
    semantic_threshold: float | None = Field(
        None, gt=0, le=1,
        description="Also answer near-duplicate prompts (all else equal) whose text-encoder "
        "embedding has at least this cosine similarity to a stored one (e.g. 0.95); null: "
        "exact matches only.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_semantic(self) -> CacheConfig:
        if self.semantic_threshold is not None and not self.enabled:
            raise ValueError("semantic_threshold needs enabled: true")
        return self


NO_CACHE = CacheConfig()


def cache_key(request: ImageRequest, weights_hash: str, width: int, height: int,
              salt: str = "") -> str:  # fmt: skip
    """The entry key of `request` made at `width` x `height` with the weights `weights_hash`
    by an engine and gate described by `salt` (cache_salt)."""
    identity = {"weights_hash": weights_hash, "request": request.fingerprint(width, height)}
    if salt:
        identity["salt"] = salt
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:40]


def cache_salt(request: ImageRequest, quantize: str, noise_on_device: bool, quality: Any,
               storage_config: Any = None) -> str | None:  # fmt: skip
    """What beyond the request and the weights decides whether a stored image is this
    request's: an 8-bit UNet and device noise (other pixels), the quality gate that passed
    it (a stricter gate must not be served what a laxer one let through), and the version
    of a LoRA file (retrained in place, same path). "" for the defaults; None when the
    request's adapter cannot be found, or its init image is named by a URI whose file may
    change (the cache stays out of it; uploads are named by their content's sha256)."""
    if any(uri is not None and not uri.startswith(UPLOAD_PREFIX)
           for uri in (request.init_image, request.mask_image)):  # fmt: skip
        return None
    parts: dict[str, Any] = {}
    if quantize != "none":
        parts["quantize"] = quantize
    if noise_on_device:
        parts["noise_on_device"] = True
    if quality is not None and quality.enabled:
        parts["quality"] = quality.model_dump(mode="json")
    if request.lora is not None:
        from .lora import adapter_stamp

        stamp = adapter_stamp(request.lora, storage_config)
        if stamp is None:
            return None
        parts["lora"] = stamp
    return (
        hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16] if parts else ""
    )


def backend_settings(backend: dict[str, str]) -> tuple[str, bool]:
    """(quantize, noise_on_device) of an engine, from the backend its images record."""
    return backend.get("quantize", "none"), "noise_on_device" in backend.get("hot_path", "").split(
        ","
    )


@dataclass(frozen=True)
class CacheView:
    """A result cache as one engine setting sees it: its entries, and what salts a key."""

    storage: Storage
    weights_hash: str
    quantize: str = "none"
    noise_on_device: bool = False
    quality: Any = None  # the QualityConfig of the gate, or None

    def key(self, request: ImageRequest, width: int, height: int) -> str | None:
        """The entry key of `request`, or None when it must not use the cache."""
        salt = cache_salt(request, self.quantize, self.noise_on_device, self.quality,
                          self.storage.config)  # fmt: skip
        return None if salt is None else cache_key(request, self.weights_hash, width, height, salt)

    def hits(self, requests: list[ImageRequest], default_side: int) -> dict[str, str]:
        """Request id -> entry key, for the requests the cache holds (a cache that cannot be
        read is a miss: it never fails the work)."""
        keys = {r.id: self.key(r, *r.resolved_size(default_side)) for r in requests}
        try:
            present = find(self.storage, [k for k in keys.values() if k])
        except Exception as exc:  # throttled, unreachable: make the images
            logger.warning("result cache %s unreadable (%s); treated as a miss", self.storage, exc)
            return {}
        return {i: k for i, k in keys.items() if k in present}


def entry_key(key: str) -> str:
    """The object key of an entry under the cache prefix."""
    return f"{key[:2]}/{key}.png"


def cache_storage(config: CacheConfig, output: str, storage_config: Any = None) -> Storage:
    """The Storage of the cache's entries (its own prefix, or cache/ under `output`)."""
    import posixpath

    return Storage(config.prefix or posixpath.join(output.rstrip("/"), CACHE), storage_config)


def find(storage: Storage, keys: list[str]) -> set[str]:
    """The `keys` that have an entry (one existence check each, a few at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    unique = sorted(set(keys))
    if not unique:
        return set()
    with ThreadPoolExecutor(min(16, len(unique))) as pool:
        present = pool.map(lambda k: storage.fs.exists(storage.path(entry_key(k))), unique)
        return {key for key, there in zip(unique, present, strict=True) if there}


def store(storage: Storage, key: str, image: GeneratedImage, provenance: dict[str, Any],
          run_id: str) -> None:  # fmt: skip
    """Write `image` (its raw pixels, how and where they were made) as the entry `key`."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    made = {"key": key, "id": image.request.id, "run_id": run_id, "provenance": provenance,
            "seed": image.seed, "width": image.width, "height": image.height,
            "scheduler_config": image.scheduler_config, "lora_sha256": image.lora_sha256}  # fmt: skip
    info = PngInfo()
    info.add_text(TEXT_KEY, json.dumps(made, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(image.image).save(buf, format="PNG", compress_level=1, pnginfo=info)
    storage.write_bytes(entry_key(key), buf.getvalue())


def load(storage: Storage, key: str, request: ImageRequest) -> tuple[GeneratedImage, dict]:
    """The entry `key` as the image of `request`, and what its text chunk says (the
    provenance of what made it, the id and run it was made for). FileNotFoundError when
    it is gone, KeyError when the object is no entry."""
    import numpy as np
    from PIL import Image

    data = storage.read_bytes(entry_key(key))
    with Image.open(io.BytesIO(data)) as image:
        made = json.loads(image.text[TEXT_KEY])
        pixels = np.asarray(image.convert("RGB"))
    generated = GeneratedImage(
        request=request, image=pixels, seed=made["seed"], width=made["width"],
        height=made["height"], batch_size=0, scheduler_config=made["scheduler_config"],
        timings=StageTimings(), cache_source=key, lora_sha256=made.get("lora_sha256"),
    )  # fmt: skip
    return generated, made
