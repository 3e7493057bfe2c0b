"""The batch job's image stage: init images and masks read ahead of the engine.

    prepare_batch -> read_images (CPU tasks) -> EngineWorker -> write_batch

Rows whose request names an `init_image` get its pixels at the output's size (and the
mask's) in binary columns, read through the storage layer (local, file://, s3://, paths
relative to the manifest's folder) by CPU tasks that Ray Data runs ahead of the engine
actors, so the engine never waits for a read. A row whose image cannot be used becomes an
errors-table row naming `init_image` or `mask_image`, and the job goes on.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..pipeline.config import RequestRefused, StorageConfig
from ..pipeline.image_inputs import ImageInput
from ..pipeline.schema import RequestLimits, request_from_json

IMAGE_COLUMNS = {  # name -> Arrow type name, added to the prepared rows
    "init_pixels": "binary", "mask_pixels": "binary", "init_width": "int64",
    "init_height": "int64", "inputs": "string",
}  # fmt: skip


def read_images(batch: Any, base: str | None, storage_config: StorageConfig | None,
                limits: dict[str, Any], default_side: int, multiple: int = 8) -> Any:  # fmt: skip
    """The prepared rows with their init images' pixels (None for the others); a row whose
    image cannot be read, decoded or sized turns into a `validate` error naming the field."""
    import pyarrow as pa

    from ..pipeline.image_reads import StorageReader
    from . import metrics

    started = time.perf_counter()
    read, limits_model = StorageReader(storage_config), RequestLimits(**limits)
    rows = batch.to_pylist()
    for row in rows:
        row.update(dict.fromkeys(IMAGE_COLUMNS))
        request = request_from_json(row["request"]) if row["request"] else None
        if request is None or request.init_image is None or row.get("cache_key"):
            continue
        _read_into(row, request, read, base, limits_model, default_side, multiple)
    columns = {name: pa.array([r[name] for r in rows], type=batch.schema.field(name).type)
               for name in batch.schema.names}  # fmt: skip
    for name, kind in IMAGE_COLUMNS.items():
        columns[name] = pa.array([r[name] for r in rows], type=getattr(pa, kind)())
    metrics.observe_stage("read_images", "job", time.perf_counter() - started)
    return pa.table(columns)


def _read_into(row: dict[str, Any], request: Any, read: Any, base: str | None,
               limits: RequestLimits, default_side: int, multiple: int) -> None:  # fmt: skip
    from ..pipeline.image_reads import load_image_input

    try:
        image = load_image_input(request, read, base, limits, default_side, multiple)
    except RequestRefused as refused:
        row.update(error_stage="validate", error_field=refused.field, error_reason=refused.reason,
                   row=row["request"], request=None)  # fmt: skip
        return
    height, width = image.pixels.shape[:2]
    row.update(init_pixels=image.pixels.tobytes(), init_width=width, init_height=height,
               inputs=json.dumps(image.provenance),
               mask_pixels=None if image.mask is None else image.mask.tobytes())  # fmt: skip


def image_inputs(rows: list[dict[str, Any]], requests: list[Any]) -> list[ImageInput | None]:
    """The init images of `requests` (in order; None for those without) that the rows
    carry, read by `read_images` (ids are unique within a job)."""
    import numpy as np

    images: dict[str, ImageInput] = {}
    for row in rows:
        if not row.get("init_pixels"):
            continue
        shape = (row["init_height"], row["init_width"])
        pixels = np.frombuffer(row["init_pixels"], np.uint8).reshape(*shape, 3)
        mask = row.get("mask_pixels")
        provenance = json.loads(row["inputs"])
        images[row["id"]] = ImageInput(
            pixels, provenance["strength"],
            None if mask is None else np.frombuffer(mask, np.uint8).reshape(shape), provenance,
        )  # fmt: skip
    return [images.get(r.id) for r in requests]


def manifest_base(uri: str, config: StorageConfig | None) -> str:
    """The folder a manifest's relative image paths start from: the manifest's own folder
    (the manifest itself when it is a folder of Parquet files)."""
    import posixpath

    from ..pipeline.storage import Storage

    storage = Storage(uri, config)
    try:
        is_folder = storage.fs.isdir(storage.root)
    except Exception:  # unreachable here: the job's checks say so on their own
        is_folder = False
    if is_folder:
        return uri.rstrip("/")
    return posixpath.dirname(uri.rstrip("/")) if "://" in uri else _local_dir(uri)


def _local_dir(path: str) -> str:
    import os

    return os.path.dirname(os.path.abspath(path))
