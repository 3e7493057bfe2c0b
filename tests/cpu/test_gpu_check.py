"""The one-command GPU check on this CPU machine: the CPU-runnable part of its correctness
stage runs, the GPU-only cases skip with their reason, and the stand-in cases exercise the
throughput and attention machinery; and the wheels it carries to a bare GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_on_a_cpu_leaves_evidence_for_every_stage(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--budget", "240", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [path] = tmp_path.glob("gpu_check_*.json")
    result = json.loads(path.read_text())
    assert result["stand_in"] is True and result["device"].startswith("cpu")
    tests = result["stages"]["correctness"]
    gpu_only = [t for t in tests if t["test"].startswith("tests/gpu/")]
    assert gpu_only and all(t["outcome"] == "skipped" and t["reason"] for t in gpu_only)
    kernels = [t for t in tests if t["test"].startswith("tests/cpu/test_attention.py")]
    assert any(t["outcome"] == "passed" for t in kernels)
    assert not [t for t in tests if t["outcome"] == "failed"]
    assert "passed" in result["stages"]["correctness_summary"][0]["summary"]
    throughput = result["stages"]["throughput"]
    assert [t["case"] for t in throughput][:3] == [
        "sd15 eager",
        "sdxl eager",
        "sd15 eager hot path",
    ]
    ran = [t for t in throughput if "skipped" not in t]
    assert len(ran) == 4 and all(t["images_per_s"] > 0 and t["stand_in"]["model"] == "tiny"
                                 for t in ran)  # fmt: skip
    assert all("needs a CUDA GPU" in t["skipped"] for t in throughput if t not in ran)
    assert len(throughput) == 3 + 9  # every case is there: run, or skipped with the reason
    assert {"flux-dev eager", "flux-dev torch.compile"} <= {t["case"] for t in throughput}
    assert result["stages"]["attention"][0]["shapes"]
    [fast] = result["stages"]["fast_paths"]
    variants = {r["variant"]: r for r in fast["results"]}
    assert variants["cached /3"]["images_per_s"] > 0 and "fp8" in variants["fp8"]["skipped"]
    assert path.with_suffix(".png").stat().st_size > 0


def test_carried_wheels_are_the_engine_stack_at_the_tested_versions():
    from importlib import metadata

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_wheels import closure
    finally:
        sys.path.pop(0)
    pins = closure()
    for needed in ("diffusers", "transformers", "pydantic", "pydantic-core", "pyyaml",
                   "open-clip-torch", "fsspec"):  # fmt: skip
        assert pins[needed] == metadata.version(needed)
    for kept in ("torch", "triton", "numpy", "pillow", "ray", "onnxruntime"):
        assert kept not in pins  # the machine's own builds stay; Ray is not carried
