"""What every benchmark result carries: where, when and with what it was measured."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def environment() -> dict[str, Any]:
    """Date, device, library versions and git commit of this run."""
    import diffusers
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name()}"
        driver = torch.version.cuda
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        driver = None
    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "diffusers": diffusers.__version__}  # fmt: skip
    for name in ("ray", "onnxruntime", "triton", "xformers", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed here
            pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cuda": driver,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "git_commit": commit,
    }


def time_call(
    fn: Callable[[], Any], warmup: int = 2, repeats: int = 5, cuda: bool = False
) -> float:
    """Median seconds of `fn()` after warm-up (synchronising CUDA around each call)."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def write_result(
    result: dict, json_path: Any, plot: Callable[[dict, Any], None], plot_path: Any = None
) -> None:
    """Write `result` as JSON and its plot (default: the JSON's name with .png)."""
    import json

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot_path = plot_path or json_path.with_suffix(".png")
    plot(result, plot_path)
    print(f"wrote {json_path} and {plot_path}")
