"""Marks in the file: an invisible watermark, a visible text or logo mark, and
provenance in PNG text chunks.

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

import functools
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
    visible_text: str | None = Field(
        None, max_length=200, description="A visible text mark drawn on every image (e.g. "
        "'AI-generated'); null: none.",
    )  # fmt: skip
    visible_logo: str | None = Field(
        None, description="A visible logo: a local PNG (its alpha kept) pasted on every image."
    )
    visible_position: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = Field(
        "bottom-right", description="Corner of the visible mark."
    )
    visible_opacity: float = Field(0.6, gt=0, le=1, description="Opacity of the visible mark.")
    visible_size: float = Field(
        0.05, gt=0, le=0.5,
        description="Visible mark size as a fraction of the image's shorter side (text height; "
        "a logo's height is four times this).",
    )  # fmt: skip

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

    if marks.visible_logo is not None:
        try:
            _logo(marks.visible_logo)
        except Exception as exc:  # missing, not an image
            raise ConfigError(f"marks.visible_logo: cannot read {marks.visible_logo!r} "
                              f"({type(exc).__name__}: {exc})") from None  # fmt: skip
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


def visibly_marked(pixels: Any, marks: MarksConfig) -> Any:
    """`pixels` with the visible text and logo `marks` asks for, blended at its opacity in
    its corner (the pixels themselves when it asks for neither)."""
    if marks.visible_text is None and marks.visible_logo is None:
        return pixels
    import numpy as np
    from PIL import Image

    base = Image.fromarray(pixels).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    side = min(base.size)
    margin = max(2, round(side * marks.visible_size / 2))
    if marks.visible_logo is not None:
        _paste_logo(overlay, marks, round(side * marks.visible_size * 4), margin)
    if marks.visible_text is not None:
        _draw_text(overlay, marks, max(6, round(side * marks.visible_size)), margin)
    alpha = overlay.getchannel("A").point(lambda a: round(a * marks.visible_opacity))
    overlay.putalpha(alpha)
    return np.asarray(Image.alpha_composite(base, overlay).convert("RGB"))


@functools.lru_cache(maxsize=8)
def _logo(path: str) -> Any:
    """The logo at `path` (read once per process; every node needs the file at that path)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGBA")


def _corner(marks: MarksConfig, canvas: tuple[int, int], box: tuple[int, int],
            margin: int) -> tuple[int, int]:  # fmt: skip
    """Top-left point of a `box`-sized mark in `marks`' corner of `canvas`."""
    vertical, horizontal = marks.visible_position.split("-")
    x = margin if horizontal == "left" else canvas[0] - box[0] - margin
    y = margin if vertical == "top" else canvas[1] - box[1] - margin
    return max(0, x), max(0, y)


def _paste_logo(overlay: Any, marks: MarksConfig, height: int, margin: int) -> None:
    logo = _logo(marks.visible_logo)
    width = max(1, round(logo.width * height / max(logo.height, 1)))
    logo = logo.resize((min(width, overlay.width), min(height, overlay.height)))
    overlay.alpha_composite(logo, _corner(marks, overlay.size, logo.size, margin))


def _draw_text(overlay: Any, marks: MarksConfig, height: int, margin: int) -> None:
    """White text with a dark outline, readable on light and dark images alike."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=height)
    draw = ImageDraw.Draw(overlay)
    stroke = max(1, height // 12)
    left, top, right, bottom = draw.textbbox((0, 0), marks.visible_text, font=font,
                                             stroke_width=stroke)  # fmt: skip
    x, y = _corner(marks, overlay.size, (right - left, bottom - top), margin)
    draw.text((x - left, y - top), marks.visible_text, font=font, fill=(255, 255, 255, 255),
              stroke_width=stroke, stroke_fill=(0, 0, 0, 255))  # fmt: skip


def read_watermark(pixels: Any, length: int, method: str = "dwtDctSvd") -> bytes:
    """The `length`-byte payload decoded from RGB `pixels` (what a verifier runs); ValueError
    for an image under MIN_WATERMARK_SIDE, which never carries one."""
    from imwatermark import WatermarkDecoder

    if min(pixels.shape[:2]) < MIN_WATERMARK_SIDE:
        raise ValueError(f"a {pixels.shape[1]}x{pixels.shape[0]} image carries no watermark: "
                         f"they go into images of at least {MIN_WATERMARK_SIDE}x{MIN_WATERMARK_SIDE}")  # fmt: skip

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
