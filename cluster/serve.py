"""The online service: engine replicas (cluster/replica.py) behind the HTTP ingress
(cluster/ingress.py), built from a `ServeConfig` and started or stopped.

`build_app(args)` is the entry point for `serve run`/`serve deploy`/KubeRay:
`import_path: daguerre.cluster.serve:build_app` with `args:` a `ServeConfig` mapping.

Overload: each engine deployment bounds its queue (`max_queued_requests`); calls beyond
it fail at once in the ingress, which answers 503 with Retry-After.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import socket
from typing import Any

from ..pipeline.composite import check_fixed_sources
from ..pipeline.config import ModelDeploymentConfig, ServeConfig, validate_config
from ..pipeline.files import WriteOptions, check_outputs
from ..pipeline.models import describe_model
from ..pipeline.quality import check_quality
from ..pipeline.semantic_cache import semantic_index
from ..pipeline.storage import Storage, is_remote
from .runtime import ResourceError, engine_resources, init_ray, node_model_path

APP_NAME = "daguerre"


def deployment_options(model: ModelDeploymentConfig, cluster_gpus: float) -> dict[str, Any]:
    """Serve options of one model's engine deployment."""
    from ray.serve.config import BackpressureConfig

    batch = model.engine.max_batch_size
    target = model.target_ongoing_requests or batch
    num_gpus = 1.0 if model.num_gpus == "auto" else model.num_gpus
    resources = engine_resources(model.engine, cluster_gpus, num_gpus=num_gpus,
                                 num_cpus=model.num_cpus)  # fmt: skip
    options: dict[str, Any] = {
        "name": f"Engine-{model.served_name}",
        "ray_actor_options": resources,
        # Close to the target: a replica far above it would absorb the load before the
        # autoscaler's new replicas are up, and requests queued on a replica never move.
        "max_ongoing_requests": model.max_ongoing_requests or math.ceil(1.5 * target),
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
            "target_ongoing_requests": target,
            "upscale_delay_s": model.upscale_delay_s,
            "downscale_delay_s": model.downscale_delay_s,
            "look_back_period_s": model.look_back_period_s,
        }
    return options


def build_app(args: dict[str, Any] | ServeConfig | None = None) -> Any:
    """The Serve application for a `ServeConfig` (a mapping, as `serve deploy` passes `args`)."""
    import ray

    from .ingress import ApiIngress
    from .replica import EngineDeployment

    config = args if isinstance(args, ServeConfig) else validate_config(ServeConfig, args or {})
    check_outputs(config)
    check_fixed_sources(config.composite)
    check_quality(config.quality)
    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    engines, default_sides, families = {}, {}, {}
    semantic = semantic_index(WriteOptions.of(config, config.output).cache, config.cache)
    for model in config.models:
        engine = model.engine.model_copy(update={"model": node_model_path(model.engine.model)})
        # an unknown preset, a bad folder or unusable storage fails here, not in a replica
        info = describe_model(engine.model, config.storage)
        default_sides[model.served_name] = info.default_size
        families[model.served_name] = info.family
        deployment = EngineDeployment.options(**deployment_options(model, cluster_gpus))
        engines[model.served_name] = deployment.bind(
            engine.model_dump(mode="json"), model.batch_wait_timeout_s, config.storage,
            model.max_replicas, model.online_fill_slack, config.quality, semantic,
        )  # fmt: skip
    ingress = ApiIngress.options(
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        max_ongoing_requests=config.ingress_max_ongoing_requests,
    )
    if is_remote(config.output):  # credentials and bucket checked before any replica starts
        Storage(config.output, config.storage).check_writable()
    # Every ingress replica signs links with one secret: configured, or made for this app.
    url_secret = os.environ.get(config.url_secret_env) or secrets.token_hex(32)
    # The config object itself travels (not a JSON dump, which would mask its secrets).
    return ingress.bind(config, engines, url_secret, default_sides, families)


def check_port(host: str, port: int) -> None:
    """Raise ResourceError when `host:port` is taken (Serve binds with port reuse, so a second
    server would share it and answer half the requests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ResourceError(f"{host}:{port} is in use; pass --port") from None
            raise ResourceError(
                f"cannot bind {host}:{port} ({exc.strerror}); pass --host/--port"
            ) from None


def start(
    config: ServeConfig,
    *,
    address: str | None = None,
    name: str = APP_NAME,
    route_prefix: str = "/",
    verbose: bool = False,
) -> str:
    """Deploy the app (starting a local Ray unless `address` is given); return its base URL."""
    from ray import serve

    check_outputs(config)  # a logo, a key, a classifier: one line, before Ray starts
    check_fixed_sources(config.composite)
    check_quality(config.quality)
    init_ray(address, verbose=verbose)
    http = {"host": config.host, "port": config.port}
    if config.request_timeout_s is not None:
        http["request_timeout_s"] = config.request_timeout_s
    serve.start(http_options=http)
    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}{route_prefix.rstrip('/')}"


def stop(shared_cluster: bool, name: str = APP_NAME) -> None:
    """Remove this app (a shared cluster keeps Serve running), or end the local Ray with
    everything on it (a separate serve.shutdown() there only adds Ray's complaint that
    the controller it kills cannot finish its graceful shutdown)."""
    import ray

    if shared_cluster:
        from ray import serve

        serve.delete(name)
    ray.shutdown()
