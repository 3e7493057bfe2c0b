"""Compaction: many small metadata (and errors) fragments merged into few large Parquet files.

A job writes one fragment per engine batch: a million images at batch 8 is 125,000 objects,
and every resume and report would list and open them all. Compaction rewrites the small
fragments of a table as files of about `target_bytes`, in bounded memory (one output file
at a time), and keeps every reader exactly-once at every moment:

  1. a journal `<table>/_compaction.json` names the sources and the outputs;
  2. the outputs are written whole (`compact-<digest of the sources>-<n>.parquet`), then
     the journal is marked committed;
  3. the sources are deleted, then the journal.

A reader that lists before step 3 sees a row twice (a source and an output) and keeps one
(pipeline/catalog.py keeps one row per id); one that lists during step 3 and finds a source
gone lists again (Storage.read_table); after step 3 it sees the outputs alone. Never zero,
never two. A compaction that dies is finished by the next one: a committed journal's
sources are deleted, an uncommitted one's outputs. Each step that changes what readers
see first checks `fence` (the output's lease), so a compaction whose lease was taken over
stops before it commits or deletes. Rows superseded within one output file are dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .catalog import fragment_sizes, latest_rows
from .schema import error_schema, record_schema
from .storage import ERRORS, METADATA, Storage, StorageError

JOURNAL = "_compaction.json"
DEFAULT_TARGET_BYTES = 128 * 2**20


@dataclass
class CompactionResult:
    """What one table's compaction did."""

    table: str
    sources: int = 0  # fragments merged (and removed)
    outputs: int = 0  # files written
    rows_in: int = 0
    rows_out: int = 0  # fewer when rows superseded within an output were dropped
    files_after: int = 0


def compact_output(storage: Storage, target_bytes: int = DEFAULT_TARGET_BYTES,
                   fence: Callable[[], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Compact the metadata and errors tables of an output; what each compaction did.
    `fence` raises when this writer no longer holds the output (its lease was taken over):
    it is called before every step that changes what readers see."""
    return {
        name: asdict(compact_table(storage, name, target_bytes, fence))
        for name in (METADATA, ERRORS)
    }


def compact_table(storage: Storage, table: str, target_bytes: int,
                  fence: Callable[[], None] | None = None) -> CompactionResult:  # fmt: skip
    """Merge the fragments of `table` smaller than half the target into files of about
    `target_bytes` (see the module's steps)."""
    fence = fence or (lambda: None)
    result = CompactionResult(table=table)
    _finish_journal(storage, table, fence)
    sizes = _fragment_keys(storage, table)
    sources = sorted(k for k, size in sizes.items() if size < target_bytes / 2)
    if len(sources) < 2:
        result.files_after = len(sizes)
        return result
    groups = _groups(sources, sizes, target_bytes)
    digest = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]
    outputs = [f"{table}/compact-{digest}-{i:05d}.parquet" for i in range(len(groups))]
    journal = {"sources": sources, "outputs": outputs, "committed": False}
    fence()
    storage.write_bytes(f"{table}/{JOURNAL}", json.dumps(journal).encode())  # 1.
    schema = record_schema() if table == METADATA else error_schema()
    for group, key in zip(groups, outputs, strict=True):  # 2.
        rows = _read_group(storage, group, schema)
        result.rows_in += rows.num_rows
        merged = _merged(rows, table)
        result.rows_out += merged.num_rows
        storage.write_table(key, merged)
    fence()  # a writer that lost the output commits nothing: a new holder rolls it back
    journal["committed"] = True
    storage.write_bytes(f"{table}/{JOURNAL}", json.dumps(journal).encode())
    _finish_journal(storage, table, fence)  # 3.
    result.sources, result.outputs = len(sources), len(outputs)
    result.files_after = len(sizes) - len(sources) + len(outputs)
    return result


def _fragment_keys(storage: Storage, table: str) -> dict[str, int]:
    """Keys (relative to the output, as the journal keeps them) and sizes of the fragments."""
    root = storage.root.rstrip("/") + "/"
    return {path.removeprefix(root): size for path, size in fragment_sizes(storage, table).items()}


def _groups(sources: list[str], sizes: dict[str, int], target_bytes: int) -> list[list[str]]:
    """Consecutive sources whose sizes add up to about the target."""
    groups: list[list[str]] = [[]]
    total = 0
    for key in sources:
        if groups[-1] and total + sizes[key] > target_bytes:
            groups.append([])
            total = 0
        groups[-1].append(key)
        total += sizes[key]
    return groups


def _read_group(storage: Storage, keys: list[str], schema: Any) -> Any:
    import pyarrow.dataset as pads

    paths = [storage.path(k) for k in keys]
    dataset = pads.dataset(paths, format="parquet", filesystem=storage.fs, schema=schema)
    return dataset.to_table(columns=[*schema.names, "__filename"])


def _merged(rows: Any, table: str) -> Any:
    """One output file's rows: for metadata, one row per id (the reader's choice); for
    errors, every row (superseding errors needs the finished ids: the readers do it)."""
    if table == METADATA:
        rows = latest_rows(rows)
    return rows.drop_columns(["__filename"]).sort_by([("id", "ascending")])


def _finish_journal(storage: Storage, table: str, fence: Callable[[], None]) -> None:
    """Complete a compaction whose journal is still there: a committed one (all its outputs
    written) by deleting its sources; an uncommitted one (it died or lost the output while
    writing) by deleting its outputs, whose rows its sources still hold."""
    found = storage.read_versioned(f"{table}/{JOURNAL}")
    if found is None:
        return
    journal = json.loads(found[0])
    if journal.get("committed"):
        missing = [k for k in journal["outputs"] if not storage.fs.exists(storage.path(k))]
        if missing or not journal["outputs"]:  # never delete the only copy of a row
            raise StorageError(f"{storage.url(table)}: compaction journal names outputs that "
                               f"are gone ({', '.join(missing[:3])}); sources kept")  # fmt: skip
        fence()
        storage.delete_many(journal["sources"])
    else:
        fence()
        storage.delete_many(journal["outputs"])
    storage.delete(f"{table}/{JOURNAL}")
