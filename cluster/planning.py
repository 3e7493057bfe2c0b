"""A job's id sets, built without holding the manifest in the driver.

Before any row is generated a job needs (1) the ids that appear more than once in the
manifest, (2) the ids already finished under its output, with what made them, and (3)
which of those a rerun must make again (another model, other request fields) or is
refused for. Each is an `IdIndex` (pipeline/id_index.py) built block by block:

    manifest ids ──digests per block──► one merge ──► duplicates
    metadata (6 columns) ──latest row per id──► finished (fingerprint, same model)
    manifest rows x finished ──validate finished rows only──► redo, skip, counts

A small manifest is planned here, in the driver (no Ray needed, same functions); a big one
(over `plan_in_driver_rows`) through Ray Data: blocks mapped across the cluster, merged in
one Ray task, the indexes left in the object store; the driver gets counts, a few example
ids and object refs. The job's read stage then maps the indexes (zero-copy) to drop
finished rows and reject duplicated ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..pipeline.catalog import metadata_files
from ..pipeline.id_index import DIGEST, IdIndex, from_arrow, id_digests, repeated, to_arrow
from ..pipeline.schema import ImageRequest, RequestLimits, validate_request
from ..pipeline.storage import Storage

FINISHED_COLUMNS = ["id", "run_id", "created_at", "model", "weights_hash", "request_fingerprint"]
FINISHED_VALUE = np.dtype([("fingerprint", DIGEST), ("same_model", "?")])
EXAMPLES = 3
MANY_FILES = 1000  # above this many files, a distributed read goes by Ray tasks over chunks
FILES_PER_TASK = 2000


@dataclass
class ResumeFindings:
    """What the manifest finds already finished under the output."""

    finished: int = 0  # manifest ids with a metadata row
    other_model: int = 0  # ... made with other weights
    changed: int = 0  # ... made from other request fields
    other_models: dict[str, str] = field(default_factory=dict)  # weights hash -> model
    examples: list[str] = field(default_factory=list)  # ids of changed rows

    def merge(self, other: ResumeFindings) -> ResumeFindings:
        return ResumeFindings(
            self.finished + other.finished, self.other_model + other.other_model,
            self.changed + other.changed, {**self.other_models, **other.other_models},
            (self.examples + other.examples)[:EXAMPLES],
        )  # fmt: skip


# -- block functions (pure: run in the driver or in Ray Data tasks) ----------------------
# Each takes an Arrow block and returns an Arrow table (digests as fixed_size_binary(16));
# each merge takes the list of those tables.


def digest_block(batch: Any) -> Any:
    """A manifest block's id digests."""
    import pyarrow as pa

    return pa.table({"digest": to_arrow(id_digests(batch.column("id")))})


def merge_duplicates(tables: list[Any]) -> IdIndex:
    return repeated(_cat(tables, "digest"))


def finished_block(batch: Any, asked_hash: str) -> Any:
    """A metadata block as (digest, fingerprint digest, same model, order, other model):
    `order` sorts a later run's row (then a later created_at) last."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fingerprints = id_digests(pc.fill_null(batch.column("request_fingerprint"), ""))
    same = pc.fill_null(pc.equal(batch.column("weights_hash"), asked_hash), False)
    created = pc.fill_null(pc.cast(batch.column("created_at"), pa.string()), "")
    order = pc.binary_join_element_wise(pc.fill_null(batch.column("run_id"), ""), created, "|")
    other = pc.if_else(same, pa.scalar(None, pa.string()), pc.binary_join_element_wise(
        pc.fill_null(batch.column("weights_hash"), ""), pc.fill_null(batch.column("model"), ""),
        "\x1f"))  # fmt: skip
    return pa.table({"digest": to_arrow(id_digests(batch.column("id"))),
                     "fingerprint": to_arrow(fingerprints), "same_model": same, "order": order,
                     "other": other})  # fmt: skip


def merge_finished(tables: list[Any]) -> tuple[IdIndex, dict[str, str]]:
    """The finished index (latest row per id) and the other models met (weights -> name)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = [t for t in tables if t.num_rows]
    if not tables:
        return IdIndex.empty(), {}
    table = pa.concat_tables(tables)
    table = table.take(pc.sort_indices(table, [("order", "descending")]))  # latest first
    values = np.empty(table.num_rows, dtype=FINISHED_VALUE)
    values["fingerprint"] = from_arrow(table["fingerprint"])
    values["same_model"] = np.asarray(table["same_model"])
    index = IdIndex.build(from_arrow(table["digest"]), values)
    others = pc.unique(table["other"].drop_null()).to_pylist()
    return index, dict(o.split("\x1f", 1) for o in others)


