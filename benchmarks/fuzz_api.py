"""Fuzz: schemathesis against a real `daguerre serve`, from the API's own OpenAPI document.

1. Starts `daguerre serve` on 127.0.0.1 with auth on (a bearer token) and small limits
   (the `tiny` model, sides up to 64, 4 steps), so thousands of generated requests that
   reach the engine fit in minutes; the compute budget is left above what the limits
   allow, so every schema-valid request must be answered 200.
2. Runs `st run URL/openapi.json --checks all` over every route: no 5xx, each status
   documented, every body valid against the documented schema (the error shape included),
   schema-valid requests accepted, schema-violating ones refused, auth enforced.
   Then the files route again with the key of a stored image fixed (generated keys never
   name a file), so its found-file path, auth and signed-link parameters are fuzzed too;
   and the multipart edits route on its own, without the positive-data check (generated
   bytes never decode as an image, so a schema-valid form is rightly refused).
3. Checks the server is healthy afterwards (it answers /healthz and makes an image), and
   writes requests tried, failures found (by check) and per-route figures as JSON.

    python benchmarks/fuzz_api.py --examples 1000 --json benchmarks/results/fuzz_api_cpu.json
    python benchmarks/fuzz_api.py --examples 25 --json /tmp/fuzz.json    # what CI runs

Exit status 1 when schemathesis found a failure or the server was unhealthy afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = Path(__file__).resolve().parent
TOKEN = "fuzz-token"
LIMITS = {"max_steps": 4, "max_pixels": 64 * 64, "max_side": 64, "size_multiple": 8,
          "max_prompt_chars": 200, "max_guidance_scale": 20}  # fmt: skip


def serve_config(folder: Path, port: int) -> dict[str, Any]:
    """The served app: `tiny` on CPU, small limits, auth from a token file."""
    (folder / "token").write_text(TOKEN + "\n")
    engine = {"model": "tiny", "device": "cpu", "max_batch_size": 8, "torch_threads": 1}
    return {
        "host": "127.0.0.1",
        "port": port,
        "models": [{"name": "tiny", "engine": engine, "num_cpus": 1, "max_queued_requests": 64}],
        "limits": LIMITS,
        "max_images_per_request": 8,
        "output": str(folder / "out"),
        "auth_token_file": str(folder / "token"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`daguerre serve --config` in a subprocess, once it says it is serving."""
    import yaml

    port = free_port()
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(folder, port)))
    exe = Path(sys.executable).with_name("daguerre")
    proc = subprocess.Popen([str(exe), "serve", "--config", str(config)], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "daguerre serving" in line:
            return proc, f"http://127.0.0.1:{port}"
    raise RuntimeError("daguerre serve did not start:\n" + "".join(lines)[-3000:])


def stored_key(url: str) -> str:
    """The key of one image made with response_format=url (a file the files route has)."""
    import httpx2 as httpx

    body = {"prompt": "a stored image", "size": "16x16", "steps": 1, "response_format": "url"}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    resp = httpx.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=120)
    return resp.json()["data"][0]["url"].split("/v1/files/", 1)[1].split("?", 1)[0]


