"""What an output prefix holds, one row per id, whatever its fragments hold.

Fragments can carry more than one row for an id: a rerun with `--overwrite`, a batch
retried with other batch-mates, the workers of a killed driver finishing a batch. Every
reader here keeps one row per id by construction: the row of the latest run (run ids
sort by start time), then the latest `created_at`, then the first fragment name, so two
readers always agree. Errors are superseded the same way: an id's errors count only
from the latest run that recorded any, and not at all once the id has an image.

`prune_superseded` rewrites the fragments that hold superseded rows without them (each
fragment atomically), so plain Parquet readers see one row per id too; the job runs it
at its end, under its lease.
"""

from __future__ import annotations

import posixpath
from typing import Any

from .schema import error_schema, record_schema
from .storage import ERRORS, METADATA, Storage

_ORDER = ["run_id", "created_at"]  # later wins


def _first_per_id(table: Any) -> Any:
    """Rows of `table` (sorted by id, then preference) where the id changes: one per id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = table.column("id")
    if len(ids) == 0:
        return table
    previous = pa.concat_arrays([pa.array([None], pa.string()), ids.combine_chunks()[:-1]])
    keep = pc.fill_null(pc.not_equal(ids, previous), True)
    return table.filter(keep)


def latest_rows(table: Any) -> Any:
    """One row per id: latest run, then latest created_at, then the first fragment name."""
    order = [("id", "ascending"), *((c, "descending") for c in _ORDER)]
    if "__filename" in table.column_names:
        order.append(("__filename", "ascending"))
    return _first_per_id(table.sort_by(order))


def fragment_sizes(storage: Storage, prefix: str) -> dict[str, int]:
    """The Parquet fragments under `prefix` (paths) and their sizes, from one listing;
    names starting with '.' or '_' (partial writes, journals) are skipped."""
    try:
        found = storage.fs.find(storage.path(prefix), detail=True)
    except FileNotFoundError:
        return {}
    return {
        path: int(info.get("size") or 0)
        for path, info in sorted(found.items())
        if path.endswith(".parquet") and not posixpath.basename(path).startswith((".", "_"))
    }  # fmt: skip


def metadata_files(storage: Storage) -> list[str]:
    """The metadata fragments' paths, sorted."""
    return list(fragment_sizes(storage, METADATA))


def read_metadata(storage: Storage, columns: list[str] | None = None) -> Any:
    """The metadata table with one row per finished id (None when there is none)."""
    wanted = list(dict.fromkeys([*(columns or record_schema().names), "id", *_ORDER]))
    table = storage.read_table(METADATA, columns=[*wanted, "__filename"], schema=record_schema())
    if table is None or table.num_rows == 0:
        return None
    return latest_rows(table).select(columns or record_schema().names)


def read_errors(
    storage: Storage, finished_ids: Any = None, columns: list[str] | None = None
) -> Any:
    """Errors that still stand: per id, the rows of the latest run that recorded any, for ids
    without an image; a retried batch's repeated rows count once."""
    key = ["id", "run_id", "stage", "field", "reason", "row"]  # what tells two errors apart
    wanted = list(dict.fromkeys([*(columns or error_schema().names), *key]))
    table = storage.read_table(ERRORS, columns=[*wanted, "__filename"], schema=error_schema())
    if table is None or table.num_rows == 0:
        return None
    table = _standing_errors(table, finished_ids)
    return table.select(columns or error_schema().names)


def _standing_errors(table: Any, finished_ids: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    index = table.schema.get_field_index("run_id")
    table = table.set_column(index, "run_id", pc.fill_null(table["run_id"], ""))
    if finished_ids is not None and len(finished_ids):
        table = table.filter(pc.invert(pc.is_in(table["id"], value_set=finished_ids)))
    if table.num_rows == 0:
        return table
    latest = table.group_by("id").aggregate([("run_id", "max")])
    joined = table.join(latest, keys="id")
    table = joined.filter(pc.equal(joined["run_id"], joined["run_id_max"]))
    table = table.drop_columns(["run_id_max"])
    # A retried batch may record one error twice, in two fragments: keep the first.
    key = [c for c in ("id", "stage", "field", "reason", "row") if c in table.column_names]
    table = table.sort_by([(c, "ascending") for c in [*key, "__filename"]])
    text = [pc.fill_null(pc.cast(table[c], pa.string()), "") for c in key]
    joined_key = pc.binary_join_element_wise(*text, "\x1f").combine_chunks()
    previous = pa.concat_arrays([pa.array([None], pa.string()), joined_key[:-1]])
    return table.filter(pc.fill_null(pc.not_equal(joined_key, previous), True))


def prune_superseded(storage: Storage) -> dict[str, int]:
    """Rewrite fragments without their superseded rows; return rows dropped per table."""
    dropped = {METADATA: 0, ERRORS: 0}
    meta = storage.read_table(
        METADATA, columns=["id", *_ORDER, "__filename"], schema=record_schema()
    )
    finished_ids = None
    if meta is not None and meta.num_rows:
        winners = latest_rows(meta)
        finished_ids = winners["id"]
        dropped[METADATA] = _drop_losers(storage, meta, winners)
    errors = storage.read_table(
        ERRORS, columns=["id", "run_id", "stage", "field", "reason", "row", "__filename"],
        schema=error_schema(),
    )  # fmt: skip
    if errors is not None and errors.num_rows:
        dropped[ERRORS] = _drop_losers(storage, errors, _standing_errors(errors, finished_ids))
    return dropped


def _drop_losers(storage: Storage, rows: Any, winners: Any) -> int:
    """Rewrite each fragment holding rows that are not among `winners` (matched by fragment,
    id and run: a compacted file holds rows of several runs) without them; delete fragments
    left empty. Return the rows dropped."""
    import collections

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def keys(table: Any) -> list[str]:
        runs = pc.fill_null(table["run_id"], "").to_pylist()
        return [f"{i}\x1f{r}" for i, r in zip(table["id"].to_pylist(), runs, strict=True)]

    kept: dict[str, set[str]] = collections.defaultdict(set)
    for name, key in zip(winners["__filename"].to_pylist(), keys(winners), strict=True):
        kept[name].add(key)
    winners_per_file = collections.Counter(winners["__filename"].to_pylist())
    dropped = 0
    for name, count in collections.Counter(rows["__filename"].to_pylist()).items():
        if winners_per_file.get(name, 0) == count:
            continue
        with storage.fs.open(name, "rb") as fh:
            table = pq.read_table(fh)
        wanted = pa.array(sorted(kept.get(name, ())), type=pa.string())
        remaining = table.filter(pc.is_in(pa.array(keys(table), pa.string()), value_set=wanted))
        if remaining.num_rows == table.num_rows:
            continue
        dropped += table.num_rows - remaining.num_rows
        key = name[len(storage.root) :].lstrip("/")
        if remaining.num_rows:
            storage.write_table(key, remaining)
        else:
            storage.delete(key)
    return dropped
