"""Compositing (composite:): image layers land in their boxes with alpha, fit and opacity;
text fills from the row's columns, wraps, shrinks and aligns; bad configs fail up front
with the field named, and bad rows fail alone with a CompositeError."""

from __future__ import annotations

import pathlib
import pickle

import numpy as np
import pytest
from daguerre.pipeline.composite import (
    Box,
    CompositeConfig,
    CompositeError,
    check_composite,
    compose,
    template_fields,
)
from daguerre.pipeline.config import ConfigError
from PIL import Image, ImageFont
from pydantic import ValidationError

pytestmark = pytest.mark.timeout(60)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def read(uri: str) -> bytes:
    return pathlib.Path(uri).read_bytes()


def base(width: int = 100, height: int = 80, color=BLUE) -> np.ndarray:
    return np.full((height, width, 3), color, dtype=np.uint8)


def png(path: pathlib.Path, size: tuple[int, int], color=(*RED, 255)) -> str:
    Image.new("RGBA", size, color).save(path)
    return str(path)


def config(*layers: dict) -> CompositeConfig:
    return CompositeConfig.model_validate({"layers": list(layers)})


def box_of(box: tuple) -> dict:
    return dict(zip(("x", "y", "width", "height"), box, strict=True))


def image_layer(source: str, box: tuple, **extra) -> dict:
    return {"kind": "image", "source": source, "box": box_of(box), **extra}


def text_layer(text: str, box: tuple, **extra) -> dict:
    return {"kind": "text", "text": text, "box": box_of(box), **extra}


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """[H, W] mask of the pixels that differ."""
    return (before != after).any(axis=2)


# -- image layers -----------------------------------------------------------------------


def test_an_opaque_square_lands_exactly_in_its_pixel_box(tmp_path):
    square = png(tmp_path / "red.png", (20, 20))
    pixels = base()
    out, records = compose(pixels, {}, config(image_layer(square, (10, 30, 20, 20))), read)
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    assert (out[30:50, 10:30] == RED).all()
    outside = np.ones(pixels.shape[:2], bool)
    outside[30:50, 10:30] = False
    assert (out[outside] == BLUE).all()
    assert records == [{"layer": 0, "kind": "image", "source": square,
                        "box": [10, 30, 20, 20], "placed": [10, 30, 20, 20]}]  # fmt: skip


def test_fraction_boxes_resolve_against_width_and_height():
    assert Box(x=0.5, y=0.25, width=0.25, height=0.5).pixels(200, 100) == (100, 25, 50, 50)
    assert Box(x=0.0, y=0, width=1.0, height=1.0).pixels(64, 32) == (0, 0, 64, 32)


def test_a_box_past_the_edge_is_clipped_and_one_outside_fails():
    assert Box(x=90, y=70, width=50, height=50).pixels(100, 80) == (90, 70, 10, 10)
    with pytest.raises(CompositeError) as err:
        Box(x=100, y=0, width=5, height=5).pixels(100, 80, field="composite.layers[0].box")
    assert err.value.field == "composite.layers[0].box.x"


@pytest.mark.parametrize(("key", "value", "says"), [
    ("x", -1, ">= 0"), ("y", 1.5, "fraction"), ("width", 0, "> 0"), ("height", 0.0, "> 0"),
    ("x", True, "int"),
])  # fmt: skip
def test_bad_box_values_are_refused_naming_the_field(key, value, says):
    fields = {"x": 0, "y": 0, "width": 10, "height": 10, key: value}
    with pytest.raises(ValidationError) as err:
        Box(**fields)
    assert err.value.errors()[0]["loc"][0] == key and says in str(err.value)


def test_alpha_is_kept_so_the_base_shows_through_transparent_parts(tmp_path):
    half = Image.new("RGBA", (20, 20), (*RED, 255))
    half.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half transparent
    half.save(tmp_path / "half.png")
    out, _ = compose(base(), {}, config(image_layer(str(tmp_path / "half.png"),
                                                    (0, 0, 20, 20))), read)  # fmt: skip
    assert (out[0:20, 0:10] == BLUE).all() and (out[0:20, 10:20] == RED).all()


def test_contain_keeps_the_aspect_ratio_and_centres(tmp_path):
    wide = png(tmp_path / "wide.png", (40, 20))
    out, records = compose(base(), {}, config(image_layer(wide, (0, 0, 40, 40))), read)
    assert records[0]["placed"] == [0, 10, 40, 20]
    assert (out[10:30, 0:40] == RED).all() and (out[0:10, 0:40] == BLUE).all()


def test_contain_places_by_align_and_valign(tmp_path):
    wide = png(tmp_path / "wide.png", (40, 20))
    placed = {}
    for align, valign, box in (("right", "top", (10, 0, 80, 20)), ("left", "top", (10, 0, 80, 20)),
                               ("center", "bottom", (10, 0, 80, 60))):  # fmt: skip
        layer = image_layer(wide, box, align=align, valign=valign)
        placed[align, valign] = compose(base(), {}, config(layer), read)[1][0]["placed"]
    assert placed["right", "top"] == [50, 0, 40, 20] and placed["left", "top"] == [10, 0, 40, 20]
    assert placed["center", "bottom"] == [10, 20, 80, 40]


