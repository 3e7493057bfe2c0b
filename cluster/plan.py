"""What a job will do, decided before any actor starts: the inputs checked, the engine pool
fitted to the machine, and what a rerun finds already made compared with what it asks.

Every refusal here is one line (a ConfigError, ManifestError or StorageError subclass),
so `daguerre generate` ends with exit code 2 and no traceback.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..kernels.tensorrt import tensorrt_unavailable
from ..kernels.unet import UNetBackend
from ..pipeline.config import ConfigError, JobConfig
from ..pipeline.files import check_outputs
from ..pipeline.manifest import ManifestInfo, inspect_manifest
from ..pipeline.models import ModelInfo, describe_model
from ..pipeline.quality import check_quality
from ..pipeline.schema import ImageRequest
from ..pipeline.storage import Storage
from .planning import IdSets
from .runtime import ResourceError, local_gpus, node_model_path, uses_gpu


class ResumeConflict(ConfigError):
    """Finished images under the output were made differently from what this run asks."""


@dataclass
class ServedEngine:
    """A running Serve app's engine deployment that a job sends its batches to."""

    app: str
    model: str  # the served name
    deployment: str
    description: dict[str, Any]  # what a replica says it runs (model, weights hash, sizes)


@dataclass
class JobPlan:
    """The checked inputs of one run."""

    manifest: ManifestInfo
    model: ModelInfo
    config: JobConfig  # the engine pool fitted to the machine
    notices: list[str] = field(default_factory=list)
    ids: IdSets | None = None  # duplicates, finished ids to skip (cluster/planning.py)
    served: ServedEngine | None = None  # engine_pool serve: where the batches go


def served_engine(
    config: JobConfig, address: str | None, verbose: bool = False
) -> ServedEngine | None:
    """engine_pool serve: join the cluster at `address` and find the app's engine (None for
    a dedicated pool). Checked before any manifest row is read."""
    if config.engine_pool != "serve":
        return None
    if address is None:
        raise ResourceError(
            "--via-serve needs --address: the Ray cluster where `daguerre serve` runs"
        )
    from .runtime import init_ray

    init_ray(address, verbose=verbose)
    return connect_serve(config)


def connect_serve(config: JobConfig) -> ServedEngine:
    """The engine deployment of `config.serve_app` serving `engine.model` on the connected
    cluster; ResourceError (one line) when there is no such app or it serves other models."""
    from pathlib import Path

    from ray import serve
    from ray.serve.exceptions import RayServeException

    app, model = config.serve_app, Path(config.engine.model.rstrip("/")).name
    try:
        apps = serve.status().applications
    except RayServeException:
        apps = {}
    if app not in apps:
        running = ", ".join(apps) or "none"
        raise ResourceError(f"--via-serve: no Serve app {app!r} on this cluster (apps: {running});"
                            " start one there with daguerre serve --address ...")  # fmt: skip
    engines = {
        n.removeprefix("Engine-"): n for n in apps[app].deployments if n.startswith("Engine-")
    }
    if model not in engines:
        raise ResourceError(f"--via-serve: Serve app {app!r} serves {', '.join(engines)}, not "
                            f"{model!r} (--model names the served model)")  # fmt: skip
    handle = serve.get_deployment_handle(engines[model], app_name=app)
    description = handle.describe.remote().result(timeout_s=120)
    return ServedEngine(app=app, model=model, deployment=engines[model], description=description)


def check_inputs(manifest: str, config: JobConfig, local: bool,
                 served: ServedEngine | None = None) -> JobPlan:  # fmt: skip
    """The manifest, the model and its backend, checked; for a local Ray, the pool fitted.
    With `served`, the model is what the app's replicas run (they need no pool here)."""
    info = inspect_manifest(manifest, config.storage)
    check_outputs(config)  # marks, credentials: the write tasks apply them, in both pools
    check_quality(config.quality)
    if served is not None:
        d = served.description
        model = ModelInfo(spec=served.app, name=d["model"], kind="served",
                          default_size=d["default_size"], _weights_hash=d["weights_hash"],
                          family=d.get("family", "unet"))  # fmt: skip
        config = config.model_copy(update={"limits": config.limits.for_family(model.family)})
        return JobPlan(manifest=info, model=model, config=config, notices=[model.describe()],
                       served=served)  # fmt: skip
    engine = config.engine.model_copy(update={"model": node_model_path(config.engine.model)})
    model = describe_model(engine.model, config.storage)
    config = config.model_copy(update={"engine": engine,
                                       "limits": config.limits.for_family(model.family)})  # fmt: skip
    notices = [model.describe()] if model.random_weights else []
    if local:  # the driver's machine is the cluster: check what the actors will need
        reason = unet_backend_unavailable(engine.unet_backend, uses_gpu(engine, local_gpus()))
        if reason:
            raise ConfigError(f"unet_backend {engine.unet_backend.value}: {reason}")
        config, notice = fit_pool(config, os.cpu_count() or 1, local_gpus())
        notices += [notice] if notice else []
    return JobPlan(manifest=info, model=model, config=config, notices=notices)


def unet_backend_unavailable(backend: UNetBackend, on_gpu: bool) -> str | None:
    """Why a UNet backend cannot run in this environment (None when it can)."""
    if backend is UNetBackend.tensorrt:
        return tensorrt_unavailable()
    if backend is UNetBackend.onnxruntime and importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install 'daguerre[onnx]')"
    return None


