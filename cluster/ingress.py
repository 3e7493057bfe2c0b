"""The HTTP ingress: FastAPI routes on Serve (OpenAI-compatible images API, native API, files).

    HTTP -> Serve proxy -> ApiIngress (CPU): auth, validate into ImageRequests (uploaded
    init images decoded and sized: cluster/edits.py), one engine call per HTTP request
    (its n images share a batch) -> the images through the one write path: inline PNG, or
    written with their metadata and linked (cluster/making.py)

Errors are JSON in OpenAI's error shape plus every field at fault; a client that goes
away cancels its engine call, so its images that have not started are never made.
Links (`response_format=url`) to a local output are signed and expire (HMAC over the
key and the expiry), so a browser or an <img> tag fetches them without the token.

No `from __future__ import annotations`: Serve pickles the ingress class by value, and
FastAPI must resolve the route annotations from the objects themselves.
"""

import asyncio
import hmac
import importlib.resources
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pipeline.config import ServeConfig, first_line
from ..pipeline.files import WriteOptions
from ..pipeline.formats import (
    FORMAT_OF_EXTENSION,
    MEDIA_TYPES,
    VARIANT_NAME,
    VARIANTS,
)
from ..pipeline.image_reads import FAMILY_MULTIPLE
from ..pipeline.outputs import (
    new_run_id,
)
from ..pipeline.rules import apply_rules
from ..pipeline.schema import _ID_SEGMENT, FieldError, ImageRequest
from ..pipeline.storage import IMAGES, Storage
from .api import (
    GeneratedImageOut,
    GenerateRequest,
    GenerateResponse,
    ImageData,
    ImagesGenerationRequest,
    ImagesResponse,
    error_responses,
    lora_errors,
    online_namespace,
    over_budget,
)
from .edits import (
    MAX_FORM_FIELDS,
    decoded_uploads,
    form_document,
    form_field,
    native_field,
    read_edit_form,
)
from .http_app import UNAUTHORIZED, ApiError, app, authorized, configure
from .making import OnlineMaking, sign_key
from .openapi import api_document

logger = logging.getLogger("ray.serve")


def _read_token(config: ServeConfig) -> str | None:
    if config.auth_token_file:
        token = Path(config.auth_token_file).read_text().strip()
        if not token:
            raise ValueError(f"auth_token_file: {config.auth_token_file} is empty")
        return token
    return os.environ.get(config.auth_token_env) or None


def _refuse(errors: list[FieldError], field: str, code: str) -> None:
    """400 with `errors`, if any: one per image for a per-image `field` (`requests.{i}....`),
    else the first (the n images of an OpenAI request share their fields: one says it)."""
    if errors:
        raise ApiError(400, fields=errors if "{i}" in field else errors[:1], code=code)


def _image_media_type(key: str) -> str | None:
    """The media type of a stored image's key (images/... or variants/<name>/...), or None
    when `key` names no image."""
    parts = key.split("/")
    ext = parts[-1].rpartition(".")[2]
    if parts[0] == VARIANTS and len(parts) >= 3 and VARIANT_NAME.fullmatch(parts[1]):
        parts = parts[2:]
    elif parts[0] == IMAGES and len(parts) >= 2:
        parts = parts[1:]
    else:
        return None
    if ext not in FORMAT_OF_EXTENSION or not all(_ID_SEGMENT.fullmatch(p) for p in parts):
        return None
    return MEDIA_TYPES[FORMAT_OF_EXTENSION[ext]]


def _page() -> str:
    return (importlib.resources.files("daguerre.cluster") / "static" / "index.html").read_text()


