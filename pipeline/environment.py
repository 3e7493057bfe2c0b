"""Where and with what a run happens: library versions, the checkout's commit, the host.

Written next to every result (run records, benchmark JSON). Light: versions come from the
installed distributions' metadata, nothing heavy is imported.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("daguerre", "torch", "diffusers", "transformers", "ray", "onnxruntime", "triton",
            "xformers", "tensorrt")  # fmt: skip


@functools.cache  # fixed for the life of a process; run records are rewritten often
def software_versions() -> dict[str, str]:
    """Python and the installed versions of the packages daguerre runs on (absent ones left out)."""
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


@functools.cache  # fixed for the life of a process; run records are rewritten often
def git_commit() -> str:
    """The short commit of the checkout daguerre runs from; for an installed wheel or a copy
    without .git, DAGUERRE_GIT_COMMIT where the launcher set it, else ''."""
    if os.environ.get("DAGUERRE_GIT_COMMIT"):
        return os.environ["DAGUERRE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


@functools.cache  # fixed for the life of a process; run records are rewritten often
def host() -> dict[str, Any]:
    """This machine: name, platform, CPU count."""
    return {"name": socket.gethostname(), "platform": platform.platform(),
            "cpus": os.cpu_count()}  # fmt: skip
