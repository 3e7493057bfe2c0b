"""What mixing LoRA adapters in one engine batch costs, against what bucketing by adapter
would cost: one workload of `--batch-size` requests cycling through no adapter, adapter A,
adapter B at 0.7 and A at 0.5, measured in one run, the engine alone (no Ray):

  plain       the same requests without adapters (the floor)
  one adapter every request with adapter A (one shared adapter: no routing per sample)
  mixed       the workload as one engine batch (what daguerre does)
  bucketed    the workload as one engine call per (adapter, scale), in turn (what a
              server running different adapters or scales in separate batches does)

The adapters are random (peft, every attention projection of the UNet, rank 4 and 2).

    python benchmarks/lora_mix.py --json benchmarks/results/lora_mix_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from _common import environment, time_call, write_result

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_adapter(model: str, folder: Path, seed: int, rank: int) -> str:
    """A random LoRA for `model`'s UNet saved in diffusers' format under `folder`."""
    import torch
    from daguerre.pipeline.models import get_preset
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel(**get_preset(model).unet)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                        init_lora_weights="gaussian")  # fmt: skip
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict())  # fmt: skip
    return str(folder)


def workloads(args: argparse.Namespace, a: str, b: str) -> dict[str, list[list]]:
    """Name -> the engine calls it makes (each a list of requests)."""
    from daguerre.pipeline.schema import ImageRequest

    cycle = [(None, 1.0), (a, 1.0), (b, 0.7), (a, 0.5)]

    def request(i: int, lora: str | None, scale: float) -> ImageRequest:
        return ImageRequest(id=f"r{i}", prompt=f"a product photo, style {i}", seed=i,
                            steps=args.steps, width=args.size, height=args.size, lora=lora,
                            lora_scale=scale)  # fmt: skip

    mixed = [request(i, *cycle[i % len(cycle)]) for i in range(args.batch_size)]
    buckets: dict[tuple, list] = {}
    for r in mixed:
        buckets.setdefault((r.lora, r.lora_scale), []).append(r)
    return {
        "plain": [[request(i, None, 1.0) for i in range(args.batch_size)]],
        "one adapter": [[request(i, a, 1.0) for i in range(args.batch_size)]],
        "mixed": [mixed],
        "bucketed": list(buckets.values()),
    }


def measure(args: argparse.Namespace) -> dict:
    import tempfile

    import torch
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="lora-mix-"))
    a = make_adapter(args.model, folder / "a", seed=1, rank=4)
    b = make_adapter(args.model, folder / "b", seed=2, rank=2)
    engine = DiffusionEngine(EngineConfig(model=args.model, device="cpu",
                                          max_batch_size=args.batch_size,
                                          torch_threads=args.threads))  # fmt: skip
    seconds = {}
    for name, calls in workloads(args, a, b).items():
        seconds[name] = time_call(lambda calls=calls: [engine.generate(c) for c in calls],
                                  warmup=1, repeats=args.repeats)  # fmt: skip
        print(f"{name:12s} {seconds[name]:.3f} s ({len(calls)} engine calls)", file=sys.stderr)
    return {
        "benchmark": "lora_mix", "environment": environment(), "model": args.model,
        "size": args.size, "steps": args.steps, "batch_size": args.batch_size,
        "threads": args.threads, "repeats": args.repeats, "seconds": seconds,
        "mixed_over_one_adapter": seconds["mixed"] / seconds["one adapter"],
        "mixed_over_plain": seconds["mixed"] / seconds["plain"],
        "bucketed_over_mixed": seconds["bucketed"] / seconds["mixed"],
        "note": "ratios from one run on this machine; CPU (no GPU was lent); the tiny preset "
        "is mostly per-layer overhead, so the routing's share is larger than on a real UNet",
    }  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["seconds"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, [result["seconds"][n] for n in names], color=["#999", "#69c", "#2a7", "#c63"])
    ax.set_ylabel("seconds per workload (median)")
    ax.set_title(f"LoRA mixing, {result['model']} {result['size']}px, {result['steps']} steps, "
                 f"batch {result['batch_size']}: bucketed / mixed = "
                 f"{result['bucketed_over_mixed']:.2f}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/lora_mix_cpu.json"))
    args = parser.parse_args()
    write_result(measure(args), args.json, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
