"""A pytest plugin for benchmarks/gpu_check.py: each test's outcome goes into the check's
JSON (the file named by GPU_CHECK_JSON) the moment the test ends, so a run cut off at the
time limit still leaves every result it reached."""

from __future__ import annotations

import json
import os
from pathlib import Path

from _common import write_json


def pytest_runtest_logreport(report) -> None:
    if not _finished(report):
        return
    item = {"test": report.nodeid, "outcome": report.outcome,
            "seconds": round(report.duration, 2)}  # fmt: skip
    if report.skipped and isinstance(report.longrepr, tuple):
        item["reason"] = report.longrepr[2].removeprefix("Skipped: ")
    elif report.failed:
        item["error"] = str(report.longrepr)[-1500:]
    path = Path(os.environ["GPU_CHECK_JSON"])
    data = json.loads(path.read_text())
    data["stages"].setdefault("correctness", []).append(item)
    write_json(path, data)


def _finished(report) -> bool:
    """The report that decides a test: its call, or a setup that skipped or failed."""
    return report.when == "call" or (report.when == "setup" and not report.passed)
