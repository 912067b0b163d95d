"""Run by test_nodes.py in its own process: a 3-node Ray cluster on this machine (head without CPUs,
two 2-CPU workers), the job on it, and optionally one worker node removed mid-run."""

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from batch_detect.config import RunConfig  # noqa: E402
from batch_detect.pipeline import run  # noqa: E402


def main() -> None:
    model, images, out, remove = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "remove"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    result: dict = {}
    cfg = RunConfig(model=model, input=images, output=out, shard_size=8, num_actors=2)
    thread = threading.Thread(target=lambda: result.update(manifest=run(cfg).manifest))
    thread.start()
    removed_at = None
    if remove:
        shard_dir = os.path.join(out, "_shards")
        while thread.is_alive() and (not os.path.isdir(shard_dir) or len(os.listdir(shard_dir)) < 3):
            time.sleep(0.02)
        removed_at = len(os.listdir(shard_dir)) if os.path.isdir(shard_dir) else 0
        cluster.remove_node(workers[1], allow_graceful=False)
    thread.join(600)
    nodes = {n.node_id for n in workers}
    print("RESULT " + json.dumps({"manifest": result.get("manifest"), "worker_nodes": sorted(nodes),
                      "removed_at": removed_at}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