@pytest.mark.parametrize("fit", ["cover", "stretch"])
def test_cover_and_stretch_fill_the_box(tmp_path, fit):
    wide = png(tmp_path / "wide.png", (40, 20))
    out, records = compose(base(), {}, config(image_layer(wide, (5, 5, 30, 30), fit=fit)), read)
    assert records[0]["placed"] == [5, 5, 30, 30]
    assert (out[5:35, 5:35] == RED).all() and (out[35:, :] == BLUE).all()


def test_cover_crops_the_centre(tmp_path):
    stripes = Image.new("RGBA", (30, 10), (0, 255, 0, 255))
    stripes.paste((*RED, 255), (10, 0, 20, 10))  # red middle third
    stripes.save(tmp_path / "stripes.png")
    layer = image_layer(str(tmp_path / "stripes.png"), (0, 0, 10, 10), fit="cover")
    out, _ = compose(base(), {}, config(layer), read)
    assert (out[0:10, 0:10] == RED).all()


def test_opacity_blends_the_layer_with_the_base(tmp_path):
    square = png(tmp_path / "red.png", (10, 10))
    out, _ = compose(base(), {}, config(image_layer(square, (0, 0, 10, 10), opacity=0.5)), read)
    assert np.abs(out[0:10, 0:10].astype(int) - (127.5, 0, 127.5)).max() <= 2


def test_a_per_row_source_reads_each_rows_file(tmp_path):
    red = png(tmp_path / "red.png", (10, 10))
    green = png(tmp_path / "green.png", (10, 10), (0, 255, 0, 255))
    layers = config(image_layer("{photo}", (0, 0, 10, 10)))
    for path, color in ((red, RED), (green, (0, 255, 0))):
        out, records = compose(base(), {"photo": path}, layers, read)
        assert (out[0:10, 0:10] == color).all() and records[0]["source"] == path


def test_a_per_row_source_that_cannot_be_read_fails_the_row(tmp_path):
    layers = config(text_layer("hi", (0, 0, 50, 30)), image_layer("{photo}", (0, 0, 10, 10)))
    missing = str(tmp_path / "gone.png")
    with pytest.raises(CompositeError) as err:
        compose(base(), {"photo": missing}, layers, read)
    assert err.value.field == "composite.layers[1].source"
    assert missing in err.value.reason and "FileNotFoundError" in err.value.reason


# -- text layers ------------------------------------------------------------------------


def test_text_is_filled_from_the_rows_columns_and_drawn_in_its_box():
    layers = config(text_layer("{headline} - {price}", (10, 10, 80, 40), size=12))
    pixels = base()
    out, records = compose(pixels, {"headline": "Sale", "price": "$5"}, layers, read)
    ink = changed(pixels, out)
    assert ink[10:50, 10:90].any() and not ink[50:, :].any() and not ink[:, :10].any()
    assert records == [{"layer": 0, "kind": "text", "text": "Sale - $5",
                        "box": [10, 10, 80, 40], "font": "default", "size": 12, "lines": 1}]  # fmt: skip


def test_long_text_wraps_in_a_narrow_box():
    layers = config(text_layer("{copy}", (0, 0, 60, 80), size=12))
    _, records = compose(base(), {"copy": "one two three four five six"}, layers, read)
    assert records[0]["lines"] > 1 and records[0]["size"] == 12


def test_text_shrinks_to_fit_and_fails_when_even_the_minimum_does_not():
    layers = config(text_layer("{copy}", (0, 0, 100, 30), size=40))
    _, records = compose(base(), {"copy": "a headline that is long"}, layers, read)
    assert 8 <= records[0]["size"] < 40
    with pytest.raises(CompositeError) as err:
        compose(base(), {"copy": "word " * 200}, layers, read)
    assert err.value.field == "composite.layers[0].text" and "does not fit" in err.value.reason


def test_centre_alignment_moves_the_ink_right_of_left_alignment():
    def ink_left(align: str) -> int:
        layers = config(text_layer("Hi", (0, 0, 100, 40), size=16, align=align))
        pixels = base()
        return int(np.nonzero(changed(pixels, compose(pixels, {}, layers, read)[0]).any(0))[0][0])

    assert ink_left("left") <= 2 and 30 < ink_left("center") < ink_left("right")


def test_text_colour_with_alpha_blends():
    layers = config(text_layer("##########", (0, 0, 100, 40), size=30, color="#ff000080"))
    out, _ = compose(base(color=(0, 0, 0)), {}, layers, read)
    assert 120 <= out[..., 0].max() <= 132  # half-transparent red over black


