"""File formats and sizes: the master image as PNG, WebP or JPEG, and resized variants.

`encoding:` in a job or serve config says how every image is written: the master file's
format and quality, and extra variants (a 512 thumbnail next to a 1024 master, a square
crop for a product grid), each under its own key and listed in the metadata row
(`format`, `variants`: name -> uri). Keys:

    images/<id>.<ext>                   the master (png, webp or jpg)
    variants/<name>/<id>.<ext>          each variant (hashed keys: variants/<name>/<hh>/<id>.<ext>)

Variants are cut from the master's pixels after its marks are applied, so a visible mark
shows in every size. Provenance text chunks are a PNG feature; WebP and JPEG files carry
provenance in their content credentials (credentials:). Lossy WebP and JPEG can erase the
invisible watermark (measured here: lossy WebP even at quality 95 did on these images,
JPEG on some, PNG and lossless WebP never): the write path decodes a lossy master back and
records the payload only when it survived.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Format = Literal["png", "webp", "jpeg"]
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
FORMAT_OF_EXTENSION = {ext: fmt for fmt, ext in EXTENSIONS.items()}
VARIANTS = "variants"
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # never `.` or `..`: a key segment


class Variant(BaseModel):
    """One extra size of every image: a box and how the image fits it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=VARIANT_NAME.pattern,
        description="Key of the variant (variants/<name>/<id>.<ext>, the metadata's variants map).",
    )
    width: int | None = Field(None, ge=8, le=8192, description="Box width in pixels.")
    height: int | None = Field(None, ge=8, le=8192, description="Box height in pixels.")
    fit: Literal["contain", "cover"] = Field(
        "contain",
        description="contain: scaled to fit inside the box, aspect kept (a thumbnail); cover: "
        "scaled to fill the box and centre-cropped to exactly width x height.",
    )
    format: Format | None = Field(None, description="File format; default: the master's.")
    quality: int | None = Field(None, ge=1, le=100, description="Default: encoding.quality.")
    lossless: bool | None = Field(None, description="webp: default encoding.lossless.")

    @model_validator(mode="after")
    def _check_box(self) -> Variant:
        if self.width is None and self.height is None:
            raise ValueError("give width, height or both")
        if self.fit == "cover" and (self.width is None or self.height is None):
            raise ValueError("fit cover needs both width and height")
        return self


class EncodingConfig(BaseModel):
    """How images are written (`encoding:` in a job or serve config)."""

    model_config = ConfigDict(extra="forbid")

    format: Format = Field("png", description="The master file's format: png, webp or jpeg.")
    quality: int = Field(
        90, ge=1, le=100, description="webp and jpeg: encoder quality (100: best, largest)."
    )
    lossless: bool = Field(False, description="webp: lossless (quality then sets the effort).")
    variants: list[Variant] = Field(
        default_factory=list, description="Extra resized or cropped files per image."
    )

    @model_validator(mode="after")
    def _check_names(self) -> EncodingConfig:
        names = [v.name for v in self.variants]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"variants: the name {twice[0]!r} is used twice")
        return self


PNG_ONLY = EncodingConfig()


@dataclass(frozen=True)
class FileFormat:
    """How one file is encoded: its format and, for webp and jpeg, quality and losslessness."""

    format: str
    quality: int = 90
    lossless: bool = False

    @property
    def lossy(self) -> bool:
        return self.format == "jpeg" or (self.format == "webp" and not self.lossless)


PNG = FileFormat("png")


def master_format(config: EncodingConfig) -> FileFormat:
    return FileFormat(config.format, config.quality, config.lossless)


def variant_format(variant: Variant, config: EncodingConfig) -> FileFormat:
    lossless = config.lossless if variant.lossless is None else variant.lossless
    return FileFormat(variant.format or config.format, variant.quality or config.quality, lossless)


def encode(pixels: Any, how: FileFormat, text: Any = None) -> bytes:
    """The bytes of a [H, W, 3] uint8 array encoded `how`; `text` (a PIL PngInfo) goes into
    a PNG's text chunks. PNG uses fast compression: encode time matters more than bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if how.format == "png":
        image.save(buf, format="PNG", compress_level=1, pnginfo=text)
    elif how.format == "webp":
        image.save(buf, format="WEBP", quality=how.quality, lossless=how.lossless, method=4)
    else:
        image.save(buf, format="JPEG", quality=how.quality, optimize=False)
    return buf.getvalue()


def decode(data: bytes) -> Any:
    """The [H, W, 3] uint8 pixels of an encoded file."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def resized(pixels: Any, variant: Variant) -> Any:
    """The pixels of `variant`: fitted into (contain) or cropped to (cover) its box."""
    import numpy as np
    from PIL import Image, ImageOps

    image = Image.fromarray(pixels)
    height, width = pixels.shape[:2]
    if variant.fit == "cover":
        out = ImageOps.fit(image, (variant.width, variant.height), Image.Resampling.LANCZOS)
    else:
        scale = min(
            (variant.width or 10**9) / width, (variant.height or 10**9) / height
        )  # fmt: skip
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        out = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(out)


def variant_key(name: str, image_id: str, ext: str, hashed: bool = False) -> str:
    """variants/<name>/<id>.<ext>, or (hashed) variants/<name>/<hh>/<id>.<ext>."""
    import hashlib

    if hashed:
        return f"{VARIANTS}/{name}/{hashlib.sha256(image_id.encode()).hexdigest()[:2]}/{image_id}.{ext}"
    return f"{VARIANTS}/{name}/{image_id}.{ext}"
