"""Images in online: `POST /v1/images/edits` (OpenAI's multipart form) and the native API's
base64 `init_image` / `mask_image`.

An uploaded image is named by its content, `upload:sha256:<hex>` (what the metadata row
records as `init_image`, and what the result cache keys it by), and read, decoded and sized
by the same code as a job's (pipeline/image_reads.py) in the ingress, so the engine
replicas only get pixels. Every bad upload is a 400 naming the field the client sent
(`image` or `mask` in the form, `requests.<i>.init_image` in the native API).
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError

from ..pipeline.config import RequestRefused
from ..pipeline.image_inputs import ImageInput
from ..pipeline.image_reads import ONLINE_INPUT_PIXELS, load_image_input
from ..pipeline.schema import (
    SEED_LIMIT,
    FieldError,
    ImageRequest,
    RequestLimits,
    ResizeMode,
    field_error,
)
from .api import MAX_N, STRENGTH, ImagesGenerationRequest, upload_uri

FORM_FILES = {"image": "init_image", "image[]": "init_image", "mask": "mask_image"}
MAX_FORM_FIELDS = 40


class ImagesEditRequest(ImagesGenerationRequest):
    """`POST /v1/images/edits`: OpenAI's image edits (multipart form: `image`, optional
    `mask`, `prompt`, `n`, `size`, `response_format`) plus daguerre's extensions. Form
    fields are text, so numbers are read from their digits here."""

    model_config = ConfigDict(extra="forbid", strict=False)

    n: int = Field(1, ge=1, le=MAX_N, description="Images to make; image i gets seed + i.")
    seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT, description="Seed of the first image; random when missing."
    )
    steps: int | None = Field(None, description="Denoising steps (default 30).")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale.")
    lora_scale: float | None = Field(None, description="How strongly lora applies.")
    strength: float | None = Field(
        None, json_schema_extra=STRENGTH,
        description="How far from the image the result may go (0 < strength <= 1; 0.8).",
    )  # fmt: skip
    resize: ResizeMode | None = Field(
        None, description="With size: how the image becomes it (fill, fit or stretch)."
    )

    _files: dict[str, str] = PrivateAttr(default_factory=dict)  # init_image, mask_image: uri

    def row(self) -> dict[str, Any]:
        return {**super().row(), "strength": self.strength, "resize": self.resize, **self._files}


def form_document() -> dict[str, Any]:
    """The route's OpenAPI requestBody: the form's fields as ImagesEditRequest states them
    (null dropped: a form field is text or absent; enums inlined), `image` and `mask` files."""
    schema = ImagesEditRequest.model_json_schema()
    defs = schema.get("$defs", {})
    properties: dict[str, Any] = {
        "image": {"type": "string", "format": "binary", "description": "The image to edit "
                  "(PNG, JPEG or WebP); without size the output takes its size rounded down "
                  "to a multiple of 8."},
        "mask": {"type": "string", "format": "binary", "description": "A mask the image's "
                 "size: white where the image is repainted, black where it is kept."},
    }  # fmt: skip
    for name, prop in schema["properties"].items():
        options = [o for o in prop.pop("anyOf", [prop]) if o.get("type") != "null"]
        option = dict(options[0]) if options else {}
        if "$ref" in option:
            option = dict(defs[option.pop("$ref").rsplit("/", 1)[-1]])
        option.pop("title", None)
        properties[name] = {**option, "description": prop.get("description", "")}
    body = {"type": "object", "required": ["image", "prompt"], "properties": properties}
    return {"requestBody": {"required": True,
                            "content": {"multipart/form-data": {"schema": body}}}}  # fmt: skip


async def read_edit_form(form: Any) -> tuple[ImagesEditRequest, dict[str, bytes]] | list[FieldError]:  # fmt: skip
    """(the form's fields as an ImagesEditRequest naming its uploads, {upload uri: bytes})
    from a parsed multipart form, or every field error."""
    fields: dict[str, Any] = {}
    files: dict[str, str] = {}
    uploads: dict[str, bytes] = {}
    errors: list[FieldError] = []
    for name, value in form.multi_items():
        if name in FORM_FILES:
            if not hasattr(value, "read"):
                errors.append(FieldError(field=name, reason="must be a file (multipart upload)"))
            elif FORM_FILES[name] in files:
                errors.append(FieldError(field=name, reason="one image per edit"))
            else:
                data = await value.read()
                files[FORM_FILES[name]] = upload_uri(data)
                uploads[files[FORM_FILES[name]]] = data
        elif hasattr(value, "read"):
            errors.append(FieldError(field=name, reason="is a file; only image and mask are"))
        elif name in fields:
            errors.append(FieldError(field=name, reason="is given more than once"))
        else:
            fields[name] = value
    if "init_image" not in files:
        errors.append(FieldError(field="image", reason="is required (the image to edit)"))
    try:
        body = ImagesEditRequest.model_validate(fields)
    except ValidationError as exc:
        errors += [field_error(err) for err in exc.errors()]
    if errors:
        return errors
    body._files = files
    return body, uploads


def decoded_uploads(requests: list[ImageRequest], uploads: dict[str, bytes],
                    limits: RequestLimits, default_side: int, multiple: int,
                    field: Any) -> dict[str, ImageInput] | list[FieldError]:  # fmt: skip
    """{request id: its ImageInput} for the requests with an init image, each upload decoded
    once however many images share it (at most ONLINE_INPUT_PIXELS), or the errors of those
    that cannot be used; `field(i, name)` names the client's field of request i's
    init_image or mask_image."""
    images: dict[str, ImageInput] = {}
    decoded: dict[tuple, ImageInput | RequestRefused] = {}
    errors: list[FieldError] = []
    for i, request in enumerate(requests):
        if request.init_image is None:
            continue
        same = request.model_dump(include={"init_image", "mask_image", "width", "height",
                                           "resize", "strength", "steps"})  # fmt: skip
        key = tuple(sorted((k, str(v)) for k, v in same.items()))
        if key not in decoded:
            try:
                decoded[key] = load_image_input(request, uploads.__getitem__, None, limits,
                                                default_side, multiple, ONLINE_INPUT_PIXELS)  # fmt: skip
            except RequestRefused as refused:
                decoded[key] = refused
        result = decoded[key]
        if isinstance(result, RequestRefused):
            errors.append(FieldError(field=field(i, result.field), reason=result.reason))
        else:
            images[request.id] = result
    return errors or images


def form_field(i: int, name: str) -> str:
    """The edits form's field of an ImageRequest field (the form names one image for all n)."""
    return {"init_image": "image", "mask_image": "mask"}.get(name, name)


def native_field(i: int, name: str) -> str:
    return f"requests.{i}.{name}"
