"""HTTP models of the online API: OpenAI-compatible images and the native API.

Both turn into `ImageRequest`s validated with the deployment's `RequestLimits`, so a
request is accepted or refused online exactly as a manifest row would be, with the
same messages. The HTTP models add what is HTTP-specific (`n`, `size`,
`response_format`) and strict JSON types: a number sent as a string, or `true` for an
integer, is refused, as the OpenAPI document (cluster/openapi.py) says. Light to
import: pydantic and the standard library.

Online ids never collide: every request's images are stored under a namespace of
their own, `online/<day>/<request>/<i>` (i: the image's index in the request); an id
the client sent is kept beside it as `client_id`, and may repeat.

One rule the document cannot state is checked here: the compute budget, pixels x steps
x images per request (`ServeConfig.max_request_pixel_steps`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import re
import uuid
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator

from ..pipeline.schema import (
    SEED_LIMIT,
    UPLOAD_PREFIX,
    FieldError,
    ImageRecord,
    ImageRequest,
    RequestLimits,
    ResizeMode,
    Scheduler,
    Speed,
    validate_request,
)

MAX_N = 10  # OpenAI's limit on `n`
# 0 < strength <= 1, stated in the document; checked by ImageRequest (its message, everywhere)
STRENGTH = {"exclusiveMinimum": 0, "maximum": 1}
# "WIDTHxHEIGHT": decimal sides without leading zeros, a lowercase x, nothing around.
SIZE_PATTERN = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


def _integral(v: Any) -> Any:
    """3.0 as 3: JSON Schema counts a number with a zero fraction as an integer."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral), Strict()]  # no "5", no true, no 2.5
Float = Annotated[float, Strict()]  # JSON numbers only (integers are numbers)


def online_namespace() -> str:
    """The key prefix of one online request's images: `online/<day>/<random>`."""
    return f"online/{dt.datetime.now(dt.timezone.utc):%Y%m%d}/{uuid.uuid4().hex[:16]}"


def _about(field: str) -> str:
    """The description of an `ImageRequest` field (one wording for manifests and HTTP)."""
    return ImageRequest.model_fields[field].description or ""


class ResponseFormat(str, Enum):
    b64_json = "b64_json"
    url = "url"


class ImagesGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's images API plus daguerre's extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="Text the images should show.")
    model: str | None = Field(None, description="A served model; default: the first one.")
    n: Int = Field(
        1, ge=1, le=MAX_N, description="Images to make; image i gets seed + i (mod 2**63)."
    )
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT" such as "512x512", or "auto" for the model default.'
    )
    response_format: ResponseFormat = Field(
        ResponseFormat.b64_json, description="b64_json (PNG inline) or url (stored, then linked)."
    )
    output_format: Literal["png"] | None = Field(None, description="Only png is produced.")
    user: str | None = Field(None, max_length=256, description="End-user id, kept in the metadata.")
    # daguerre extensions
    negative_prompt: str = Field("", description=_about("negative_prompt"))
    seed: Int | None = Field(
        None, ge=0, lt=SEED_LIMIT, description="Seed of the first image; random when missing."
    )
    steps: Int | None = Field(None, description="Denoising steps (default 30).")
    guidance_scale: Float | None = Field(None, description=_about("guidance_scale"))
    scheduler: Scheduler | None = Field(None, description="Sampler.")
    speed: Speed | None = Field(None, description=_about("speed"))
    lora: str | None = Field(None, description=_about("lora"))
    lora_scale: Float | None = Field(None, description=_about("lora_scale"))

    @field_validator("size")
    @classmethod
    def _check_size(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or SIZE_PATTERN.fullmatch(v):
            return v
        raise ValueError('must be "WIDTHxHEIGHT" such as "512x512", or "auto"')

    def dimensions(self) -> tuple[int | None, int | None]:
        """(width, height) asked for; None where the model's default applies."""
        match = SIZE_PATTERN.fullmatch(self.size or "")
        return (int(match[1]), int(match[2])) if match else (None, None)

    def image_requests(
        self, namespace: str, base_seed: int, limits: RequestLimits
    ) -> list[ImageRequest] | list[FieldError]:
        """One `ImageRequest` per image (image i: id `<namespace>/<i>`, seed
        `(base_seed + i) mod 2**63`, so every valid seed is valid for every n), or what is
        wrong."""
        row = self.row()
        requests: list[ImageRequest] = []
        for i in range(self.n):
            seed = (base_seed + i) % SEED_LIMIT
            result = validate_request({**row, "id": f"{namespace}/{i}", "seed": seed}, limits)
            if isinstance(result, list):
                return [_openai_field(e) for e in result]
            requests.append(result)
        return requests

    def row(self) -> dict[str, Any]:
        """The ImageRequest fields every image of this request shares."""
        width, height = self.dimensions()
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "width": width,
            "height": height,
            "scheduler": self.scheduler,
            "speed": self.speed,
            "lora": self.lora,
            "lora_scale": self.lora_scale,
            "metadata": {"user": self.user} if self.user else {},
        }


