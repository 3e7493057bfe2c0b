"""Compositing after generation (`composite:`): layers placed in boxes over a generated
image, for ad creatives and product shots: a cut-out product PNG, a logo, and text filled
from the row's metadata columns. Layers are drawn in order, later ones on top.

- Boxes: an int is pixels, a float in [0, 1] a fraction of the image's width (x, width)
  or height (y, height). A box running past the image's edge is clipped to it; a box
  starting outside the image fails the row.
- Image fit: `contain` scales the whole layer into the box keeping its aspect ratio and
  places it by align/valign; `cover` fills the box, cropping the centre; `stretch` fills
  it ignoring the aspect ratio. Alpha is kept and multiplied by `opacity`.
- Text: `text` and an image's `source` are str.format templates over the row's columns
  ("{headline} — {price}"). Words wrap to the box's width; when the lines still overflow
  the box, the font shrinks about 10% a step down to MIN_FONT_SIZE, then the row fails:
  text is never silently clipped. Lines are `line_spacing` x the font size apart
  (pipeline/layer_text.py draws them). Pillow's bundled default font covers ASCII and a
  few typographic marks only; name a TTF/OTF `font` for other characters.

Light to import (Pillow and numpy load inside the functions that use them).
"""

from __future__ import annotations

import functools
import io
import string
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

MIN_FONT_SIZE = 8
Read = Callable[[str], bytes]


class CompositeError(ValueError):
    """One row's composite failed: field (e.g. 'composite.layers[1].text') and reason."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason

    def __reduce__(self):  # crosses Ray's process boundaries with its two arguments
        return (type(self), (self.field, self.reason))


class Box(BaseModel):
    """Where a layer goes: ints are pixels, floats in [0, 1] fractions of the image."""

    model_config = ConfigDict(extra="forbid")

    # Strict: a YAML `true` or "10" is refused rather than read as 1 or 10 pixels.
    x: StrictInt | StrictFloat = Field(description="Left edge: px, or a fraction of the width.")
    y: StrictInt | StrictFloat = Field(description="Top edge: px, or a fraction of the height.")
    width: StrictInt | StrictFloat = Field(description="Px, or a fraction of the image's width.")
    height: StrictInt | StrictFloat = Field(description="Px, or a fraction of its height.")

    @field_validator("x", "y", "width", "height")
    @classmethod
    def _check_range(cls, v: int | float, info: Any) -> int | float:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        if isinstance(v, float) and v > 1:
            raise ValueError(f"a float is a fraction in [0, 1], got {v}; write pixels as an int")
        if info.field_name in ("width", "height") and v == 0:
            raise ValueError("must be > 0")
        return v

    def pixels(
        self, image_width: int, image_height: int, *, field: str = "box"
    ) -> tuple[int, int, int, int]:
        """(x, y, w, h) in pixels, clipped to the image; CompositeError naming `field`.x or
        .y when the box starts outside it."""
        x, y = _to_pixels(self.x, image_width), _to_pixels(self.y, image_height)
        for name, start, side in (("x", x, image_width), ("y", y, image_height)):
            if start >= side:
                raise CompositeError(f"{field}.{name}", f"{start} px starts outside the "
                                     f"{image_width}x{image_height} image")  # fmt: skip
        width = min(max(1, _to_pixels(self.width, image_width)), image_width - x)
        height = min(max(1, _to_pixels(self.height, image_height)), image_height - y)
        return x, y, width, height


def _to_pixels(value: int | float, side: int) -> int:
    return round(value * side) if isinstance(value, float) else value


class ImageLayer(BaseModel):
    """A picture (PNG/JPEG/WebP, alpha kept) placed in a box: a product cut-out, a logo."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["image"]
    source: str = Field(min_length=1, description="Path or URI; may be a template "
                        "('{product_png}') filled from the row's columns.")  # fmt: skip
    box: Box
    fit: Literal["contain", "cover", "stretch"] = Field(
        "contain", description="contain: whole, aspect kept; cover: fills, centre cropped."
    )
    align: Literal["left", "center", "right"] = "center"
    valign: Literal["top", "middle", "bottom"] = "middle"
    opacity: float = Field(1.0, gt=0, le=1, description="Multiplies the layer's alpha.")