def run_schemathesis(url: str, examples: int, seed: int, folder: Path, workers: int,
                     extra: tuple[str, ...] = ()) -> tuple[dict, str]:  # fmt: skip
    """`st run --checks all` against the served document, in `folder` (its schemathesis.toml,
    if any, and its cache): the JSON report and the output."""
    exe = Path(sys.executable).with_name("st")
    report = folder / "report.json"
    command = [
        str(exe), "run", f"{url}/openapi.json", "--checks", "all",
        "--max-examples", str(examples), "--seed", str(seed), "--workers", str(workers),
        "-H", f"Authorization: Bearer {TOKEN}", "--request-timeout", "120",
        "--report", "json", "--report-json-path", str(report), "--no-color", *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "fuzz_hooks",  # real images (fuzz_hooks.py)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env)
    output = done.stdout + done.stderr
    if not report.exists():
        raise RuntimeError(f"schemathesis wrote no report:\n{output[-3000:]}")
    return json.loads(report.read_text()), output


EDITS = "/v1/images/edits"


def fuzz_runs(url: str, examples: int, seed: int, root: Path, workers: int) -> list[dict]:
    """Every route with generated keys; then the files route again with the key of a
    stored image fixed, so its found-file path (auth, signed-link parameters) is fuzzed;
    then the edits route with every check but positive data acceptance: generated bytes
    are never a decodable image, so a schema-valid form is rightly a 400 there (its
    accepted path is tests/cpu/test_edits.py's)."""
    everything, files = root / "all", root / "files"
    everything.mkdir(), files.mkdir()
    (files / "schemathesis.toml").write_text(
        f'[[operations]]\ninclude-path = "/v1/files/{{key}}"\n'
        f'parameters = {{ "path.key" = "{stored_key(url)}" }}\n'
    )
    edits = root / "edits"
    edits.mkdir()
    runs = []
    for name, folder, extra in (("every route", everything, ("--exclude-path", EDITS)),
                                ("files, a stored key", files,
                                 ("--include-path", "/v1/files/{key}")),
                                ("edits, uploads", edits,
                                 ("--include-path", EDITS, "--exclude-checks",
                                  "positive_data_acceptance"))):  # fmt: skip
        t0 = time.monotonic()
        report, output = run_schemathesis(url, examples, seed, folder, workers, extra)
        runs.append(summarise(name, report, output, time.monotonic() - t0))
    return runs


def summarise(name: str, report: dict, output: str, seconds: float) -> dict:
    """One schemathesis run's figures."""
    cases = report["test_cases"]
    found = cases["unique_failures"] or report["errors"]
    return {
        "run": name,
        "seconds": round(seconds, 1),
        "operations_tested": report["operations"]["tested"],
        "requests_tried": cases["generated"],
        "failures_found": cases["unique_failures"],
        "failures": report["failures"],
        "errors": report["errors"],
        "warnings": {k: v for k, v in report["warnings"].items() if v},
        # per route and phase: generated requests the server accepted / rejected
        "valid_rates": report.get("valid_rates", {}),
        "output_tail": output[-4000:] if found else "",
    }


def healthy(url: str) -> bool:
    """The server answers /healthz and still makes an image."""
    import httpx2 as httpx

    if httpx.get(f"{url}/healthz", timeout=30).json().get("status") != "ok":
        return False
    body = {"prompt": "after the fuzz", "size": "64x64", "steps": 2, "seed": 1}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    resp = httpx.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=120)
    return resp.status_code == 200 and bool(resp.json()["data"][0]["b64_json"])


def fuzz(examples: int, seed: int, workers: int) -> dict[str, Any]:
    """Serve, fuzz, check health; the figures of the run."""
    with tempfile.TemporaryDirectory(prefix="daguerre-fuzz-") as tmp:
        folder = Path(tmp)
        proc, url = start_server(folder)
        try:
            runs = fuzz_runs(url, examples, seed, folder, workers)
            alive = healthy(url)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    return {
        "examples_per_operation": examples,
        "seed": seed,
        "checks": "all",
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "operations_tested": runs[0]["operations_tested"] + runs[2]["operations_tested"],
        "requests_tried": sum(r["requests_tried"] for r in runs),
        "failures_found": sum(r["failures_found"] for r in runs),
        "errors": [e for r in runs for e in r["errors"]],
        "healthy_after": alive,
        "schemathesis": _version(),
        "runs": runs,
    }


def _version() -> str:
    from importlib.metadata import version

    return version("schemathesis")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fuzzed = result["fuzz"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = ["requests tried", "failures found"]
    values = [fuzzed["requests_tried"], fuzzed["failures_found"]]
    bars = ax.bar(labels, values, color=["tab:blue", "tab:red"])
    ax.bar_label(bars)
    ax.set_title(f"schemathesis --checks all, {fuzzed['examples_per_operation']} examples per "
                 f"route, {fuzzed['seconds']:.0f} s")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000, help="cases per route and phase")
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import environment, write_result

    result = {"conditions": environment(), "limits": LIMITS,
              "fuzz": fuzz(args.examples, args.seed, args.workers)}  # fmt: skip
    write_result(result, args.json, plot)
    fuzzed = result["fuzz"]
    print(f"{fuzzed['requests_tried']} requests, {fuzzed['failures_found']} failures, "
          f"{len(fuzzed['errors'])} errors, healthy after: {fuzzed['healthy_after']}")  # fmt: skip
    return (
        0 if not (fuzzed["failures_found"] or fuzzed["errors"]) and fuzzed["healthy_after"] else 1
    )


if __name__ == "__main__":
    sys.exit(main())
