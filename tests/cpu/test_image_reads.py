"""Reading init images and masks (pipeline/image_reads.py): the size rule, the resize
modes, and every bad input as a per-row refusal naming its field."""

from __future__ import annotations

import io

import numpy as np
import pytest
from daguerre.pipeline.config import RequestRefused
from daguerre.pipeline.image_reads import StorageReader, load_image_input, resolve_uri
from daguerre.pipeline.schema import DEFAULT_LIMITS, ImageRequest, RequestLimits, validate_request
from PIL import Image

READ = StorageReader()


def _png(path, width, height, color=(200, 30, 30), mode="RGB"):
    Image.new(mode, (width, height), color).save(path)
    return str(path)


def _load(request, base=None, limits=DEFAULT_LIMITS, side=64):
    return load_image_input(request, READ, base, limits, side)


def test_sized_by_the_image_rounds_down_to_multiples_of_8(tmp_path):
    _png(tmp_path / "photo.png", 101, 67)
    image = _load(ImageRequest(id="a", prompt="p", init_image="photo.png"), base=str(tmp_path))
    assert image.pixels.shape == (64, 96, 3) and image.pixels.dtype == np.uint8
    assert image.provenance["resize"] is None
    assert image.provenance["init_image"] == "photo.png"
    assert len(image.provenance["init_sha256"]) == 64


@pytest.mark.parametrize("mode", ["fill", "fit", "stretch"])
def test_a_request_size_resizes_by_mode(tmp_path, mode):
    # A red 64x32 photo into 32x32: fill crops to red, fit pads white above and below.
    _png(tmp_path / "wide.png", 64, 32)
    request = ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "wide.png"), width=32,
                           height=32, resize=mode)  # fmt: skip
    pixels = _load(request).pixels
    assert pixels.shape == (32, 32, 3)
    top = pixels[1, 16]
    if mode == "fit":
        assert tuple(top) == (255, 255, 255) and tuple(pixels[16, 16]) == (200, 30, 30)
    else:
        assert tuple(top) == (200, 30, 30)


def test_fit_pads_the_mask_white_so_the_padding_is_painted(tmp_path):
    _png(tmp_path / "wide.png", 64, 32)
    _png(tmp_path / "mask.png", 64, 32, color=0, mode="L")
    request = ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "wide.png"),
                           mask_image=str(tmp_path / "mask.png"), width=32, height=32,
                           resize="fit")  # fmt: skip
    mask = _load(request).mask
    assert mask.shape == (32, 32) and mask[1, 16] == 255 and mask[16, 16] == 0


def test_transparency_is_composited_over_white(tmp_path):
    _png(tmp_path / "cutout.png", 16, 16, color=(0, 0, 0, 0), mode="RGBA")
    image = _load(ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "cutout.png")))
    assert (image.pixels == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a 32x16 file shows 16x32
    Image.new("RGB", (32, 16), (10, 10, 10)).save(tmp_path / "phone.jpg", exif=exif)
    image = _load(ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "phone.jpg")))
    assert image.pixels.shape == (32, 16, 3)


def _refusal(request, **kw) -> RequestRefused:
    with pytest.raises(RequestRefused) as caught:
        _load(request, **kw)
    return caught.value


def test_bad_inputs_are_refused_naming_the_field(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    _png(tmp_path / "photo.png", 64, 48)
    _png(tmp_path / "small_mask.png", 32, 32, color=255, mode="L")
    missing = _refusal(ImageRequest(id="a", prompt="p", init_image="gone.png"), base=str(tmp_path))
    assert missing.field == "init_image" and "does not exist" in missing.reason
    assert "gone.png" in missing.reason
    garbage = _refusal(ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "notes.png")))
    assert garbage.field == "init_image" and "not a PNG, JPEG or WebP image" in garbage.reason
    mismatch = _refusal(ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "photo.png"),
                                     mask_image=str(tmp_path / "small_mask.png")))  # fmt: skip
    assert mismatch.field == "mask_image"
    assert "32x32" in mismatch.reason and "64x48" in mismatch.reason
    bad_mask = _refusal(ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "photo.png"),
                                     mask_image=str(tmp_path / "notes.png")))  # fmt: skip
    assert bad_mask.field == "mask_image"


def test_an_image_past_the_limits_asks_for_a_size(tmp_path):
    _png(tmp_path / "big.png", 320, 64)
    limits = RequestLimits(max_side=256)
    request = ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "big.png"))
    refused = _refusal(request, limits=limits)
    assert refused.field == "init_image" and "give a size (width and height)" in refused.reason
    sized = request.model_copy(update={"width": 128, "height": 64})
    assert _load(sized, limits=limits).pixels.shape == (64, 128, 3)
    _png(tmp_path / "tiny.png", 5, 40)
    tiny = _refusal(ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "tiny.png")))
    assert "at least 8" in tiny.reason


