"""`daguerre generate --address` on a 3-node `ray.cluster_utils.Cluster`, one worker node
killed mid-job.

Run as a script by tests/cpu/test_faults.py (a process of its own, so its cluster never
meets the test session's Ray). S3 comes from the standard AWS environment variables.
Prints one line `RESULT <json>`: what was killed and the job summary.

    python tests/cpu/cluster_job.py MANIFEST OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main(manifest: str, out: str) -> int:
    import ray
    from daguerre.pipeline.storage import METADATA, Storage
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "temp_dir": tempfile.mkdtemp(prefix="rc", dir="/tmp")},
    )
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    # The job as a user runs it against an existing cluster: `daguerre generate --address`.
    job_yaml = Path(tempfile.mkdtemp(prefix="job")) / "job.yaml"
    job_yaml.write_text(
        "batch_size: 2\nmin_actors: 2\nmax_actors: 2\n"
        "actor_num_cpus: 1.5  # at most one engine actor per worker node: the pool spans both\n"
        "wait_for_min_actors_s: 120\n"
        "engine: {model: tiny, device: cpu, torch_threads: 1}\n"
    )
    exe = Path(sys.executable).with_name("daguerre")
    driver = subprocess.Popen(
        [str(exe), "generate", manifest, "--out", out, "--config", str(job_yaml),
         "--address", cluster.address, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    # Kill a worker node that has written images, as soon as some have been written.
    storage = Storage(out)
    killed = None
    deadline = time.time() + 240
    while killed is None and driver.poll() is None and time.time() < deadline:
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
    output, _ = driver.communicate(timeout=600)
    runs = sorted(storage.fs.find(storage.path("runs")))
    summary = json.loads(storage.fs.cat_file(runs[-1])) if driver.returncode == 0 else None
    print("RESULT " + json.dumps({
        "killed": killed,
        "nodes_with_images": sorted(set(
            storage.read_table(METADATA, columns=["node_id"]).column("node_id").to_pylist()
        )),
        "summary": summary,
        "driver_output_tail": output[-3000:],
    }), flush=True)  # fmt: skip
    ray.shutdown()
    cluster.shutdown()
    return 0 if summary is not None else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
