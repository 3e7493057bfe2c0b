"""The pinned packages the GPU check carries to a bare GPU machine (`make gpu-wheels`).

The lent GPU machines have torch, Triton, NumPy, Pillow, ONNX Runtime and a few more (see
GPU_MACHINE_HAS), but not diffusers, pydantic or this project. The check runs at the engine
level (no Ray, which alone is larger than what may travel), so what it needs is the
engine's own stack: diffusers, transformers and the Hugging Face libraries, pydantic,
PyYAML, fsspec and the CLIP vocabulary's wheel, at exactly the versions installed here (the
versions the tests pass with), minus what the machine has.

    python benchmarks/gpu_wheels.py          # prints one `name==version` a line
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

# What the engine-level check imports (their requirements are followed from here).
ROOTS = ["diffusers", "transformers", "pydantic", "pyyaml", "fsspec", "matplotlib", "torchao"]
# Installed here with --no-deps (its own requirements would replace torch); only its
# bundled CLIP vocabulary is used.
NO_DEPS = ["open_clip_torch"]
# Present on the lent GPU machines (../shared/FACTS.md) with binaries built against their
# torch and CUDA: never carried, so the machine's own builds stay.
GPU_MACHINE_HAS = {
    "torch", "triton", "numpy", "pillow", "onnx", "onnxruntime", "pyarrow", "peft", "accelerate",
    "pytest", "hypothesis", "prometheus-client", "rich", "jinja2", "markupsafe", "sympy",
    "mpmath", "networkx", "setuptools", "psutil", "protobuf", "ml-dtypes",
}  # fmt: skip


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(name: str) -> list[str]:
    """The names `name` requires on this platform (extras not asked for are left out)."""
    out = []
    for spec in metadata.requires(name) or []:
        requirement, _, marker = spec.partition(";")
        if "extra" in marker:
            continue
        if marker.strip() and not _marker_holds(marker):
            continue
        out.append(re.split(r"[\s<>=!~\[(]", requirement.strip(), maxsplit=1)[0])
    return out


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker.strip()).evaluate({"python_version": "3.12", "platform_machine": "x86_64"})


def closure() -> dict[str, str]:
    """canonical name -> installed version, for the roots and everything they require."""
    pins: dict[str, str] = {}
    todo = list(ROOTS)
    while todo:
        name = canonical(todo.pop())
        if name in pins or name in GPU_MACHINE_HAS:
            continue
        pins[name] = metadata.version(name)
        todo.extend(requirements(name))
    for name in NO_DEPS:
        pins[canonical(name)] = metadata.version(name)
    return dict(sorted(pins.items()))


def main() -> int:
    for name, version in closure().items():
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
