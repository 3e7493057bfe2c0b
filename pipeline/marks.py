"""Marks in the file: an invisible watermark and provenance in PNG text chunks.

Applied in the one write path (pipeline/outputs.py), so a job's images and the online
API's carry the same marks, configured per job and per deployment (`marks:`), and
recorded in each image's metadata row (`watermark`: the payload embedded, or null).

- The watermark is invisible-watermark's DWT-DCT-SVD method (`dwtDctSvd`): the plain
  DWT-DCT method SDXL's reference code uses (`dwtDct`) is selectable, but it did not
  decode its own payload back on smooth or noisy test images here. The library needs
  images of at least 256x256; smaller images are written unmarked (recorded as such).
- The text chunks are one `daguerre` tEXt chunk holding JSON (the id, prompt, seed, model,
  weights hash, run, version: what the metadata row says) and `Software`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_WATERMARK_SIDE = 256  # invisible-watermark refuses smaller images
MAX_PAYLOAD_BYTES = 16
TEXT_KEY = "daguerre"


class MarksConfig(BaseModel):
    """What is marked into each image file (`marks:` in a job or serve config)."""

    model_config = ConfigDict(extra="forbid")

    watermark: str | None = Field(
        None,
        description=f"ASCII payload (at most {MAX_PAYLOAD_BYTES} characters) embedded invisibly "
        "in every image of at least 256x256; null: none.",
    )
    watermark_method: Literal["dwtDctSvd", "dwtDct"] = Field(
        "dwtDctSvd", description="invisible-watermark's method (dwtDct: SDXL's, less robust)."
    )
    png_text: bool = Field(False, description="Write provenance into PNG text chunks.")

    @field_validator("watermark")
    @classmethod
    def _check_payload(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v or not v.isascii() or len(v) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"must be 1 to {MAX_PAYLOAD_BYTES} ASCII characters")
        return v


NO_MARKS = MarksConfig()


def check_marks(marks: MarksConfig) -> None:
    """ConfigError with one line naming the field when `marks` cannot be applied here."""
    from .config import ConfigError

    if marks.watermark is None:
        return
    try:
        import imwatermark  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"marks.watermark: needs invisible-watermark ({exc}); install it with "
                          "pip install 'daguerre[marks]' && pip install --no-deps "
                          "invisible-watermark==0.2.0") from None  # fmt: skip


def watermarked(pixels: Any, marks: MarksConfig) -> tuple[Any, str | None]:
    """(pixels with the watermark, the payload embedded), or (pixels, None) when marks ask
    for none or the image is under MIN_WATERMARK_SIDE."""
    if marks.watermark is None or min(pixels.shape[:2]) < MIN_WATERMARK_SIDE:
        return pixels, None
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", marks.watermark.encode())
    bgr = encoder.encode(pixels[:, :, ::-1].copy(), marks.watermark_method)
    return bgr[:, :, ::-1].copy(), marks.watermark


def read_watermark(pixels: Any, length: int, method: str = "dwtDctSvd") -> bytes:
    """The `length`-byte payload decoded from RGB `pixels` (what a verifier runs)."""
    from imwatermark import WatermarkDecoder

    return WatermarkDecoder("bytes", length * 8).decode(pixels[:, :, ::-1].copy(), method)


def text_chunks(fields: dict[str, Any], version: str) -> Any:
    """A PIL PngInfo with the provenance `fields` as JSON under TEXT_KEY, and Software."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(TEXT_KEY, json.dumps(fields, sort_keys=True, default=str))
    info.add_text("Software", f"daguerre {version}")
    return info


def read_text_chunks(png: bytes) -> dict[str, Any]:
    """The provenance a PNG's TEXT_KEY chunk holds ({} when it has none)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        raw = image.text.get(TEXT_KEY)
    return json.loads(raw) if raw else {}
