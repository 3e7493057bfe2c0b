"""A job on a 3-node `ray.cluster_utils.Cluster` with one worker node killed mid-job.

Run as a script by tests/cpu/test_faults.py (a process of its own, so its cluster never
meets the test session's Ray). S3 comes from the standard AWS environment variables.
Prints one line `RESULT <json>`: what was killed and the job summary.

    python tests/cpu/cluster_job.py MANIFEST OUT
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main(manifest: str, out: str) -> int:
    import ray
    from daguerre.pipeline.config import EngineConfig, JobConfig
    from daguerre.pipeline.job import run_job
    from daguerre.pipeline.storage import METADATA, Storage
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "temp_dir": tempfile.mkdtemp(prefix="rc", dir="/tmp")},
    )
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    config = JobConfig(
        engine=EngineConfig(model="tiny", device="cpu", torch_threads=1),
        batch_size=2,
        min_actors=2,
        max_actors=2,
        actor_num_cpus=1.5,  # at most one engine actor per worker node: the pool spans both
        wait_for_min_actors_s=120,
    )
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(summary=run_job(manifest, out, config, progress=False))
    )
    thread.start()

    # Kill a worker node that has written images, as soon as some have been written.
    storage = Storage(out)
    killed = None
    deadline = time.time() + 240
    while killed is None and thread.is_alive() and time.time() < deadline:
        time.sleep(0.5)
        table = storage.read_table(METADATA, columns=["node_id"])
        if table is None or table.num_rows < 4:
            continue
        busy = set(table.column("node_id").to_pylist())
        victim = next((w for w in workers if w.node_id in busy), None)
        if victim is not None:
            done_before = table.num_rows
            cluster.remove_node(victim, allow_graceful=False)
            killed = {"node_id": victim.node_id, "images_before_kill": done_before}
    thread.join(timeout=600)
    summary = result.get("summary")
    print("RESULT " + json.dumps({
        "killed": killed,
        "nodes_with_images": sorted(set(
            storage.read_table(METADATA, columns=["node_id"]).column("node_id").to_pylist()
        )),
        "summary": None if summary is None else json.loads(summary.to_json()),
    }), flush=True)  # fmt: skip
    ray.shutdown()
    cluster.shutdown()
    return 0 if summary is not None else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