def _openai_field(error: FieldError) -> FieldError:
    """An ImageRequest error renamed to the OpenAI field the client sent."""
    if error.field in ("width", "height"):
        return FieldError(field="size", reason=f"{error.field} {error.reason}")
    if error.field == "width,height":
        return FieldError(field="size", reason=error.reason)
    return error


def over_budget(requests: list[ImageRequest], default_side: int, budget: int | None,
                field: str, sizes: dict[str, tuple[int, int]] | None = None) -> list[FieldError]:  # fmt: skip
    """The error of a request whose images together ask for more than `budget`
    pixel-steps (width x height x steps, summed), or none; `sizes`: those sized by their
    init image, by id."""
    sizes = sizes or {}
    work = [sizes.get(r.id, r.resolved_size(default_side)) + (r.steps,) for r in requests]
    total = sum(w * h * steps for w, h, steps in work)
    if budget is None or total <= budget:
        return []
    w, h, steps = max(work, key=lambda s: s[0] * s[1] * s[2])
    images = f"{len(requests)} images up to" if len(requests) > 1 else "one image of"
    ways = "fewer images, fewer steps or a smaller size, or split the request"
    reason = (
        f"{images} {w}x{h} at {steps} steps is {total:,} pixel-steps (width x height x steps, "
        f"summed); this server allows at most {budget:,} per request: ask for "
        + (ways if len(requests) > 1 else "fewer steps or a smaller size")
    )
    return [FieldError(field=field, reason=reason)]


class ImageRequestIn(BaseModel):
    """One image of `POST /v1/generate`: the manifest's columns, strictly typed; null or
    missing takes the default."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(
        None, description="The client's id, kept as `client_id` (same rules as a manifest id; "
        "may repeat). The image is stored as `online/<day>/<request>/<i>`.",
    )  # fmt: skip
    prompt: str = Field(description=_about("prompt"))
    negative_prompt: str | None = Field(None, description=_about("negative_prompt"))
    seed: Int | None = Field(None, description="Seed of this image's noise; random when missing.")
    steps: Int | None = Field(None, description=_about("steps") + " Default 30.")
    guidance_scale: Float | None = Field(None, description=_about("guidance_scale"))
    width: Int | None = Field(None, description=_about("width"))
    height: Int | None = Field(None, description=_about("height"))
    scheduler: Scheduler | None = Field(None, description=_about("scheduler"))
    speed: Speed | None = Field(None, description=_about("speed"))
    lora: str | None = Field(None, description=_about("lora"))
    lora_scale: Float | None = Field(None, description=_about("lora_scale"))
    model: str | None = Field(None, description="A served model; must agree with the call's.")
    metadata: dict[str, str] | None = Field(None, description=_about("metadata"))
    init_image: str | None = Field(
        None, description="An image to start from (img2img): the file's bytes in base64 (or a "
        "data: URL). Without width and height the output takes its size rounded down to a "
        "multiple of 8.",
    )  # fmt: skip
    mask_image: str | None = Field(
        None, description="Inpainting: a mask the size of init_image (base64), white where the "
        "image is repainted, black where it is kept.",
    )  # fmt: skip
    strength: Float | None = Field(None, description=_about("strength"), json_schema_extra=STRENGTH)
    resize: ResizeMode | None = Field(None, description=_about("resize"))


class GenerateRequest(BaseModel):
    """`POST /v1/generate`: one or more images, each an `ImageRequestIn`."""

    model_config = ConfigDict(extra="forbid")

    requests: list[ImageRequestIn] = Field(min_length=1, description="The images to make.")
    model: str | None = Field(None, description="A served model; default: the first one.")
    response_format: ResponseFormat = ResponseFormat.b64_json

    def models(self) -> set[str]:
        """Every model the call names."""
        named = {r.model for r in self.requests if r.model is not None}
        return named | ({self.model} if self.model is not None else set())

    def image_requests(
        self, namespace: str, limits: RequestLimits
    ) -> tuple[list[ImageRequest], dict[str, str], dict[str, bytes]] | list[FieldError]:
        """Validated requests stored as `<namespace>/<i>`, {stored id: client id} and the
        uploaded images {upload uri: bytes} they name, or every field error."""
        requests: list[ImageRequest] = []
        client_ids: dict[str, str] = {}
        rows = [item.model_dump(exclude_none=True, mode="json") for item in self.requests]
        uploads, errors = decode_base64_images(rows)
        for i, (item, row) in enumerate(zip(self.requests, rows, strict=True)):
            if any(e.field.startswith(f"requests.{i}.") for e in errors):
                continue
            row.pop("model", None)
            result = validate_request({**row, "id": row.get("id", str(i))}, limits)
            if isinstance(result, list):
                errors += [
                    FieldError(field=f"requests.{i}.{e.field}", reason=e.reason) for e in result
                ]
                continue
            stored = result.model_copy(update={"id": f"{namespace}/{i}"})
            if item.id is not None:
                client_ids[stored.id] = item.id
            requests.append(stored)
        return errors or (requests, client_ids, uploads)


def upload_uri(data: bytes) -> str:
    """The name of an uploaded image: its content's sha256."""
    return UPLOAD_PREFIX + hashlib.sha256(data).hexdigest()


