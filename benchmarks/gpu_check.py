"""Every GPU claim in one run, most important first, each result in the JSON as it comes.

Run through `bash benchmarks/gpu_check.sh` (which installs the carried wheels on a bare GPU
machine). Stages, in order, while the budget lasts (a case that would start after it is
spent is recorded as skipped, never silently dropped):
  1. correctness: pytest over tests/gpu (the Triton kernel vs SDPA vs float64 on the real
     attention shapes, sd15/sdxl fp16 images, alone vs in a batch of 8, eager vs compile vs
     onnxruntime, TensorRT where importable) and the kernels' own numerics tests; every
     test's outcome (and a skip's reason) is written as soon as it ends;
  2. throughput, the fast-starting baseline: `daguerre bench` eager for sd15 512x512 30
     steps, sdxl 1024x1024 20 steps and flux-dev 1024x1024 28 steps (bf16) over batch
     sizes (flux-dev's random weights are drawn on the CPU first: ~67 GB, time not measured);
  3. attention: benchmarks/attention.py on SD1.5's and SDXL's shapes;
  4. fast paths: benchmarks/fast_paths.py (step caching, int8/fp8, the hot path) against
     the default, images/s and mean abs pixel difference on the same seeds;
  5. throughput, the other backends (torch.compile, whose warm-up is measured and
     reported, the Triton attention kernel, onnxruntime) while time remains.
Without CUDA the GPU-only tests skip with their reason, and stages 2-5 run small stand-ins
(marked "stand_in") so the machinery itself is exercised: that is what CI runs.

    bash benchmarks/gpu_check.sh [--budget 420] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from _common import write_json

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

# (case, model, size, steps, batch sizes, unet backend, attention backend, hot path)
HOT = "fuse_qkv,channels_last,noise_on_device"
BASELINE = [
    ("sd15 eager", "sd15", "512x512", 30, "1,4,8", "eager", "sdpa", ""),
    ("sdxl eager", "sdxl", "1024x1024", 20, "1,4", "eager", "sdpa", ""),
    # issue 19's goal: <= 3.5 s per image exact in bf16 (<= 2.0 s cached: FAST_PATHS)
    ("flux-dev eager", "flux-dev", "1024x1024", 28, "1,2,4", "eager", "sdpa", ""),
]
OTHERS = [
    ("sd15 eager hot path", "sd15", "512x512", 30, "8", "eager", "sdpa", HOT),
    ("sd15 triton attention", "sd15", "512x512", 30, "1,8", "eager", "triton", ""),
    ("sd15 torch.compile", "sd15", "512x512", 30, "8", "compile", "sdpa", HOT),
    ("sdxl eager hot path", "sdxl", "1024x1024", 20, "4", "eager", "sdpa", HOT),
    ("sd15 onnxruntime", "sd15", "512x512", 30, "1,8", "onnxruntime", "sdpa", ""),
    ("sdxl torch.compile", "sdxl", "1024x1024", 20, "4", "compile", "sdpa", HOT),
    ("sdxl onnxruntime", "sdxl", "1024x1024", 20, "4", "onnxruntime", "sdpa", ""),
    ("flux-dev torch.compile", "flux-dev", "1024x1024", 28, "1", "compile", "sdpa", ""),
    ("flux-dev triton attention", "flux-dev", "1024x1024", 28, "1", "eager", "triton", ""),
]
FAST_PATHS = [
    ("sd15 512x512 30 steps", ["--model", "sd15", "--size", "512", "--steps", "30",
                               "--batch-size", "8", "--intervals", "3"]),
    ("sdxl 1024x1024 20 steps", ["--model", "sdxl", "--size", "1024", "--steps", "20",
                                 "--batch-size", "4", "--intervals", "3"]),
    ("flux-dev 1024x1024 28 steps", ["--model", "flux-dev", "--size", "1024", "--steps", "28",
                                     "--batch-size", "1", "--intervals", "3", "--repeats", "2"]),
]  # fmt: skip
STAND_IN_FAST = ("tiny 64x64 6 steps (stand-in)", ["--model", "tiny", "--size", "64", "--steps",
                                                   "6", "--repeats", "1", "--intervals", "3"])  # fmt: skip
COMPILE_MODE = "reduce-overhead"  # CUDA graphs without minutes of autotuning: fits the budget
STAND_IN = {"model": "tiny", "size": "64x64", "steps": 4, "batch_sizes": "1,2"}


class Evidence:
    """The check's JSON, rewritten (atomically) after every result."""

    def __init__(self, path: Path, header: dict):
        self.path, self.data = path, {**header, "stages": {}}
        self.write()

    def add(self, stage: str, item: dict) -> None:
        self.data["stages"].setdefault(stage, []).append(item)
        self.write()

    def write(self) -> None:
        write_json(self.path, self.data)