class TextLayer(BaseModel):
    """Text from a template over the row's columns, wrapped and shrunk to fit its box."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["text"]
    text: str = Field(description="str.format template, e.g. '{headline} — {price}'.")
    box: Box
    font: str | None = Field(None, description="Path or URI of a TTF/OTF; null: Pillow's.")
    size: int = Field(32, gt=0, description="Font size in px (shrunk when the text overflows).")
    color: str = Field("#ffffff", description="A Pillow colour; '#RRGGBBAA' for alpha.")
    align: Literal["left", "center", "right"] = "left"
    valign: Literal["top", "middle", "bottom"] = "top"
    wrap: bool = Field(True, description="Wrap words to the box's width.")
    line_spacing: float = Field(1.2, gt=0, description="Line pitch as a multiple of the size.")
    stroke_width: int = Field(0, ge=0, description="Outline width in px.")
    stroke_color: str = "#000000"

    @field_validator("color", "stroke_color")
    @classmethod
    def _check_color(cls, v: str) -> str:
        _rgba(v)  # ValueError: unknown color specifier
        return v


class CompositeConfig(BaseModel):
    """Layers drawn over every generated image of a job (`composite:`), in order."""

    model_config = ConfigDict(extra="forbid")

    layers: list[Annotated[ImageLayer | TextLayer, Field(discriminator="kind")]] = Field(
        default_factory=list
    )

    @property
    def enabled(self) -> bool:
        return bool(self.layers)


def _rgba(color: str) -> tuple[int, int, int, int]:
    from PIL import ImageColor

    return ImageColor.getcolor(color, "RGBA")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _template_names(template: str, field: str) -> list[str]:
    """The column names `template` uses; CompositeError naming `field` for a bad one."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise CompositeError(field, f"bad template {template!r} ({exc})") from None
    names = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or "." in name or "[" in name:
            raise CompositeError(field, f"bad template {template!r}: {{{name}}} is not a "
                                 "column name; write one like {headline}")  # fmt: skip
        names += [name, *_template_names(spec or "", field)]
    return names


def _layer_templates(config: CompositeConfig) -> list[tuple[str, str]]:
    return [(f"composite.layers[{i}].{'source' if layer.kind == 'image' else 'text'}",
             layer.source if layer.kind == "image" else layer.text)
            for i, layer in enumerate(config.layers)]  # fmt: skip


def template_fields(config: CompositeConfig) -> set[str]:
    """The metadata column names all of `config`'s templates use."""
    return {name for field, t in _layer_templates(config) for name in _template_names(t, field)}


def layer_values(request: Any) -> dict[str, str]:
    """What a request's templates fill from: its id, prompt, seed and metadata."""
    return {"id": request.id, "prompt": request.prompt, "seed": str(request.resolved_seed),
            **request.metadata}  # fmt: skip