@serve.deployment(name="Api")
@serve.ingress(app)
class ApiIngress(OnlineMaking):
    """Validates, authorises and fans requests out to the engine deployments."""

    def __init__(self, config: ServeConfig, engines: dict[str, Any], url_secret: str,
                 default_sides: dict[str, int], families: dict[str, str] | None = None):  # fmt: skip
        self.config = ServeConfig.model_validate(config)
        self.engines = engines  # served name -> DeploymentHandle
        self.default_sides = default_sides  # served name -> the model's native side
        families = self.families = families or {}  # served name -> unet, sd3 or flux
        self.limits = {name: self.config.limits.for_family(families.get(name, "unet"))
                       for name in engines}  # fmt: skip
        self.default_model = self.config.models[0].served_name
        self.storage = Storage(self.config.output, self.config.storage)
        self.token = _read_token(self.config)
        configure(self.config.max_body_bytes, self.token)
        self.url_secret = url_secret.encode()
        self.run_id = new_run_id(kind="serve")
        self.options = WriteOptions.of(self.config, self.config.output)  # how files are written
        self.cache_views: dict[str, Any] = {}  # served name -> its CacheView (result cache)
        self.created = int(time.time())
        self.in_flight = dict.fromkeys(self.engines, 0)  # engine calls this ingress awaits
        self.document: dict[str, Any] | None = None  # the OpenAPI document, built once

    # -- routes --------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """A page to try the API from a browser (no external assets)."""
        return HTMLResponse(_page())

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        """The OpenAPI document: the routes, this deployment's limits, its auth."""
        if self.document is None:
            base = get_openapi(title=app.title, version=app.version,
                               description=app.description, routes=app.routes)  # fmt: skip
            self.document = api_document(base, self.config, auth=self.token is not None)
        return JSONResponse(self.document)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": list(self.engines)}

    @app.get("/v1/models", responses=error_responses(401))
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        data = [
            {"id": name, "object": "model", "created": self.created, "owned_by": "daguerre"}
            for name in self.engines
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/stats", responses=error_responses(400, 401, 503))
    async def stats(self, request: Request, engines: bool = True) -> dict[str, Any]:
        """Per model: the engine calls this ingress replica awaits, and the counters of one
        engine replica (each call may reach another; `engines=false` skips them)."""
        self._authorize(request)
        out = {}
        for name, handle in self.engines.items():
            out[name] = {"ingress_in_flight": self.in_flight[name]}
            if engines:
                try:
                    out[name].update(await handle.stats.remote())
                except Exception as exc:  # a replica restarting: say so, keep serving
                    raise ApiError(503, f"model {name!r}: no stats now ({first_line(exc)})",
                                   type="server_error", code="unavailable") from None  # fmt: skip
        return out

    @app.post("/v1/images/generations", response_model=ImagesResponse,
              responses=error_responses(400, 401, 404, 413, 422, 500, 503),
              description="OpenAI's images API. Beyond the schema: the images' pixels x steps "
              "together within the server's compute budget, else 400 (code over_budget).")  # fmt: skip
    async def images_generations(self, body: ImagesGenerationRequest, request: Request) -> Any:
        self._authorize(request)
        return await self._openai_images(body, request, {})

    @app.post("/v1/images/edits", response_model=ImagesResponse,
              responses=error_responses(400, 401, 404, 413, 422, 500, 503),
              openapi_extra=form_document(),
              description="OpenAI's image edits (multipart form): img2img from `image`, "
              "inpainting with `mask`; daguerre's extensions as form fields (strength, resize, "
              "steps, seed, ...). Beyond the schema: the image must decode, and the mask match "
              "its size, else 400 naming the field.")  # fmt: skip
    async def images_edits(self, request: Request) -> Any:
        self._authorize(request)
        try:
            form = await request.form(max_files=4, max_fields=MAX_FORM_FIELDS)
        except StarletteHTTPException:  # a streamed body over the limit: its 413 stands
            raise
        except Exception as exc:  # not a parsable multipart body
            raise ApiError(400, f"the body is not a readable multipart form ({first_line(exc)})",
                           code="invalid_value") from None  # fmt: skip
        read = await read_edit_form(form)
        if isinstance(read, list):
            raise ApiError(400, fields=read, code="invalid_value")
        body, uploads = read
        return await self._openai_images(body, request, uploads)

    async def _openai_images(self, body: ImagesGenerationRequest, request: Request,
                             uploads: dict[str, bytes]) -> Any:  # fmt: skip
        """The images of an OpenAI generations or edits request, answered in its shape."""
        model = self._model(body.model, "model")
        base_seed = body.seed if body.seed is not None else secrets.randbelow(2**62)
        image_requests = body.image_requests(online_namespace(), base_seed, self.limits[model])
        if image_requests and isinstance(image_requests[0], FieldError):
            raise ApiError(400, fields=image_requests, code="invalid_value")
        self._check_lora(image_requests, "lora")
        image_requests = self._apply_rules(image_requests, "prompt")
        images = await self._image_inputs(model, image_requests, uploads, form_field)
        self._check_budget(model, image_requests, "n", images)
        stored = await self._make(model, image_requests, body.response_format, request, {},
                                  images, lambda name: form_field(0, name))  # fmt: skip
        data = [ImageData(seed=s.record.seed, id=s.record.id, **fields) for s, fields in stored]
        return JSONResponse(
            ImagesResponse(created=int(time.time()), data=data).model_dump(exclude_none=True)
        )

    async def _image_inputs(self, model: str, requests: list[ImageRequest],
                            uploads: dict[str, bytes], field: Any) -> dict[str, Any]:  # fmt: skip
        """The requests' init images decoded and sized (off the event loop), or a 400."""
        if not uploads:
            return {}
        images = await asyncio.to_thread(decoded_uploads, requests, uploads, self.limits[model],
                                         self.default_sides.get(model, 512),
                                         FAMILY_MULTIPLE[self.families.get(model, "unet")],
                                         field)  # fmt: skip
        if isinstance(images, list):
            raise ApiError(400, fields=images, code="invalid_value")
        return images

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses=error_responses(400, 401, 404, 413, 422, 500, 503),
              description="Native API: each image an ImageRequestIn. Beyond the schema: one "
              "model per call, each image within max_pixels, and the images' pixels x steps "
              "together within the server's compute budget (code over_budget), else 400.")  # fmt: skip
    async def generate(self, body: GenerateRequest, request: Request) -> Any:
        self._authorize(request)
        limit = self.config.max_images_per_request
        if len(body.requests) > limit:
            reason = f"has {len(body.requests)} requests; at most {limit} per call"
            raise ApiError(400, fields=[FieldError(field="requests", reason=reason)])
        named = body.models()
        for name in sorted(named):
            self._model(name, "model")
        if len(named) > 1:
            reason = f"names {', '.join(map(repr, sorted(named)))}; one model per call"
            raise ApiError(400, fields=[FieldError(field="model", reason=reason)],
                           code="invalid_value")  # fmt: skip
        model = self._model(next(iter(named), None), "model")
        checked = body.image_requests(online_namespace(), self.limits[model])
        if isinstance(checked, list):
            raise ApiError(400, fields=checked, code="invalid_value")
        image_requests, client_ids, uploads = checked
        self._check_lora(image_requests, "requests.{i}.lora")
        image_requests = self._apply_rules(image_requests, "requests.{i}.prompt")
        images = await self._image_inputs(model, image_requests, uploads, native_field)
        self._check_budget(model, image_requests, "requests", images)
        stored = await self._make(model, image_requests, body.response_format, request,
                                  client_ids, images)  # fmt: skip
        data = [
            GeneratedImageOut(
                id=s.record.id, client_id=s.record.client_id, record=s.record, **fields
            )  # fmt: skip
            for s, fields in stored
        ]
        return JSONResponse(
            GenerateResponse(created=int(time.time()), data=data).model_dump(
                mode="json", exclude_none=True
            )
        )

    @app.get("/v1/files/{key:path}", response_class=Response,
             responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()},
                              "description": "The image file."},
                        **error_responses(400, 401, 403, 404)})  # fmt: skip
    async def files(self, key: str, request: Request, expires: int | None = None,
                    signature: str | None = None) -> Response:  # fmt: skip
        """An image written for response_format=url under a local output prefix: by its
        signed link (`expires` and `signature`), or with the bearer token."""
        if signature is not None or expires is not None:
            self._check_signature(key, expires, signature)
        else:
            self._authorize(request)
        media_type = _image_media_type(key)
        if media_type is None:
            raise ApiError(404, f"{key!r}: not an image key", code="not_found")
        try:
            data = await asyncio.to_thread(self.storage.fs.cat_file, self.storage.path(key))
        except OSError:  # missing, or not a file
            raise ApiError(404, f"{key}: no such image", code="not_found") from None
        return Response(data, media_type=media_type)

    # -- helpers ---------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not authorized(request.headers.get("authorization")):
            message, kind, code = UNAUTHORIZED
            raise ApiError(401, message, type=kind, code=code,
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    def _check_signature(self, key: str, expires: int | None, signature: str | None) -> None:
        deadline = expires or 0
        good = sign_key(self.url_secret, key, deadline)
        if not signature or not hmac.compare_digest(signature.encode(), good.encode()):
            raise ApiError(403, "this link's signature does not match (tampered or from another "
                           "deployment)", type="permission_error", code="bad_signature")  # fmt: skip
        if deadline < time.time():
            raise ApiError(403, "this link has expired; ask for the image again",
                           type="permission_error", code="link_expired")  # fmt: skip

    def _model(self, name: str | None, field: str) -> str:
        name = self.default_model if name is None else name
        if name not in self.engines:
            reason = f"{name!r} is not served here (served: {', '.join(self.engines)})"
            raise ApiError(404, fields=[FieldError(field=field, reason=reason)],
                           code="model_not_found")  # fmt: skip
        return name

    def _check_lora(self, requests: list[ImageRequest], field: str) -> None:
        """400 unless every named adapter lies under lora_roots (online never reads elsewhere)."""
        errors = lora_errors(requests, self.config.lora_roots, field)
        _refuse(errors, field, "invalid_value")

    def _apply_rules(self, requests: list[ImageRequest], field: str) -> list[ImageRequest]:
        """The requests with the prompt rules' style applied; 400 naming the prompt and the
        rule when one breaks a rule (code rule_broken)."""
        out, errors = [], []
        for i, image_request in enumerate(requests):
            ruled = apply_rules(image_request, self.config.rules, field.format(i=i))
            (out if isinstance(ruled, ImageRequest) else errors).append(ruled)
        _refuse(errors, field, "rule_broken")
        return out

    def _check_budget(self, model: str, requests: list[ImageRequest], field: str,
                      images: dict[str, Any] | None = None) -> None:  # fmt: skip
        budget = self.config.max_request_pixel_steps
        sizes = {i: (m.pixels.shape[1], m.pixels.shape[0]) for i, m in (images or {}).items()}
        errors = over_budget(requests, self.default_sides.get(model, 512), budget, field, sizes)
        if errors:
            raise ApiError(400, fields=errors, code="over_budget")