def fit_pool(config: JobConfig, cpus: float, gpus: float) -> tuple[JobConfig, str | None]:
    """The actor pool that fits `cpus` and `gpus`, and a one-line notice when it was shrunk.

    On CPU every engine actor takes `actor_num_cpus`, and `writer_num_cpus` must stay free
    for reading and writing (without it Ray Data waits forever); on GPU each takes
    `actor_num_gpus`. Raises ResourceError when not even one actor fits."""
    if uses_gpu(config.engine, gpus):
        per, have, unit, spare = config.actor_num_gpus, gpus, "GPU", 0.0
        if gpus == 0:
            raise ResourceError(f"engine.device {config.engine.device}: this machine has no GPU")
    else:
        per, have, unit, spare = config.actor_num_cpus, cpus, "CPU", config.writer_num_cpus
    fits = math.floor((have - spare) / per + 1e-9) if per > 0 else config.max_actors
    if fits < 1:
        raise ResourceError(
            f"one engine actor needs {per:g} {unit}s (actor_num_{unit.lower()}s) and {spare:g} "
            f"must stay free for reading and writing; this machine has {have:g}: "
            f"lower actor_num_{unit.lower()}s"
        )
    if config.max_actors <= fits:
        return config, None
    low, high = min(config.min_actors, fits), fits
    fitted = config.model_copy(update={"min_actors": low, "max_actors": high})
    notice = (
        f"engine actors {config.min_actors}:{config.max_actors} fitted to {low}:{high}: this "
        f"machine has {have:g} {unit}s, each actor takes {per:g}"
        + (f" and {spare:g} stays free for reading and writing" if spare else "")
    )
    return fitted, notice


def plan_resume(plan: JobPlan, storage: Storage, overwrite: bool, *,
                address: str | None = None, distributed: bool | None = None,
                verbose: bool = False) -> None:  # fmt: skip
    """Find the manifest's duplicated ids and compare what is already finished under the
    output with what this run asks: fill `plan.ids`, or raise ResumeConflict naming the
    difference. A manifest over `plan_in_driver_rows` is planned through Ray Data."""
    from .planning import ParquetSource, plan_id_sets

    if distributed is None:
        distributed = plan.manifest.rows > plan.config.plan_in_driver_rows
    if distributed:
        from .runtime import init_ray

        init_ray(address, verbose=verbose)
    source = ParquetSource(Storage(plan.manifest.uri, plan.config.storage), plan.manifest.files,
                            plan.manifest.table, distributed=distributed)  # fmt: skip
    asked_hash = plan.model.weights_hash()
    sets = plan_id_sets(source, storage, asked_hash, plan.config.limits.model_dump(),
                        plan.model.default_size, distributed, plan.config.rules.model_dump(),
                        plan.config.composite.model_dump())  # fmt: skip
    if sets.redone and not overwrite:
        raise ResumeConflict(_conflict_line(plan, sets.findings, asked_hash))
    plan.ids = sets
    if sets.redone:
        plan.notices.append(
            f"--overwrite: {sets.redone} finished ids made differently are made again"
        )


def manifest_rows(plan: JobPlan) -> Any:
    """The manifest as one Arrow table (small manifests only: the dry run, rejects_only)."""
    import pyarrow.dataset as pads

    if plan.manifest.table is not None:
        return plan.manifest.table
    storage = Storage(plan.manifest.uri, plan.config.storage)
    return pads.dataset(plan.manifest.files, format="parquet", filesystem=storage.fs).to_table()


DRIVER_CHECK_ROWS = 10_000  # a rerun with at most this many rows left checks them here first


def rejects_only(plan: JobPlan) -> list[tuple[dict[str, Any], list[Any]]] | None:
    """When every row left to do is invalid (a rerun of a finished job with bad rows), those
    rows and their errors, so the run records them without starting Ray; else None."""
    from ..pipeline.id_index import id_digests
    from .stages import check_row

    sets = plan.ids
    if sets is None or sets.distributed:
        return None
    left = plan.manifest.rows - sets.skipped
    if left <= 0 or left > DRIVER_CHECK_ROWS:
        return None
    table = manifest_rows(plan)
    digests = id_digests(table.column("id"))
    keep = ~sets.skip.contains(digests)
    duplicated = sets.duplicates.contains(digests)
    names = [plan.config.engine.model, plan.model.name]
    out = []
    for row, duplicate in zip(table.filter(keep).to_pylist(), duplicated[keep], strict=True):
        result = check_row(row, plan.config.limits, names, duplicate=bool(duplicate),
                           rules=plan.config.rules, composite=plan.config.composite)  # fmt: skip
        if isinstance(result, ImageRequest):
            return None
        out.append((row, result))
    return out


def _conflict_line(plan: JobPlan, findings: Any, asked: str) -> str:
    fix = "use a new --out or pass --overwrite"
    if findings.other_model:
        weights, model = next(iter(findings.other_models.items()), ("?", "another model"))
        return (
            f"{findings.other_model} finished ids were made with {model} "
            f"(weights {weights[:19]}...), this run asks for {plan.model.name} "
            f"(weights {asked[:19]}...): {fix}"
        )
    example = findings.examples[0] if findings.examples else "?"
    return (
        f"{findings.changed} finished ids were made from other request fields than the manifest "
        f"now gives (prompt, seed, steps, guidance, size, scheduler, speed, LoRA, the init "
        f"image, mask, strength or resize, or the composite layers; e.g. {example!r}): {fix}"
    )
