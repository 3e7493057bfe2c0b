"""What the batch job and the Serve app share about running on Ray: starting or joining a
cluster, where an engine goes (GPU or CPU share), the model path every node resolves,
fitting a pool to the machine, and errors unwrapped to their cause in one line."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..pipeline.config import ConfigError, EngineConfig, first_line


class ResourceError(ConfigError):
    """An engine pool that cannot run on the resources at hand; the message says what to change."""


def init_ray(address: str | None = None, *, verbose: bool = False, **options: Any) -> None:
    """Start a private local Ray on 127.0.0.1 (address None) or join `address`; quiet
    unless verbose (the CLI's --address defaults to $RAY_ADDRESS).

    Without an address Ray itself would join the cluster last started on this machine
    (/tmp/ray/ray_current_cluster), even a stopped one: "local" never does. An address
    that does not answer is one line (ResourceError) after a few seconds, not a wait:
    ray.init retries an unreachable cluster for as long as it runs."""
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
        address=address or "local", include_dashboard=False, log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR, **local, **options,
    )  # fmt: skip


def _quiet_ray() -> None:
    """Ray's, Ray Data's and Serve's own INFO and WARNING lines off (they configure their
    loggers when imported, so import them first); daguerre prints its own progress."""
    import warnings

    import ray.data  # noqa: F401
    import ray.serve  # noqa: F401

    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Data logs every failure with its whole stack before raising it to us.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    _quiet_raylet_warnings()


def _quiet_raylet_warnings() -> None:
    """Drop what the raylet pushes to every driver (worker-pool sizes on small machines,
    task retries with their tracebacks, a controller that cannot finish its graceful
    shutdown): a failure that matters reaches daguerre as an exception and is reported in
    one line with its cause. --verbose shows them all."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_daguerre_quiet", False):
        return

    def quiet(data: dict, *args: Any, **kwargs: Any) -> None:
        if data.get("pid") != "raylet":
            original(data, *args, **kwargs)

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
    """The original exception under Ray's wrappers: the first one, breadth first through
    `.cause` (RayTaskError, ActorDiedError), `__cause__` and `__context__`, that is not
    Ray's own (Ray Data chains an empty SystemException marker, which is skipped)."""
    queue, seen = [exc], set()
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if not type(current).__module__.startswith("ray"):
            return current
        for inner in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(inner, BaseException):
                queue.append(inner)
    return exc


def describe_error(exc: BaseException) -> str:
    """One line for a failure anywhere under Ray: the original error's type and first line."""
    cause = root_cause(exc)
    text = first_line(cause)
    if "ray::" in text or text.startswith("Traceback"):
        # Ray's banner around a remote traceback: its last line is the original error.
        lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
        return lines[-1] if lines else type(cause).__name__
    name = type(cause).__name__
    if isinstance(cause, ConfigError | ValueError) or text.startswith(name):
        return text
    return f"{name}: {text}"


NATIVE_NOISE = (
    # Ray Data passes every actor pool's UDF by reference, so each job start logs this
    # (ray-project/ray#53727); nothing a user can act on.
    re.compile(
        rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in "
        rb"the object store"
    ),  # fmt: skip
)


@contextlib.contextmanager
def quiet_native_stderr(patterns: tuple = NATIVE_NOISE) -> Iterator[None]:
    """Drop lines matching `patterns` from this process's file descriptor 2, where Ray's C++
    core worker logs (below Python's logging); every other line passes through at once."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not any(p.search(line) for p in patterns):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="daguerre-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe closes once nothing else holds it; the pump then ends
        thread.join(timeout=2)