def decode_base64_images(rows: list[dict[str, Any]]) -> tuple[dict[str, bytes], list[FieldError]]:
    """The native API's init_image / mask_image (base64, or a data: URL) in `rows`,
    replaced in place by their upload uris: ({uri: bytes}, every field error)."""
    uploads: dict[str, bytes] = {}
    errors: list[FieldError] = []
    for i, row in enumerate(rows):
        for name in ("init_image", "mask_image"):
            text = row.get(name)
            if text is None:
                continue
            try:
                data = _from_base64(text)
            except ValueError as exc:
                errors.append(FieldError(field=f"requests.{i}.{name}", reason=str(exc)))
                continue
            row[name] = upload_uri(data)
            uploads[row[name]] = data
    return uploads, errors


def _from_base64(text: str) -> bytes:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("is a data: URL without ;base64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not base64 (send the image file's bytes base64-encoded)") from None
    if not data:
        raise ValueError("is empty")
    return data


def lora_errors(requests: list[ImageRequest], roots: list[str], field: str) -> list[FieldError]:
    """Why online requests may not name their `lora` adapters (the server reads only under
    `roots`, ServeConfig.lora_roots), one error per offending request; `field` is the field
    path, with `{i}` for the request's index."""
    from ..pipeline.lora import under_roots

    errors = []
    for i, request in enumerate(requests):
        if request.lora is None:
            continue
        if not roots:
            reason = "online LoRA is off on this server (its lora_roots is empty)"
        elif under_roots(request.lora, roots):
            continue
        else:
            reason = (f"{request.lora!r} is not under this server's LoRA folders "
                      f"({', '.join(roots)}); name an adapter inside one")  # fmt: skip
        errors.append(FieldError(field=field.format(i=i), reason=reason))
    return errors


class ImageData(BaseModel):
    """One image of an OpenAI images response (`seed` and `id` are daguerre's additions)."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int
    id: str  # the stored id (unique: online/<day>/<request>/<i>)


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class GeneratedImageOut(BaseModel):
    id: str  # the stored id: online/<day>/<request>/<i>
    client_id: str | None = None  # the id the client sent, when it sent one
    b64_json: str | None = None
    url: str | None = None
    record: ImageRecord


class GenerateResponse(BaseModel):
    created: int
    data: list[GeneratedImageOut]


class ErrorDetail(BaseModel):
    """OpenAI's error shape (`message`, `type`, `param`, `code`) plus every field at fault."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None
    fields: list[FieldError] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_MEANINGS = {
    400: "Invalid request: `error.fields` names every field at fault and why.",
    401: "Missing or wrong bearer token.",
    403: "A signed link whose signature does not match, or that has expired.",
    404: "No such model, route or image.",
    413: "The body is larger than the server's max_body_bytes.",
    422: "An image failed the server's quality gate (after its regenerations); `error.fields` "
    "names it and why.",
    500: "Generation failed inside the engine (a server fault, logged).",
    503: "The model is at capacity or restarting: retry after Retry-After seconds.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route answers, all in `ErrorResponse`."""
    return {s: {"model": ErrorResponse, "description": ERROR_MEANINGS[s]} for s in statuses}


def error_body(
    message: str | None = None,
    *,
    fields: list[FieldError] | None = None,
    type: str = "invalid_request_error",
    code: str | None = None,
) -> dict[str, Any]:
    """The JSON body of an error response; with fields, the message lists each one."""
    fields = fields or []
    text = message or "; ".join(f"{f.field}: {f.reason}" for f in fields)
    detail = ErrorDetail(
        message=text,
        type=type,
        param=fields[0].field if fields else None,
        code=code,
        fields=fields,
    )
    return ErrorResponse(error=detail).model_dump(exclude_none=True)