def resume_block(batch: Any, finished: IdIndex, limits: dict[str, Any], default_side: int,
                 rules: dict[str, Any] | None = None,
                 composite: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """A manifest block checked against the finished index: one row per digest to make again
    (other model, other request fields: the prompt rules' style counts), then one row with
    the block's findings (JSON)."""
    import pyarrow as pa

    from ..pipeline.composite import CompositeConfig, LayersStamp
    from ..pipeline.rules import PromptRules, apply_rules

    digests = id_digests(batch.column("id"))
    found, at = finished.positions(digests)
    findings = ResumeFindings(finished=int(found.sum()))
    redo: list[bytes] = []
    if findings.finished:
        values = finished.values[at]
        limits_model, rules_model = RequestLimits(**limits), PromptRules(**(rules or {}))
        stamp = LayersStamp(CompositeConfig(**(composite or {})))
        rows = batch.take(pa.array(np.flatnonzero(found))).to_pylist()
        for row, digest, value in zip(rows, digests[found], values[found], strict=True):
            if not value["same_model"]:
                findings.other_model += 1
                redo.append(digest)
                continue
            request = validate_request(row, limits_model)
            if isinstance(request, ImageRequest):
                request = apply_rules(request, rules_model)
            if not isinstance(request, ImageRequest):
                continue  # an invalid row is recorded as such, finished or not
            size = request.resolved_size(default_side)
            asked = id_digests([request.fingerprint(*size, stamp(request))])[0]
            if asked != value["fingerprint"]:
                findings.changed += 1
                findings.examples = (findings.examples + [request.id])[:EXAMPLES]
                redo.append(digest)
    digest_column = pa.concat_arrays([to_arrow(np.array(redo, dtype=DIGEST)),
                                      pa.nulls(1, pa.binary(16))])  # fmt: skip
    findings_column = pa.array([None] * len(redo) + [json.dumps(asdict(findings))], pa.string())
    return pa.table({"digest": digest_column, "findings": findings_column})


def merge_resume(finished: IdIndex, tables: list[Any]) -> tuple[IdIndex, ResumeFindings]:
    """(skip, findings): skip holds the finished ids that stay as they are (the others are
    made again)."""
    findings = ResumeFindings()
    for table in tables:
        for text in table["findings"].drop_null().to_pylist():
            findings = findings.merge(ResumeFindings(**json.loads(text)))
    redo = IdIndex.build(_cat(tables, "digest"))
    keep = ~redo.contains(finished.digests) if len(redo) else np.ones(len(finished), bool)
    return IdIndex(finished.digests[keep]), findings


# -- running them ------------------------------------------------------------------------


@dataclass
class IdSets:
    """What planning leaves for the job: indexes (or object refs to them) and counts."""

    duplicates: Any  # IdIndex or ObjectRef
    skip: Any  # IdIndex or ObjectRef: finished ids that stay as they are
    duplicate_ids: int = 0
    findings: ResumeFindings = field(default_factory=ResumeFindings)
    distributed: bool = False

    @property
    def skipped(self) -> int:
        return self.findings.finished - self.findings.other_model - self.findings.changed

    @property
    def redone(self) -> int:
        return self.findings.other_model + self.findings.changed


def plan_id_sets(manifest: Any, output: Storage, asked_hash: str, limits: dict[str, Any],
                 default_side: int, distributed: bool, rules: dict[str, Any] | None = None,
                 composite: dict[str, Any] | None = None) -> IdSets:  # fmt: skip
    """Duplicates, finished ids and what a rerun would make again, for `manifest` (a
    `ParquetSource`) against `output`."""
    runner = _RayRunner() if distributed else _LocalRunner()
    duplicates = runner.map_merge(manifest.batches(["id"]), digest_block, merge_duplicates)
    sets = IdSets(duplicates=duplicates, skip=IdIndex.empty(), distributed=distributed)
    sets.duplicate_ids = runner.size(duplicates)
    finished, others = _finished_index(runner, output, asked_hash, distributed)
    if finished is None:
        return sets
    skip, findings = runner.resume(manifest.batches(None), finished, limits, default_side, rules,
                                   composite)  # fmt: skip
    findings.other_models = runner.get(others)
    sets.skip, sets.findings = skip, findings
    return sets


def _finished_index(runner: Any, output: Storage, asked_hash: str, distributed: bool) -> tuple:
    """(finished index, other models) of the output's metadata, or (None, None) without any;
    a fragment that vanishes while it is read (compaction replaced it) makes it list again."""
    from ..pipeline.schema import record_schema
    from ..pipeline.storage import READ_RELISTS, vanished

    for attempt in range(READ_RELISTS):
        files = metadata_files(output)
        if not files:
            return None, None
        source = ParquetSource(output, files, distributed=distributed, schema=record_schema())
        try:
            return runner.map_merge(source.batches(FINISHED_COLUMNS),
                                    lambda b: finished_block(b, asked_hash), merge_finished,
                                    returns=2)  # fmt: skip
        except Exception as exc:  # a Ray task's error wraps the vanished file's
            if attempt == READ_RELISTS - 1 or not vanished(exc):
                raise
    return None, None


def _length(index: IdIndex) -> int:
    return len(index)


def _cat(tables: list[Any], key: str) -> np.ndarray:
    return np.concatenate([from_arrow(t[key]) for t in tables] or [np.empty(0, DIGEST)])


class _LocalRunner:
    """Runs the block functions in this process."""

    def map_merge(self, batches: Any, block_fn: Any, merge_fn: Any, returns: int = 1) -> Any:
        return merge_fn([block_fn(b) for b in batches])

    def resume(self, batches: Any, finished: IdIndex, limits: dict, side: int,
               rules: dict | None = None, composite: dict | None = None) -> tuple:  # fmt: skip
        return merge_resume(finished, [resume_block(b, finished, limits, side, rules, composite)
                                       for b in batches])  # fmt: skip

    def size(self, index: IdIndex) -> int:
        return len(index)

    def get(self, value: Any) -> Any:
        return value


class _RayRunner:
    """Runs the block functions as Ray Data map_batches, merges in one Ray task; indexes
    stay in the object store."""

    def _tables(self, dataset: Any, block_fn: Any, **fn_kwargs: Any) -> list[Any]:
        if isinstance(dataset, _FileChunks):  # many small files: Ray tasks over chunks
            import ray

            task = ray.remote(num_cpus=0.5)(_chunk_task)
            return [task.remote(dataset.storage, chunk, dataset.columns, dataset.schema,
                                block_fn, fn_kwargs) for chunk in dataset.chunks()]  # fmt: skip
        mapped = dataset.map_batches(block_fn, fn_kwargs=fn_kwargs or None,
                                     batch_format="pyarrow", batch_size=None)  # fmt: skip
        return mapped.to_arrow_refs()

    def map_merge(self, dataset: Any, block_fn: Any, merge_fn: Any, returns: int = 1) -> Any:
        """A ref to merge_fn's result (a tuple of refs when it returns `returns` values)."""
        import ray

        task = ray.remote(num_returns=returns)(_merge_task)
        refs = task.remote(merge_fn, *self._tables(dataset, block_fn))
        return tuple(refs) if returns > 1 else refs

    def resume(self, dataset: Any, finished: Any, limits: dict, side: int,
               rules: dict | None = None, composite: dict | None = None) -> tuple:  # fmt: skip
        import ray

        tables = self._tables(dataset, _resume_task, finished_ref=finished, limits=limits,
                              side=side, rules=rules, composite=composite)  # fmt: skip
        merge = ray.remote(num_returns=2)(_merge_resume_task)
        skip, findings = merge.remote(finished, *tables)
        return skip, ray.get(findings)

    def size(self, ref: Any) -> int:
        import ray

        return ray.get(ray.remote(_length).remote(ref))

    def get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref)


