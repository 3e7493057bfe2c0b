"""The engine-level half of `daguerre bench`: images/s, seconds per image, UNet calls/s and
image-steps/s, peak memory and model FLOP utilisation of the engine alone, per backend and
batch size.
(cluster/bench.py is the command: it adds the same workload through the batch job or
Serve as a ratio to the engine alone.)

MFU = FLOPs done / time / peak. FLOPs are counted once per model and shape with
torch.utils.flop_counter on the actual UNet (CFG-doubled batch, every step) and VAE
decoder; the peak is measured in the same run by a large matmul in the same dtype, and
reported beside the result (on a CPU both are CPU figures). Where the model beats that
peak (MFU above 100%, common on CPUs with small models) the row says mfu_reliable: false and
the report carries a note. benchmarks/throughput.py is this same code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from .config import ConfigError
from .models import SDXL_TIME_IDS
from .tokenizer import TEXT_MAX_LENGTH


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: {text!r} is not WIDTHxHEIGHT such as 512x512") from None
    if width % 8 or height % 8 or min(width, height) < 8:
        raise ConfigError(f"--size: {text!r}: width and height must be multiples of 8")
    return width, height


def _unet_flops(
    model: Any, latent_h: int, latent_w: int, batch: int, device: Any, dtype: Any
) -> float:
    """FLOPs of one UNet forward of `model` at a latent size and batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = model.unet
    sample = torch.zeros(
        batch, unet.config.in_channels, latent_h, latent_w, device=device, dtype=dtype
    )
    text = torch.zeros(batch, TEXT_MAX_LENGTH, unet.config.cross_attention_dim, device=device,
                       dtype=dtype)  # fmt: skip
    added = None
    if model.is_sdxl:
        pooled = model.text_encoder_2.config.projection_dim
        added = {"text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
                 "time_ids": torch.zeros(batch, SDXL_TIME_IDS, device=device, dtype=dtype)}  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(10, device=device), encoder_hidden_states=text,
             added_cond_kwargs=added)  # fmt: skip
    return float(counter.get_total_flops())


def count_flops(spec: str, model: Any, width: int, height: int, steps: int) -> dict[str, float]:
    """FLOPs of one image: `steps` denoising steps (a CFG-doubled UNet or SD3 forward, one
    FLUX forward each) plus one VAE decode.

    Counted on the meta device (shapes only: instant, no memory): a preset as built, a
    folder model as an empty copy of its modules (its real weights on a CPU would run
    torch's CPU flash attention, which the FLOP counter does not count)."""
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .model_build import build_preset
    from .models import get_preset, preset_names

    if spec in preset_names():
        model = build_preset(get_preset(spec), meta=True)
    else:
        model = dataclasses.replace(
            model, vae=_meta_copy(model.vae),
            **{name: _meta_copy(getattr(model, name)) for name in ("unet", "transformer")
               if getattr(model, name) is not None},
        )  # fmt: skip
    meta = torch.device("meta")
    step_flops = denoiser_step_flops(model, width, height)
    h, w = height // model.vae_scale_factor, width // model.vae_scale_factor
    latents = torch.zeros(1, model.vae.config.latent_channels, h, w, device=meta)
    with torch.no_grad(), FlopCounterMode(display=False) as vae_counter:
        model.vae.decode(latents)
    vae_flops = float(vae_counter.get_total_flops())
    flops = {"denoiser_step": step_flops, "vae_decode": vae_flops,
             "per_image": steps * step_flops + vae_flops}  # fmt: skip
    if model.family == "unet":
        flops["unet_forward_cfg"] = step_flops
    return flops


