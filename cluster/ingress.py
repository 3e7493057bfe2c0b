"""The HTTP ingress: FastAPI routes on Serve (OpenAI-compatible images API, native API, files).

    HTTP -> Serve proxy -> ApiIngress (CPU): auth, validate into ImageRequests, one engine
    call per HTTP request (its n images share a batch) -> the images through the one write
    path (pipeline/outputs.py): inline PNG, or written with their metadata and linked

Errors are JSON in OpenAI's error shape plus every field at fault; a client that goes
away cancels its engine call, so its images that have not started are never made.
Links (`response_format=url`) to a local output are signed and expire (HMAC over the
key and the expiry), so a browser or an <img> tag fetches them without the token.

No `from __future__ import annotations`: Serve pickles the ingress class by value, and
FastAPI must resolve the route annotations from the objects themselves.
"""

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
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
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

import daguerre

from ..pipeline.composite import CompositeError
from ..pipeline.config import RequestRefused, ServeConfig, first_line
from ..pipeline.credentials import CredentialsError
from ..pipeline.files import Provenance, WriteOptions
from ..pipeline.formats import (
    EXTENSIONS,
    FORMAT_OF_EXTENSION,
    MEDIA_TYPES,
    VARIANT_NAME,
    VARIANTS,
)
from ..pipeline.outputs import (
    StoredImage,
    cache_view,
    keep_rejected,
    new_run_id,
    write_errors,
    write_outputs,
)
from ..pipeline.quality import Rejected
from ..pipeline.rules import apply_rules
from ..pipeline.schema import _ID_SEGMENT, ErrorRecord, FieldError, ImageRequest
from ..pipeline.storage import IMAGES, Storage, image_key
from . import metrics
from .api import (
    GeneratedImageOut,
    GenerateRequest,
    GenerateResponse,
    ImageData,
    ImagesGenerationRequest,
    ImagesResponse,
    ResponseFormat,
    error_responses,
    lora_errors,
    online_namespace,
    over_budget,
)
from .edits import (
    MAX_FORM_FIELDS,
    form_document,
    form_field,
    image_inputs,
    native_field,
    read_edit_form,
)
from .http_app import UNAUTHORIZED, ApiError, app, authorized, configure
from .openapi import api_document
from .replica import EngineLoopFailed, ReplicaImage

logger = logging.getLogger("ray.serve")


def _read_token(config: ServeConfig) -> str | None:
    if config.auth_token_file:
        token = Path(config.auth_token_file).read_text().strip()
        if not token:
            raise ValueError(f"auth_token_file: {config.auth_token_file} is empty")
        return token
    return os.environ.get(config.auth_token_env) or None


