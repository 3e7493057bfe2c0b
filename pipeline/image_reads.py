"""Reading init images and masks: from a request's URI to the pixels the engine takes.

A request names its init image (and mask) by URI: `s3://`, `file://`, an absolute path, or
a path relative to the manifest's folder; online, an upload named by its content
(`upload:sha256:<hex>`). Reading is CPU work done before the engine (the job's image stage,
the online ingress), so the engine only ever sees pixels at the output's size.

The size rule: a request with width or height gets that size (the model's side filling a
missing one), the image made to fit it by `resize` (fill: cover and crop the centre; fit:
inside, padded with white, a mask's padding white so the padding is painted; stretch).
A request with neither takes the image's own size rounded down to a multiple of 8 (the
centre kept), within the deployment's limits. A mask must be the init image's size.

Every failure is the row's alone, a `RequestRefused` naming the field: a missing file, one
that is not an image, one too large, a mask that does not match.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
from collections.abc import Callable
from typing import Any

from .config import RequestRefused, StorageConfig
from .image_inputs import ImageInput, start_step
from .schema import UPLOAD_PREFIX, ImageRequest, RequestLimits, ResizeMode

MAX_INPUT_BYTES = 64 * 2**20  # largest init image or mask file read
MAX_INPUT_PIXELS = 64 * 10**6  # largest (width x height) a job decodes, checked before decoding
ONLINE_INPUT_PIXELS = 16 * 10**6  # ... an HTTP upload: a phone photo, not a decompression bomb
FORMATS = ("PNG", "JPEG", "WEBP")  # what is decoded; other formats are refused unread
FAMILY_MULTIPLE = {"unet": 8, "sd3": 16, "flux": 16}  # image sides: the VAE's factor x patching
WHITE = (255, 255, 255)

Reader = Callable[[str], bytes]


def resolve_uri(uri: str, base: str | None) -> str:
    """`uri` as read: URLs and absolute paths as they are, relative paths under `base` (the
    manifest's folder, itself a path or URL), `..` resolved."""
    if "://" in uri or uri.startswith(UPLOAD_PREFIX) or os.path.isabs(uri) or not base:
        return uri
    if "://" in base:
        scheme, _, rest = base.rstrip("/").partition("://")
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return os.path.normpath(os.path.join(base, uri))


class StorageReader:
    """Reads paths, file:// and s3:// URIs (through fsspec, with the storage config's
    endpoint and credentials), refusing files over MAX_INPUT_BYTES. Picklable (it crosses
    to Ray workers) and equal to another of the same config (caches keyed on it hit)."""

    def __init__(self, config: StorageConfig | None = None):
        self.config = config
        self._key = None if config is None else json.dumps(config.model_dump(), default=_plain)

    def __call__(self, uri: str) -> bytes:
        import fsspec

        from .storage import storage_options

        with fsspec.open(uri, "rb", **storage_options(uri, self.config)) as f:
            data = f.read(MAX_INPUT_BYTES + 1)
        if len(data) > MAX_INPUT_BYTES:
            raise ValueError(f"the file is over {MAX_INPUT_BYTES // 2**20} MiB")
        return data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorageReader) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)


def _plain(value: Any) -> str:
    secret = getattr(value, "get_secret_value", None)  # keys tell configs apart too
    return secret() if secret else str(value)


def load_image_input(request: ImageRequest, read: Reader, base: str | None, limits: RequestLimits,
                     default_side: int, multiple: int = 8,
                     max_pixels: int = MAX_INPUT_PIXELS) -> ImageInput:  # fmt: skip
    """The engine's ImageInput of a request with an init image (its provenance for the
    metadata row with it); RequestRefused naming init_image or mask_image when it cannot be
    used. `multiple`: the model's size grid (FAMILY_MULTIPLE); `max_pixels`: the largest
    image decoded."""
    assert request.init_image is not None
    init_bytes = _read(request.init_image, "init_image", read, base)
    init = _open(init_bytes, "init_image", max_pixels)
    width, height = output_size(request, _upright_size(init), limits, default_side, multiple)
    init = _decoded(init, "init_image", mode="RGB")
    mask = mask_bytes = None
    if request.mask_image is not None:
        mask_bytes = _read(request.mask_image, "mask_image", read, base)
        mask = _decoded(_open(mask_bytes, "mask_image", max_pixels), "mask_image", mode="L")
        if mask.size != init.size:
            raise RequestRefused("mask_image", (
                f"is {mask.size[0]}x{mask.size[1]} pixels; it must match init_image's "
                f"{init.size[0]}x{init.size[1]}"
            ))  # fmt: skip
    mode = None if request.sized_by_image else request.resize
    pixels = _resized(init, width, height, mode)
    mask_pixels = None if mask is None else _resized(mask, width, height, mode)
    provenance = {
        "init_image": request.init_image, "init_sha256": hashlib.sha256(init_bytes).hexdigest(),
        "mask_image": request.mask_image, "strength": float(request.strength),
        "mask_sha256": None if mask_bytes is None else hashlib.sha256(mask_bytes).hexdigest(),
        "resize": None if mode is None else mode.value,
        "steps_run": request.steps - start_step(request.steps, request.strength),
    }  # fmt: skip
    return ImageInput(pixels, request.strength, mask_pixels, provenance)


