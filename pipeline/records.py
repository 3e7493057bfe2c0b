"""From a generated image to its stored form: PNG bytes and the `ImageRecord` row.

Shared by the batch job's write stage and the online API, so an image made online
carries exactly the provenance a batch image does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass
from typing import Any

from daguerre.pipeline.schema import ImageRecord, ImageRequest, StageTimings


@dataclass(frozen=True)
class Provenance:
    """Where and with what an image was made (one per engine actor or replica)."""

    model: str
    weights_hash: str
    backend: dict[str, str]
    node_id: str
    actor_id: str


def encode_png(pixels: Any) -> bytes:
    """PNG bytes of a [H, W, 3] uint8 array (fast compression: encode time matters more)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_record(
    request: ImageRequest,
    *,
    png: bytes,
    uri: str,
    seed: int,
    width: int,
    height: int,
    batch_size: int,
    scheduler_config: str,
    timings: StageTimings,
    provenance: Provenance,
    version: str,
    created_at: dt.datetime | None = None,
) -> ImageRecord:
    """The metadata row of one image: the request with defaults resolved, and its provenance."""
    fields = request.model_dump(exclude={"seed", "width", "height", "scheduler", "model"})
    return ImageRecord(
        **fields,
        seed=seed,
        width=width,
        height=height,
        scheduler=request.scheduler.value,
        model=provenance.model,
        uri=uri,
        sha256=hashlib.sha256(png).hexdigest(),
        weights_hash=provenance.weights_hash,
        scheduler_config=scheduler_config,
        backend=provenance.backend,
        batch_size=batch_size,
        daguerre_version=version,
        timings=timings,
        node_id=provenance.node_id,
        actor_id=provenance.actor_id,
        created_at=created_at or dt.datetime.now(dt.timezone.utc),
    )