def test_relative_uris_resolve_under_the_manifest_folder():
    assert resolve_uri("p/a.png", "s3://bucket/jobs") == "s3://bucket/jobs/p/a.png"
    assert resolve_uri("p/a.png", "/data/jobs") == "/data/jobs/p/a.png"
    assert resolve_uri("s3://b/a.png", "/data") == "s3://b/a.png"
    assert resolve_uri("/abs/a.png", "s3://bucket") == "/abs/a.png"
    assert resolve_uri("file:///x/a.png", "/data") == "file:///x/a.png"


def test_the_contract_checks_the_image_fields():
    errors = validate_request({"id": "a", "prompt": "p", "mask_image": "m.png"})
    assert [e.field for e in errors] == ["mask_image"] and "needs init_image" in errors[0].reason
    errors = validate_request({"id": "a", "prompt": "p", "init_image": "a.png", "strength": 0})
    assert [e.field for e in errors] == ["strength"]
    errors = validate_request({"id": "a", "prompt": "p", "init_image": "a.png", "resize": "crop"})
    assert [e.field for e in errors] == ["resize"] and "fill" in errors[0].reason
    errors = validate_request({"id": "a", "prompt": "p", "init_image": " "})
    assert [e.field for e in errors] == ["init_image"]


def test_fingerprints_are_computable_from_the_manifest():
    text = ImageRequest(id="a", prompt="p")
    photo = ImageRequest(id="a", prompt="p", init_image="a.png")
    # Text-only requests keep the fingerprints they had; an image request's does not depend
    # on the size it turns out to have (a rerun computes it before reading the image).
    assert text.fingerprint(64, 64) == ImageRequest(id="a", prompt="p", strength=0.5).fingerprint(
        64, 64
    )
    assert photo.fingerprint(64, 64) == photo.fingerprint(96, 48) != text.fingerprint(64, 64)
    assert photo.fingerprint(64, 64) != photo.model_copy(update={"strength": 0.5}).fingerprint(
        64, 64
    )
    assert photo.fingerprint(64, 64) != ImageRequest(
        id="a", prompt="p", init_image="b.png"
    ).fingerprint(64, 64)


def test_storage_reader_reads_file_uris(tmp_path):
    path = _png(tmp_path / "a.png", 8, 8)
    data = READ(f"file://{path}")
    assert Image.open(io.BytesIO(data)).size == (8, 8)


def test_only_png_jpeg_and_webp_are_decoded(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.gif")
    Image.new("RGB", (16, 16)).save(tmp_path / "a.webp")
    refused = _refusal(ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "a.gif")))
    assert refused.field == "init_image" and "not a PNG, JPEG or WebP" in refused.reason
    assert _load(
        ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "a.webp"))
    ).pixels.shape == (16, 16, 3)


def test_large_images_are_refused_from_the_header(tmp_path):
    _png(tmp_path / "big.png", 400, 300)  # 120,000 pixels; the cap below is 100,000
    request = ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "big.png"), width=64,
                           height=64)  # fmt: skip
    with pytest.raises(RequestRefused, match="is 400x300 pixels; at most 100000 are read"):
        load_image_input(request, READ, None, DEFAULT_LIMITS, 64, max_pixels=100_000)


def test_transformers_round_to_16(tmp_path):
    _png(tmp_path / "photo.png", 101, 67)
    request = ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "photo.png"))
    image = load_image_input(request, READ, None, DEFAULT_LIMITS, 64, multiple=16)
    assert image.pixels.shape == (64, 96, 3)


def test_a_mask_with_transparency_paints_where_it_is_transparent(tmp_path):
    """OpenAI's convention: the mask's transparent pixels are edited, opaque ones kept."""
    _png(tmp_path / "photo.png", 16, 16)
    mask = Image.new("RGBA", (16, 16), (255, 255, 255, 255))  # opaque white: kept here
    mask.paste((0, 0, 0, 0), (0, 0, 8, 16))  # transparent left half: painted
    mask.save(tmp_path / "mask.png")
    request = ImageRequest(id="a", prompt="p", init_image=str(tmp_path / "photo.png"),
                           mask_image=str(tmp_path / "mask.png"))  # fmt: skip
    painted = _load(request).mask
    assert (painted[:, :8] == 255).all() and (painted[:, 8:] == 0).all()