class Budget:
    """Seconds left; counted from when gpu_check.sh started (wheel install included)."""

    def __init__(self, seconds: float):
        started = float(os.environ.get("GPU_CHECK_STARTED") or time.time())
        self.seconds, self.start = seconds, time.monotonic() - max(time.time() - started, 0)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def read_json(path: Path) -> dict | None:
    """A case's JSON, or None where it wrote none (or was cut off while writing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def header(args: argparse.Namespace) -> dict:
    import torch
    from daguerre.pipeline.bench import environment

    info = environment()
    cuda = torch.cuda.is_available()
    info.update(
        check="gpu_check", budget_s=args.budget, python=sys.version.split()[0],
        driver=_driver_version() if cuda else None,
        gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        stand_in=not cuda,
    )  # fmt: skip
    return info


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run(cmd: list[str], budget: Budget, env: dict | None = None) -> tuple[int | None, str, float]:
    """Run `cmd` for at most the budget left: (exit code or None if cut off, output tail, s)."""
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=max(budget.left(), 1))  # fmt: skip
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = None, _text(exc.stdout) + _text(exc.stderr)
    return code, output[-3000:], time.monotonic() - t0


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def correctness(evidence: Evidence, budget: Budget) -> None:
    """pytest over the GPU tests and the kernels' numerics; each outcome lands as it ends."""
    # no empty entry: it would put the working directory (and the repository's daguerre/
    # folder, which is not the package) on sys.path
    paths = [str(BENCHMARKS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "GPU_CHECK_JSON": str(evidence.path), "PYTHONPATH": os.pathsep.join(paths)}
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "gpu_check_plugin", "-p",
           "no:cacheprovider", "tests/gpu", "tests/cpu/test_attention.py"]  # fmt: skip
    code, output, seconds = run(cmd, budget, env)
    evidence.data = read_json(evidence.path) or evidence.data  # the plugin added the tests
    summary = re.findall(r"^[= ]*(\d+ (?:passed|failed|skipped|error).*?) in [\d.]+s", output, re.M)
    evidence.add("correctness_summary", {"exit_code": code, "seconds": round(seconds, 1),
                                         "summary": summary[-1] if summary else None,
                                         "cut_off": code is None,
                                         **({"output_tail": output} if code != 0 else {})})  # fmt: skip


def case(evidence: Evidence, budget: Budget, stage: str, item: dict, cmd: list[str],
         path: Path, keep) -> None:  # fmt: skip
    """One case into `stage`: skipped once the budget is spent; else its exit code and time,
    and what `keep` takes from the JSON it wrote (its output's tail where it wrote none)."""
    if budget.left() <= 0:
        evidence.add(stage, {**item, "skipped": "the budget was spent"})
        return
    code, output, seconds = run(cmd, budget)
    item.update(exit_code=code, seconds=round(seconds, 1), cut_off=code is None)
    report = read_json(path)
    item.update(keep(report) if report is not None else {"output_tail": output})
    evidence.add(stage, item)


def throughput(evidence: Evidence, budget: Budget, cases: list[tuple], cuda: bool) -> None:
    """One `daguerre bench` process per case, so each result lands as it ends."""
    out = evidence.path.parent / "throughput"
    for name, model, size, steps, batches, unet, attention, hot_path in cases:
        item = {"case": name, "model": model, "size": size, "steps": steps,
                "unet_backend": unet, "attention_backend": attention, "hot_path": hot_path}  # fmt: skip
        if not cuda:  # exercise the machinery on a small stand-in
            model, size, steps, batches = (STAND_IN[k] for k in ("model", "size", "steps",
                                                                 "batch_sizes"))  # fmt: skip
            item.update(stand_in=STAND_IN)
        if unet == "compile":
            item["compile_mode"] = COMPILE_MODE
        path = out / f"{re.sub(r'[^a-z0-9]+', '_', name)}.json"
        cmd = [sys.executable, str(BENCHMARKS / "throughput.py"), "--model", model, "--size",
               size, "--steps", str(steps), "--batch-sizes", batches, "--backends", unet,
               "--attention-backends", attention, "--hot-path", hot_path, "--repeats", "3",
               "--compile-mode", COMPILE_MODE, "--json", str(path)]  # fmt: skip
        case(evidence, budget, "throughput", item, cmd, path,
             lambda r: {k: r.get(k) for k in ("images_per_s", "mfu", "results", "notes")})  # fmt: skip


