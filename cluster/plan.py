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
from ..pipeline.catalog import read_metadata
from ..pipeline.config import ConfigError, JobConfig
from ..pipeline.manifest import ManifestInfo, inspect_manifest
from ..pipeline.models import ModelInfo, describe_model
from ..pipeline.schema import ImageRequest, validate_request
from ..pipeline.storage import Storage
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
    skip_ids: set[str] = field(default_factory=set)  # finished, and made as asked
    redo_ids: set[str] = field(default_factory=set)  # finished differently: --overwrite redoes
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
    if served is not None:
        d = served.description
        model = ModelInfo(spec=served.app, name=d["model"], kind="served",
                          default_size=d["default_size"], _weights_hash=d["weights_hash"])  # fmt: skip
        return JobPlan(manifest=info, model=model, config=config, notices=[model.describe()],
                       served=served)  # fmt: skip
    engine = config.engine.model_copy(update={"model": node_model_path(config.engine.model)})
    model = describe_model(engine.model, config.storage)
    config = config.model_copy(update={"engine": engine})
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


def plan_resume(plan: JobPlan, storage: Storage, overwrite: bool) -> None:
    """Compare the ids already finished under the output with what this run asks; fill
    `skip_ids` and `redo_ids`, or raise ResumeConflict naming the difference."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = ["id", "model", "weights_hash", "request_fingerprint"]
    finished = read_metadata(storage, columns)
    if finished is None:
        return
    ids = pa.array(sorted(set(plan.manifest.ids)), type=pa.string())
    finished = finished.filter(pc.is_in(finished["id"], value_set=ids))
    if finished.num_rows == 0:
        return
    asked_hash = plan.model.weights_hash()
    rows = finished.to_pylist()
    other_model = [r for r in rows if r["weights_hash"] != asked_hash]
    asked = _asked_fingerprints(plan, {r["id"] for r in rows} - {r["id"] for r in other_model})
    changed = [r for r in rows if r["id"] in asked and asked[r["id"]] != r["request_fingerprint"]]
    redo = {r["id"] for r in other_model} | {r["id"] for r in changed}
    if redo and not overwrite:
        raise ResumeConflict(_conflict_line(plan, other_model, changed, asked_hash))
    plan.redo_ids = redo
    plan.skip_ids = {r["id"] for r in rows} - redo
    if redo:
        plan.notices.append(
            f"--overwrite: {len(redo)} finished ids made differently are made again"
        )


def _asked_fingerprints(plan: JobPlan, ids: set[str]) -> dict[str, str]:
    """Fingerprints of the manifest's valid rows among `ids` (the rest are not compared)."""
    rows = manifest_rows(plan, ids)
    side = plan.model.default_size
    out = {}
    for row in rows:
        request = validate_request(row, plan.config.limits)
        if isinstance(request, ImageRequest):
            out[request.id] = request.fingerprint(*request.resolved_size(side))
    return out


def manifest_rows(plan: JobPlan, ids: set[str]) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    if not ids:
        return []
    wanted = pa.array(sorted(ids), type=pa.string())
    if plan.manifest.table is not None:
        table = plan.manifest.table
    else:
        storage = Storage(plan.manifest.uri, plan.config.storage)
        table = pads.dataset(
            storage.root, format="parquet", filesystem=storage.fs, ignore_prefixes=[".", "_"]
        ).to_table()
    return table.filter(pc.is_in(pc.cast(table["id"], pa.string()), value_set=wanted)).to_pylist()


DRIVER_CHECK_ROWS = 10_000  # a rerun with at most this many rows left checks them here first


def rejects_only(plan: JobPlan) -> list[tuple[dict[str, Any], list[Any]]] | None:
    """When every row left to do is invalid (a rerun of a finished job with bad rows), those
    rows and their errors, so the run records them without starting Ray; else None."""
    from .stages import check_row

    left = set(plan.manifest.ids) - plan.skip_ids
    if not left or len(left) > DRIVER_CHECK_ROWS:
        return None
    names = [plan.config.engine.model, plan.model.name]
    out = []
    for row in manifest_rows(plan, left):
        result = check_row(row, plan.config.limits, plan.manifest.duplicate_ids, names)
        if isinstance(result, ImageRequest):
            return None
        out.append((row, result))
    return out


def _conflict_line(plan: JobPlan, other_model: list[dict], changed: list[dict], asked: str) -> str:
    fix = "use a new --out or pass --overwrite"
    if other_model:
        first = other_model[0]
        return (
            f"{len(other_model)} finished ids were made with {first['model']} "
            f"(weights {first['weights_hash'][:19]}...), this run asks for {plan.model.name} "
            f"(weights {asked[:19]}...): {fix}"
        )
    example = changed[0]["id"]
    return (
        f"{len(changed)} finished ids were made from other request fields than the manifest "
        f"now gives (prompt, seed, steps, guidance, size or scheduler; e.g. {example!r}): {fix}"
    )
