"""The FastAPI app under the ingress: errors in one JSON shape, bodies bounded.

Every error is JSON in OpenAI's error shape plus every field at fault (`ErrorResponse`,
cluster/api.py), encoded as ASCII so that whatever a client sent, echoed back, encodes;
FastAPI's 422 becomes 400, unknown routes 404 and wrong methods 405 in the same shape. A
body over the replica's `max_body_bytes` is refused with 413 before any of it is parsed.

No `from __future__ import annotations`: FastAPI resolves the handlers' annotations.
"""

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import daguerre

from ..pipeline.schema import FieldError, field_error
from .api import error_body

# No /docs or /redoc: FastAPI's pages load their scripts from a CDN, which leaves them blank
# on a cluster without internet. The page at / and /openapi.json work offline; the ingress
# serves the document itself, corrected for its limits and auth (cluster/openapi.py).
app = FastAPI(
    title="daguerre",
    description="Diffusion image generation: OpenAI-compatible images API and a native API.",
    version=daguerre.__version__,
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
# The largest body this process's ingress replica accepts: set by limit_bodies() from the
# replica's ServeConfig (a function of this module, so the replica's copy of the ingress
# class, pickled by value, sets the state the middleware reads).
_BODY_LIMIT = {"bytes": 1024 * 1024}


def limit_bodies(max_bytes: int) -> None:
    """Bodies over `max_bytes` get 413 in this process from now on."""
    _BODY_LIMIT["bytes"] = max_bytes


class ErrorJSON(JSONResponse):
    """An error body as ASCII JSON: whatever a client sent, echoed, encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


class BodyLimit:
    """Refuses a body over the limit with 413 before any of it is parsed: by its
    Content-Length, or while it streams in."""

    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        limit = _BODY_LIMIT["bytes"]
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > limit:
            reason = "is not a number" if not declared.isdigit() else f"is over {limit} bytes"
            status = 400 if not declared.isdigit() else 413
            body = error_body(f"body: Content-Length {reason}", code="payload_too_large"
                              if status == 413 else "invalid_value")  # fmt: skip
            return await ErrorJSON(body, status_code=status)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise StarletteHTTPException(413, f"the body is over {limit} bytes")
            return message

        await self.inner(scope, limited, send)


app.add_middleware(BodyLimit)


class ApiError(Exception):
    """An error answered as JSON in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        fields: list[FieldError] | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = error_body(message, fields=fields, type=type, code=code)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return ErrorJSON(exc.body, status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = [_request_field_error(err) for err in exc.errors()]
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and kind != "application/json":
        fields = [FieldError(field="body", reason=f"must be sent as JSON with Content-Type: "
                             f"application/json (got {kind or 'no content type'})")]  # fmt: skip
    return ErrorJSON(error_body(fields=fields, code="invalid_value"), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the same JSON error shape as everything else."""
    message = f"{request.method} {request.url.path}: {exc.detail}"
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status_code
    )
    return ErrorJSON(error_body(message, code=code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))  # fmt: skip


def _request_field_error(err: dict[str, Any]) -> FieldError:
    loc = list(err.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        return FieldError(field="body", reason=f"is not valid JSON ({err.get('msg', '')})")
    if not loc and err.get("type") == "missing":
        return FieldError(
            field="body", reason="is required: send a JSON object (Content-Type: application/json)"
        )
    if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
        return FieldError(field="body", reason="must be a JSON object")
    return field_error({**err, "loc": tuple(loc)})
