"""Manifests: reading one (Parquet, or CSV / JSON Lines with the manifest's columns) and
building one from prompts (a .txt or a templated .csv) x seeds.

Light to import: pyarrow and the schema only.
"""

from __future__ import annotations

import csv
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import first_line
from .schema import manifest_schema, validate_request
from .storage import Storage

if TYPE_CHECKING:
    from .config import StorageConfig


class ManifestBuildError(ValueError):
    """Prompts that cannot become a manifest; the message names the line and the problem."""


class ManifestError(ValueError):
    """A manifest the job cannot read at all (not Parquet, required columns missing, ...)."""


@dataclass
class ManifestInfo:
    """What the driver learns of a manifest before starting any actor."""

    uri: str
    rows: int
    columns: list[str]
    files: list[str]  # the Parquet files (filesystem paths); none for a parsed table
    table: Any = None  # a CSV / JSON Lines manifest, parsed (it is written as Parquet to run)


TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")
PROMPT_SUFFIXES = (".txt",)


def inspect_manifest(uri: str, storage_config: StorageConfig | None = None) -> ManifestInfo:
    """Check that `uri` is a readable manifest with the required columns; read its ids.

    Parquet (a file or a folder of them) is read where it lies; a .csv or .jsonl file with
    the manifest's columns is parsed here."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    storage = Storage(uri, storage_config)
    if storage.is_local and not storage.fs.exists(storage.root):
        raise ManifestError(f"{uri}: no such file or folder")
    storage.check_readable()  # credentials, bucket, endpoint: one line naming the cause
    suffix = Path(uri).suffix.lower()
    if suffix in PROMPT_SUFFIXES:
        raise ManifestError(
            f"{uri}: a prompt list, not a manifest; build one first: "
            f"daguerre manifest {uri} -o manifest.parquet"
        )
    table = _read_table_manifest(uri, storage) if suffix in TABLE_SUFFIXES else None
    try:
        if table is not None:
            schema = table.schema
        else:
            dataset = pads.dataset(
                storage.root, format="parquet", filesystem=storage.fs, ignore_prefixes=[".", "_"]
            )
            if not dataset.files:
                raise ManifestError(f"{uri}: no Parquet files in this folder")
            schema = dataset.schema
    except ManifestError:
        raise
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{uri}: not a Parquet manifest ({first_line(exc)})") from None
    columns = list(schema.names)
    _check_columns(uri, columns)
    if table is not None:
        return ManifestInfo(uri=uri, rows=table.num_rows, columns=columns, files=[], table=table)
    # Row counts come from the Parquet footers: no id is read here (cluster/planning.py
    # finds duplicates block by block).
    return ManifestInfo(uri=uri, rows=dataset.count_rows(), columns=columns,
                        files=list(dataset.files))  # fmt: skip


def _check_columns(uri: str, columns: list[str]) -> None:
    known = manifest_schema().names
    missing = [c for c in ("id", "prompt") if c not in columns]
    if missing:
        hint = ""
        if Path(uri).suffix.lower() == ".csv":
            hint = "; for a CSV of template fields use daguerre manifest --template"
        raise ManifestError(
            f"{uri}: missing required column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (has: {', '.join(columns) or 'no columns'}){hint}"
        )
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise ManifestError(
            f"{uri}: unknown column{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(known: {', '.join(known)}; put free fields in the 'metadata' map column)"
        )


def _read_table_manifest(uri: str, storage: Storage) -> Any:
    """A .csv or .jsonl manifest as an Arrow table typed like the manifest schema."""
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    data = storage.fs.cat_file(storage.root)
    types = {f.name: f.type for f in manifest_schema()}
    try:
        if uri.lower().endswith(".csv"):
            scalar = {k: v for k, v in types.items() if not pa.types.is_map(v)}
            options = pacsv.ConvertOptions(column_types=scalar, strings_can_be_null=True)
            return pacsv.read_csv(io.BytesIO(data), convert_options=options)
        lines = data.strip()
        if uri.lower().endswith(".json") and lines.startswith(b"["):
            raise ManifestError(f"{uri}: a JSON array; write one JSON object per line (.jsonl)")
        schema = pa.schema([pa.field(n, t) for n, t in types.items() if not pa.types.is_map(t)])
        options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
        table = pajson.read_json(io.BytesIO(data), parse_options=options)
        if "metadata" in table.column_names:  # a JSON object becomes a struct: make it a map
            table = _struct_to_map(table)
        return table
    except ManifestError:
        raise
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise ManifestError(f"{uri}: cannot be read as a manifest ({first_line(exc)})") from None


def _struct_to_map(table: Any) -> Any:
    import pyarrow as pa

    values = [
        None if v is None else [(str(k), None if x is None else str(x)) for k, x in v.items()]
        for v in table.column("metadata").to_pylist()
    ]
    index = table.schema.get_field_index("metadata")
    return table.set_column(
        index, "metadata", pa.array(values, type=pa.map_(pa.string(), pa.string()))
    )


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
    images: dict[str, str] | None = None,
    manifest_dir: Path | None = None,
) -> Any:
    """A manifest table: one row per (prompt row, seed), ids `<stem>-<row>-s<seed>` (seeds
    zero-padded to one width, so ids sort by seed).

    With a template (`"a photo of {product}, {style}"`) each prompt is filled from the
    row's fields; the row's fields are also kept in the image's `metadata`. `images` maps
    `init_image` / `mask_image` to the CSV column naming each row's file: a path relative
    to the CSV is rewritten relative to `manifest_dir` (where the manifest is written, which
    the job reads relative paths from); URIs stay as they are."""
    import pyarrow as pa

    rows = read_prompt_rows(source)
    if not rows:
        raise ManifestBuildError(f"{source}: no prompts found")
    fields = [f for _, f, _, _ in string.Formatter().parse(template or "") if f]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem).strip("-.") or "prompt"
    digits = max(3, len(str(seed_base + seeds - 1)))  # -s007 sorts before -s010
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
        files = _image_columns(row, images or {}, source, manifest_dir, line)
        for seed in range(seed_base, seed_base + seeds):
            request = {
                **(defaults or {}),
                **files,
                "id": f"{stem}-{line:05d}-s{seed:0{digits}d}",
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


def _image_columns(row: dict[str, str], images: dict[str, str], source: Path,
                   manifest_dir: Path | None, line: int) -> dict[str, str]:  # fmt: skip
    """{init_image / mask_image: the row's file, as the manifest names it}."""
    out = {}
    for field, column in images.items():
        if column not in row:
            raise ManifestBuildError(f"{source}: --{field.replace('_', '-')}-column {column!r} "
                                     f"is not a column ({', '.join(row)})")  # fmt: skip
        value = (row[column] or "").strip()
        if not value:
            raise ManifestBuildError(f"{source}: row {line}: column {column!r} is empty")
        if "://" not in value and not Path(value).is_absolute():
            where = (source.parent / value).resolve()
            value = os.path.relpath(where, (manifest_dir or Path.cwd()).resolve())
        out[field] = value
    return out


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