class LayersStamp:
    """What of a request's composite decides its file (the layers' config and the values
    its templates read), as a digest its fingerprint counts; None without layers. Made
    once per config (templates parsed, config serialised), applied per request."""

    def __init__(self, config: CompositeConfig):
        self.fields = sorted(template_fields(config)) if config.enabled else None
        self.basis = config.model_dump(mode="json") if config.enabled else None

    def __call__(self, request: Any) -> str | None:
        import hashlib
        import json

        if self.fields is None:
            return None
        values = layer_values(request)
        used = {name: values.get(name) for name in self.fields}
        text = json.dumps([self.basis, used], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def missing_value(config: CompositeConfig, values: dict[str, str]) -> CompositeError | None:
    """Why a row with `values` cannot be composited (a column a template needs), checked
    before its image is made; None when it can."""
    for field, template in _layer_templates(config):
        for name in _template_names(template, field):
            if values.get(name) is None:
                return CompositeError(field, f"needs the metadata column {name!r}, which this "
                                      "row does not have")  # fmt: skip
    return None


def _filled(template: str, values: dict[str, str], field: str) -> str:
    """`template` filled from the row's `values`; CompositeError for a missing column."""
    for name in _template_names(template, field):
        if values.get(name) is None:
            raise CompositeError(field, f"needs the metadata column {name!r}, which this row "
                                 "does not have")  # fmt: skip
    try:
        return template.format_map(values)
    except (ValueError, TypeError) as exc:  # a format spec the value does not take
        raise CompositeError(field, f"cannot fill {template!r} ({_first_line(exc)})") from None


def check_composite(config: CompositeConfig, read: Read) -> None:
    """ConfigError with one line naming the field when `config` cannot be applied: a fixed
    source or a font that cannot be read and loaded, or a bad template."""
    from .config import ConfigError
    from .layer_text import layer_font

    try:
        for field, template in _layer_templates(config):
            _template_names(template, field)
        for i, layer in enumerate(config.layers):
            field = f"composite.layers[{i}]"
            if layer.kind == "image" and not _template_names(layer.source, f"{field}.source"):
                _layer_image(read, layer.source, f"{field}.source", fixed=True)
            if layer.kind == "text":
                layer_font(read, layer.font, layer.size, f"{field}.font")
    except CompositeError as exc:
        raise ConfigError(str(exc)) from None


def check_fixed_sources(config: CompositeConfig) -> None:
    """ConfigError naming the first image layer whose file each row names (online, where a
    client's metadata would choose which of the server's files is read)."""
    from .config import ConfigError

    for i, layer in enumerate(config.layers):
        field = f"composite.layers[{i}].source"
        if layer.kind == "image" and _template_names(layer.source, field):
            raise ConfigError(f"{field}: {layer.source!r} names a file per request; online a "
                              "client's metadata would choose which of the server's files is "
                              "read, so give a fixed path (per-row images are for batch jobs)")  # fmt: skip


def compose(
    pixels: np.ndarray, values: dict[str, str], config: CompositeConfig, read: Read
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(new uint8 [H, W, 3] pixels with `config`'s layers drawn over `pixels`, one
    placement record per layer); CompositeError naming the field when a layer fails."""
    import numpy as np
    from PIL import Image

    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
    from .layer_text import place_text

    canvas = Image.fromarray(pixels).convert("RGBA")  # a copy: `pixels` stays as it is
    records = []
    for i, layer in enumerate(config.layers):
        place = _place_image if layer.kind == "image" else place_text
        records.append(place(canvas, i, layer, values, read))
    return np.array(canvas.convert("RGB")), records


def _place_image(canvas: PILImage.Image, i: int, layer: ImageLayer, values: dict[str, str],
                 read: Read) -> dict[str, Any]:  # fmt: skip
    field = f"composite.layers[{i}]"
    box = layer.box.pixels(*canvas.size, field=f"{field}.box")
    uri = _filled(layer.source, values, f"{field}.source")
    fixed = not _template_names(layer.source, f"{field}.source")
    tile, (dx, dy) = _fitted(_layer_image(read, uri, f"{field}.source", fixed), layer, box[2:])
    if layer.opacity < 1:
        tile = _faded(tile, layer.opacity)
    canvas.alpha_composite(tile, (box[0] + dx, box[1] + dy))
    return {"layer": i, "kind": "image", "source": uri, "box": list(box),
            "placed": [box[0] + dx, box[1] + dy, tile.width, tile.height]}  # fmt: skip


def _layer_image(read: Read, uri: str, field: str, fixed: bool) -> PILImage.Image:
    """The RGBA image at `uri` (fixed sources decoded once per process; per-row ones every
    time); CompositeError naming `field` when it cannot be read or decoded."""
    try:
        return (_cached_image if fixed else _decoded_image)(read, uri)
    except Exception as exc:  # missing, no access, not an image
        raise CompositeError(field, f"cannot read {uri!r} ({_first_line(exc)})") from None


def _decoded_image(read: Read, uri: str) -> PILImage.Image:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(read(uri))) as image:
        return ImageOps.exif_transpose(image).convert("RGBA")  # camera JPEGs stand upright


_cached_image = functools.lru_cache(maxsize=16)(_decoded_image)


def _fitted(image: PILImage.Image, layer: ImageLayer,
            box: tuple[int, int]) -> tuple[PILImage.Image, tuple[int, int]]:  # fmt: skip
    """(`image` sized for `box` by `layer.fit`, its offset inside the box)."""
    from PIL import Image, ImageOps

    if layer.fit == "stretch":
        return image.resize(box, Image.Resampling.LANCZOS), (0, 0)
    if layer.fit == "cover":
        return ImageOps.fit(image, box, Image.Resampling.LANCZOS), (0, 0)
    scale = min(box[0] / image.width, box[1] / image.height)
    size = (min(box[0], max(1, round(image.width * scale))),
            min(box[1], max(1, round(image.height * scale))))  # fmt: skip
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image, (_offset(layer.align, box[0] - size[0]), _offset(layer.valign, box[1] - size[1]))


def _offset(alignment: str, slack: int) -> int:
    """How far into the box an item goes, given the room (`slack`) it leaves."""
    return {"left": 0, "top": 0, "center": slack // 2, "middle": slack // 2}.get(alignment, slack)


def _faded(tile: PILImage.Image, opacity: float) -> PILImage.Image:
    faded = tile.copy()  # never touch a cached layer image
    faded.putalpha(tile.getchannel("A").point(lambda a: round(a * opacity)))
    return faded
