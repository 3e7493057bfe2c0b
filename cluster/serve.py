"""The online service: Ray Serve engine replicas behind a FastAPI ingress.

    HTTP -> Serve proxy -> ApiIngress (FastAPI, CPU): validate, auth, fan out one call per image
         -> EngineDeployment (one engine per replica, one GPU each): @serve.batch collects
            concurrent calls; a replica-local runner merges everything waiting when the
            engine frees up into its next batch (one bucket per engine call)
         <- raw images; the ingress encodes PNGs (and for response_format=url writes them
            and their metadata rows through the storage layer, as the batch job does)

Why a runner behind @serve.batch: Serve forms the next batch as soon as the previous one
is *started*, so under load a diffusion replica (a batch takes seconds) would run many
small batches one after another. The runner instead takes everything that arrived while
the engine was busy, so batches grow with load and a lone request never waits.

Overload: each engine deployment bounds its queue (`max_queued_requests`); calls beyond
it fail at once in the ingress, which answers 503 with Retry-After. Every other failure
is a JSON body in OpenAI's error shape.

`build_app(args)` is the entry point for `serve run`/`serve deploy`/KubeRay:
`import_path: daguerre.cluster.serve:build_app` with `args:` a `ServeConfig` mapping.

No `from __future__ import annotations` here: Serve pickles the ingress class by value,
and FastAPI must resolve the route annotations from the objects themselves.
"""

import asyncio
import base64
import collections
import datetime as dt
import hmac
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daguerre.cluster.api import (
    GeneratedImageOut,
    GenerateRequest,
    GenerateResponse,
    ImageData,
    ImagesGenerationRequest,
    ImagesResponse,
    ResponseFormat,
    error_body,
)
from daguerre.pipeline.config import (
    EngineConfig,
    ModelDeploymentConfig,
    ServeConfig,
    StorageConfig,
)
from daguerre.pipeline.job import first_line
from daguerre.pipeline.records import Provenance, encode_png, image_record
from daguerre.pipeline.schema import FieldError, ImageRequest
from daguerre.pipeline.storage import (
    IMAGES,
    METADATA,
    Storage,
    fragment_key,
    image_key,
    is_remote,
)
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

import daguerre

logger = logging.getLogger("ray.serve")

APP_NAME = "daguerre"


# Serve pickles deployment classes when they are decorated: everything their methods
# use must already be defined above them.


def _online_ids(n: int) -> list[str]:
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    stem = uuid.uuid4().hex
    return [f"online/{day}/{stem}-{i}" for i in range(n)]


def _read_token(config: ServeConfig) -> str | None:
    if config.auth_token_file:
        token = Path(config.auth_token_file).read_text().strip()
        if not token:
            raise ValueError(f"auth_token_file: {config.auth_token_file} is empty")
        return token
    return os.environ.get(config.auth_token_env) or None


# -- engine replicas ----------------------------------------------------------------------


@dataclass
class ReplicaImage:
    """What a replica returns for one request: the raw image and its provenance."""

    image: Any  # GeneratedImage
    provenance: Provenance


