"""What an operator's Prometheus scrapes: metrics through Ray's metrics API.

`ray.util.metrics` objects recorded in any Ray process (job stages, engine actors, Serve
replicas) are exported by each node's metrics agent at its metrics export port
(`ray.nodes()[i]["MetricsExportPort"]`, `ray start --metrics-export-port`); Ray prefixes
their names with `ray_`:

    ray_daguerre_images_total{pool, model}              images written (job) or answered (serve)
    ray_daguerre_cache_hits_total{pool, model}          of those, answered from the result cache
    ray_daguerre_errors_total{stage, field}             rows that failed, by stage and field
    ray_daguerre_stage_seconds{stage, pool}             latency histogram per stage and call
    ray_daguerre_queue_depth{model, priority}           a replica's waiting online/batch requests
    ray_daguerre_engine_busy_fraction{pool, actor}      time inside generate since the first call

Outside Ray (a driver-only rerun, a unit test) every call here does nothing.
"""

from __future__ import annotations

from typing import Any

SECONDS_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]
_made: dict[str, Any] = {}


def _metric(kind: str, name: str, description: str, tags: tuple[str, ...]) -> Any:
    """This process's metric of that name (created once), or None outside Ray."""
    if name in _made:
        return _made[name]
    import ray

    if not ray.is_initialized():
        return None
    from ray.util import metrics

    options: dict[str, Any] = {"description": description, "tag_keys": tags}
    if kind == "Histogram":
        options["boundaries"] = SECONDS_BUCKETS
    _made[name] = getattr(metrics, kind)(name, **options)
    return _made[name]


def record_images(pool: str, model: str, count: int) -> None:
    metric = _metric("Counter", "daguerre_images_total", "Images written (job) or answered "
                     "(serve).", ("pool", "model"))  # fmt: skip
    if metric is not None and count:
        metric.inc(count, tags={"pool": pool, "model": model})


def record_cache_hits(pool: str, model: str, count: int) -> None:
    metric = _metric("Counter", "daguerre_cache_hits_total", "Images answered from the result "
                     "cache instead of made.", ("pool", "model"))  # fmt: skip
    if metric is not None and count:
        metric.inc(count, tags={"pool": pool, "model": model})


def record_errors(stage: str, field: str, count: int = 1) -> None:
    metric = _metric("Counter", "daguerre_errors_total", "Rows that failed, by stage and "
                     "field.", ("stage", "field"))  # fmt: skip
    if metric is not None and count:
        metric.inc(count, tags={"stage": stage, "field": field or ""})


def observe_stage(stage: str, pool: str, seconds: float) -> None:
    metric = _metric("Histogram", "daguerre_stage_seconds", "Seconds per call of a stage "
                     "(prepare, generate, write).", ("stage", "pool"))  # fmt: skip
    if metric is not None:
        metric.observe(seconds, tags={"stage": stage, "pool": pool})


def set_queue_depth(model: str, online: int, batch: int) -> None:
    metric = _metric("Gauge", "daguerre_queue_depth", "Requests waiting in a replica, by "
                     "priority.", ("model", "priority"))  # fmt: skip
    if metric is not None:
        metric.set(online, tags={"model": model, "priority": "online"})
        metric.set(batch, tags={"model": model, "priority": "batch"})


def set_busy_fraction(pool: str, actor: str, fraction: float) -> None:
    metric = _metric("Gauge", "daguerre_engine_busy_fraction", "Fraction of an engine's "
                     "time inside generate since its first call.", ("pool", "actor"))  # fmt: skip
    if metric is not None:
        metric.set(fraction, tags={"pool": pool, "actor": actor})
