"""`daguerre bench`: the FLOP counter against the known UNet costs, and a run on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from daguerre.pipeline.bench import unet_forward_flops


@pytest.mark.parametrize(
    ("preset", "latent", "tflop"),
    [("sd15", 64, 0.803), ("sdxl", 128, 6.761)],
    ids=["sd15-512px", "sdxl-1024px"],
)
def test_unet_flops_per_forward(preset, latent, tflop):
    """One UNet forward, batch 1, counted on the meta device (no memory, no weights)."""
    assert unet_forward_flops(preset, latent) / 1e12 == pytest.approx(tflop, rel=0.02)


def run_bench(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("daguerre")
    args = [str(exe), "bench", "--model", "tiny", "--steps", "2", "--batch-sizes", "1,2",
            "--repeats", "1", "--json", str(tmp_path / "bench.json"), *extra]  # fmt: skip
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_bench_tiny_writes_json_and_plot(tmp_path):
    result = run_bench(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["images_per_s"] > 0 and 0 < report["mfu"] < 1
    assert report["device"] == "cpu" and report["peak_tflops"] > 0
    assert {"torch", "diffusers", "ray", "daguerre"} <= set(report["versions"])
    c = report["conditions"]
    assert c["model"] == "tiny" and c["size"] == "64x64" and c["steps"] == 2 and c["git_commit"]
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    assert all(r["unet_steps_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in report["results"])
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "images/s" in result.stdout


def test_bench_bad_size_is_one_line(tmp_path):
    result = run_bench(tmp_path, "--size", "100x13")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("daguerre: error: --size:")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_through_batch_and_serve(tmp_path):
    result = run_bench(
        tmp_path, "--through", "batch", "--through", "serve", "--through-images", "8"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    for kind in ("batch", "serve"):
        assert report[f"through_{kind}"]["ratio_to_engine"] > 0
