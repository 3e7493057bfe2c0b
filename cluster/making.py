"""How the ingress makes the images of one HTTP request: the result cache first, one engine
call for the rest (its engine errors answered as HTTP errors), then the one write path
(pipeline/outputs.py): inline PNG, or written with their metadata and linked. A mixin of
`ApiIngress` (cluster/ingress.py), which holds the state it uses."""

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import time
from typing import Any

from fastapi import Request
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

import daguerre

from ..pipeline.composite import CompositeError, layer_values, missing_value
from ..pipeline.config import RequestRefused, first_line
from ..pipeline.credentials import CredentialsError
from ..pipeline.files import Provenance
from ..pipeline.formats import EXTENSIONS
from ..pipeline.outputs import StoredImage, cache_view, keep_rejected, write_errors, write_outputs
from ..pipeline.quality import Rejected
from ..pipeline.schema import ErrorRecord, FieldError, ImageRequest
from ..pipeline.storage import image_key
from . import metrics
from .api import ResponseFormat
from .http_app import ApiError
from .replica import EngineLoopFailed, ReplicaImage

logger = logging.getLogger("ray.serve")


def sign_key(secret: bytes, key: str, expires: int) -> str:
    """The signature of a file link: HMAC-SHA256 over the key and its expiry."""
    return hmac.new(secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


class OnlineMaking:
    """Making and packaging the images of HTTP requests (state: ApiIngress's)."""

    async def _make(self, model: str, requests: list[ImageRequest], response_format: ResponseFormat,
                    request: Request, client_ids: dict[str, str],
                    inputs: dict[str, Any] | None = None,
                    rename: Any = None) -> list[tuple[StoredImage, dict]]:  # fmt: skip
        """Generate (what the result cache does not hold), then encode (and for url, write)
        through the one write path. `inputs`: init images by request id; `rename`: the
        client's name of a request field an engine refusal names."""
        inputs = inputs or {}
        self._check_layers(requests)
        hits = await self._cached(model, requests, inputs) if self.options.cache is not None else {}
        misses = [r for r in requests if r.id not in hits]
        made = iter(await self._generate(model, misses, inputs, rename) if misses else [])
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

    def _check_layers(self, requests: list[ImageRequest]) -> None:
        """400 before any image is made for a request the deployment's layers cannot take."""
        if not self.options.composite.enabled:
            return
        for request in requests:
            missing = missing_value(self.options.composite, layer_values(request))
            if missing is not None:
                raise ApiError(400, fields=[FieldError(field=missing.field, reason=missing.reason)],
                               code="invalid_value")  # fmt: skip

    async def _generate(self, model: str, requests: list[ImageRequest], inputs: dict[str, Any],
                        rename: Any = None) -> list[ReplicaImage]:  # fmt: skip
        """The images of one HTTP request, from one engine call (replicas batch calls)."""
        call = self.engines[model].generate.remote(requests, [inputs.get(r.id) for r in requests])
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
            field = rename(cause.field) if rename else cause.field
            raise ApiError(400, fields=[FieldError(field=field, reason=cause.detail)],
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
