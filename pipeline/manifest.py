"""Building manifests: prompts (a .txt or .csv) x seeds -> one Parquet row per image.

Light to import: pyarrow and the schema only.
"""

from __future__ import annotations

import csv
import re
import string
from pathlib import Path
from typing import Any

from daguerre.pipeline.schema import manifest_schema, validate_request


class ManifestBuildError(ValueError):
    """Prompts that cannot become a manifest; the message names the line and the problem."""


def read_prompt_rows(source: Path) -> list[dict[str, str]]:
    """Rows of template fields: a .csv's columns, or a .txt's lines as `prompt`."""
    if not source.is_file():
        raise ManifestBuildError(f"{source}: no such file")
    if source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8") as fh:
            return [dict(row) for row in csv.DictReader(fh)]
    lines = source.read_text(encoding="utf-8").splitlines()
    return [
        {"prompt": line.strip()}
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def build_manifest(
    source: Path,
    template: str | None = None,
    seeds: int = 1,
    seed_base: int = 0,
    defaults: dict[str, Any] | None = None,
) -> Any:
    """A manifest table: one row per (prompt row, seed), ids `<stem>-<row>-s<seed>`.

    With a template (`"a photo of {product}, {style}"`) each prompt is filled from the
    row's fields; the row's fields are also kept in the image's `metadata`."""
    import pyarrow as pa

    rows = read_prompt_rows(source)
    if not rows:
        raise ManifestBuildError(f"{source}: no prompts found")
    fields = [f for _, f, _, _ in string.Formatter().parse(template or "") if f]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem).strip("-.") or "prompt"
    out = []
    for line, row in enumerate(rows, start=1):
        if template:
            missing = [f for f in fields if f not in row]
            if missing:
                raise ManifestBuildError(
                    f"{source}: row {line}: template field {missing[0]!r} is not a column ({', '.join(row)})"
                )
            prompt = template.format(**row)
        elif "prompt" in row:
            prompt = row["prompt"]
        else:
            raise ManifestBuildError(
                f"{source}: no 'prompt' column and no --template (columns: {', '.join(row)})"
            )
        for seed in range(seed_base, seed_base + seeds):
            request = {
                **(defaults or {}),
                "id": f"{stem}-{line:05d}-s{seed}",
                "prompt": prompt,
                "seed": seed,
                "metadata": {k: v for k, v in row.items() if k != "prompt" and v is not None},
            }
            checked = validate_request(request)
            if isinstance(checked, list):
                reasons = "; ".join(f"{e.field}: {e.reason}" for e in checked)
                raise ManifestBuildError(f"{source}: row {line}: {reasons}")
            out.append(checked.model_dump(mode="json"))
    schema = manifest_schema()
    return pa.Table.from_pylist(out, schema=schema)


DEMO_PROMPTS = [
    "a daguerreotype of a lighthouse at dawn",
    "a studio photo of a red ceramic teapot",
    "an oil painting of a fox in the snow",
    "a watercolor map of an imaginary island",
    "a macro photo of a dew-covered leaf",
    "a neon sign reading 'open late' in the rain",
    "a pencil sketch of a sleeping cat",
    "an isometric render of a tiny greenhouse",
]


def demo_manifest() -> Any:
    """The demo's manifest: 8 valid rows (sizes, steps and schedulers mixed) and 2 invalid
    rows that land in the errors table on purpose."""
    import pyarrow as pa

    schedulers = ["ddim", "euler", "euler_a", "dpmpp_2m"]
    rows: list[dict[str, Any]] = []
    for i, prompt in enumerate(DEMO_PROMPTS):
        rows.append(
            {
                "id": f"demo-{i:02d}",
                "prompt": prompt,
                "negative_prompt": "blurry, low quality",
                "seed": 1000 + i,
                "steps": 8 if i % 2 else 12,
                "guidance_scale": 7.5,
                "width": 64 if i < 6 else 96,
                "height": 64,
                "scheduler": schedulers[i % 4],
                "metadata": {"source": "daguerre demo"},
            }
        )
    rows.append(
        {"id": "demo-bad-size", "prompt": "a bad row: width is not a multiple of 8", "width": 100}
    )
    rows.append({"id": "demo-bad-prompt", "prompt": "   "})
    return pa.Table.from_pylist(rows, schema=manifest_schema())


def write_manifest(table: Any, path: str | Path) -> Path:
    """Write a manifest table as Parquet."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
