"""Text layers of a composite (pipeline/composite.py): a template filled from the row, in
a font (a TTF/OTF by path or URI, or Pillow's bundled one), wrapped to its box's width and
shrunk step by step until the lines fit its height (down to MIN_FONT_SIZE; then the row
fails: text is never silently clipped), aligned and drawn with its stroke."""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Any

from .composite import (
    MIN_FONT_SIZE,
    CompositeError,
    Read,
    TextLayer,
    _filled,
    _first_line,
    _offset,
    _rgba,
)

if TYPE_CHECKING:
    from PIL import Image as PILImage


def layer_font(read: Read, uri: str | None, size: int, field: str) -> Any:
    """The font at `uri` (Pillow's bundled one for None) at `size` px; CompositeError
    naming `field` when it cannot be read or loaded."""
    try:
        return _font(read, uri, size)
    except Exception as exc:  # missing, not a font, Pillow without FreeType
        raise CompositeError(field, f"cannot load {uri or 'the default font'!r} at {size} px "
                             f"({_first_line(exc)})") from None  # fmt: skip


@functools.lru_cache(maxsize=64)
def _font(read: Read, uri: str | None, size: int) -> Any:
    from PIL import ImageFont

    if uri is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(io.BytesIO(_font_bytes(read, uri)), size)


@functools.lru_cache(maxsize=8)
def _font_bytes(read: Read, uri: str) -> bytes:
    return read(uri)


def place_text(canvas: PILImage.Image, i: int, layer: TextLayer, values: dict[str, str],
                read: Read) -> dict[str, Any]:  # fmt: skip
    field = f"composite.layers[{i}]"
    box = layer.box.pixels(*canvas.size, field=f"{field}.box")
    text = _filled(layer.text, values, f"{field}.text")
    font, lines = _fitted_text(text, layer, box[2:], read, field)
    if lines:
        _draw_lines(canvas, lines, font, layer, box)
    return {"layer": i, "kind": "text", "text": text, "box": list(box),
            "font": layer.font or "default", "size": font.size, "lines": len(lines)}  # fmt: skip


def _font_sizes(size: int):
    """`size`, then about 10% smaller each step, down to MIN_FONT_SIZE."""
    yield size
    while size > MIN_FONT_SIZE:
        size = max(MIN_FONT_SIZE, min(size - 1, int(size * 0.9)))
        yield size


def _fitted_text(text: str, layer: TextLayer, box: tuple[int, int], read: Read,
                 field: str) -> tuple[Any, list[str]]:  # fmt: skip
    """(font, lines): the largest size from `layer.size` down whose lines fit `box`."""
    if not text.strip():
        return layer_font(read, layer.font, layer.size, f"{field}.font"), []
    for size in _font_sizes(layer.size):
        font = layer_font(read, layer.font, size, f"{field}.font")
        lines = _wrapped(text, font, layer, box[0]) if layer.wrap else text.split("\n")
        widest = max(_ink_width(line, font, layer.stroke_width) for line in lines)
        if widest <= box[0] and _block_height(len(lines), font, layer) <= box[1]:
            return font, lines
    raise CompositeError(f"{field}.text", f"{text!r} does not fit the {box[0]}x{box[1]} box "
                         f"even at {size} px; shorten it or enlarge the box")  # fmt: skip


def _wrapped(text: str, font: Any, layer: TextLayer, width: int) -> list[str]:
    """`text`'s words, greedily into lines no wider than `width` (a longer word alone)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            longer = f"{line} {word}" if line else word
            if line and _ink_width(longer, font, layer.stroke_width) > width:
                lines.append(line)
                longer = word
            line = longer
        lines.append(line)
    return lines


def _ink_width(line: str, font: Any, stroke: int) -> int:
    left, _, right, _ = font.getbbox(line, stroke_width=stroke)
    return right - left


def _block_height(count: int, font: Any, layer: TextLayer) -> int:
    """Pixels from the first line's top to the last's bottom, outline included."""
    ascent, descent = font.getmetrics()
    pitch = round(font.size * layer.line_spacing)
    return (count - 1) * pitch + ascent + descent + 2 * layer.stroke_width


def _draw_lines(canvas: PILImage.Image, lines: list[str], font: Any, layer: TextLayer,
                box: tuple[int, int, int, int]) -> None:  # fmt: skip
    """`lines` aligned in `box`, on an overlay blended over `canvas` (colours with alpha)."""
    from PIL import Image, ImageDraw

    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    stroke, pitch = layer.stroke_width, round(font.size * layer.line_spacing)
    top = box[1] + _offset(layer.valign, box[3] - _block_height(len(lines), font, layer))
    for k, line in enumerate(lines):
        left = font.getbbox(line, stroke_width=stroke)[0]
        x = box[0] + _offset(layer.align, box[2] - _ink_width(line, font, stroke)) - left
        draw.text((x, top + stroke + k * pitch), line, font=font, fill=_rgba(layer.color),
                  stroke_width=stroke, stroke_fill=_rgba(layer.stroke_color))  # fmt: skip
    canvas.alpha_composite(overlay)
