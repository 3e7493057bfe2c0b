"""What every benchmark result carries: where, when and with what it was measured."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def environment() -> dict[str, Any]:
    """Date, device, versions and git commit of this run (the same as `daguerre bench`'s)."""
    from daguerre.pipeline.bench import environment

    return environment()


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
    write_json(json_path, result)
    plot_path = plot_path or json_path.with_suffix(".png")
    plot(result, plot_path)
    print(f"wrote {json_path} and {plot_path}")


def write_json(path: Any, data: dict) -> None:
    """Write `data` as JSON atomically (a reader never sees half a file)."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
