"""`daguerre bench`: the FLOP counter against the known UNet costs, the figures, flags, notes
and tables built from given numbers, and a run on the tiny model."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daguerre.cluster.bench import (
    NOTHING_MEASURED,
    print_report,
    run_through,
    through_reference,
    through_result,
)
from daguerre.pipeline.bench import measured_rates, mfu_notes, unet_forward_flops
from rich.console import Console


@pytest.mark.parametrize(
    ("preset", "latent", "tflop"),
    [("sd15", 64, 0.803), ("sdxl", 128, 6.761)],
    ids=["sd15-512px", "sdxl-1024px"],
)
def test_unet_flops_per_forward(preset, latent, tflop):
    """One UNet forward, batch 1, counted on the meta device (no memory, no weights)."""
    assert unet_forward_flops(preset, latent) / 1e12 == pytest.approx(tflop, rel=0.02)


def row(batch: int, peak: float, seconds: float = 2.0, **extra) -> dict:
    """A measured result row: 10 steps x 3 repeats of `batch` images at 1 TFLOP/image."""
    return {"unet_backend": "eager", "attention_backend": "sdpa", "attention_ran": "sdpa",
            "batch_size": batch, "peak_memory_mb": 100.0,
            **measured_rates(batch, 10, 3, seconds, 1e12, peak), **extra}  # fmt: skip


def test_mfu_above_one_is_flagged_with_a_note():
    # 4 images x 3 repeats in 2 s at 1 TFLOP/image = 6 TFLOP/s achieved.
    over, under, exact = row(4, peak=5e12), row(4, peak=10e12), row(4, peak=6e12)
    assert over["mfu"] == pytest.approx(1.2) and over["mfu_reliable"] is False
    assert under["mfu"] == pytest.approx(0.6) and under["mfu_reliable"] is True
    assert exact["mfu_reliable"] is True
    assert mfu_notes([under], 10e12) == []
    (note,) = mfu_notes([over, {"skipped": "x"}], 5e12)
    assert note.startswith("MFU above 100%: the measured matmul peak (5 TFLOP/s)")
    assert "(6 TFLOP/s)" in note and "unreliable on this device" in note


def test_unet_calls_and_image_steps_per_s():
    """The same seconds per call at batch 1 and 4: the same UNet calls/s, 4x the image-steps/s."""
    one, four = row(1, peak=1e15), row(4, peak=1e15)
    assert one["unet_calls_per_s"] == four["unet_calls_per_s"] == pytest.approx(10 * 3 / 2.0)
    assert one["denoise_steps_per_s"] == pytest.approx(15.0)
    assert four["denoise_steps_per_s"] == pytest.approx(60.0)
    assert four["images_per_s"] == pytest.approx(6.0) and four["s_per_image"] == pytest.approx(
        1 / 6
    )
    assert "unet_steps_per_s" not in four


def report_with(results: list[dict], **through) -> dict:
    return {"conditions": {"model": "tiny", "size": "64x64", "steps": 10, "dtype": "float32",
                           "device": "cpu: test"},
            "peak_tflops": 5.0, "flops_per_image_tflop": 1.0, "results": results,
            "notes": mfu_notes(results, 5e12), **through}  # fmt: skip


def rendered(report: dict) -> str:
    console = Console(record=True, width=200)
    print_report(report, console)
    return console.export_text()


def test_table_shows_skip_reasons_unreliable_mfu_and_notes():
    skipped = {"unet_backend": "tensorrt", "attention_backend": "sdpa", "batch_size": 4,
               "skipped": "tensorrt is not installed (pip install 'daguerre[gpu]')"}  # fmt: skip
    text = rendered(report_with([row(4, peak=5e12), skipped]))
    assert "UNet calls/s" in text and "image-steps/s" in text
    assert "120.0% (peak unreliable)" in text
    assert "skipped [1]" in text
    assert (
        "[1] skipped: tensorrt/sdpa: tensorrt is not installed (pip install 'daguerre[gpu]')"
        in text
    )
    assert "note: MFU above 100%: the measured matmul peak (5 TFLOP/s)" in text
    assert "through the cluster" not in text


def test_through_result_names_its_ratio_basis():
    reference = row(4, peak=1e15)  # 6 images/s
    figures = {"startup_s": 3.0, "steady_images_per_s": 3.0, "end_to_end_images_per_s": 1.5,
               "mean_engine_batch": 4.0}  # fmt: skip
    batch = through_result(16, figures, "steady_images_per_s", reference)
    assert batch["ratio_to_engine"] == pytest.approx(0.5)
    assert batch["ratio_basis"] == "steady_images_per_s" and batch["images_per_s"] == 3.0
    assert batch["startup_s"] == 3.0 and batch["end_to_end_images_per_s"] == 1.5
    assert batch["engine"] == {"unet_backend": "eager", "attention_backend": "sdpa",
                               "batch_size": 4, "images_per_s": pytest.approx(6.0)}  # fmt: skip
    unmeasured = through_result(16, {**figures, "steady_images_per_s": None},
                                "steady_images_per_s", reference)  # fmt: skip
    assert unmeasured["ratio_to_engine"] is None and "no ratio" in unmeasured["note"]
    text = rendered(report_with([reference], through_batch=batch,
                                through_serve={"skipped": "serve would not start"}))  # fmt: skip
    assert "through the cluster" in text and "steady_images_per_s" in text
    assert "0.50x" in text and "[1] skipped: serve would not start" in text
    assert "ratio to engine = the ratio basis / the engine alone at eager/sdpa batch 4" in text


def test_through_with_nothing_measured_records_why():
    skipped = [{"unet_backend": "tensorrt", "attention_backend": "sdpa", "batch_size": b,
                "skipped": "not installed"} for b in (1, 2)]  # fmt: skip
    assert through_reference(skipped) is None
    out = run_through(["batch", "serve"], argparse.Namespace(), skipped)
    assert out == {"through_batch": {"skipped": NOTHING_MEASURED},
                   "through_serve": {"skipped": NOTHING_MEASURED}}  # fmt: skip


def test_through_reference_is_the_first_pair_at_its_largest_measured_batch():
    compiled = [row(b, peak=1e15, unet_backend="compile") for b in (1, 2, 8)]
    rows = [row(1, peak=1e15), row(2, peak=1e15), {**row(4, peak=1e15), "skipped": "oom"}]
    rows[2] = {
        k: rows[2][k] for k in ("unet_backend", "attention_backend", "batch_size", "skipped")
    }
    assert through_reference(rows + compiled)["batch_size"] == 2
    assert through_reference(rows + compiled)["unet_backend"] == "eager"


def run_bench(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("daguerre")
    args = [str(exe), "bench", "--model", "tiny", "--steps", "2", "--batch-sizes", "1,2",
            "--repeats", "1", "--json", str(tmp_path / "bench.json"), *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # piped: 140 columns
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_bench_tiny_writes_json_and_plot(tmp_path):
    result = run_bench(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["images_per_s"] > 0 and report["mfu"] > 0
    assert report["device"] == "cpu" and report["peak_tflops"] > 0
    assert {"torch", "diffusers", "ray", "daguerre"} <= set(report["versions"])
    c = report["conditions"]
    assert c["model"] == "tiny" and c["size"] == "64x64" and c["steps"] == 2 and c["git_commit"]
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["unet_calls_per_s"] > 0 and r["peak_memory_mb"] > 0 and r["s_per_image"] > 0
        assert r["denoise_steps_per_s"] == pytest.approx(r["batch_size"] * r["unet_calls_per_s"])
        assert r["mfu_reliable"] is (r["mfu"] <= 1) and "unet_steps_per_s" not in r
    over = any(r["mfu"] > 1 for r in report["results"])
    assert over == any(n.startswith("MFU above 100%") for n in report["notes"])
    assert over == ("(peak unreliable)" in result.stdout)
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "images/s" in result.stdout and "UNet calls/s" in result.stdout


def test_bench_skipped_backends_and_through_are_in_the_json(tmp_path):
    """tensorrt is not installed on the CPU runners: nothing measured, nothing run through."""
    result = run_bench(tmp_path, "--backends", "tensorrt", "--through", "batch")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert all("not installed" in r["skipped"] for r in report["results"])
    assert report["through_batch"] == {"skipped": NOTHING_MEASURED}
    assert "[1] skipped: tensorrt/sdpa:" in result.stdout and "through the cluster" in result.stdout


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
    batch, serve = report["through_batch"], report["through_serve"]
    for run in (batch, serve):
        assert run["ratio_to_engine"] > 0 and run["images"] == 8 and "skipped" not in run
        assert run["engine"]["batch_size"] == 2
    assert batch["ratio_basis"] == "steady_images_per_s"
    assert batch["images_per_s"] == batch["steady_images_per_s"]
    assert batch["startup_s"] > 0 and batch["end_to_end_images_per_s"] > 0
    assert serve["ratio_basis"] == "images_per_s"
    assert "through the cluster" in result.stdout and "steady_images_per_s" in result.stdout
