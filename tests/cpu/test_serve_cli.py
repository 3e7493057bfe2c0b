"""`daguerre serve` as a user runs it, and the serve configs it reads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml
from daguerre.pipeline.config import ConfigError, ServeConfig, load_yaml, validate_config

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "serve").glob("*.yaml")), ids=str)
def test_shipped_serve_configs_validate(path):
    config = load_yaml(path, ServeConfig)
    assert config.models and config.models[0].served_name


def test_deploy_manifests_carry_valid_serve_configs():
    """The Serve/KubeRay manifests pass `args` that build_app accepts."""
    found = 0
    for path in sorted((REPO / "cluster" / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", doc) or {}
            serve_config = spec.get("serveConfigV2", spec if "applications" in spec else None)
            if isinstance(serve_config, str):
                serve_config = yaml.safe_load(serve_config)
            for app in (serve_config or {}).get("applications", []):
                assert app["import_path"] == "daguerre.cluster.serve:build_app"
                validate_config(ServeConfig, app.get("args", {}), source=str(path))
                found += 1
    assert found >= 2


def test_serve_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("port: 8000\nmodels:\n  - engine: {model: tiny}\n    max_replica: 2\n")
    with pytest.raises(ConfigError, match=r"models\.0\.max_replica: is not a known key"):
        load_yaml(bad, ServeConfig)
    with pytest.raises(ConfigError, match="the name 'tiny' is used twice"):
        validate_config(ServeConfig, {"models": [{"engine": {"model": "tiny"}}] * 2})
    with pytest.raises(ConfigError, match="max_replicas: 1 is below min_replicas"):
        validate_config(ServeConfig, {"models": [{"min_replicas": 2}]})


@pytest.mark.timeout(300)
def test_cli_serve_starts_answers_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    exe = Path(sys.executable).with_name("daguerre")
    env = {**os.environ, "DAGUERRE_API_TOKEN": "cli-token"}
    proc = subprocess.Popen(
        [str(exe), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "daguerre serving" in line:
                break
        url = f"http://127.0.0.1:{port}"
        assert any(f"serving tiny at {url}" in line for line in lines), "".join(lines)[-3000:]
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        body = {"prompt": "a lamp", "size": "64x64", "steps": 2}
        assert httpx.post(f"{url}/v1/images/generations", json=body).status_code == 401
        resp = httpx.post(
            f"{url}/v1/images/generations",
            json=body,
            headers={"Authorization": "Bearer cli-token"},
            timeout=120,
        )
        assert resp.status_code == 200 and resp.json()["data"][0]["b64_json"]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, rest[-3000:]
        assert "stopping" in rest
        # nothing but our own lines: no Ray warnings at start, nothing alarming on Ctrl-C
        everything = "".join(lines) + rest
        for noise in ("will not be applied", "WARNING", "Error", "failed", "Traceback"):
            assert noise not in everything, everything[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_on_a_busy_port_is_one_line_before_ray(tmp_path):
    exe = Path(sys.executable).with_name("daguerre")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run([str(exe), "serve", "--port", str(port)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"daguerre: error: 127.0.0.1:{port} is in use; pass --port"
    assert time.monotonic() - started < 20  # refused before Ray starts
    assert "serving" not in result.stdout


def test_build_app_is_a_serve_app_builder():
    """What `serve run`/`serve deploy`/KubeRay do with import_path + args."""
    from daguerre.cluster.serve import build_app
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"models": [{"engine": {"model": "tiny"}}]}
    )
    assert isinstance(app, Application)
    with pytest.raises(ConfigError, match="models.0.engine.modle: is not a known key"):
        build_app({"models": [{"engine": {"modle": "tiny"}}]})


def test_deployment_options_autoscale_and_bound_the_queue():
    from daguerre.cluster.serve import deployment_options
    from daguerre.pipeline.config import ModelDeploymentConfig

    fixed = deployment_options(ModelDeploymentConfig(), cluster_gpus=0)
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert fixed["max_ongoing_requests"] == 12 and fixed["max_queued_requests"] == 64  # 1.5 x 8
    scaled = deployment_options(
        ModelDeploymentConfig(min_replicas=1, max_replicas=4, retry_after_s=3), cluster_gpus=2
    )
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 60.0,
        "look_back_period_s": 15.0,
    }
    assert scaled["ray_actor_options"]["num_gpus"] == 1.0
    assert scaled["backpressure_config"].retry_after_s == 3
    # `device: cpu` never reserves a GPU, on a GPU cluster either (as in the batch job)
    on_cpu = ModelDeploymentConfig(engine={"model": "tiny", "device": "cpu"})
    assert deployment_options(on_cpu, cluster_gpus=2)["ray_actor_options"]["num_gpus"] == 0.0


def test_job_and_serve_place_engines_the_same_way():
    from daguerre.cluster.runtime import engine_resources
    from daguerre.pipeline.config import EngineConfig

    for device, gpus, expected in (("auto", 0, 0.0), ("auto", 4, 1.0), ("cpu", 4, 0.0),
                                   ("cuda", 4, 1.0)):  # fmt: skip
        engine = EngineConfig(device=device)
        assert engine_resources(engine, gpus)["num_gpus"] == expected, (device, gpus)