class _FileChunks:
    """Many small Parquet files (an uncompacted output's fragments), read by Ray tasks in
    chunks of FILES_PER_TASK with pyarrow's threads: Ray Data lists and opens each file
    as its own unit, minutes for 100,000 fragments."""

    def __init__(self, storage: Storage, files: list[str], columns: list[str] | None,
                 schema: Any = None):  # fmt: skip
        self.storage, self.files, self.columns, self.schema = storage, files, columns, schema

    def chunks(self) -> list[list[str]]:
        return [self.files[i : i + FILES_PER_TASK]
                for i in range(0, len(self.files), FILES_PER_TASK)]  # fmt: skip


def _chunk_task(storage: Storage, files: list[str], columns: list[str] | None, schema: Any,
                block_fn: Any, fn_kwargs: dict[str, Any]) -> Any:  # fmt: skip
    import pyarrow as pa

    source = ParquetSource(storage, files, schema=schema)
    tables = [block_fn(pa.Table.from_batches([batch]), **fn_kwargs)
              for batch in source.batches(columns)]  # fmt: skip
    return pa.concat_tables(tables) if tables else None


def _merge_task(merge_fn: Any, *tables: Any) -> Any:
    return merge_fn([t for t in tables if t is not None])


def _resume_task(batch: Any, finished_ref: Any, limits: dict, side: int,
                 rules: dict | None = None, composite: dict | None = None) -> Any:  # fmt: skip
    import ray

    return resume_block(batch, ray.get(finished_ref), limits, side, rules, composite)