def output_size(request: ImageRequest, image_size: tuple[int, int], limits: RequestLimits,
                default_side: int, multiple: int = 8) -> tuple[int, int]:  # fmt: skip
    """(width, height) of the output: the request's, or the image's rounded down to a
    multiple of the model's grid (8; 16 for SD3 and FLUX) and of the limits' size_multiple,
    refused past the limits."""
    if not request.sized_by_image:
        return request.resolved_size(default_side)
    step = math.lcm(8, multiple, limits.size_multiple)
    width, height = (side - side % step for side in image_size)
    shown = f"{image_size[0]}x{image_size[1]} pixels"
    if min(width, height) < step:
        raise RequestRefused("init_image", f"is {shown}; each side needs at least {step}")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise RequestRefused("init_image", (
            f"is {shown}; this deployment makes at most {limits.max_side} per side and "
            f"{limits.max_pixels} pixels: give a size (width and height) to resize it"
        ))  # fmt: skip
    return width, height


def _read(uri: str, field: str, read: Reader, base: str | None) -> bytes:
    where = resolve_uri(uri, base)
    try:
        return read(where)
    except FileNotFoundError:
        raise RequestRefused(field, f"{uri!r} does not exist (read as {where!r})") from None
    except Exception as exc:  # permissions, storage errors, too large: this row's alone
        from .config import first_line

        raise RequestRefused(field, f"cannot read {uri!r} ({type(exc).__name__}: "
                             f"{first_line(exc)})") from None  # fmt: skip


def _open(data: bytes, field: str, max_pixels: int) -> Any:
    """The image in `data`, opened but not decoded (its header read): RequestRefused when it
    is not a PNG, JPEG or WebP, or has more than `max_pixels`."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Exception as exc:  # not an image, or a format not decoded here
        raise RequestRefused(field, f"is not a PNG, JPEG or WebP image Pillow can decode "
                             f"({type(exc).__name__})") from None  # fmt: skip
    if image.width * image.height > max_pixels:
        raise RequestRefused(field, (
            f"is {image.width}x{image.height} pixels; at most {max_pixels} are read"
        ))  # fmt: skip
    return image


def _upright_size(image: Any) -> tuple[int, int]:
    """An opened image's (width, height) once its EXIF orientation is applied (header only)."""
    turned = image.getexif().get(0x0112) in (5, 6, 7, 8)  # rotated a quarter turn
    return (image.height, image.width) if turned else image.size


def _decoded(image: Any, field: str, mode: str) -> Any:
    """An opened image decoded as `mode`, upright (EXIF orientation applied), transparency
    composited over white; a mask with transparency is its alpha: transparent is painted
    (OpenAI's convention), opaque kept. RequestRefused when it does not decode."""
    from PIL import Image, ImageOps

    try:
        image = ImageOps.exif_transpose(image)
        image.load()
    except Exception as exc:  # truncated, corrupt
        raise RequestRefused(field, f"is not an image Pillow can decode "
                             f"({type(exc).__name__})") from None  # fmt: skip
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if mode == "L" and rgba.getextrema()[3][0] < 255:  # a mask with transparent parts
            return rgba.getchannel("A").point(lambda a: 255 if a < 128 else 0)
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba)
    return image.convert(mode)


def _resized(image: Any, width: int, height: int, mode: ResizeMode | None) -> Any:
    """`image` as uint8 pixels of width x height; mode None: sized by the image (the
    centre cropped to the rounded size)."""
    import numpy as np
    from PIL import Image, ImageOps

    size, resample = (width, height), Image.Resampling.LANCZOS
    if image.size == size:
        out = image
    elif mode is None or mode is ResizeMode.fill:
        out = ImageOps.fit(image, size, resample, centering=(0.5, 0.5))
    elif mode is ResizeMode.fit:
        out = ImageOps.pad(image, size, resample, color=255 if image.mode == "L" else WHITE)
    else:
        out = image.resize(size, resample)
    return np.asarray(out, dtype=np.uint8).copy()
