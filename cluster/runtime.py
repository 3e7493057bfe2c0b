"""What the batch job and the Serve app share about running on Ray: starting or joining a
cluster, where an engine goes (GPU or CPU share), the model path every node resolves,
fitting a pool to the machine, and errors unwrapped to their cause in one line."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..pipeline.config import ConfigError, EngineConfig, first_line


class ResourceError(ConfigError):
    """An engine pool that cannot run on the resources at hand; the message says what to change."""


def init_ray(address: str | None = None, *, verbose: bool = False, **options: Any) -> None:
    """Start a local Ray on 127.0.0.1 (address None) or join `address`; quiet unless verbose.

    An address that does not answer is one line (ResourceError) after a few seconds, not a
    wait: ray.init retries an unreachable cluster for as long as it runs."""
    if address is None:
        # A private local cluster: Ray's token auth only adds a warning line here.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        check_reachable(address)
    if not verbose:
        _quiet_ray()
    local = {"_node_ip_address": "127.0.0.1"} if address is None else {}
    ray.init(
        address=address, include_dashboard=False, log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR, **local, **options,
    )  # fmt: skip


def _quiet_ray() -> None:
    """Ray's, Ray Data's and Serve's own INFO and WARNING lines off (they configure their
    loggers when imported, so import them first); daguerre prints its own progress."""
    import warnings

    import ray.data  # noqa: F401
    import ray.serve  # noqa: F401

    for name in ("ray", "ray.data", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    _quiet_raylet_warnings()


def _quiet_raylet_warnings() -> None:
    """Drop the raylet's WARNING lines that Ray pushes to every driver (worker-pool sizes on
    small machines, a controller that cannot finish its graceful shutdown): not actionable
    for a daguerre user, and not lines of ours. Errors still print; --verbose shows all."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_daguerre_quiet", False):
        return

    def quiet(data: dict, *args: Any, **kwargs: Any) -> None:
        lines = [
            line for line in data.get("lines", [])
            if not (data.get("pid") == "raylet" and str(line).lstrip().startswith("WARNING"))
        ]  # fmt: skip
        if lines:
            original({**data, "lines": lines}, *args, **kwargs)

    quiet._daguerre_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = quiet


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise ResourceError unless a `host:port` or `ray://host:port` address accepts a
    connection ('auto' and other forms are left to Ray)."""
    import socket

    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ResourceError(f"cannot reach the Ray cluster at {address} ({reason})") from None


def local_gpus() -> int:
    """CUDA GPUs on this machine, without importing torch where there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        return 0
    import torch

    return torch.cuda.device_count()


def uses_gpu(engine: EngineConfig, cluster_gpus: float) -> bool:
    """Whether engines of this config each take a GPU (`device: auto` does when there are any)."""
    if engine.device.startswith("cuda"):
        return True
    return engine.device == "auto" and cluster_gpus > 0


def engine_resources(
    engine: EngineConfig, cluster_gpus: float, *, num_gpus: float = 1.0, num_cpus: float = 1.0
) -> dict[str, float]:
    """Ray resources of one engine actor or replica: a GPU share when it runs on a GPU, else
    a CPU share (`device: cpu` never reserves a GPU, even on a GPU cluster)."""
    return {"num_gpus": num_gpus if uses_gpu(engine, cluster_gpus) else 0.0, "num_cpus": num_cpus}


def node_model_path(spec: str) -> str:
    """The model spec every node can resolve: a local folder as an absolute path."""
    path = Path(spec)
    return str(path.resolve()) if path.is_dir() else spec


def root_cause(exc: BaseException) -> BaseException:
    """The original exception under Ray's wrappers (task, actor and Ray Data errors)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # RayTaskError / RayActorError
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if type(exc).__module__.startswith("ray") and exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    return exc


def describe_error(exc: BaseException) -> str:
    """One line for a failure anywhere under Ray: the original error's type and first line."""
    cause = root_cause(exc)
    text = first_line(cause)
    # Ray prefixes a task's message with its own banner; keep the user's last line of it.
    if "ray::" in text or text.startswith("Traceback"):
        lines = [line for line in str(cause).strip().splitlines() if line.strip()]
        text = lines[-1] if lines else type(cause).__name__
    name = type(cause).__name__
    if isinstance(cause, ConfigError | ValueError) or text.startswith(name):
        return text
    return f"{name}: {text}"
