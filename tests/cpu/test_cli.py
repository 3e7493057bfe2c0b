"""The `daguerre` command as a new user meets it: help that teaches, one-line errors before
Ray starts, pools fitted to the machine, dry runs, limits and progress in images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from daguerre.cluster.plan import fit_pool
from daguerre.cluster.runtime import ResourceError
from daguerre.pipeline.config import JobConfig
from daguerre.pipeline.schema import manifest_schema

pytestmark = pytest.mark.timeout(300)

ROWS = [{"id": f"c-{i}", "prompt": f"a command line {i}", "seed": i, "steps": 2,
         "width": 64 if i % 2 else 96, "height": 64} for i in range(6)]  # fmt: skip


def daguerre(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("daguerre")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=280, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.fixture
def manifest(tmp_path) -> str:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([*ROWS, {"id": "bad", "prompt": " "}],
                                        schema=manifest_schema()), path)  # fmt: skip
    return str(path)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("daguerre: error: ")
    return lines[0].removeprefix("daguerre: error: ")


def test_help_teaches_and_version_answers(tmp_path):
    import daguerre as package

    assert daguerre("--version", cwd=tmp_path).stdout.strip() == f"daguerre {package.__version__}"
    for command in ("generate", "manifest", "serve", "inspect", "compile", "demo"):
        text = daguerre(command, "--help", cwd=tmp_path).stdout
        assert "example:\n  daguerre " + command in text, command
    generate = daguerre("generate", "--help", cwd=tmp_path).stdout
    for flag in ("--dry-run", "--limit", "--overwrite", "--verbose", "--actors", "--model"):
        assert flag in generate
    bench = daguerre("bench", "--help", cwd=tmp_path)
    assert bench.returncode == 0 and "--batch-sizes" in bench.stdout


def test_unavailable_unet_backend_is_one_line_before_ray(manifest, tmp_path):
    from daguerre.kernels.tensorrt import tensorrt_unavailable

    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT runs here")
    started = time.monotonic()
    result = daguerre("generate", manifest, "--out", str(tmp_path / "o"), "--unet-backend",
                      "tensorrt", cwd=tmp_path)  # fmt: skip
    assert one_error_line(result) == f"unet_backend tensorrt: {tensorrt_unavailable()}"
    assert time.monotonic() - started < 30 and not (tmp_path / "o").exists()


def test_incomplete_model_folder_is_one_line_before_ray(manifest, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    result = daguerre("generate", manifest, "--out", str(tmp_path / "o"), "--model", str(folder),
                      cwd=tmp_path)  # fmt: skip
    assert (
        one_error_line(result) == f"model: {folder}/model_index.json has no _class_name "
        "(not a diffusers pipeline index)"
    )


def test_hub_id_is_one_line_with_the_way_to_real_weights(manifest, tmp_path):
    result = daguerre("generate", manifest, "--out", str(tmp_path / "o"), "--model",
                      "runwayml/stable-diffusion-v1-5", cwd=tmp_path)  # fmt: skip
    assert "looks like a Hugging Face Hub id" in one_error_line(result)


def test_pools_are_fitted_to_the_machine():
    config = JobConfig(min_actors=1, max_actors=2)
    fitted, notice = fit_pool(config, cpus=2, gpus=0)
    assert (fitted.min_actors, fitted.max_actors) == (1, 1)
    assert notice == ("engine actors 1:2 fitted to 1:1: this machine has 2 CPUs, each actor "
                      "takes 1 and 0.25 stays free for reading and writing")  # fmt: skip
    same, none = fit_pool(config, cpus=8, gpus=0)
    assert same is config and none is None
    gpu = JobConfig(min_actors=2, max_actors=8, engine={"device": "cuda"})
    fitted, notice = fit_pool(gpu, cpus=16, gpus=4)
    assert (fitted.min_actors, fitted.max_actors) == (2, 4) and "4 GPUs" in notice
    with pytest.raises(ResourceError, match="one engine actor needs 4 CPUs"):
        fit_pool(JobConfig(actor_num_cpus=4), cpus=2, gpus=0)
    with pytest.raises(ResourceError, match="this machine has no GPU"):
        fit_pool(JobConfig(engine={"device": "cuda"}), cpus=2, gpus=0)


def test_dry_run_counts_and_says_there_is_no_estimate(manifest, tmp_path):
    env = {"DAGUERRE_CACHE": str(tmp_path / "cache")}
    result = daguerre("generate", manifest, "--out", str(tmp_path / "o"), "--dry-run",
                      "--actors", "1:64", cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "nothing generated" in out and "to generate" in out
    assert "96x64, 2 steps, ddim" in out and "64x64, 2 steps, ddim" in out
    assert "no daguerre bench result for tiny on this machine" in out
    assert "engine actors 1:64 fitted to" in out + result.stderr
    assert not (tmp_path / "o").exists()  # nothing written


def test_limit_progress_and_where_outputs_went(manifest, tmp_path):
    out = tmp_path / "o"
    result = daguerre("generate", manifest, "--out", str(out), "--limit", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((out / "images").glob("*.png"))) == 2
    assert "rows done (" in result.stderr  # progress in images, not Ray Data blocks
    assert "Running Dataset" not in result.stderr and "[dataset" not in result.stderr
    for line in ("images:", "metadata:", "errors:", "run record:"):
        assert line in result.stdout
    record = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert record["generated"] == 2 and "--limit" in record["command"]


def test_a_failure_inside_an_engine_actor_is_its_cause_in_one_line(manifest, tmp_path):
    """What no check before Ray can see (weights that do not load) fails in the actor; the
    command unwraps Ray's and Ray Data's wrappers and prints the original error alone."""
    from daguerre.pipeline.model_build import save_model
    from daguerre.pipeline.models import load_model

    folder = save_model(load_model("tiny"), tmp_path / "corrupt")
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.write_bytes(b"these are not safetensors")
    result = daguerre("generate", manifest, "--out", str(tmp_path / "o"), "--model", str(folder),
                      cwd=tmp_path)  # fmt: skip
    line = one_error_line(result)
    assert line.startswith("OSError: Unable to load weights from checkpoint file"), line
    assert result.stdout.count("\n") <= 1, result.stdout[-2000:]  # no pushed Ray tracebacks


def test_generate_without_address_never_joins_the_last_cluster_started_here(manifest, tmp_path):
    """Ray's own default joins the cluster /tmp/ray/ray_current_cluster names, even a stopped
    one (a job then hung, then failed without a word); without --address a private local
    Ray starts."""
    import shutil
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("192.0.2.2:45123")  # TEST-NET
        env = {"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
        result = daguerre("generate", manifest, "--out", str(tmp_path / "out"), "--model", "tiny",
                          "--no-progress", cwd=tmp_path, env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(list((tmp_path / "out" / "images").glob("*.png"))) == len(ROWS)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_dry_run_counts_the_cached_tier_as_its_own_batches(tmp_path):
    """exact and cached requests never share an engine batch: the dry run's buckets say so."""
    from daguerre.cluster.dryrun import dry_run
    from daguerre.pipeline.config import JobConfig

    rows = [{"id": f"r{i}", "prompt": "a lamp", "steps": 2, "speed": "cached" if i % 2 else "exact"}
            for i in range(4)]  # fmt: skip
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,steps,speed\n" + "".join(
        f"{r['id']},{r['prompt']},{r['steps']},{r['speed']}\n" for r in rows))  # fmt: skip
    report = dry_run(str(path), str(tmp_path / "o"), JobConfig())
    assert report.buckets == {"64x64, 2 steps, ddim": 2, "64x64, 2 steps, ddim, cached": 2}
    assert report.engine_batches == 2
