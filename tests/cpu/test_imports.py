"""The public light modules stay light, and the import root is `daguerre` alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "diffusers", "transformers")


def _run(code: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def test_light_modules_import_no_heavy_packages():
    code = (
        "import sys\n"
        "import daguerre.pipeline.schema, daguerre.pipeline.config, daguerre.pipeline.manifest\n"
        "import daguerre.pipeline.catalog, daguerre.pipeline.lease, daguerre.pipeline.report\n"
        "import daguerre.cluster.cli, daguerre.cluster.api, daguerre.cluster.plan\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert _run(code).strip() == "[]"


def _resolves_into_repo(name: str) -> bool:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    places = [spec.origin or "", *(spec.submodule_search_locations or [])]
    return any(str(REPO) in str(p) for p in places)


def test_kernels_is_not_importable_from_the_repository():
    # Hugging Face ships a top-level `kernels` package that diffusers/transformers probe;
    # ours exists only as daguerre.kernels (run tests with `pytest`, not `python -m pytest`).
    for name in ("kernels", "pipeline", "cluster"):
        assert not _resolves_into_repo(name), f"`import {name}` resolves into the repository"


def test_kernels_is_not_importable_for_an_installed_user():
    code = (
        "import importlib.util\n"
        "for name in ('kernels', 'pipeline', 'cluster'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    places = [spec.origin or '', *(spec.submodule_search_locations or [])] if spec else []\n"
        f"    print(name, any({str(REPO)!r} in str(p) for p in places))\n"
    )
    out = _run(code, cwd=Path("/"))
    assert "True" not in out, out


def test_subpackages_map_to_the_top_level_folders():
    import daguerre.cluster
    import daguerre.kernels
    import daguerre.pipeline

    assert Path(daguerre.pipeline.__file__).parent == REPO / "pipeline"
    assert Path(daguerre.kernels.__file__).parent == REPO / "kernels"
    assert Path(daguerre.cluster.__file__).parent == REPO / "cluster"


LAYERS = {"cluster": 2, "pipeline": 1, "kernels": 0}


def test_layers_only_import_downwards():
    """cluster -> pipeline -> kernels, never back up (relative imports, as DESIGN.md asks)."""
    import ast

    wrong = []
    for folder, level in LAYERS.items():
        for path in (REPO / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level == 0 and (node.module or "").startswith("daguerre."):
                    target = node.module.split(".")[1]
                elif node.level == 2:
                    target = (node.module or "").split(".")[0]
                else:
                    continue
                if LAYERS.get(target, -1) > level:
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    assert not wrong, wrong
