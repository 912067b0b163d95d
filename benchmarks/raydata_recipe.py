"""The Ray Data recipe a competent user writes: read_binary_files -> map_batches(detector actor class)
-> write_parquet, with the same interpreter and preprocessing. Actors take 0.5 CPU each (one per core)
so the read tasks keep a CPU share: a pool that holds every CPU starves them and hangs on 2 CPUs."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402


class DetectBatch:
    def __init__(self, model: str):
        from batch_detect.model.detector import Detector
        from batch_detect.model.interpreter import load_backend, read_model

        self.det = Detector(load_backend(), read_model(model), num_threads=1, score_threshold=0.5,
                            resize="stretch", normalization="auto", max_pixels=10**9)

    def __call__(self, batch):
        import time

        uris, counts, done = [], [], []
        for path, data in zip(batch["path"], batch["bytes"]):
            r = self.det.process(path, data)
            uris.append(path)
            counts.append(len(r.detections.scores) if hasattr(r, "detections") else -1)
            done.append(time.time())  # each image's own completion: the steady-state rate is read from these
        return {"uri": uris, "num_detections": counts, "t": done}


def main() -> None:
    model, listing, out = sys.argv[1:4]
    ray.init(include_dashboard=False, configure_logging=False)
    paths = open(listing).read().split()
    cores = int(ray.cluster_resources()["CPU"])
    ds = ray.data.read_binary_files(paths, include_paths=True)
    ds = ds.map_batches(DetectBatch, fn_constructor_args=(model,), batch_size=16, num_cpus=0.5, concurrency=cores)
    ds.write_parquet(out)
    print(f"ray data: {len(paths)} images")


if __name__ == "__main__":
    main()