@serve.deployment(name="Engine")
class EngineDeployment:
    """One DiffusionEngine per replica, fed by a runner that batches whatever is waiting."""

    def __init__(
        self,
        engine_config: dict[str, Any],
        served_name: str,
        batch_wait_timeout_s: float,
        storage_config: StorageConfig | None = None,
    ):
        import ray
        from daguerre.pipeline.engine import EngineThread

        self._thread = EngineThread(EngineConfig(**engine_config), storage_config)
        engine = self._thread.engine
        self.max_batch_size = engine.config.max_batch_size
        self.collect.set_max_batch_size(self.max_batch_size)
        self.collect.set_batch_wait_timeout_s(batch_wait_timeout_s)
        context = ray.get_runtime_context()
        self.provenance = Provenance(
            model=served_name,
            weights_hash=engine.model.weights_hash,
            backend=engine.backend,
            node_id=context.get_node_id(),
            actor_id=context.get_actor_id() or "",
        )
        self._pending: collections.deque[tuple[ImageRequest, asyncio.Future]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.images = 0

    async def generate(self, requests: list[ImageRequest]) -> list[ReplicaImage]:
        """One image per request; concurrent calls are batched together."""
        results = await self.collect(requests)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [ReplicaImage(image=r, provenance=self.provenance) for r in results]

    # Serve's batch queue collects concurrent calls (each the images of one HTTP request);
    # all their images go to the runner in one step, so one request's n images share a
    # batch. max_concurrent_batches is high so collected calls reach the runner at once
    # instead of waiting behind a running batch.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, max_concurrent_batches=1024)
    async def collect(self, calls: list[list[ImageRequest]]) -> list[list[Any]]:
        futures = [[self._submit(r) for r in call] for call in calls]
        return [list(await asyncio.gather(*f, return_exceptions=True)) for f in futures]

    def _submit(self, request: ImageRequest) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._runner is None:
            self._wakeup = asyncio.Event()
            self._runner = loop.create_task(self._run())
        future = loop.create_future()
        self._pending.append((request, future))
        self._wakeup.set()
        return future

    async def _run(self) -> None:
        """Forever: take the oldest request's bucket (up to max_batch_size), run it, answer."""
        assert self._wakeup is not None
        engine = self._thread.engine
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                key = engine.bucket_key(self._pending[0][0])
                batch, rest = [], collections.deque()
                for request, future in self._pending:
                    if future.cancelled():
                        continue
                    if len(batch) < self.max_batch_size and engine.bucket_key(request) == key:
                        batch.append((request, future))
                    else:
                        rest.append((request, future))
                self._pending = rest
                if not batch:
                    continue
                results = await self._thread.generate_each_async([r for r, _ in batch])
                self.batch_sizes[len(batch)] += 1
                self.images += len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)

    async def stats(self) -> dict[str, Any]:
        """This replica's counters: images made, engine batches by size, requests waiting."""
        return {
            "replica": self.provenance.actor_id,
            "images": self.images,
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "pending": len(self._pending),
        }


# -- HTTP ingress ----------------------------------------------------------------------------

app = FastAPI(
    title="daguerre",
    description="Diffusion image generation: OpenAI-compatible images API and a native API.",
    version=daguerre.__version__,
)


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
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = [_request_field_error(err) for err in exc.errors()]
    return JSONResponse(error_body(fields=fields, code="invalid_value"), status_code=400)


def _request_field_error(err: dict[str, Any]) -> FieldError:
    from daguerre.pipeline.schema import field_error

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


