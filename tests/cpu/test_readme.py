"""The README's quick start, run as written: every command in a block marked
`<!-- quickstart -->` runs in a fresh copy of the repository (sharing this .venv) and must
succeed without a traceback, so the README cannot drift from what works on the machine
it is measured on. `make test` is left out: it is this very suite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIPPED = {"make test"}  # this suite itself


def quickstart_blocks(readme: str) -> list[list[str]]:
    """The shell lines of every ```bash block right after a <!-- quickstart --> marker."""
    blocks = []
    for match in re.finditer(r"<!-- quickstart -->\s*```bash\n(.*?)```", readme, re.S):
        lines = []
        for line in match.group(1).splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
        blocks.append(lines)
    return blocks


def test_the_readme_has_a_quick_start():
    blocks = quickstart_blocks((REPO / "README.md").read_text())
    commands = [c for block in blocks for c in block]
    assert "make demo" in commands and "make test" in commands
    assert any(c.startswith("daguerre generate") for c in commands)


def fresh_copy(target: Path) -> Path:
    """The tracked files of this checkout (mtimes kept, so make sees its stamps as current)
    with this checkout's .venv linked in."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for name in files:
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(Path(sys.executable).parents[1])
    return target


@pytest.mark.timeout(900)
def test_quick_start_commands_run_as_written(tmp_path):
    stamps = [Path(sys.executable).parents[1] / s for s in (".daguerre-run", ".daguerre-dev")]
    if not all(s.exists() for s in stamps):
        pytest.skip("needs the venv that `make` builds (.venv with its install stamps)")
    if any(s.stat().st_mtime < (REPO / "pyproject.toml").stat().st_mtime for s in stamps):
        # make in the copy would reinstall into the shared venv, pointing it at the copy
        pytest.skip("the venv predates pyproject.toml: run `make install-dev` (make test does)")
    work = fresh_copy(tmp_path / "daguerre")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VIRTUAL_ENV"))}
    env["PATH"] = f"{work / '.venv' / 'bin'}:{env['PATH']}"
    for block in quickstart_blocks((REPO / "README.md").read_text()):
        script = "\n".join(["set -e", *(c for c in block if c not in SKIPPED)])
        result = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True,
                                text=True, timeout=800)  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{block}\n{output[-4000:]}"
        assert "Traceback" not in output, output[-4000:]
    assert len(list((work / "output" / "demo" / "images").glob("*.png"))) == 8
