"""Scale: a 10M-row manifest planned and partly run, against an output of 1M finished ids
held in 100,000 fragments, before and after compaction.

1. Builds a manifest of --rows rows (Parquet, 1M rows per file) and an output whose
   metadata holds the first --finished of them as made by `tiny` (their real request
   fingerprints), spread over --fragments fragments; no images (resume reads metadata).
2. Times the resume read alone (the finished-id index from the metadata) over the
   fragments, then `daguerre compact`, then the same read over the compacted files.
3. Runs `daguerre generate MANIFEST --out OUT --limit N --model tiny` as a subprocess,
   once on the fragments (its end compacts them) and once on the compacted output: the
   driver's own peak RSS and planning seconds (duplicates over every manifest id, the
   finished index, the resume check) from its run record, images made.
4. Times the read stage's row work alone (digests, skip filter, validation, bucket order)
   on unfinished rows: rows/s of the non-engine stage that every row passes.

    python benchmarks/scale.py --rows 10000000 --json benchmarks/results/scale_cpu.json
    python benchmarks/scale.py --rows 100000 --finished 10000 --fragments 1000 --json /tmp/s.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROWS_PER_FILE = 1_000_000


def build_manifest(folder: Path, rows: int) -> None:
    """`rows` rows in files of ROWS_PER_FILE: ids sc-00000000..., 64x64, 2 steps."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from daguerre.pipeline.schema import manifest_schema

    folder.mkdir(parents=True)
    schema = manifest_schema()
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        numbers = pa.array(np.char.zfill(np.arange(start, start + n).astype(str), 8))
        columns = {
            "id": pc.binary_join_element_wise("sc-", numbers, ""),
            "prompt": pc.binary_join_element_wise("a studio photo of product ", numbers, ""),
            "seed": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "steps": pa.array(np.full(n, 2, dtype=np.int64)),
            "width": pa.array(np.full(n, 64, dtype=np.int64)),
            "height": pa.array(np.full(n, 64, dtype=np.int64)),
        }
        table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)).cast(f.type)
                          for f in schema}, schema=schema)  # fmt: skip
        pq.write_table(table, folder / f"part-{start // ROWS_PER_FILE:04d}.parquet",
                       row_group_size=200_000)  # fmt: skip


def build_finished(out: Path, manifest: Path, finished: int, fragments: int) -> None:
    """Metadata rows for the first `finished` manifest rows, as tiny makes them, in
    `fragments` fragments of one run."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    from daguerre.pipeline.models import describe_model
    from daguerre.pipeline.outputs import new_run_id
    from daguerre.pipeline.schema import StageTimings, record_schema
    from daguerre.pipeline.storage import METADATA, Storage, fragment_key

    storage = Storage(str(out))
    storage.check_writable()
    weights = describe_model("tiny").weights_hash()
    run_id = new_run_id(kind="scale")
    now = dt.datetime.now(dt.timezone.utc)
    timings = StageTimings().model_dump()
    per = max(1, finished // fragments)
    schema = record_schema()
    batches = pads.dataset(manifest).to_batches(batch_size=per * 100)
    done = 0
    for batch in batches:  # a chunk at a time: this process stays small
        rows = batch.to_pylist()[: finished - done]
        for start in range(0, len(rows), per):
            records = [_record(row, storage, weights, run_id, now, timings)
                       for row in rows[start : start + per]]  # fmt: skip
            table = pa.Table.from_pylist(records, schema=schema)
            storage.write_table(fragment_key(METADATA, run_id, [r["id"] for r in records]), table)
        done += len(rows)
        if done >= finished:
            break


def _record(row: dict, storage, weights: str, run_id: str, now, timings: dict) -> dict:  # noqa: ANN001
    from daguerre.pipeline.schema import validate_request

    request = validate_request(row)
    return {
        **request.model_dump(exclude={"model"}), "speed": request.speed.value,
        "scheduler": request.scheduler.value, "model": "tiny",
        "uri": f"{storage.url('images')}/{request.id}.png", "sha256": "0" * 64,
        "request_fingerprint": request.fingerprint(64, 64), "weights_hash": weights,
        "scheduler_config": "{}", "backend": {}, "batch_size": 8,
        "daguerre_version": "scale", "timings": timings, "node_id": "n",
        "actor_id": "a", "run_id": run_id, "created_at": now, "status": "ok",
    }  # fmt: skip


def time_resume_read(out: Path) -> dict:
    """Seconds to build the finished-id index from the output's metadata, in one process."""
    from daguerre.cluster.planning import (
        FINISHED_COLUMNS,
        ParquetSource,
        _LocalRunner,
        finished_block,
        merge_finished,
    )  # fmt: skip
    from daguerre.pipeline.catalog import metadata_files
    from daguerre.pipeline.storage import Storage

    storage = Storage(str(out))
    t0 = time.perf_counter()
    files = metadata_files(storage)
    source = ParquetSource(storage, files).batches(FINISHED_COLUMNS)
    index, _ = _LocalRunner().map_merge(source, lambda b: finished_block(b, "w"),
                                        merge_finished)  # fmt: skip
    return {"seconds": round(time.perf_counter() - t0, 2), "fragments": len(files),
            "finished_ids": len(index)}  # fmt: skip


