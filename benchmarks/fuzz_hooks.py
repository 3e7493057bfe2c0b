"""Schemathesis hooks for benchmarks/fuzz_api.py (loaded with SCHEMATHESIS_HOOKS).

The document can say an init image is "a base64 string" or "a file", not that it must
decode as a photo, nor that a mask needs an image of its size. So where a generated value
is already schema-valid (a string, bytes), it is swapped for a real image of the same
kind: schema-valid requests stay schema-valid and can now be accepted, and
schema-violating ones are left as generated, to be refused.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import schemathesis


def _png(mode: str, color: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (64, 48), color).save(buf, format="PNG")  # within the fuzz limits
    return buf.getvalue()


PHOTO, MASK = _png("RGB", (200, 120, 40)), _png("L", 255)


@schemathesis.hook
def before_call(ctx: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Every phase's requests (the coverage phase applies no generation hooks), in place:
    schemathesis revalidates a case a hook changed, so it is judged as sent."""
    _with_real_images(ctx.operation.path, case.body)


def _with_real_images(path: str, body: Any) -> None:
    if path == "/v1/generate" and isinstance(body, dict):
        for item in body.get("requests") or []:
            if isinstance(item, dict):
                _native_images(item)
    elif path == "/v1/images/edits" and isinstance(body, dict):
        for name, data in (("image", PHOTO), ("mask", MASK)):
            if isinstance(body.get(name), (bytes, str)):
                body[name] = data


def _native_images(item: dict[str, Any]) -> None:
    """One native request's init_image / mask_image as real base64 PNGs where valid (a
    mask brings its image: the API refuses a mask alone), and a valid strength as 1 (a
    small strength of few steps runs no step, which the document cannot state)."""
    if isinstance(item.get("mask_image"), str) and item.get("init_image") is None:
        item["init_image"] = ""
    if not isinstance(item.get("init_image"), str):
        return
    item["init_image"] = base64.b64encode(PHOTO).decode()
    if isinstance(item.get("mask_image"), str):
        item["mask_image"] = base64.b64encode(MASK).decode()
    strength = item.get("strength")
    if isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0 < strength <= 1:
        item["strength"] = 1.0