def test_a_font_file_is_used(tmp_path):
    font = tmp_path / "font.ttf"
    font.write_bytes(ImageFont.load_default(size=10).font_bytes)
    layers = config(text_layer("Hi", (0, 0, 100, 40), font=str(font), size=20))
    _, records = compose(base(), {}, layers, read)
    assert records[0]["font"] == str(font) and records[0]["size"] == 20


@pytest.mark.parametrize("values", [{"headline": "Sale"}, {"headline": "Sale", "price": None}])
def test_a_missing_column_fails_the_row_naming_the_layer_and_column(values):
    layers = config(text_layer("{headline} - {price}", (0, 0, 100, 40)))
    with pytest.raises(CompositeError) as err:
        compose(base(), values, layers, read)
    assert str(err.value) == ("composite.layers[0].text: needs the metadata column 'price', "
                              "which this row does not have")  # fmt: skip


# -- config and contract ----------------------------------------------------------------


def test_template_fields_lists_every_placeholder():
    layers = config(text_layer("{headline} {price:>6}", (0, 0, 1, 1)),
                    image_layer("{product_png}", (0, 0, 1, 1)),
                    image_layer("logo.png", (0, 0, 1, 1)))  # fmt: skip
    assert template_fields(layers) == {"headline", "price", "product_png"}
    assert not CompositeConfig().enabled and layers.enabled


def test_a_good_config_passes_the_check(tmp_path):
    font = tmp_path / "font.ttf"
    font.write_bytes(ImageFont.load_default(size=10).font_bytes)
    check_composite(config(image_layer(png(tmp_path / "logo.png", (4, 4)), (0, 0, 4, 4)),
                           image_layer("{photo}", (0, 0, 4, 4)),
                           text_layer("{headline}", (0, 0, 4, 4)),
                           text_layer("x", (0, 0, 4, 4), font=str(font))), read)  # fmt: skip


@pytest.mark.parametrize(("layer", "field"), [
    (image_layer("MISSING", (0, 0, 4, 4)), "composite.layers[0].source: cannot read"),
    (image_layer("NOT_AN_IMAGE", (0, 0, 4, 4)), "composite.layers[0].source: cannot read"),
    (text_layer("x", (0, 0, 4, 4), font="MISSING"), "composite.layers[0].font: "),
    (text_layer("x", (0, 0, 4, 4), font="NOT_AN_IMAGE"), "composite.layers[0].font: "),
    (text_layer("{", (0, 0, 4, 4)), "composite.layers[0].text: bad template"),
    (text_layer("{0}", (0, 0, 4, 4)), "composite.layers[0].text: bad template"),
    (text_layer("{a.b}", (0, 0, 4, 4)), "composite.layers[0].text: bad template"),
    (image_layer("{}.png", (0, 0, 4, 4)), "composite.layers[0].source: bad template"),
])  # fmt: skip
def test_the_check_refuses_a_config_naming_the_field(tmp_path, layer, field):
    (tmp_path / "NOT_AN_IMAGE").write_text("hello")
    for key in ("source", "font"):
        if layer.get(key) in ("MISSING", "NOT_AN_IMAGE"):
            layer = {**layer, key: str(tmp_path / layer[key])}
    with pytest.raises(ConfigError) as err:
        check_composite(config(layer), read)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


@pytest.mark.parametrize("layers", [
    [{"kind": "text", "text": "x", "box": {"x": 0, "y": 0, "width": 1, "height": 1}, "colour": "red"}],
    [{"kind": "text", "text": "x", "box": {"x": 0, "y": 0, "width": 1, "height": 1}, "color": "nope"}],
    [{"kind": "video", "source": "a.mp4", "box": {"x": 0, "y": 0, "width": 1, "height": 1}}],
    [{"kind": "image", "source": "a.png", "box": {"x": 0, "y": 0, "width": 1, "height": 1}, "opacity": 0}],
])  # fmt: skip
def test_unknown_keys_and_bad_values_fail_validation(layers):
    with pytest.raises(ValidationError):
        CompositeConfig.model_validate({"layers": layers})


def test_the_input_array_is_not_modified(tmp_path):
    pixels = base()
    before = pixels.copy()
    layers = config(image_layer(png(tmp_path / "red.png", (10, 10)), (0, 0, 50, 50)),
                    text_layer("Hello", (0, 0, 100, 80)))  # fmt: skip
    out, _ = compose(pixels, {}, layers, read)
    assert (pixels == before).all() and out.dtype == np.uint8 and out.shape == (80, 100, 3)
    assert not np.shares_memory(out, pixels)


def test_no_layers_give_back_a_copy():
    pixels = base()
    out, records = compose(pixels, {}, CompositeConfig(), read)
    assert records == [] and (out == pixels).all() and not np.shares_memory(out, pixels)


def test_a_composite_error_pickles_with_its_field_and_reason():
    err = pickle.loads(pickle.dumps(CompositeError("composite.layers[1].text", "too long")))
    assert (err.field, err.reason, str(err)) == ("composite.layers[1].text", "too long",
                                                 "composite.layers[1].text: too long")  # fmt: skip
