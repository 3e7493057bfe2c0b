"""The schema-driven fuzzing, bounded for CI: benchmarks/fuzz_api.py starts `daguerre serve`
with auth on and runs schemathesis --checks all over every route (its own module, so no
other Serve app shares the two cores while it runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_fuzz_api_finds_nothing(tmp_path):
    """No 5xx, documented statuses and bodies, valid requests accepted and invalid refused,
    auth enforced, the server healthy afterwards."""
    out = tmp_path / "fuzz.json"
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "fuzz_api.py"),
                             "--examples", "25", "--json", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=540)
    finally:  # the server and its Ray go with the script's process group
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert out.exists(), output[-3000:]
    fuzzed = json.loads(out.read_text())["fuzz"]
    tails = "".join(run["output_tail"] for run in fuzzed["runs"])
    assert fuzzed["failures_found"] == 0 and not fuzzed["errors"], tails
    assert fuzzed["operations_tested"] == 7 and fuzzed["requests_tried"] > 200
    files_run = fuzzed["runs"][1]["valid_rates"]["GET /v1/files/{key}"]
    assert sum(phase["accepted"] for phase in files_run.values()) > 0  # a stored file was read
    assert fuzzed["healthy_after"] and proc.returncode == 0
