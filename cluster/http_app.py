"""The FastAPI app under the ingress: errors in one JSON shape, bodies bounded.

Every error is JSON in OpenAI's error shape plus every field at fault (`ErrorResponse`,
cluster/api.py), encoded as ASCII so that whatever a client sent, echoed back, encodes;
FastAPI's 422 becomes 400, unknown routes 404 and wrong methods 405 in the same shape. A
body over the replica's `max_body_bytes` is refused with 413 before any of it is parsed.

No `from __future__ import annotations`: FastAPI resolves the handlers' annotations.
"""

import hmac
import json
import logging
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
# This process's ingress replica's settings: set by configure() from its ServeConfig (a
# function of this module, so the replica's copy of the ingress class, pickled by value,
# sets the state the middleware and the handlers read).
_SETTINGS: dict[str, Any] = {"max_body_bytes": None, "token": None}
UNAUTHORIZED = ("missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                "authentication_error", "invalid_api_key")  # fmt: skip


def configure(max_body_bytes: int, token: str | None) -> None:
    """Bodies over `max_body_bytes` get 413, and the /v1 routes need `token` (None: auth
    off), in this process from now on."""
    _SETTINGS.update(max_body_bytes=max_body_bytes, token=token)


def authorized(authorization: str | None) -> bool:
    """Whether an Authorization header value carries the bearer token (or auth is off)."""
    token = _SETTINGS["token"]
    if token is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(errors="replace"), token.encode()
    )


def needs_token(path: str) -> bool:
    """The routes behind the token: /v1/..., but for file links (they carry a signature)."""
    return "/v1/" in path and "/v1/files/" not in path


def unauthorized_body() -> dict[str, Any]:
    message, kind, code = UNAUTHORIZED
    return error_body(message, type=kind, code=code)


class ErrorJSON(JSONResponse):
    """An error body as ASCII JSON: whatever a client sent, echoed, encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


class BodyLimit:
    """Refuses a body over the limit with 413 before any of it is parsed (401 first where the
    route needs the token and it is missing): by its Content-Length, or as it streams in."""

    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        limit = _SETTINGS["max_body_bytes"]
        if scope["type"] != "http" or limit is None:
            return await self.inner(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length", b"0")
        refusal = None
        if len(declared) > 20 or not declared.isdigit():
            refusal = 400, error_body(fields=[FieldError(field="Content-Length",
                                      reason="is not a byte count")], code="invalid_value")  # fmt: skip
        elif int(declared) > limit:
            refusal = 413, error_body(f"body: Content-Length {int(declared)} is over this "
                                      f"server's {limit} bytes", code="payload_too_large")  # fmt: skip
        if (
            refusal
            and needs_token(scope.get("path", ""))
            and not authorized(headers.get(b"authorization", b"").decode("latin-1"))
        ):
            refusal = 401, unauthorized_body()
        if refusal:
            status, body = refusal
            return await ErrorJSON(body, status_code=status)(scope, receive, send)
        await self.inner(scope, _counting(receive, limit), send)


def _counting(receive: Any, limit: int) -> Any:
    """`receive`, refusing (413) the message that takes the body past `limit` bytes."""
    seen = 0

    async def limited() -> dict:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise StarletteHTTPException(413, f"the body is over this server's {limit} bytes")
        return message

    return limited


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
    if needs_token(request.url.path) and not authorized(request.headers.get("authorization")):
        return ErrorJSON(
            unauthorized_body(), status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
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


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    """A fault of ours (a storage write, a bug): logged, answered 500 in the error shape."""
    logging.getLogger("ray.serve").error("%s %s failed", request.method, request.url.path,
                                         exc_info=exc)  # fmt: skip
    message = f"{request.method} {request.url.path}: {type(exc).__name__}: {exc}"
    return ErrorJSON(error_body(message[:500], type="server_error", code="internal_error"),
                     status_code=500)  # fmt: skip


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