@serve.deployment(name="Api")
@serve.ingress(app)
class ApiIngress:
    """Validates, authorises and fans requests out to the engine deployments."""

    def __init__(self, config: ServeConfig | dict[str, Any], engines: dict[str, Any]):
        self.config = ServeConfig.model_validate(config)
        self.engines = engines  # served name -> DeploymentHandle
        self.default_model = self.config.models[0].served_name
        self.storage = Storage(self.config.output, self.config.storage)
        self.token = _read_token(self.config)
        self.created = int(time.time())

    # -- routes --------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": list(self.engines)}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        data = [
            {"id": name, "object": "model", "created": self.created, "owned_by": "daguerre"}
            for name in self.engines
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Counters of one replica per model (each call may reach a different replica)."""
        self._authorize(request)
        return {name: await handle.stats.remote() for name, handle in self.engines.items()}

    @app.post("/v1/images/generations", response_model=ImagesResponse)
    async def images_generations(self, body: ImagesGenerationRequest, request: Request) -> Any:
        self._authorize(request)
        model = self._model(body.model, "model")
        base_seed = body.seed if body.seed is not None else secrets.randbelow(2**62)
        ids = _online_ids(body.n)
        image_requests = body.image_requests(ids, base_seed, self.config.limits)
        if image_requests and isinstance(image_requests[0], FieldError):
            raise ApiError(400, fields=image_requests, code="invalid_value")
        images = await self._generate(model, image_requests)
        outputs = await asyncio.to_thread(
            self._package, images, body.response_format, str(request.base_url)
        )
        data = [
            ImageData(seed=img.image.seed, id=img.image.request.id, **out)
            for img, (out, _) in zip(images, outputs, strict=True)
        ]
        return JSONResponse(
            ImagesResponse(created=int(time.time()), data=data).model_dump(exclude_none=True)
        )

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest, request: Request) -> Any:
        self._authorize(request)
        limit = self.config.max_images_per_request
        if len(body.requests) > limit:
            raise ApiError(
                400,
                fields=[
                    FieldError(
                        field="requests",
                        reason=f"has {len(body.requests)} requests; at most {limit} per call",
                    )
                ],
            )
        image_requests = body.image_requests(_online_ids(len(body.requests)), self.config.limits)
        if image_requests and isinstance(image_requests[0], FieldError):
            raise ApiError(400, fields=image_requests, code="invalid_value")
        named = {r.model for r in image_requests if r.model is not None}
        if len(named) > 1:
            raise ApiError(
                400, fields=[FieldError(field="requests.model", reason="one model per call")]
            )
        model = self._model(body.model or next(iter(named), None), "model")
        images = await self._generate(model, image_requests)
        outputs = await asyncio.to_thread(
            self._package, images, body.response_format, str(request.base_url)
        )
        data = [
            GeneratedImageOut(id=img.image.request.id, record=record, **out)
            for img, (out, record) in zip(images, outputs, strict=True)
        ]
        return JSONResponse(
            GenerateResponse(created=int(time.time()), data=data).model_dump(
                mode="json", exclude_none=True
            )
        )

    @app.get("/v1/files/{key:path}")
    async def files(self, key: str, request: Request) -> Response:
        """An image written for response_format=url (local output prefixes)."""
        self._authorize(request)
        parts = key.split("/")
        if parts[0] != IMAGES or any(p in ("", ".", "..") for p in parts) or len(parts) < 2:
            raise ApiError(404, f"{key}: not an image key", code="not_found")
        try:
            data = await asyncio.to_thread(self.storage.fs.cat_file, self.storage.path(key))
        except FileNotFoundError:
            raise ApiError(404, f"{key}: no such image", code="not_found") from None
        return Response(data, media_type="image/png")

    # -- helpers ---------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _model(self, name: str | None, field: str) -> str:
        name = name or self.default_model
        if name not in self.engines:
            raise ApiError(
                404,
                fields=[
                    FieldError(
                        field=field,
                        reason=f"{name!r} is not served here (served: {', '.join(self.engines)})",
                    )
                ],
                code="model_not_found",
            )
        return name

    async def _generate(self, model: str, requests: list[ImageRequest]) -> list[ReplicaImage]:
        """The images of one HTTP request, from one engine call (replicas batch calls)."""
        call = self.engines[model].generate.remote(requests)
        try:
            return await call
        except BackPressureError as exc:
            retry = exc.retry_after_s
            raise ApiError(
                503,
                f"model {model!r} is at capacity; retry later",
                type="server_error",
                code="overloaded",
                headers={"Retry-After": str(int(retry + 0.999))} if retry is not None else None,
            ) from None
        except DeploymentUnavailableError:
            raise ApiError(
                503, f"model {model!r} is not available", type="server_error", code="unavailable"
            ) from None
        except asyncio.CancelledError:  # the client went away: drop what is still queued
            call.cancel()
            raise
        except Exception as exc:
            logger.exception("generation failed")
            raise ApiError(
                500,
                f"generation failed: {type(exc).__name__}: {first_line(exc)}",
                type="server_error",
                code="generation_failed",
            ) from None

    def _package(
        self, images: list[ReplicaImage], response_format: ResponseFormat, base_url: str
    ) -> list[tuple[dict[str, str], Any]]:
        """(response fields, ImageRecord) per image: PNG inline, or written and linked."""
        out, records = [], []
        for item in images:
            generated = item.image
            t0 = time.perf_counter()
            png = encode_png(generated.image)
            t1 = time.perf_counter()
            uri, fields = "", {}
            if response_format is ResponseFormat.url:
                key = image_key(generated.request.id)
                uri = self.storage.write_bytes(key, png)
                fields["url"] = self._public_url(key, base_url)
            else:
                fields["b64_json"] = base64.b64encode(png).decode()
            timings = generated.timings.model_copy(
                update={"encode_png_s": t1 - t0, "write_s": time.perf_counter() - t1}
            )
            record = image_record(
                generated.request,
                png=png,
                uri=uri,
                seed=generated.seed,
                width=generated.width,
                height=generated.height,
                batch_size=generated.batch_size,
                scheduler_config=generated.scheduler_config,
                timings=timings,
                provenance=item.provenance,
                version=daguerre.__version__,
            )
            records.append(record)
            out.append((fields, record))
        if response_format is ResponseFormat.url:  # after the images: metadata proves them
            import pyarrow as pa
            from daguerre.pipeline.schema import record_schema

            table = pa.Table.from_pylist([r.model_dump() for r in records], schema=record_schema())
            self.storage.write_table(fragment_key(METADATA, [r.id for r in records]), table)
        return out

    def _public_url(self, key: str, base_url: str) -> str:
        if self.storage.is_local:
            return f"{base_url.rstrip('/')}/v1/files/{key}"
        try:  # object stores: a presigned URL where the filesystem can make one
            return self.storage.fs.sign(self.storage.path(key), expiration=3600)
        except (NotImplementedError, AttributeError):
            return self.storage.url(key)


# -- building the application --------------------------------------------------------------


def deployment_options(model: ModelDeploymentConfig, has_gpus: bool) -> dict[str, Any]:
    """Serve options of one model's engine deployment."""
    from ray.serve.config import BackpressureConfig

    batch = model.engine.max_batch_size
    num_gpus = (1.0 if has_gpus else 0.0) if model.num_gpus == "auto" else model.num_gpus
    options: dict[str, Any] = {
        "name": f"Engine-{model.served_name}",
        "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": model.max_ongoing_requests or 2 * batch,
        "max_queued_requests": model.max_queued_requests,
        "backpressure_config": BackpressureConfig(
            status_code=503, retry_after_s=model.retry_after_s
        ),
        # Model load (weights, first CUDA kernels) can take minutes on a cold node.
        "health_check_timeout_s": 120,
    }
    if model.min_replicas == model.max_replicas:
        options["num_replicas"] = model.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": model.min_replicas,
            "max_replicas": model.max_replicas,
            "target_ongoing_requests": model.target_ongoing_requests or batch,
        }
    return options


