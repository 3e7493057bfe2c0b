"""What tests/cpu/test_fleet.py asks of its Ray cluster, from a process of its own (the test
session has its own local Ray, so it never joins this one):

    python tests/cpu/fleet_tool.py watch ADDRESS APP DEPLOYMENT FILE   replica counts, 2 per second
    python tests/cpu/fleet_tool.py kill-replica ADDRESS APP DEPLOYMENT  kill one replica actor
    python tests/cpu/fleet_tool.py free-cpus ADDRESS                    available CPUs, as JSON
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


def main(command: str, address: str, *rest: str) -> int:
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    if command == "watch":
        app, deployment, path = rest
        with open(path, "a", buffering=1) as out:
            while True:
                out.write(f"{time.time():.2f} {replicas(app, deployment)}\n")
                time.sleep(0.5)
    if command == "kill-replica":
        app, deployment = rest
        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(prefix)]  # fmt: skip
        actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
        ray.kill(actor, no_restart=True)
        print(json.dumps({"killed": names[0]["name"]}))
        return 0
    if command == "free-cpus":
        print(json.dumps(ray.available_resources().get("CPU", 0)))
        return 0
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
