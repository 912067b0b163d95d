"""Run by test_nodes.py in its own process: a 3-node Ray cluster on this machine (head without CPUs,
two 2-CPU workers), the job on it, and optionally one worker node removed mid-run."""

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from batch_detect.config import RunConfig  # noqa: E402
from batch_detect.run.pipeline import run  # noqa: E402
from helpers import committed_count, shard_events  # noqa: E402


def main() -> None:
    model, images, out, mode = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    remove, join, hetero = mode == "remove", mode == "join", mode == "hetero"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cpus = [1] if join else [1, 3] if hetero else [2, 2]
    workers = [cluster.add_node(num_cpus=n) for n in cpus]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    result: dict = {}
    # remove: a fixed pool of 2 (one per node); join: an automatic pool that must grow
    cfg = RunConfig(model=model, input=images, output=out, shard_size=8, num_actors=2 if remove else None)
    thread = threading.Thread(target=lambda: result.update(manifest=run(cfg).manifest))
    thread.start()
    removed_at = None
    if remove:
        # Both actors must have worked (one per node) before one node goes: on a loaded machine the second
        # can take a while to start, and a node removed before would test nothing.
        while thread.is_alive() and (committed_count(out) < 3
                                     or len({ev.get("node_id") for ev in shard_events(out)}) < 2):
            time.sleep(0.05)
        removed_at = committed_count(out)
        cluster.remove_node(workers[1], allow_graceful=False)
    if join:
        while thread.is_alive() and committed_count(out) < 1:
            time.sleep(0.05)
        removed_at = committed_count(out)
        workers.append(cluster.add_node(num_cpus=1))
    thread.join(600)
    shard_nodes = {}
    for ev in shard_events(out):
        shard_nodes[ev.get("node_id")] = shard_nodes.get(ev.get("node_id"), 0) + 1
    print("RESULT " + json.dumps({"manifest": result.get("manifest"), "worker_nodes": [n.node_id for n in workers],
                                  "removed_at": removed_at, "shards_per_node": shard_nodes}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
