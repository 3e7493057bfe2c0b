"""HTTP models of the online API: OpenAI-compatible images and the native API.

Both turn into `ImageRequest`s validated with the deployment's `RequestLimits`, so a
request is accepted or refused online exactly as a manifest row would be, with the
same messages. Only what is HTTP-specific (`n`, `size`, `response_format`) is checked
here. Light to import: pydantic and the standard library.

Online ids never collide: every request's images are stored under a namespace of
their own, `online/<day>/<request>/`, followed by the id the client sent (kept as
`client_id`) or the image's index.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..pipeline.schema import (
    MAX_ID_CHARS,
    SEED_LIMIT,
    FieldError,
    ImageRecord,
    ImageRequest,
    RequestLimits,
    Scheduler,
    Speed,
    validate_request,
)

MAX_N = 10  # OpenAI's limit on `n`
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


def online_namespace() -> str:
    """The key prefix of one online request's images: `online/<day>/<random>`."""
    return f"online/{dt.datetime.now(dt.timezone.utc):%Y%m%d}/{uuid.uuid4().hex[:16]}"


class ResponseFormat(str, Enum):
    b64_json = "b64_json"
    url = "url"


class ImagesGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's images API plus daguerre's extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="Text the images should show.")
    model: str | None = Field(None, description="A served model; default: the first one.")
    n: int = Field(1, ge=1, le=MAX_N, description="Images to make; image i gets seed + i.")
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT" such as "512x512", or "auto" for the model default.'
    )
    response_format: ResponseFormat = Field(
        ResponseFormat.b64_json, description="b64_json (PNG inline) or url (stored, then linked)."
    )
    output_format: Literal["png"] | None = Field(None, description="Only png is produced.")
    user: str | None = Field(None, max_length=256, description="End-user id, kept in the metadata.")
    # daguerre extensions
    negative_prompt: str = Field("", description="Text the images should not show.")
    seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT, description="Seed of the first image; random when missing."
    )
    steps: int | None = Field(None, description="Denoising steps (default 30).")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale.")
    scheduler: Scheduler | None = Field(None, description="Sampler.")
    speed: Speed | None = Field(None, description="exact (default) or cached (step caching).")

    @field_validator("size")
    @classmethod
    def _check_size(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or _SIZE.match(v):
            return v
        raise ValueError('must be "WIDTHxHEIGHT" such as "512x512", or "auto"')

    def dimensions(self) -> tuple[int | None, int | None]:
        """(width, height) asked for; None where the model's default applies."""
        match = _SIZE.match(self.size or "")
        return (int(match[1]), int(match[2])) if match else (None, None)

    def image_requests(
        self, namespace: str, base_seed: int, limits: RequestLimits
    ) -> list[ImageRequest] | list[FieldError]:
        """One `ImageRequest` per image (image i: id `<namespace>/<i>`, seed `base_seed + i`),
        or what is wrong."""
        width, height = self.dimensions()
        row: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "width": width,
            "height": height,
            "scheduler": self.scheduler,
            "speed": self.speed,
            "metadata": {"user": self.user} if self.user else {},
        }
        requests: list[ImageRequest] = []
        for i in range(self.n):
            result = validate_request({**row, "id": f"{namespace}/{i}", "seed": base_seed + i},
                                      limits)  # fmt: skip
            if isinstance(result, list):
                return [_openai_field(e) for e in result]
            requests.append(result)
        return requests


def _openai_field(error: FieldError) -> FieldError:
    """An ImageRequest error renamed to the OpenAI field the client sent."""
    if error.field in ("width", "height"):
        return FieldError(field="size", reason=f"{error.field} {error.reason}")
    if error.field == "width,height":
        return FieldError(field="size", reason=error.reason)
    return error


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


class GenerateRequest(BaseModel):
    """`POST /v1/generate`: one or more `ImageRequest`s (ids are assigned where missing)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[dict[str, Any]] = Field(
        min_length=1, description="ImageRequest objects (see the manifest columns)."
    )
    model: str | None = Field(None, description="A served model; default: the first one.")
    response_format: ResponseFormat = ResponseFormat.b64_json

    def image_requests(
        self, namespace: str, limits: RequestLimits
    ) -> tuple[list[ImageRequest], dict[str, str]] | list[FieldError]:
        """Validated requests stored under `namespace` (`<namespace>/<the client's id>`, or
        `<namespace>/<i>` without one) and {stored id: client id}, or every field error."""
        requests: list[ImageRequest] = []
        client_ids: dict[str, str] = {}
        errors: list[FieldError] = []
        room = MAX_ID_CHARS - len(namespace) - 1
        for i, row in enumerate(self.requests):
            given = row.get("id")
            row = {**row, "id": str(i)} if given is None else row
            if self.model is not None and row.get("model") not in (None, self.model):
                errors.append(
                    FieldError(
                        field=f"requests.{i}.model",
                        reason=f"{row['model']!r} differs from the request's model {self.model!r}",
                    )
                )
                continue
            result = validate_request(row, limits)
            if not isinstance(result, list) and len(result.id) > room:
                result = [FieldError(field="id", reason=f"is {len(result.id)} characters long; "
                                     f"at most {room} allowed online (stored under {namespace}/)")]  # fmt: skip
            if isinstance(result, list):
                errors += [
                    FieldError(field=f"requests.{i}.{e.field}", reason=e.reason) for e in result
                ]
                continue
            stored = result.model_copy(update={"id": f"{namespace}/{result.id}"})
            if given is not None:
                client_ids[stored.id] = result.id
            requests.append(stored)
        ids = [r.id for r in requests]
        if len(set(ids)) < len(ids):
            errors.append(FieldError(field="requests", reason="ids must be unique in one call"))
        return errors or (requests, client_ids)


class GeneratedImageOut(BaseModel):
    id: str  # the stored id: online/<day>/<request>/<client id or index>
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