def run_generate(manifest: Path, out: Path, limit: int) -> dict:
    """`daguerre generate` as a subprocess: its peak RSS and its run record's figures."""
    exe = Path(sys.executable).with_name("daguerre")
    t0 = time.perf_counter()
    done = subprocess.run([str(exe), "generate", str(manifest), "--out", str(out), "--limit",
                           str(limit), "--model", "tiny"], capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"daguerre generate failed:\n{done.stderr[-3000:]}")
    record = json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())
    keys = ("generated", "skipped_done", "errors", "planning_s", "driver_peak_rss_mib",
            "startup_s", "steady_images_per_s", "engine_busy_fraction_mean", "compacted")  # fmt: skip
    return {"wall_s": round(wall, 1), **{k: record.get(k) for k in keys}}


def time_read_stage(manifest: Path, finished: int, rows: int = 100_000) -> dict:
    """Rows/s of the read stage's per-row work on unfinished rows (one process, one core)."""
    import pyarrow.dataset as pads
    from daguerre.cluster.stages import prepare_rows
    from daguerre.pipeline.id_index import IdIndex, id_digests

    table = pads.dataset(manifest).head(finished + rows).slice(finished)
    skip = IdIndex.build(id_digests([f"sc-{i:08d}" for i in range(finished)]))
    t0 = time.perf_counter()
    out = prepare_rows(table, skip, IdIndex.empty(), {}, ["tiny"], 64)
    seconds = time.perf_counter() - t0
    return {"rows": table.num_rows, "valid": out.num_rows, "seconds": round(seconds, 2),
            "rows_per_s": round(table.num_rows / seconds, 1),
            "skip_index_ids": finished}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    r = result
    bars = {"resume read\n(fragments)": r["resume_before"]["seconds"],
            "resume read\n(compacted)": r["resume_after"]["seconds"],
            "job planning\n(fragments)": r["job_before"]["planning_s"],
            "job planning\n(compacted)": r["job_after"]["planning_s"]}  # fmt: skip
    left.bar(list(bars), list(bars.values()), color=["#c44", "#4a4", "#c44", "#4a4"])
    left.axhline(30, color="gray", ls="--", label="goal: resume of 1M ids < 30 s")
    left.set_ylabel("seconds")
    left.legend(fontsize=8)
    left.tick_params(axis="x", labelsize=8)
    rss = [r["job_before"]["driver_peak_rss_mib"], r["job_after"]["driver_peak_rss_mib"]]
    right.bar(["before compaction", "after"], rss, color="#47a")
    right.axhline(1024, color="gray", ls="--", label="goal: driver < 1 GiB")
    right.set_ylabel("driver peak RSS (MiB)")
    right.legend(fontsize=8)
    c = r["conditions"]
    fig.suptitle(f"{c['rows']:,} manifest rows, {c['finished']:,} finished in "
                 f"{c['fragments']:,} fragments, --limit {c['limit']}, {c['device']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--fragments", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=64, help="rows generated per job run")
    parser.add_argument("--workdir", type=Path, help="where the manifest and output go (temp)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a --workdir's manifest and fragments from an earlier run")  # fmt: skip
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    from _common import environment, write_result

    work = Path(args.workdir or tempfile.mkdtemp(prefix="daguerre-scale-"))
    manifest, out = work / "manifest", work / "out"
    if args.reuse and manifest.exists() and (out / "metadata").exists():
        print(f"reusing the manifest and fragments under {work}")
    else:
        t0 = time.perf_counter()
        build_manifest(manifest, args.rows)
        print(f"manifest: {args.rows:,} rows in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        build_finished(out, manifest, args.finished, args.fragments)
        print(f"output: {args.finished:,} finished ids in {args.fragments:,} fragments, "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    result: dict = {"conditions": {**environment(), "rows": args.rows, "finished": args.finished,
                                   "fragments": args.fragments, "limit": args.limit}}  # fmt: skip
    result["resume_before"] = time_resume_read(out)
    print(f"resume read over fragments: {result['resume_before']}")
    result["job_before"] = run_generate(manifest, out, args.limit)  # its end compacts
    print(f"job on the fragments: {result['job_before']}")
    result["resume_after"] = time_resume_read(out)
    print(f"resume read after compaction: {result['resume_after']}")
    result["job_after"] = run_generate(manifest, out, args.limit)
    print(f"job on the compacted output: {result['job_after']}")
    result["read_stage"] = time_read_stage(manifest / "part-0000.parquet",
                                           min(args.finished, ROWS_PER_FILE // 2))  # fmt: skip
    print(f"read stage: {result['read_stage']}")
    peak = max(
        result["job_before"]["driver_peak_rss_mib"], result["job_after"]["driver_peak_rss_mib"]
    )
    result["goals"] = {
        "driver_peak_rss_mib": peak, "driver_goal_mib": 1024, "driver_met": peak < 1024,
        "resume_after_compaction_s": result["job_after"]["planning_s"], "resume_goal_s": 30,
        "resume_met": result["job_after"]["planning_s"] < 30,
    }  # fmt: skip
    print(f"goals: {result['goals']}")
    write_result(result, args.json, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