def sign_key(secret: bytes, key: str, expires: int) -> str:
    """The signature of a file link: HMAC-SHA256 over the key and its expiry."""
    return hmac.new(secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


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
class ApiIngress:
    """Validates, authorises and fans requests out to the engine deployments."""

    def __init__(self, config: ServeConfig, engines: dict[str, Any], url_secret: str,
                 default_sides: dict[str, int], families: dict[str, str] | None = None):  # fmt: skip
        self.config = ServeConfig.model_validate(config)
        self.engines = engines  # served name -> DeploymentHandle
        self.default_sides = default_sides  # served name -> the model's native side
        families = families or {}  # served name -> unet, sd3 or flux: its default scheduler
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
                                  images)  # fmt: skip
        data = [ImageData(seed=s.record.seed, id=s.record.id, **fields) for s, fields in stored]
        return JSONResponse(
            ImagesResponse(created=int(time.time()), data=data).model_dump(exclude_none=True)
        )

    async def _image_inputs(self, model: str, requests: list[ImageRequest],
                            uploads: dict[str, bytes], field: Any) -> dict[str, Any]:  # fmt: skip
        """The requests' init images decoded and sized (off the event loop), or a 400."""
        if not uploads:
            return {}
        images = await asyncio.to_thread(image_inputs, requests, uploads, self.limits[model],
                                         self.default_sides.get(model, 512), field)  # fmt: skip
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

    async def _make(self, model: str, requests: list[ImageRequest], response_format: ResponseFormat,
                    request: Request, client_ids: dict[str, str],
                    inputs: dict[str, Any] | None = None) -> list[tuple[StoredImage, dict]]:  # fmt: skip
        """Generate (what the result cache does not hold), then encode (and for url, write)
        through the one write path. `inputs`: init images by request id."""
        inputs = inputs or {}
        hits = await self._cached(model, requests, inputs) if self.options.cache is not None else {}
        misses = [r for r in requests if r.id not in hits]
        made = iter(await self._generate(model, misses, inputs) if misses else [])
        images = [hits[r.id] if r.id in hits else next(made) for r in requests]
        if hits:
            metrics.record_cache_hits("serve", model, len(hits))
        base_url = str(request.base_url)
        try:
            return await asyncio.to_thread(self._package, images, response_format, base_url,
                                           client_ids)  # fmt: skip
        except CompositeError as exc:  # this request's layers cannot be placed
            raise ApiError(400, fields=[FieldError(field=exc.field, reason=exc.reason)],
                           code="invalid_value") from None  # fmt: skip
        except CredentialsError as exc:  # a timestamp server down, say: retry later
            raise ApiError(503, f"the images could not be signed: {exc}", type="server_error",
                           code="signing_failed", headers={"Retry-After": "5"}) from None  # fmt: skip

    async def _cached(self, model: str, requests: list[ImageRequest],
                      inputs: dict[str, Any]) -> dict[str, ReplicaImage]:  # fmt: skip
        """Request id -> the image the result cache holds for it (best effort: a cache or a
        replica that cannot answer now is a miss, the engine makes the image)."""
        from ..pipeline.result_cache import load

        if model not in self.cache_views:
            try:
                weights = (await self.engines[model].describe.remote())["weights_hash"]
            except Exception:  # no replica yet, or at capacity: _generate says so
                return {}
            engine = next(m.engine for m in self.config.models if m.served_name == model)
            self.cache_views[model] = cache_view(self.options, weights, engine)
        view, side = self.cache_views[model], self.default_sides.get(model, 512)

        def read() -> dict[str, ReplicaImage]:
            out = {}
            for image_id, key in view.hits(requests, side).items():
                request = next(r for r in requests if r.id == image_id)
                try:
                    generated, made = load(view.storage, key, request)
                    if image_id in inputs:  # the upload it was made from, as made
                        generated.inputs = inputs[image_id].provenance
                    out[image_id] = ReplicaImage(generated, Provenance(**made["provenance"]))
                except Exception as exc:  # gone, or not an entry this version reads
                    logger.warning("result cache entry %s unreadable (%s): made again", key, exc)
            return out

        return await asyncio.to_thread(read)

    async def _generate(self, model: str, requests: list[ImageRequest],
                        inputs: dict[str, Any]) -> list[ReplicaImage]:  # fmt: skip
        """The images of one HTTP request, from one engine call (replicas batch calls)."""
        wanted = {r.id: inputs[r.id] for r in requests if r.id in inputs}
        call = self.engines[model].generate.remote(requests, wanted)
        self.in_flight[model] += 1
        try:
            return await call
        except BackPressureError as exc:
            retry = exc.retry_after_s
            raise ApiError(
                503, f"model {model!r} is at capacity; retry later", type="server_error",
                code="overloaded",
                headers={"Retry-After": str(int(retry + 0.999))} if retry is not None else None,
            ) from None  # fmt: skip
        except DeploymentUnavailableError:
            raise ApiError(
                503, f"model {model!r} is not available", type="server_error", code="unavailable"
            ) from None
        except asyncio.CancelledError:  # the client went away: its unstarted images are dropped
            call.cancel()
            raise
        except Rejected as exc:  # the quality gate refused an image of this request
            if exc.image is not None and self.options.keep_rejected:
                with contextlib.suppress(Exception):  # kept for review, best effort: still a 422
                    await asyncio.to_thread(self._keep_rejected, exc)
            raise ApiError(422, fields=[FieldError(field="image", reason=str(exc))],
                           type="invalid_request_error", code="quality_rejected") from None  # fmt: skip
        except RequestRefused as exc:  # the model cannot make this request (an adapter that
            # does not load, a negative prompt for FLUX, a scheduler without a flow form)
            cause = getattr(exc, "cause", exc)  # Ray's wrapper keeps the engine's exception
            raise ApiError(400, fields=[FieldError(field=cause.field, reason=cause.detail)],
                           code="invalid_value") from None  # fmt: skip
        except EngineLoopFailed as exc:
            raise ApiError(503, str(exc), type="server_error", code="engine_restarted",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        except Exception as exc:
            logger.exception("generation failed")
            raise ApiError(
                500, f"generation failed: {type(exc).__name__}: {first_line(exc)}",
                type="server_error", code="generation_failed",
            ) from None  # fmt: skip
        finally:
            self.in_flight[model] -= 1

    def _package(self, images: list[ReplicaImage], response_format: ResponseFormat, base_url: str,
                 client_ids: dict[str, str]) -> list[tuple[StoredImage, dict]]:  # fmt: skip
        """(stored image, response fields) per image: PNG inline, or written and linked."""
        url = response_format is ResponseFormat.url
        stored = write_outputs(
            [(i.image, i.provenance) for i in images], self.storage if url else None,
            run_id=self.run_id, version=daguerre.__version__, client_ids=client_ids,
            options=self.options,
        )  # fmt: skip
        out = []
        for item in stored:
            if url:
                key = image_key(item.record.id, ext=EXTENSIONS[item.record.format])
                fields = {"url": self._public_url(key, base_url)}
            else:
                fields = {"b64_json": base64.b64encode(item.data).decode()}
            out.append((item, fields))
        return out

    def _keep_rejected(self, rejected: Rejected) -> None:
        """quality.keep_rejected online: the image under rejected/ and its errors row."""
        image = rejected.image
        uri = keep_rejected(image, self.storage)
        error = ErrorRecord(id=image.request.id, stage="quality", field="image",
                            reason=str(rejected), row=image.request.model_dump_json(),
                            uri=uri, run_id=self.run_id,
                            created_at=dt.datetime.now(dt.timezone.utc))  # fmt: skip
        write_errors([error], self.storage, self.run_id)

    def _public_url(self, key: str, base_url: str) -> str:
        if self.storage.is_local:
            expires = int(time.time() + self.config.url_ttl_s)
            signature = sign_key(self.url_secret, key, expires)
            return f"{base_url.rstrip('/')}/v1/files/{key}?expires={expires}&signature={signature}"
        try:  # object stores: a presigned URL where the filesystem can make one
            return self.storage.fs.sign(
                self.storage.path(key), expiration=int(self.config.url_ttl_s)
            )
        except (NotImplementedError, AttributeError):
            return self.storage.url(key)