def fast_paths(evidence: Evidence, budget: Budget, cuda: bool) -> None:
    """benchmarks/fast_paths.py: step caching, int8/fp8 and the hot path against the
    default: images/s and the mean abs pixel difference on the same seeds."""
    for name, args in FAST_PATHS if cuda else [STAND_IN_FAST]:
        path = evidence.path.parent / f"fast_paths_{re.sub(r'[^a-z0-9]+', '_', name)}.json"
        cmd = [sys.executable, str(BENCHMARKS / "fast_paths.py"), *args, "--json", str(path)]
        case(evidence, budget, "fast_paths", {"case": name, "stand_in": not cuda}, cmd, path,
             lambda r: {"results": r.get("results")})  # fmt: skip


def attention(evidence: Evidence, budget: Budget) -> None:
    path = evidence.path.parent / "attention.json"
    cmd = [sys.executable, str(BENCHMARKS / "attention.py"), "--json", str(path)]
    case(evidence, budget, "attention", {}, cmd, path, lambda r: r)


def plot(evidence: Evidence) -> None:
    """images/s per throughput case and batch size (a PNG beside the JSON)."""
    try:
        import matplotlib
    except ImportError:
        evidence.data["plot"] = "matplotlib is not installed: no PNG"
        evidence.write()
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for item in evidence.data["stages"].get("throughput", []):
        points = [(r["batch_size"], r["images_per_s"]) for r in item.get("results") or []
                  if "images_per_s" in r]  # fmt: skip
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=item["case"])
    ax.set_xlabel("engine batch size")
    ax.set_ylabel("images/s")
    ax.set_title(f"{evidence.data['device']} ({evidence.data['date']})", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(evidence.path.with_suffix(".png"), dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which no new case starts (default 420)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    budget = Budget(args.budget)
    info = header(args)
    stamp = info["date"][:10]
    device = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    evidence = Evidence(args.out / f"gpu_check_{stamp}_{device}.json", info)
    print(f"gpu_check: {info['device']}, budget {args.budget:.0f} s -> {evidence.path}")
    correctness(evidence, budget)
    stand_ins = 2  # without CUDA: the first two cases of a list run on the tiny stand-in
    throughput(evidence, budget, BASELINE if cuda else BASELINE[:stand_ins], cuda)
    attention(evidence, budget)
    fast_paths(evidence, budget, cuda)
    throughput(evidence, budget, OTHERS if cuda else OTHERS[:stand_ins], cuda)
    if not cuda:  # recorded, never silently dropped
        for case in BASELINE[stand_ins:] + OTHERS[stand_ins:]:
            evidence.add(
                "throughput", {"case": case[0], "skipped": "needs a CUDA GPU (no stand-in)"}
            )
    evidence.data["seconds"] = round(time.monotonic() - budget.start, 1)
    evidence.write()
    plot(evidence)
    _print_summary(evidence)
    return 0


def _print_summary(evidence: Evidence) -> None:
    stages = evidence.data["stages"]
    tests = stages.get("correctness", [])
    outcomes = {
        o: sum(1 for t in tests if t["outcome"] == o) for o in ("passed", "failed", "skipped")
    }
    print(f"correctness: {outcomes}")
    for item in stages.get("throughput", []):
        figure = item.get("images_per_s")
        shown = f"{figure:.3f} images/s" if figure else item.get("skipped") or "no figure"
        stand_in = " (stand-in: {model} {size}, {steps} steps)".format(**item["stand_in"]) \
            if "stand_in" in item else ""  # fmt: skip
        print(f"throughput {item['case']}{stand_in}: {shown}")
    print(f"wrote {evidence.path}")


if __name__ == "__main__":
    sys.exit(main())