def _meta_copy(module: Any) -> Any:
    """An empty (meta-device) module of the same class and config."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return type(module).from_config(module.config).eval()


def denoiser_step_flops(model: Any, width: int, height: int) -> float:
    """FLOPs of one denoising step of a meta-device model at an image size: the
    CFG-doubled UNet or SD3 forward (batch 2), FLUX's single forward (batch 1)."""
    import torch

    meta = torch.device("meta")
    factor = model.vae_scale_factor
    if model.family == "unet":
        return _unet_flops(model, height // factor, width // factor, 2, meta, torch.float32)
    return _transformer_flops(model, width, height, batch=None)


def _transformer_flops(model: Any, width: int, height: int, batch: int | None) -> float:
    """FLOPs of one transformer forward of a meta-device model on `batch` rows (None: a
    denoising step's, 2 with CFG, else 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..kernels.transformer import TransformerRunner
    from .dit import dit_denoiser

    eager = TransformerRunner(model.transformer)
    denoiser = dit_denoiser(model, torch.device("meta"), torch.float32, eager)
    rows = batch if batch is not None else (2 if denoiser.cfg else 1)
    inputs = denoiser.forward_inputs(rows, width, height)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.transformer(**inputs, return_dict=False)
    return float(counter.get_total_flops())


def transformer_forward_flops(spec: str, width: int, height: int, batch: int = 1) -> float:
    """FLOPs of one transformer forward of a preset on `batch` rows (meta device)."""
    from .model_build import build_preset
    from .models import get_preset

    return _transformer_flops(build_preset(get_preset(spec), meta=True), width, height, batch)


def unet_forward_flops(spec: str, latent: int, batch: int = 1) -> float:
    """FLOPs of one UNet forward of a preset at a square latent size (meta device)."""
    import torch

    from .model_build import build_preset
    from .models import get_preset

    model = build_preset(get_preset(spec), meta=True)
    return _unet_flops(model, latent, latent, batch, torch.device("meta"), torch.float32)


def peak_flops(device: Any, dtype: Any, seconds: float = 1.0) -> float:
    """Measured matmul FLOP/s on `device` in `dtype` (the MFU denominator)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        runs += 1
    sync()
    return 2 * n**3 * runs / (time.perf_counter() - t0)


def measured_rates(batch: int, steps: int, repeats: int, seconds: float,
                   flops_per_image: float, peak: float) -> dict[str, Any]:  # fmt: skip
    """The figures of one timed point: `repeats` generations of `batch` images in `seconds`.

    unet_calls_per_s counts UNet forwards (each one CFG-doubled, over the whole batch), so
    it falls as the batch grows; denoise_steps_per_s counts image-steps and grows with it.
    mfu_reliable is False when the MFU exceeds 1: the matmul peak measured is then below
    what the model reached, and the MFU says nothing about this device."""
    images = batch * repeats
    images_per_s = images / seconds
    mfu = flops_per_image * images_per_s / peak
    return {
        "images_per_s": images_per_s,
        "s_per_image": seconds / images,
        "unet_calls_per_s": steps * repeats / seconds,
        "denoise_steps_per_s": batch * steps * repeats / seconds,
        "achieved_tflops": flops_per_image * images_per_s / 1e12,
        "mfu": mfu,
        "mfu_reliable": mfu <= 1.0,
    }


def mfu_notes(results: list[dict[str, Any]], peak: float) -> list[str]:
    """The explanation owed when any measured row's MFU is above 100%."""
    over = [r for r in results if "mfu" in r and not r["mfu_reliable"]]
    if not over:
        return []
    reached = max(r["achieved_tflops"] for r in over)
    return [f"MFU above 100%: the measured matmul peak ({peak / 1e12:.3g} TFLOP/s) is below "
            f"what the model reached ({reached:.3g} TFLOP/s); treat MFU as unreliable on this "
            "device"]  # fmt: skip


def _requests(batch: int, steps: int, width: int, height: int) -> list[Any]:
    from .schema import ImageRequest

    return [ImageRequest(id=f"b{i}", prompt=f"a benchmark photo {i}", seed=i, steps=steps,
                         width=width, height=height) for i in range(batch)]  # fmt: skip


def _time_point(engine: Any, requests: list[Any], repeats: int, device: Any) -> dict[str, Any]:
    """Warm-up once (compiles, exports, autotunes), then `repeats` timed generations."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    engine.generate(requests)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        engine.generate(requests)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        memory_mb, kind = torch.cuda.max_memory_allocated(device) / 2**20, "device"
    else:
        memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kind = "host RSS (process peak)"
    return {"warmup_s": warmup_s, "seconds": seconds, "peak_memory_mb": memory_mb,
            "memory_kind": kind}  # fmt: skip


def bench_engine(args: argparse.Namespace) -> dict[str, Any]:
    """Every (unet backend, attention backend, batch size): the engine alone."""
    from ..kernels.unet import BackendUnavailable
    from .config import EngineConfig
    from .engine import DiffusionEngine, resolve_device, resolve_dtype
    from .models import load_model

    width, height = args.size
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    components = load_model(args.model, device=device, dtype=dtype)
    flops = count_flops(args.model, components, width, height, args.steps)
    peak = peak_flops(device, dtype)
    results = []
    points = [(u, a, b) for u in args.backends for a in args.attention_backends
              for b in args.batch_sizes]  # fmt: skip
    for unet_backend, attention, batch in points:
        config = EngineConfig(model=args.model, device=str(device), dtype=args.dtype,
                              unet_backend=unet_backend, attention_backend=attention,
                              max_batch_size=batch,
                              quantize=getattr(args, "quantize", "none"),
                              compile_mode=getattr(args, "compile_mode", "auto"),
                              **dict.fromkeys(getattr(args, "hot_path", []), True))  # fmt: skip
        row: dict[str, Any] = {"unet_backend": unet_backend, "attention_backend": attention,
                               "batch_size": batch}  # fmt: skip
        results.append(row)
        try:
            engine = DiffusionEngine(config, components)
        except BackendUnavailable as exc:
            row["skipped"] = str(exc)
            print(f"{unet_backend}/{attention} batch {batch}: skipped ({exc})")
            continue
        timed = _time_point(engine, _requests(batch, args.steps, width, height), args.repeats,
                            device)  # fmt: skip
        seconds = timed.pop("seconds")
        row.update(attention_ran=engine.backend["attention"], warmup_s=timed["warmup_s"],
                   **measured_rates(batch, args.steps, args.repeats, seconds,
                                    flops["per_image"], peak),
                   peak_memory_mb=timed["peak_memory_mb"], memory_kind=timed["memory_kind"])  # fmt: skip
        print(f"{unet_backend}/{engine.backend['attention']} batch {batch}: "
              f"{row['images_per_s']:.3f} images/s, MFU {row['mfu']:.1%}"
              f"{'' if row['mfu_reliable'] else ' (peak unreliable)'}")  # fmt: skip
    return {"results": results, "flops": flops, "peak_flops": peak,
            "notes": mfu_notes(results, peak),
            "device": str(device), "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip


def bench_cache(model: str) -> Path:
    """Where the last `daguerre bench` result for `model` is kept on this machine."""
    from ..kernels.unet import cache_root

    return cache_root() / "bench" / f"{Path(model.rstrip('/')).name}.json"


def last_bench(model: str) -> dict[str, Any] | None:
    """The last `daguerre bench` result for `model` on this machine, or None."""
    try:
        return json.loads(bench_cache(model).read_text())
    except (OSError, ValueError):
        return None


def fastest_unet_backend(
    model: str, device: Any, allowed: tuple[str, ...] | None = None
) -> tuple[str, str]:
    """`unet_backend: auto`: (backend, why). On a GPU, the UNet backend with the most
    images/s in the last `daguerre bench` of this model on this very device (name and
    all); eager when there is none. On a CPU always eager (a CPU is for tests and demos)."""
    import torch

    if device.type != "cuda":
        return "eager", "auto on a CPU is eager"
    bench = last_bench(model) or {}
    here = f"cuda: {torch.cuda.get_device_name(device)}"
    conditions = bench.get("conditions", {})
    if conditions.get("device") != here:
        return "eager", f"no daguerre bench result for {model} on {here}: eager"
    if conditions.get("quantize", "none") != "none" or conditions.get("hot_path"):
        return (
            "eager",
            f"the last daguerre bench of {model} ran a quantized or hot-path UNet: eager",
        )
    measured = [r for r in bench.get("results", []) if r.get("images_per_s")
                and (allowed is None or r["unet_backend"] in allowed)]  # fmt: skip
    if not measured:
        return "eager", f"the last daguerre bench of {model} measured nothing: eager"
    best = max(measured, key=lambda r: r["images_per_s"])
    return best["unet_backend"], (f"fastest in the last daguerre bench of {model} on {here} "
                                  f"({best['images_per_s']:.2f} images/s at batch "
                                  f"{best['batch_size']})")  # fmt: skip


def environment() -> dict[str, Any]:
    """Date, device, driver, library versions and git commit of this run (every benchmark's)."""
    import datetime as dt
    import platform

    import torch

    from .environment import git_commit, software_versions

    if torch.cuda.is_available():
        device, cuda = f"cuda: {torch.cuda.get_device_name()}", torch.version.cuda
    else:
        device, cuda = (
            f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            None,
        )
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cuda": cuda,
        "torch_threads": torch.get_num_threads(),
        "versions": software_versions(),
        "git_commit": git_commit(),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lines: dict[str, list] = {}
    for row in report["results"]:
        if "images_per_s" in row:
            lines.setdefault(f"{row['unet_backend']}/{row['attention_ran']}", []).append(row)
    for name, rows in lines.items():
        batches = [r["batch_size"] for r in rows]
        left.plot(batches, [r["images_per_s"] for r in rows], "o-", label=name)
        right.plot(batches, [100 * r["mfu"] for r in rows], "o-", label=name)
    for ax, label in ((left, "images/s"), (right, "MFU (%)")):
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        if lines:
            ax.legend(fontsize=8)
    c = report["conditions"]
    fig.suptitle(f"{c['model']} {c['size']} x{c['steps']} steps, {c['dtype']}, {c['device']} "
                 f"(peak {report['peak_tflops']:.2f} TFLOP/s measured)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