def build_app(args: dict[str, Any] | ServeConfig | None = None) -> Any:
    """The Serve application for a `ServeConfig` (a mapping, as `serve deploy` passes `args`)."""
    import ray
    from daguerre.pipeline.config import validate_config
    from daguerre.pipeline.models import describe_model

    config = args if isinstance(args, ServeConfig) else validate_config(ServeConfig, args or {})
    has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    engines = {}
    for model in config.models:
        engine = model.engine.model_copy()
        if Path(engine.model).is_dir():  # replicas resolve paths on their own nodes
            engine.model = str(Path(engine.model).resolve())
        # an unknown preset, a bad folder or unusable storage fails here, not in a replica
        describe_model(engine.model, config.storage)
        deployment = EngineDeployment.options(**deployment_options(model, has_gpus))
        engines[model.served_name] = deployment.bind(
            engine.model_dump(), model.served_name, model.batch_wait_timeout_s, config.storage
        )
    ingress = ApiIngress.options(
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        max_ongoing_requests=config.ingress_max_ongoing_requests,
    )
    if is_remote(config.output):  # credentials and bucket checked before any replica starts
        Storage(config.output, config.storage).check_writable()
    # The config object itself travels (not a JSON dump, which would mask its secrets).
    return ingress.bind(config, engines)


def start(
    config: ServeConfig,
    *,
    address: str | None = None,
    name: str = APP_NAME,
    route_prefix: str = "/",
) -> str:
    """Deploy the app (starting a local Ray unless `address` is given); return its base URL."""
    import ray

    if not ray.is_initialized():
        local = {"_node_ip_address": "127.0.0.1"} if address is None else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
    http = {"host": config.host, "port": config.port}
    if config.request_timeout_s is not None:
        http["request_timeout_s"] = config.request_timeout_s
    serve.start(http_options=http)
    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}{route_prefix.rstrip('/')}"