def _merge_resume_task(finished: IdIndex, *tables: Any) -> tuple:
    return merge_resume(finished, [t for t in tables if t is not None])


class ParquetSource:
    """Parquet files (or an in-memory table) a planning pass reads in blocks: in this
    process as pyarrow batches, or as a Ray Data dataset when Ray runs the pass."""

    def __init__(self, storage: Storage | None, files: list[str] | None, table: Any = None,
                 distributed: bool = False, schema: Any = None):  # fmt: skip
        self.storage, self.files, self.table, self.distributed = storage, files, table, distributed
        self.schema = schema  # metadata: the record schema (older fragments lack new columns)

    def batches(self, columns: list[str] | None) -> Any:
        if self.distributed:
            return self._dataset(columns)
        return self._local(columns)

    def _local(self, columns: list[str] | None) -> Any:
        import pyarrow.dataset as pads

        if self.table is not None:
            table = self.table.select(columns) if columns else self.table
            yield from table.to_batches(max_chunksize=65536)
            return
        dataset = pads.dataset(self.files, format="parquet", filesystem=self.storage.fs,
                               schema=self.schema)  # fmt: skip
        yield from dataset.to_batches(columns=columns, batch_size=65536)

    def _dataset(self, columns: list[str] | None) -> Any:
        import ray

        if self.table is None and len(self.files) > MANY_FILES:
            return _FileChunks(self.storage, self.files, columns, self.schema)
        if self.table is not None:
            ds = ray.data.from_arrow(self.table)
            return ds.select_columns(columns) if columns else ds
        fs = None if self.storage.is_local else self.storage.fs
        return ray.data.read_parquet(self.files, columns=columns, filesystem=fs, schema=self.schema)
